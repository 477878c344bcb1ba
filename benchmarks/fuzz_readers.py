"""Fuzz the shard readers with a large budget: the property of tests/transforms/test_reader_fuzz.py
(read -> decode -> preprocess as the job does it; no exception escapes, every record counted
once, finite model input, deterministic reasons) on many generated inputs.

    python benchmarks/fuzz_readers.py [--examples 20000] [--seed 0]

Input i is generated from random.Random(seed * 10**9 + i), cycling through the kinds (tar,
tar.gz, png, jpg, npy, parquet) and the two preprocessing settings, so a crash is reproduced
from the printed index alone. Prints inputs tried, records read, crashes (must be 0), the time
and the peak RSS. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_reader_fuzz import KINDS, PREPS, check_input, peak_rss_mb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow warns about odd palettes; the run counts crashes
    start, records, crashes = time.perf_counter(), 0, collections.Counter()
    for i in range(args.examples):
        kind, prep = KINDS[i % len(KINDS)], PREPS[(i // len(KINDS)) % len(PREPS)]
        try:
            records += check_input(random.Random(args.seed * 10 ** 9 + i), kind, prep)
        except Exception as e:  # an escaped exception or a violated property: count, show the first
            crashes[kind] += 1
            if crashes[kind] == 1:  # the first of each kind
                print(f"crash on input {i} ({kind}):", "".join(traceback.format_exception_only(e)).strip())
    seconds = time.perf_counter() - start
    print(f"inputs tried: {args.examples}  records: {records}  crashes: {sum(crashes.values())} "
          f"{dict(crashes) or ''}  time: {seconds:.1f} s ({1000 * seconds / max(args.examples, 1):.2f} ms/input)  "
          f"peak RSS: {peak_rss_mb():.0f} MB")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
