"""The reader decodes ahead in a thread pool while the model runs (transforms.io.prefetch,
transforms.read): the same outputs and errors with or without it, a bounded window, decoding that
overlaps the consumer, a pool that ends when the consumer fails, and the thread budget's split."""
from __future__ import annotations

import gc
import io
import tarfile
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, add_member, png_bytes, read_output

from saliency_audit.pipelines import audit
from saliency_audit.transforms import read
from saliency_audit.transforms.io.prefetch import THREAD_NAME, prefetched
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.records import ErrorRecord, ImageBatch
from saliency_audit.transforms.model import threads
from saliency_audit.transforms.model.threads import ThreadBudget, one_intraop_thread

PREP = Preprocessing(channels=1)
RNG = np.random.default_rng(0)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_shard(path, n: int = 14) -> str:
    """n 28x28 digits-like PNGs with labels, one with a ground-truth mask, one of another size,
    one npy, and records that fail at each stage: read (bad label), decode (corrupt PNG, bad mask)
    and preprocess (a 4-channel npy)."""
    mask = np.zeros((28, 28), np.uint8)
    mask[4:12, 6:20] = 255
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            add_member(tar, f"img{i:02d}.png", png_bytes(RNG.integers(0, 256, (28, 28), dtype=np.uint8)))
            add_member(tar, f"img{i:02d}.cls", str(i % 10).encode())
            if i == 2:
                add_member(tar, "img02.mask.png", png_bytes(mask))
            if i == 5:
                add_member(tar, "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00not a png" * 8)
                add_member(tar, "wide.png", png_bytes(RNG.integers(0, 256, (28, 40), dtype=np.uint8)))
                add_member(tar, "badlabel.png", png_bytes(RNG.integers(0, 256, (28, 28), dtype=np.uint8)))
                add_member(tar, "badlabel.cls", b"three")
            if i == 9:
                add_member(tar, "arr.npy", npy_bytes(RNG.random((28, 28), dtype=np.float32)))
                add_member(tar, "fourch.npy", npy_bytes(RNG.random((28, 28, 4), dtype=np.float32)))
                add_member(tar, "badmask.png", png_bytes(RNG.integers(0, 256, (28, 28), dtype=np.uint8)))
                add_member(tar, "badmask.mask.png", png_bytes(np.zeros((5, 5), np.uint8)))
    return str(path)


def outputs(url: str, **kwargs) -> list:
    return [(getattr(o, "tag", None), getattr(o, "value", o)) for o in read.ReadShardBatches(PREP, 4, **kwargs)
            .process(url)]


def same(a, b) -> bool:
    if isinstance(a, ImageBatch):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def decode_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


# --- the same outputs, errors included ----------------------------------------------------------

@pytest.mark.parametrize("decode_threads, prefetch", [(1, 1), (2, 2), (3, 5)])
def test_outputs_and_errors_are_the_same_with_the_pool(tmp_path, decode_threads, prefetch):
    url = write_shard(tmp_path / "s.tar")
    inline = outputs(url, decode_threads=0)
    pooled = outputs(url, decode_threads=decode_threads, prefetch=prefetch)
    assert len(inline) == len(pooled) and all(t == u and same(a, b) for (t, a), (u, b) in zip(inline, pooled))
    errors = {e.image_id: e.stage for t, e in pooled if t == read.ERRORS}
    # the corrupt PNG is decoded in a prefetched batch (after img05): its error row, stage decode, as inline
    assert errors == {"corrupt": "decode", "badmask": "decode", "badlabel": "read", "fourch": "preprocess"}
    batches = [b for t, b in pooled if t is None]
    assert sum(len(b.image_ids) for b in batches) == 14 + 2  # + wide, arr
    assert [b.image_ids for b in batches if b.pixels.shape[-1] == 40] == [["wide"]]
    assert batches[0].has_mask == [False, False, True, False]


def test_a_cuda_device_without_cuda_reads_as_on_a_cpu(tmp_path):
    # device "cuda" splits the budget as a GPU worker and pins pixels only where CUDA is there
    url = write_shard(tmp_path / "s.tar")
    reference = outputs(url, decode_threads=0)
    on_cuda = outputs(url, device="cuda", threads=ThreadBudget(1))
    assert all(same(a, b) for (_, a), (_, b) in zip(reference, on_cuda))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_for_a_cuda_worker_are_pinned_and_copy_without_blocking(tmp_path):
    url = write_shard(tmp_path / "s.tar")
    plain = [b for t, b in outputs(url, decode_threads=0) if t is None]
    pinned = [b for t, b in outputs(url, device="cuda", decode_threads=2) if t is None]
    for a, b in zip(plain, pinned):
        host = torch.from_numpy(b.pixels)
        assert host.is_pinned() and not torch.from_numpy(a.pixels).is_pinned()
        on_device = host.to("cuda", non_blocking=True)
        assert torch.equal(on_device.cpu(), torch.from_numpy(a.pixels))


