"""Publishing under faults, kills and races, at large trial counts, on local disk and on S3 (moto).

    python benchmarks/publish_trials.py [--races 200] [--s3-races 50] [--kills 50] [--s3-kills 10]
        [--faults/--no-faults] [--s3/--no-s3] [--seed 0]

The trials of tests/transforms/test_publication.py (fault at every storage call of the publish step,
before and after its effect; SIGKILL at a random moment; two runs publishing at the same
instant), with every call swept and more tries. Prints, per place: trials, faults injected,
kills landed, mixed or lost results (the output did not read back as exactly one complete run:
must be 0), leftovers (files of other runs after a later run reclaimed) and failed exits of a
run that published.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import publish_harness  # noqa: E402
import test_publication as t  # noqa: E402
from conftest import DEMO_DATA  # noqa: E402


class Tally:
    """Counts the trials' outcomes; a failed check of the invariant is a mixed or lost result."""

    def __init__(self):
        self.counts = collections.Counter()
        self.examples: dict[str, str] = {}

    def watch(self, mp: pytest.MonkeyPatch) -> None:
        for name, kind in (("check", "mixed or lost"), ("leftovers", "leftovers")):
            mp.setattr(t, name, self._counting(getattr(publish_harness, name), kind))

    def _counting(self, fn, kind):
        def wrapped(*args, **kwargs):
            try:
                result = fn(*args, **kwargs)
            except AssertionError as e:
                self.fail(kind, e)
                raise
            if kind == "leftovers" and result:
                self.fail(kind, AssertionError(result))
            return result
        return wrapped

    def fail(self, kind: str, e: BaseException) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, f"{type(e).__name__}: {str(e)[:300]}")

    def trial(self, fn, *args):
        self.counts["trials"] += 1
        try:
            return fn(*args)
        except AssertionError as e:
            self.counts["failed trials"] += 1
            self.examples.setdefault("failed trial", f"{str(e)[:300]}")
            return None


def run_place(name: str, prepared: t.Prepared, options: dict, args, folder: Path, mp: pytest.MonkeyPatch) -> Tally:
    tally = Tally()
    tally.watch(mp)
    counter = iter(range(10**9))
    if options:
        new_output = lambda: f"s3://publish-bucket/bench-{args.seed}-{next(counter)}"  # noqa: E731
    else:
        new_output = lambda: str(folder / f"out-{next(counter)}")  # noqa: E731
    races, kills = (args.s3_races, args.s3_kills) if options else (args.races, args.kills)
    if args.faults:
        storage = publish_harness.Storage().install(mp.setattr)
        run = t.AuditRun(mp, prepared, storage)
        for after in (False, True):
            for k in range(10**6):
                tally.counts["trials"] += 1
                try:
                    tally.counts["published but reported failed"] += t.fault_trial(
                        run, prepared, new_output(), options, k, after)
                except AssertionError as e:
                    tally.counts["failed trials"] += 1
                    tally.examples.setdefault("failed trial", str(e)[:300])
                tally.counts["faults injected"] += storage.faults
                if not storage.faults:
                    break
        mp.undo()
        tally.watch(mp)
    if kills:
        delay = 0.02 if not options else 0.01
        window = t.kill_trial(prepared, new_output(), options, folder, delay, None)
        rng = __import__("random").Random(args.seed)
        for _ in range(kills):
            tally.counts["kills landed"] += tally.trial(
                t.kill_trial, prepared, new_output(), options, folder, delay, rng.uniform(0, window)) is None
    for seed in range(races):
        outcome = tally.trial(t.race_trial, prepared, new_output(), options, folder, args.seed * 100000 + seed)
        tally.counts["races"] += 1
        if outcome is not None:
            tally.counts["failed exits of a published run"] += outcome[1].count(0) != 2
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--races", type=int, default=200)
    parser.add_argument("--s3-races", type=int, default=50)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--s3-kills", type=int, default=10)
    parser.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging
    logging.getLogger("saliency_audit").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "prepared").mkdir()
        prepared = t.prepare(folder / "prepared", DEMO_DATA / "mnist-test-sample.tar",
                             ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights",
                              str(DEMO_DATA / "mnist_cnn.pt")])
        places = [("local", None)] + ([("s3 (moto)", "s3")] if args.s3 else [])
        for name, kind in places:
            started = time.monotonic()
            with pytest.MonkeyPatch.context() as env:
                with (t.moto_s3(env) if kind else _nothing()) as options:
                    with pytest.MonkeyPatch.context() as mp:
                        tally = run_place(name, prepared, options or {}, args, folder, mp)
            c = tally.counts
            print(f"{name}: {c['trials']} trials in {time.monotonic() - started:.0f} s; "
                  f"faults injected {c['faults injected']}, kills landed {c['kills landed']}, races {c['races']}; "
                  f"mixed or lost results {c['mixed or lost']}; leftovers {c['leftovers']}; "
                  f"failed exits of a published run {c['failed exits of a published run']}; "
                  f"published but reported failed {c['published but reported failed']}")
            for kind_, example in tally.examples.items():
                print(f"    first {kind_}: {example}")


class _nothing:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
