"""``run --dry-run``: the plan's records, passes and a short calibration, printed; nothing is run."""
from __future__ import annotations

import dataclasses
import itertools
import time


from saliency_audit.pipelines.job.plan import Plan
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ImageBatch
from saliency_audit.transforms.model.handler import BatchHandler, build_explainers


def shards_to_read(plan: Plan) -> list[str]:
    """The shards the job reads: all, or for an incremental run those the history lacks."""
    return plan.shards if plan.work is None else [url for url in plan.shards if url in plan.work.needed]


def count_records(plan: Plan) -> int:
    """Records the job would read (shards read, nothing decoded), with --limit-per-shard."""
    total = 0
    for url in shards_to_read(plan):
        records = read_shard(url, plan.storage_options, max_pixels=plan.prep.max_pixels)
        total += sum(1 for _ in itertools.islice(records, plan.options.limit_per_shard))
    return total


def calibrate(plan: Plan, images: int = 8) -> dict[str, float]:
    """Seconds per image on this machine, on the first decodable images, after a warm-up: each
    method's own cost (its metrics included) and, under None, the per-batch work every method
    shares (the forward pass and the random-order reference of the metrics)."""
    import copy

    from saliency_audit.pipelines.checks.sanity import sample_images
    from saliency_audit.transforms.model.threads import apply_threads
    ids, pixels, labels = sample_images(plan.shards, plan.prep, plan.storage_options, images)
    if not ids:
        return {}
    apply_threads(plan.config.threads.resolve())  # as one worker process of the run would
    loaded = build_explainers(plan.config)

    def seconds(methods: dict, n: int = len(ids)) -> float:
        batch = ImageBatch(ids[:n], ["calibration"] * n, labels[:n], [tuple(pixels.shape[2:])] * n,
                           pixels[:n].numpy())
        # The handler runs every explainer its state holds, so it gets only the measured ones
        # (with all of them, every figure was the cost of all the methods).
        state = copy.copy(loaded)
        state.explainers = {name: loaded.explainers[name] for name in methods}
        handler = BatchHandler(dataclasses.replace(plan.config, methods=methods), state)
        start = time.perf_counter()
        list(handler.process(batch))
        return (time.perf_counter() - start) / n

    seconds(plan.methods, 1)  # warm-up: first calls allocate and compile (one image is enough)
    shared_cost = seconds({})
    out: dict[str | None, float] = {name: max(0.0, seconds({name: options}) - shared_cost)
                                    for name, options in plan.methods.items()}
    out[None] = shared_cost
    return out


def print_plan(plan: Plan) -> None:
    """``run --dry-run``: what the job would do and about how long it would take here."""
    records = count_records(plan)
    seconds = calibrate(plan)
    print(f"input: {plan.options.input}: {len(plan.shards)} shard(s), {records} record(s)"
          + (f" (at most {plan.options.limit_per_shard} per shard)" if plan.options.limit_per_shard else "")
          + (f" in the {len(plan.work.needed)} shard(s) to read" if plan.work is not None else ""))
    if plan.work is not None:
        work = plan.work
        print(f"incremental: model {work.model[:12]}, slot {work.slot or '(a new one)'}"
              + (f" (replaces run {work.replaces})" if work.replaces else "") + f"; {len(work.runs)} recorded run(s) "
              f"of this model count; {len(work.skipped_shards)} shard(s) skipped (every method explained them), "
              f"{len(work.needed)} to read; images the history holds are skipped there too, so the estimate is "
              f"an upper bound")
    print(f"model: {plan.options.model} on {plan.resolved['device']}, {plan.resolved['num_classes']} classes; "
          f"batch size {plan.options.batch_size}; metrics {'on' if plan.options.metrics else 'off'}")
    print(f"{'method':>12}  {'passes / image':>16}  {'s / image':>10}  {'estimate':>10}  {'explain ms':>10}")
    total = seconds.get(None, 0.0) * records
    for name, info in plan.resolved["methods"].items():
        passes = "+".join(str(v) for v in info["passes"].values()) if isinstance(info["passes"], dict) \
            else str(info["passes"])
        per_image = seconds.get(name)
        estimate = per_image * records if per_image is not None else None
        total += estimate or 0.0
        print(f"{name:>12}  {passes:>16}  {per_image if per_image is not None else float('nan'):>10.4f}  "
              f"{_duration(estimate):>10}  {info.get('preflight_ms_per_image', float('nan')):>10.1f}")
    print(f"{'(shared)':>12}  {'1+0':>16}  {seconds.get(None, float('nan')):>10.4f}  "
          f"{_duration(seconds.get(None, 0.0) * records):>10}")
    for line in metric_lines(plan.resolved):
        print(line)
    print(f"estimated time: {_duration(total)} in one process on this machine (calibrated on "
          f"{min(8, records)} image(s); the sanity check and reading are extra). explain ms: one explanation of "
          f"the sample image, warm, as preflight timed it; the run's report warns where explaining took longer "
          f"(docs/performance.md). Nothing was run (--dry-run).")


def metric_lines(resolved: dict) -> list[str]:
    """The metrics' rows of the plan: each one's forward passes per image (per method's map, once
    per image for the reference, and explanations of its copies), and the total beside the methods'."""
    entry = resolved.get("metrics")
    if not entry:  # no decodable sample: the input size, so the cost, is unknown
        return []
    height, width = entry["image_size"]
    lines = [f"{'metric':>12}  {'passes / image':>16}  forward passes on {height}x{width} inputs: per map + per image "
             f"(each method's map, and once for the batch's methods)"]
    for name, cost in entry["passes"].items():
        text = f"{cost['per_map']}/map+{cost['per_image']}"
        more = f"  and {cost['explanations']} explanations per map at the method's cost" if cost["explanations"] else ""
        lines.append(f"{name:>12}  {text:>16}{more}")
    lines.append(f"forward passes per image and target: methods {entry['methods_forward_passes']}, metrics "
                 f"{entry['forward_passes']}, in all {entry['methods_forward_passes'] + entry['forward_passes']}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"
