"""Peak memory of the commands that read a whole audit, at growing audit sizes (issue 23).

``saliency-audit report`` (and ``check``) must stream the audit's rows, not hold them: peak RSS
should grow by less than 20% from 60 to 1,000,000 saliency rows. Each size gets one synthetic
audit in the job's layout (``build_audit``), and each command in COMMANDS runs on it in a fresh
subprocess, whose own peak RSS (VmHWM of its interpreter, written as it exits) is the figure.

    python benchmarks/report_check_memory.py                          # 60, 150,000, 1,000,000 rows
    python benchmarks/report_check_memory.py --rows 60,2000 --commands report   # the CI smoke run

The audit: METHODS x images rows of 28 x 28 float32 maps (zero outside a central square, as a
digit's gradient x input map is on its background, so a million rows are ~100 MB on disk), 10
classes, RISE metrics, in row groups and files of the sink's sizes (saliency_audit.transforms.parquet_sink), with
summary/, errors/, a manifest.json that names them ("layout": "run-folders", "outputs", "files",
"counts") and one tar shard holding the first SHARD_IMAGES images (the others are placeholders).
Audits are built once per size under --scratch and reused when it is kept (--keep).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.transforms.io.rows import ERROR_SCHEMA, SUMMARY_SCHEMA, saliency_schema  # noqa: E402
from saliency_audit.transforms.parquet_sink import FILE_BYTES, GROUP_BYTES  # noqa: E402

ROWS = (60, 150_000, 1_000_000)
METHODS = ("sal", "grad", "intg", "occlusion")
CLASSES = 10
SIDE = 28
PATCH = 12            # maps are non-zero only in a central PATCH x PATCH square
SHARD_IMAGES = 200    # images in the audit's one shard; the report shows the others as placeholders
ERROR_EVERY = 10_000  # one unreadable record per this many images
RUN_ID = "20250101T000000-0badc0de"
GROWTH_TARGET = 0.20


@dataclasses.dataclass(frozen=True)
class Command:
    """One measured command: its saliency-audit argv for (audit, scratch folder), and the exit
    codes that mean it worked."""
    argv: Callable[[Path, Path], list[str]]
    ok: tuple[int, ...] = (0,)


def check_against_a_copy(audit: Path, scratch: Path) -> list[str]:
    """``check`` against a baseline: the audit itself under another run id (its manifest, with
    links to its folders), so every gate compares a million maps."""
    baseline = scratch / "baseline"
    if not baseline.exists():
        baseline.mkdir()
        manifest = json.loads((audit / "manifest.json").read_text())
        (baseline / "manifest.json").write_text(json.dumps({**manifest, "run_id": f"{manifest['run_id']}-copy"}))
        for name in manifest["outputs"]:
            if (audit / name).exists():
                (baseline / name).symlink_to((audit / name).resolve())
    return ["check", str(audit), "--baseline", str(baseline), "--verdict", str(scratch / "verdict.json")]


COMMANDS: dict[str, Command] = {
    "report": Command(lambda audit, scratch: ["report", str(audit), "--output", str(scratch / "report.html")]),
    # the gates alone (exit 1 when one fails is a finished check too), then against a baseline
    "check": Command(lambda audit, scratch: ["check", str(audit), "--verdict", str(scratch / "verdict.json")], (0, 1)),
    "check-baseline": Command(check_against_a_copy, (0, 1)),
}
# The child's own peak (VmHWM) as it exits: wait4's ru_maxrss also counts the parent's pages the
# child shared between fork and exec, so it read as the benchmark's own size (it builds the audits).
LAUNCH = ("import atexit, os, sys\n"
          "def peak():\n"
          "    hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
          "    open(os.environ['PEAK_FILE'], 'w').write(hwm)\n"
          "atexit.register(peak)\n"
          "from saliency_audit.pipelines.cli import main\n"
          "sys.exit(main(sys.argv[1:]))")


# ---- the synthetic audit ----

def image_id(index: int) -> str:
    return f"img-{index:07d}"


def _digit(rng: np.random.Generator) -> bytes:
    from PIL import Image
    pixels = np.zeros((SIDE, SIDE), np.uint8)
    pixels[6:22, 9:19] = rng.integers(0, 256, (16, 10), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, images: int, seed: int) -> None:
    """A WebDataset-style tar: KEY.png and KEY.cls for the first ``images`` ids."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index in range(images):
            for suffix, data in (("png", _digit(rng)), ("cls", str(index % CLASSES).encode())):
                member = tarfile.TarInfo(f"{image_id(index)}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def _maps(rng: np.random.Generator, n: int) -> pa.Array:
    maps = np.zeros((n, SIDE, SIDE), np.float32)
    start = (SIDE - PATCH) // 2
    maps[:, start:start + PATCH, start:start + PATCH] = rng.integers(-8, 9, (n, PATCH, PATCH))
    offsets = np.arange(n + 1, dtype=np.int32) * SIDE * SIDE
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(maps.reshape(-1)))