@pytest.mark.slow
def test_an_audit_writes_the_same_parquet_with_and_without_the_pool(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "s.tar")
    used = []

    def spy(function, items, n, ahead):
        used.append(n)
        return prefetched(function, items, n, ahead)

    monkeypatch.setattr(read, "prefetched", spy)
    results = {}
    for cores in (1, 3):  # --torch-threads 1 on one core decodes inline; on three, beside the model
        monkeypatch.setattr(threads, "available_cores", lambda cores=cores: cores)
        out = tmp_path / f"out{cores}"
        audit.run(["--input", url, "--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn",
                   "--weights", str(DEMO_DATA / "mnist_cnn.pt"), "--channels", "1", "--methods", "sal",
                   "--batch-size", "4", "--torch-threads", "1", "--output", str(out)])
        results[cores] = {name: sorted(read_output(out / name), key=lambda r: (r["image_id"], r.get("method") or ""))
                          for name in ("saliency", "errors")}
    assert set(used) == {0, 1}
    differ = {key for a, b in zip(results[1]["saliency"], results[3]["saliency"]) for key in a if a[key] != b[key]}
    assert len(results[1]["saliency"]) == len(results[3]["saliency"]) and differ <= {"time_ms"}  # only the clock
    assert results[1]["errors"] == results[3]["errors"]
    assert {r["image_id"]: r["stage"] for r in results[3]["errors"]}["corrupt"] == "decode"


# --- bounded, overlapping, and never left running ---------------------------------------------------

@pytest.mark.parametrize("decode_threads, prefetch, ahead", [(0, 2, 0), (1, 2, 8), (2, 1, 4), (1, 3, 12)])
def test_the_window_holds_at_most_prefetch_batches(tmp_path, monkeypatch, decode_threads, prefetch, ahead):
    url = write_shard(tmp_path / "s.tar")
    pulled = [0]
    real = read.read_shard

    def counting(*args, **kwargs):
        for record in real(*args, **kwargs):
            pulled[0] += 1
            yield record

    monkeypatch.setattr(read, "read_shard", counting)
    handed, window = 0, []
    for out in read.ReadShardBatches(PREP, 4, decode_threads=decode_threads, prefetch=prefetch).process(url):
        handed += getattr(out, "tag", None) == read.READ
        window.append(pulled[0] - handed)  # read from the shard, not yet handed to the next step
    assert max(window) == ahead  # prefetch batches of 4 records, no more (and inline: none)


def test_the_next_batches_are_decoded_while_the_consumer_works(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "s.tar")
    decoded = threading.Event()
    real = read._prepare

    def prepare(record, prep):
        result = real(record, prep)
        if record.image_id == "img06":  # in the second batch of 4 (the corrupt one is an error)
            decoded.set()
        return result

    monkeypatch.setattr(read, "_prepare", prepare)
    steps = read.ReadShardBatches(PREP, 4, decode_threads=1).process(url)
    first = next(o for o in steps if isinstance(o, ImageBatch))
    # the "model" holds the first batch: the decoder must finish a record of the next one meanwhile
    assert first.image_ids == ["img00", "img01", "img02", "img03"] and decoded.wait(timeout=20)
    steps.close()


def slow_prepare(record, prep, real=read._prepare):
    time.sleep(0.1)  # 32 queued records: 3 s to drain, if a failure did not cancel them
    return real(record, prep)


def failing_model(batch):
    assert len(decode_threads_alive()) == 2  # the pool is decoding the next batches meanwhile
    raise RuntimeError("the model failed")


def wait_for_no_decode_threads(seconds: float = 3) -> bool:
    deadline = time.monotonic() + seconds
    while decode_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not decode_threads_alive()


def test_the_pool_ends_when_the_model_fails_in_a_beam_job(tmp_path, monkeypatch):
    # Beam tears the failed bundle's DoFns down without resuming the reader's generator
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    url = write_shard(tmp_path / "s.tar", n=40)
    monkeypatch.setattr(read, "_prepare", slow_prepare)
    assert not decode_threads_alive()
    with pytest.raises(Exception, match="the model failed"):
        with beam.Pipeline(runner=FnApiRunner()) as p:
            reader = read.ReadShardBatches(PREP, 8, decode_threads=2, prefetch=4)
            read_out = p | beam.Create([url]) | beam.ParDo(reader).with_outputs(read.ERRORS, read.READ, main="batches")
            read_out.batches | beam.Map(failing_model)
    assert wait_for_no_decode_threads()


