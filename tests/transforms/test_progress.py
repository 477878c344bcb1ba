"""Progress of a run: workers' counts in files of their own, summed and shown by the launcher."""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import tarfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.utils import shared
from conftest import DEMO_DATA, add_member, moto_s3, read_output

from saliency_audit.transforms.explain import ExplainBatches
from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.rows import ERROR_SCHEMA
from saliency_audit.transforms.model.handler import DEVICE, ExplainConfig, default_settings
from saliency_audit.transforms.model.load import ModelSpec
from saliency_audit.transforms.parquet_sink import WriteParquet
from saliency_audit.transforms.read import ERRORS, READ, ReadShardBatches

SHARDS = 2
PER_SHARD = 12  # images per shard; the first shard also holds one broken record


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker(sink, shards: dict[str, tuple[int, int, bool]], explained: int) -> progress._Worker:
    """One worker's counts, put to its own file (as a worker process does at a bundle's end)."""
    w = progress._Worker(sink)
    for shard, (read, failed, complete) in shards.items():
        w.add(shard, restart=True)
        for k in range(read):
            w.add(shard, read=1, failed=int(k < failed))
        if complete:
            w.add(shard, complete=True)
    w.add(explained=explained)
    w.write(wait=True)
    return w


def test_poller_sums_the_files_of_two_workers(tmp_path):
    sink = progress.Sink(str(tmp_path / "progress"))
    worker(sink, {"s0": (10, 1, True), "s1": (5, 0, False)}, explained=12)
    worker(sink, {"s2": (7, 2, True)}, explained=3)
    assert len(list((tmp_path / "progress").glob("*.json"))) == 2
    assert progress.poll(sink) == progress.Totals(read=22, failed=3, explained=15, shards_read=2,
                                                  records_in_read_shards=17)


def test_a_shard_read_again_counts_once_and_done_never_exceeds_the_records_read(tmp_path):
    # Worker A read 6 records of s0 and died; worker B read s0 again, to the end, and its explain
    # step counted some images that A's explain step had already counted.
    sink = progress.Sink(str(tmp_path / "progress"))
    worker(sink, {"s0": (6, 0, False)}, explained=6)
    worker(sink, {"s0": (10, 0, True)}, explained=10)
    totals = progress.poll(sink)
    assert (totals.read, totals.shards_read, totals.done) == (10, 1, 10)


def test_terminal_line_rate_and_eta(tmp_path):
    sink = progress.Sink(str(tmp_path / "progress"))
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(sink, shards=4, stream=stream, tty=True, clock=clock)
    a = worker(sink, {"s0": (10, 1, True), "s1": (5, 0, False)}, explained=6)
    worker(sink, {}, explained=2)
    clock.now += 10
    display.tick()
    # 9 done in 10 s; one shard of 10 records read of 4: about 40 records, 31 to go at 0.9/s
    assert stream.getvalue() == "\rexplained 9/15+ images | 0.9 images/s | 1/4 shards read | ETA ~0:34\x1b[K"
    a.add("s1", read=5, complete=True)
    a.add("s2", read=10, complete=True)
    a.add("s3", read=10, complete=True)
    a.add(explained=21)
    a.write(wait=True)
    clock.now += 10
    display.tick()  # 30 of 40 done in 20 s; the total is known now
    assert stream.getvalue().split("\r")[-1] == (
        "explained 30/40 images (75%) | 1.5 images/s | 4/4 shards read | ETA 0:07\x1b[K")
    clock.now += 5
    display.finish(succeeded=True)
    assert stream.getvalue().split("\r")[-1] == "done: 40 images in 0:25 (1.6 images/s)\x1b[K\n"


def test_plain_lines_at_most_every_log_interval(tmp_path):
    sink = progress.Sink(str(tmp_path / "progress"))
    worker(sink, {"s0": (10, 0, True)}, explained=4)
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(sink, shards=2, stream=stream, tty=False, clock=clock, log_s=30)
    for _ in range(7):  # ticks at 10, 20, ..., 70 s: a line at 30 and at 60 s
        clock.now += 10
        display.tick()
    # nothing moves after the first tick: the rate falls and the estimate grows
    assert stream.getvalue().splitlines() == [
        "progress: explained 4/10+ images | 0.1 images/s | 1/2 shards read | ETA ~2:00",
        "progress: explained 4/10+ images | 0.1 images/s | 1/2 shards read | ETA ~4:00"]


def test_before_any_shard_is_read_the_limit_per_shard_gives_the_estimate(tmp_path):
    sink = progress.Sink(str(tmp_path / "progress"))
    worker(sink, {"s0": (30, 0, False)}, explained=30)
    clock, stream = FakeClock(), io.StringIO()
    for limit, eta in ((None, "ETA -"), (50, "ETA ~0:23")):  # 100 expected, 70 to go at 3 images/s
        display = progress.Display(sink, 2, limit, stream=stream, tty=True, clock=clock)
        clock.now += 10
        display.tick()
        assert stream.getvalue().endswith(f"explained 30/30+ images | 3.0 images/s | 0/2 shards read | {eta}\x1b[K")