class Totals:
    """Per (method, class) sums over the rows written, for summary/."""

    SUMMED = ("score", "time_ms", "deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random",
              "gini")

    def __init__(self):
        self.count = np.zeros((len(METHODS), CLASSES))
        self.correct = np.zeros((len(METHODS), CLASSES))
        self.sums = {name: np.zeros((len(METHODS), CLASSES)) for name in self.SUMMED}

    def add(self, method: int, target: np.ndarray, label: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        self.count[method] += np.bincount(target, minlength=CLASSES)
        self.correct[method] += np.bincount(target, weights=label == target, minlength=CLASSES)
        for name in self.SUMMED:
            self.sums[name][method] += np.bincount(target, weights=columns[name], minlength=CLASSES)

    def rows(self) -> list[dict]:
        rows = []
        for m, method in enumerate(METHODS):
            for target in [None, *range(CLASSES)]:
                pick = slice(None) if target is None else target
                count = float(np.sum(self.count[m][pick]))
                row = {"method": method, "target": target, "count": int(count), "labelled": int(count),
                       "accuracy": float(np.sum(self.correct[m][pick])) / count if count else None,
                       "empty_maps": 0, "constant_maps": 0, "empty_share": 0.0, "constant_share": 0.0}
                for name in self.SUMMED:
                    key = f"mean_{name}" if name != "time_ms" else "mean_time_ms"
                    row[key] = float(np.sum(self.sums[name][m][pick])) / count if count else None
                rows.append(row)
        return rows


def _group(schema: pa.Schema, first: int, images: int, shard: str, rng: np.random.Generator,
           totals: Totals) -> pa.Table:
    """The rows of ``images`` consecutive images from ``first``, every method's (image-major, as
    the job's batches explain them)."""
    ids = np.array([image_id(i) for i in range(first, first + images)], dtype=object)
    label = rng.integers(0, CLASSES, images)
    predicted = np.where(rng.random(images) < 0.9, label, rng.integers(0, CLASSES, images))
    n = images * len(METHODS)
    per_image = {"image_id": np.repeat(ids, len(METHODS)), "label": np.repeat(label, len(METHODS)),
                 "predicted": np.repeat(predicted, len(METHODS))}
    method_index = np.tile(np.arange(len(METHODS)), images)
    columns = {**per_image, "source": np.full(n, shard, dtype=object),
               "method": np.array(METHODS, dtype=object)[method_index], "target": per_image["predicted"],
               "score": rng.random(n, dtype=np.float32), "predicted_score": rng.random(n, dtype=np.float32),
               "height": np.full(n, SIDE, np.int32), "width": np.full(n, SIDE, np.int32),
               "original_height": np.full(n, SIDE, np.int32), "original_width": np.full(n, SIDE, np.int32),
               "time_ms": rng.random(n, dtype=np.float32) * 5, "seed": rng.integers(0, 2 ** 32, n),
               "deletion_auc": rng.random(n, dtype=np.float32) * 0.6,
               "insertion_auc": rng.random(n, dtype=np.float32),
               "deletion_auc_random": 0.2 + rng.random(n, dtype=np.float32) * 0.6,
               "insertion_auc_random": rng.random(n, dtype=np.float32), "gini": rng.random(n, dtype=np.float32)}
    for m in range(len(METHODS)):
        mine = method_index == m
        totals.add(m, columns["target"][mine], columns["label"][mine], {k: v[mine] for k, v in columns.items()})
    arrays = {name: pa.array(values, schema.field(name).type) for name, values in columns.items()}
    arrays["saliency"] = _maps(rng, n)
    return pa.Table.from_arrays([arrays.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def _write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def build_audit(directory: Path, rows: int, seed: int = 0) -> Path:
    """A published audit of about ``rows`` saliency rows (whole images x METHODS) in ``directory``."""
    from saliency_audit.explainers import explainer_class
    images = max(1, rows // len(METHODS))
    schema = saliency_schema(METHODS)
    run = f"run={RUN_ID}"
    shard = directory / "shards" / "images.tar"
    write_shard(shard, min(images, SHARD_IMAGES), seed)
    row_bytes = 512 + SIDE * SIDE * 4                       # saliency_audit.transforms.parquet_sink.row_bytes of one row
    group_images = max(1, GROUP_BYTES // row_bytes // len(METHODS))
    groups_per_file = max(1, FILE_BYTES // GROUP_BYTES)
    rng, totals, files = np.random.default_rng(seed), Totals(), []
    writer = None
    for number, first in enumerate(range(0, images, group_images)):
        if number % groups_per_file == 0:
            if writer is not None:
                writer.close()
            files.append(f"saliency/{run}/part-synthetic-{len(files):05d}.parquet")
            (directory / files[-1]).parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(directory / files[-1], schema, compression="zstd")
        writer.write_table(_group(schema, first, min(group_images, images - first), str(shard), rng, totals))
    writer.close()
    failed = max(1, images // ERROR_EVERY)
    errors = pa.Table.from_pylist([{"image_id": f"broken-{i:05d}", "source": str(shard), "stage": "decode",
                                    "reason": "cannot decode png", "method": None} for i in range(failed)],
                                  schema=ERROR_SCHEMA)
    outputs = {"summary": pa.Table.from_pylist(totals.rows(), schema=SUMMARY_SCHEMA), "errors": errors}
    listed = {"saliency": files}
    for name, table in outputs.items():
        listed[name] = [f"{name}/{run}/part-00000.parquet"]
        _write_table(directory / listed[name][0], table)
    described = {m: {"options": {}, "signed": explainer_class(m).signed, "extras": dict(explainer_class(m).extras),
                     "control": False} for m in METHODS}
    manifest = {
        "run_id": RUN_ID, "started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T01:00:00+00:00",
        "status": "succeeded", "layout": "run-folders", "input": {"pattern": str(shard), "shards": 1},
        "model": {"model": "synthetic", "weights": None, "sha256": {}, "num_classes": CLASSES},
        "methods": described, "options": {"methods": ",".join(METHODS), "target": "predicted"},
        "preprocessing": {"channels": 1}, "conventions": {"synthetic": "benchmarks/report_check_memory.py"},
        "counts": {m: {"read": images + failed, "explained": images, "errors": failed} for m in METHODS},
        "reconciled": True, "sanity": None, "findings": None,
        "outputs": {name: f"{name}/{run}/" for name in ("saliency", "summary", "errors", "sanity", "findings")},
        "files": {**listed, "sanity": [], "findings": []},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


# ---- the measurement ----

def peak_rss_mb(argv: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> float:
    """Run ``saliency-audit argv`` in a fresh interpreter; its peak RSS in MB (Linux: VmHWM in KB)."""
    peak = log.with_suffix(".peak")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PEAK_FILE": str(peak)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    if code not in ok:
        raise RuntimeError(f"saliency-audit {' '.join(argv[:2])} exited {code}: {log.read_text()[-2000:]}")
    return int(peak.read_text()) / 1024


def measure(rows: list[int], commands: list[str], scratch: Path) -> dict:
    figures = {"rows": rows, "peak_rss_mb": {name: [] for name in commands}, "build_s": []}
    for count in rows:
        audit = scratch / f"audit-{count}"
        if not (audit / "manifest.json").exists():
            shutil.rmtree(audit, ignore_errors=True)
            started = time.perf_counter()
            build_audit(audit, count)
            figures["build_s"].append(round(time.perf_counter() - started, 1))
        for name in commands:
            out = scratch / f"{name}-{count}"
            out.mkdir(exist_ok=True)
            peak = peak_rss_mb(COMMANDS[name].argv(audit, out), out / "log.txt", COMMANDS[name].ok)
            figures["peak_rss_mb"][name].append(round(peak, 1))
    figures["growth"] = {name: round(peaks[-1] / peaks[0] - 1, 3) for name, peaks in figures["peak_rss_mb"].items()}
    return figures


def markdown(figures: dict) -> str:
    names = list(figures["peak_rss_mb"])
    lines = ["| rows | " + " | ".join(f"{name} peak RSS (MB)" for name in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for i, count in enumerate(figures["rows"]):
        lines.append(f"| {count:,} | " + " | ".join(f"{figures['peak_rss_mb'][n][i]:,.0f}" for n in names) + " |")
    lines.append("| growth | " + " | ".join(f"{100 * figures['growth'][n]:+.0f}%" for n in names) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="audit sizes in saliency rows")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"of {', '.join(COMMANDS)}")
    parser.add_argument("--scratch", help="where the audits go (default: a temporary folder, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep --scratch's audits for the next run")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    args.commands = args.commands.split(",")
    unknown = [c for c in args.commands if c not in COMMANDS]
    if unknown:
        parser.error(f"unknown command(s) {', '.join(unknown)}; known: {', '.join(COMMANDS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="report-check-memory-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        figures = measure(args.rows, args.commands, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(markdown(figures))
    over = [name for name, growth in figures["growth"].items() if growth >= GROWTH_TARGET]
    print(f"target: growth under {100 * GROWTH_TARGET:.0f}% from {args.rows[0]:,} to {args.rows[-1]:,} rows; "
          + (f"missed by {', '.join(over)}" if over else "met"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