def test_closing_or_collecting_the_reader_ends_its_pool(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "s.tar", n=40)
    monkeypatch.setattr(read, "_prepare", slow_prepare)
    reader = read.ReadShardBatches(PREP, 8, decode_threads=2, prefetch=4)
    steps = reader.process(url)
    next(o for o in steps if isinstance(o, ImageBatch))
    reader.teardown()
    assert wait_for_no_decode_threads()
    steps = read.ReadShardBatches(PREP, 8, decode_threads=2, prefetch=4).process(url)
    next(o for o in steps if isinstance(o, ImageBatch))
    del steps  # a consumer that stopped: the generator is collected
    gc.collect()
    assert wait_for_no_decode_threads()


def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    delays = [0.03, 0.0, 0.02, 0.0, 0.01, 0.0]

    def work(i):
        time.sleep(delays[i])
        if i == 4:
            raise ValueError("item 4")
        return i * i

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for item, result in prefetched(work, range(6), 3, 2):
            got.append((item, result))
    assert got == [(0, 0), (1, 1), (2, 4), (3, 9)]
    assert list(prefetched(lambda i: -i, range(5), 0, 3)) == [(i, -i) for i in range(5)]


def test_the_pool_takes_items_in_groups(monkeypatch):
    """A task per item cost as much as decoding a digit: the pool gets groups of ahead // (2 * threads)."""
    from saliency_audit.transforms.io import prefetch
    groups = []
    real = prefetch._each

    def each(function, group):
        groups.append(len(group))
        return real(function, group)

    monkeypatch.setattr(prefetch, "_each", each)
    assert list(prefetched(lambda i: i + 1, range(64), 1, 8)) == [(i, i + 1) for i in range(64)]
    assert groups == [4] * 16
    groups.clear()
    assert [i for i, _ in prefetched(str, range(10), 2, 16)] == list(range(10))
    assert groups == [4, 4, 2]


def test_a_group_does_not_keep_the_results_already_handed_out():
    """The window bounds memory at ``ahead`` results: a result the consumer has dropped must not
    live on in its group's list until the group's last item is taken."""
    import weakref

    class Result:
        pass

    it = prefetched(lambda i: Result(), range(8), 1, 8)  # groups of 4
    _, first = next(it)
    gone = weakref.ref(first)
    del first
    next(it)  # the second item of the same group: the group's list is still alive
    assert gone() is None
    it.close()


# --- the thread budget ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget, device, cores, split", [
    (ThreadBudget(), "cpu", 1, (1, 0)), (ThreadBudget(), "cpu", 2, (2, 0)),  # small CPU: torch keeps the cores
    (ThreadBudget(), "cpu", 8, (7, 1)), (ThreadBudget(), "cpu", 16, (14, 2)),
    (ThreadBudget(None, 2), "cpu", 32, (14, 2)),  # two worker processes share the 32 cores
    (ThreadBudget(), "cuda", 1, (1, 0)), (ThreadBudget(), "cuda", 2, (1, 1)), (ThreadBudget(), "cuda", 16, (8, 8)),
    (ThreadBudget(1), "cpu", 2, (1, 1)), (ThreadBudget(2), "cpu", 2, (2, 0)),  # explicit: the cores torch leaves
    (ThreadBudget(4), "cpu", 16, (4, 2)), (ThreadBudget(1), "cuda", 16, (1, 8)), (ThreadBudget(8), "cpu", 4, (8, 0))])
def test_decode_threads_come_out_of_the_budget(budget, device, cores, split):
    assert budget.split(device, cores) == split
    torch_threads, decode = split
    assert decode == 0 or torch_threads + decode <= max(cores // max(budget.processes, 1), torch_threads)


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch's parallel backend is not OpenMP")
def test_a_decode_thread_runs_torch_on_itself_only():
    before, seen = torch.get_num_threads(), {}

    def decode_thread():
        seen["took"] = one_intraop_thread()
        torch.nn.functional.interpolate(torch.rand(1, 3, 64, 64), size=(32, 32), mode="bilinear", antialias=True)
        seen["threads"] = torch.get_num_threads()

    worker = threading.Thread(target=decode_thread)
    worker.start()
    worker.join()
    assert seen == {"took": True, "threads": 1} and torch.get_num_threads() == before


def test_error_records_pass_through_the_pool_untouched(tmp_path):
    url = str(tmp_path / "missing.tar")
    (error,) = [e for t, e in outputs(url, decode_threads=2) if t == read.ERRORS]
    assert isinstance(error, ErrorRecord) and error.stage == "read"


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were():
    # _open turns Pillow's decompression-bomb warning into an error with catch_warnings, which swaps
    # the process's filters: two threads inside it at once left an "error" filter behind for good
    from concurrent.futures import ThreadPoolExecutor

    from saliency_audit.transforms.io.preprocess import decode
    from saliency_audit.transforms.io.records import RawImage
    raw = RawImage("a", "s", png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "png")
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        assert all(a.shape == (64, 64, 3) for a in pool.map(lambda _: decode(raw, 10 ** 6), range(2000)))
    assert warnings.filters == before