def test_worker_puts_are_rare_and_the_bundle_end_puts_the_last_counts(tmp_path, monkeypatch):
    puts = []
    real = progress.storage.write_json_atomic
    monkeypatch.setattr(progress.storage, "write_json_atomic", lambda url, body, so=None: (
        puts.append(body), real(url, body, so)))
    sink = progress.Sink(str(tmp_path / "progress"))
    for _ in range(1000):  # within WRITE_S of the first: one put
        progress.record_read(sink, "s0")
    assert len(puts) == 1
    progress.flush(sink)
    progress.flush(sink)  # nothing changed since: no put
    assert len(puts) == 2 and puts[-1]["shards"] == {"s0": [1000, 0, False]}
    assert progress.poll(sink).read == 1000


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress-shards")
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src:
        members = src.getmembers()[: 2 * SHARDS * PER_SHARD]  # KEY.png and KEY.cls per digit
        for k in range(SHARDS):
            with tarfile.open(root / f"part-{k}.tar", "w") as dst:
                for member in members[k * 2 * PER_SHARD:(k + 1) * 2 * PER_SHARD]:
                    add_member(dst, member.name, src.extractfile(member).read())
                if k == 0:
                    add_member(dst, "broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00not a png" * 8)
    return sorted(str(p) for p in root.glob("*.tar"))


def explain_job(p, shards, sink, errors_dir):
    """The audit's read and explain steps (one cheap method), reporting to ``sink``."""
    config = ExplainConfig(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt")),
                           {"sal": {}}, device="cpu", settings={**default_settings(), "metrics": False},
                           progress=sink)
    reader = ReadShardBatches(Preprocessing(channels=1), 5, progress=sink)
    batched = (p | beam.Create(shards) | beam.Reshuffle()
               | "Read" >> beam.ParDo(reader).with_outputs(ERRORS, READ, main="batches"))
    explained = batched.batches | "Explain" >> beam.ParDo(ExplainBatches(config, shared.Shared())).with_outputs(
        ERRORS, DEVICE, main="rows")
    ((batched.errors, explained.errors) | beam.Flatten() | beam.Map(dataclasses.asdict)
     | WriteParquet(errors_dir, ERROR_SCHEMA))


@pytest.mark.slow
def test_two_worker_processes_report_what_they_read_and_explained(shards, tmp_path):
    sink = progress.Sink(str(tmp_path / "progress"))
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    stream = io.StringIO()
    with progress.Display(sink, len(shards), stream=stream, tty=True, poll_s=0.2), \
            beam.Pipeline(runner=FnApiRunner(), options=options) as p:
        explain_job(p, shards, sink, str(tmp_path / "errors"))
    files = list((tmp_path / "progress").glob("*.json"))
    assert files and all(f"-{os.getpid()}-" not in f.name for f in files)  # written by the workers
    read = SHARDS * PER_SHARD + 1
    totals = progress.poll(sink)
    assert dataclasses.replace(totals, asked={}) == progress.Totals(
        read=read, failed=1, explained=SHARDS * PER_SHARD, shards_read=SHARDS, records_in_read_shards=read)
    # the model's cost: sal asks it each image once; in all, the predictions too
    assert totals.asked["sal"] == SHARDS * PER_SHARD and totals.asked["*"] >= 2 * SHARDS * PER_SHARD
    assert stream.getvalue().endswith("\x1b[K\n") and f"done: {read} images in " in stream.getvalue()
    assert "model asked per image: sal 1.0, in all " in stream.getvalue()


def test_progress_storage_that_fails_does_not_fail_the_run(shards, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the progress folder would be")
    sink = progress.Sink(str(blocker / "progress"))
    caplog.set_level(logging.INFO, logger="saliency_audit")
    stream = io.StringIO()
    with progress.Display(sink, len(shards), stream=stream, tty=False), beam.Pipeline(runner=FnApiRunner()) as p:
        explain_job(p, shards, sink, str(tmp_path / "errors"))
    assert len(read_output(tmp_path / "errors")) == 1  # the broken record: the job ran to the end
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("could not write progress to ")
    assert stream.getvalue().startswith("progress: done in ")


def test_workers_and_poller_on_object_storage(monkeypatch):
    with moto_s3(monkeypatch, "progress-bucket") as (_, endpoint):
        options = {"endpoint_url": endpoint}
        sink = progress.Sink("s3://progress-bucket/out/_runs/r1/progress", options)
        worker(sink, {"s0": (10, 1, True)}, explained=9)
        assert progress.poll(sink) == progress.Totals(read=10, failed=1, explained=9, shards_read=1,
                                                      records_in_read_shards=10)
        worker(sink, {"s1": (4, 0, False)}, explained=2)  # a second worker, seen by the next poll
        assert progress.poll(sink).read == 14 and progress.poll(sink).done == 12


def test_a_poll_that_fails_is_logged_once_and_the_display_goes_on(caplog):
    clock, stream = FakeClock(), io.StringIO()
    display = progress.Display(progress.Sink("nosuchstorage://bucket/progress"), 2, stream=stream, tty=True,
                               clock=clock)
    with display:  # the polling thread too: it must not die or raise
        for _ in range(3):
            clock.now += 10
            display.tick()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("could not read progress from nosuchstorage://")
    assert stream.getvalue().endswith("\rdone in 0:30\x1b[K\n")


def test_batches_slower_than_the_window_keep_a_rate(tmp_path, monkeypatch):
    """A batch every 64 s (the demo's abele): between two batches the rate must not read 0."""
    from saliency_audit.transforms.io import progress
    clock, done = [0.0], [0]
    monkeypatch.setattr(progress, "poll", lambda sink: progress.Totals(read=100, explained=done[0]))
    display = progress.Display(progress.Sink(str(tmp_path / "p")), 1, 100, stream=io.StringIO(), tty=False,
                               clock=lambda: clock[0])
    for t in range(0, 200, 2):
        clock[0] = float(t)
        done[0] = 32 * (t // 64)
        display.refresh()
        if t >= 70:
            assert display.rate() and display.rate() > 0.2, (t, list(display.samples))
