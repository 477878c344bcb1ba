"""The batched explain step: one model per worker, every method on every batch."""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any

import apache_beam as beam
import numpy as np
import torch
from apache_beam.utils import shared

from explainers import get_explainer
from explainers._base import alone, decision_tolerance, stable_argmax
from explainers import metrics as quality
from transforms import progress
from transforms.abele_protocol import AbeleProtocol, abele_metrics
from transforms.batching import ERRORS
from transforms.models import ModelSpec, load_model, resolve_device
from transforms.records import ErrorRecord, ImageBatch, seed_for
from transforms.rows import extra_value, map_problems, map_statistics
from transforms.skip_explained import SKIPPED

DEVICE = "device"  # side output: the device each batch ran on, so the manifest records the workers'
# side output: (what, calls, images) the model was asked: what = a method (its explain calls), ALL
# (everything: predictions, methods, metrics) or HTTP (an endpoint's requests, retries)
MODEL_CALLS = "model_calls"
ALL, HTTP, NOT_COUNTED = "*", "*http", "*not counted"


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    """Torch threads per worker process (--torch-threads), which also size the methods' own
    thread pools. ``threads`` None (auto): the cores this process may use divided by
    ``processes``, the SDK worker processes the runner starts per machine (0: one per core);
    inside a Dask worker, the threads that worker was given. Resolved on the worker, whose
    cores may differ from the launcher's."""

    threads: int | None = None
    processes: int = 1

    def resolve(self, cores: int | None = None) -> int:
        if self.threads is not None:
            return self.threads
        dask = _dask_worker_threads()
        if dask is not None:
            return dask
        if not self.processes:
            return 1
        return max(1, (cores or available_cores()) // self.processes)


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may run on, not the machine's: its CPU affinity (a cpuset), capped
    by the container's CPU quota (a Kubernetes CPU limit is a CFS quota, invisible to affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup)
    return max(1, min(cores, quota)) if quota else cores


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota in whole cores (rounded up), from cgroup v2's cpu.max ("400000 100000") or
    v1's cfs_quota_us / cfs_period_us; None when there is none ("max", -1) or no cgroup."""
    def read(name: str) -> str | None:
        try:
            with open(os.path.join(root, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    v2 = read("cpu.max")
    fields = v2.split() if v2 else [read("cpu/cpu.cfs_quota_us") or "", read("cpu/cpu.cfs_period_us") or ""]
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (IndexError, ValueError):  # "max", missing files
        return None
    return -(-quota // period) if quota > 0 and period > 0 else None


def _dask_worker_threads() -> int | None:
    """The thread count of the Dask worker running this code, if any (only looked for where
    dask.distributed is already loaded, so other runners never import it)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker
        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):  # not inside a Dask worker
        return None


def apply_threads(threads: int) -> None:
    """Size torch's pools for this worker process. The inter-op pool can only be sized before its
    first use (in-process runners have used it already), so it is left as it is then."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    model: ModelSpec
    methods: dict[str, dict[str, Any]]  # name -> options, in run order
    device: str = "auto"
    target: str = "predicted"  # predicted | label | an integer class
    seed: int = 0
    metrics: bool = True
    metric_steps: int | None = 16  # None: one image row per step (explainers.metrics.default_steps)
    metric_substrate: str = "zero"
    abele: AbeleProtocol | None = None  # ABELE's relevance/coherence/stability (--abele-metrics)
    road: bool = False  # ROAD MoRF/LeRF per image (--road)
    threads: ThreadBudget = ThreadBudget()
    # Where the workers report images explained (transforms.progress); not part of the model's identity.
    progress: progress.Sink | None = dataclasses.field(default=None, repr=False, compare=False)
    # method -> its fingerprint in an audit history (pipelines.incremental), stored in its rows; empty outside one.
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)


class CallCounter:
    """Forward calls of the model and the images they carried, counted by a pre-hook on its root
    module: what a black box is billed for. (A TorchScript module takes no hook: not counted.)"""

    def __init__(self):
        self.calls = self.images = 0

    @classmethod
    def attach(cls, model: torch.nn.Module) -> "CallCounter | None":
        counter = cls()

        def count(module, args):
            first = args[0] if args else None
            counter.calls += 1
            counter.images += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1

        try:
            model.register_forward_pre_hook(count)
        except Exception:  # noqa: BLE001 - ScriptModules refuse hooks
            return None
        return counter

    def snapshot(self) -> tuple[int, int]:
        return self.calls, self.images


def _http(model) -> tuple[int, int]:
    """An endpoint's requests and retries so far ((0, 0) for other models)."""
    calls = getattr(model, "calls", None)
    return calls.snapshot()[::2] if calls is not None else (0, 0)


class _Loaded:
    """What a worker keeps between bundles: the model and one explainer per method.
    (A plain class, because Beam's Shared holds objects by weak reference.)

    ``lock`` serialises their use: an SDK worker runs several bundles on threads at once,
    and hook-based methods (DeepLift, LRP, Grad-CAM) change the shared model's modules
    while they run, so two concurrent calls would corrupt each other's results."""

    def __init__(self, config: ExplainConfig):
        self.lock = threading.Lock()
        self.device = resolve_device(config.device)
        self.model = load_model(config.model, self.device)
        self.explainers = {name: get_explainer(name, self.model, **opts) for name, opts in config.methods.items()}
        self.counter = CallCounter.attach(self.model)


def build_explainers(config: ExplainConfig) -> _Loaded:
    return _Loaded(config)


def choose_targets(mode: str, predicted: torch.Tensor, labels: list[int | None], num_classes: int):
    """Targets [B] and, per image, a reason why it has none (or None)."""
    reasons: list[str | None] = [None] * len(labels)
    if mode == "predicted":
        return predicted.clone(), reasons
    if mode == "label":
        targets = []
        for i, label in enumerate(labels):
            if label is None:
                reasons[i] = "--target label, but the record has no label"
            elif not 0 <= label < num_classes:
                reasons[i] = f"label {label} is outside the model's {num_classes} classes"
            targets.append(label if reasons[i] is None else 0)
        return torch.tensor(targets, dtype=torch.long, device=predicted.device), reasons
    cls = int(mode)
    if not 0 <= cls < num_classes:
        reasons = [f"--target {cls} is outside the model's {num_classes} classes"] * len(labels)
    return torch.full_like(predicted, cls), reasons


def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B,K] float32, probabilities [B,K], predicted class [B]) of a batch. The class is
    the one each image gets alone (batch of 1): rows whose top-2 logit gap is near the batch's
    rounding noise are recomputed alone (explainers._base.stable_argmax), so the target a
    method explains never depends on which other images share the batch."""
    with torch.inference_mode():
        raw = model(images)
        logits = raw.float()
        probabilities = torch.softmax(logits, dim=1)
        predicted, _ = stable_argmax(logits, lambda rows: alone(model, images[rows]).float(),
                                     decision_tolerance(raw.dtype))
    return logits, probabilities, predicted


def ground_truth(batch: ImageBatch, keep: list[int], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kept images' ground-truth masks [N,H,W] bool and whether each has one [N], or None
    when no image of the batch has ground truth."""
    if batch.masks is None or not any(batch.has_mask[i] for i in keep):
        return None
    return (torch.from_numpy(np.asarray(batch.masks)[keep]).to(device).bool(),
            torch.tensor([batch.has_mask[i] for i in keep], device=device))


def localisation(maps: torch.Tensor, masks: torch.Tensor, present: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pointing game, relevance mass and rank accuracy of each map; NaN (a null) for an image without
    ground truth."""
    nan = torch.tensor(float("nan"), device=maps.device)
    scores = {"pointing_game": quality.pointing_game(maps, masks),
              "relevance_mass": quality.relevance_mass_accuracy(maps, masks),
              "relevance_rank": quality.relevance_rank_accuracy(maps, masks)}
    return {key: torch.where(present, score.values.to(maps.device).float(), nan) for key, score in scores.items()}


def metric_value(value: torch.Tensor) -> float | list[float] | None:
    """One image's metric as a Parquet value: NaN or infinite (no usable neighbour, constant
    map, a model that overflows on perturbed images) -> null."""
    values = value.float().cpu().numpy()
    if not np.isfinite(values).all():
        return None
    return float(values) if value.dim() == 0 else values


class ExplainBatches(beam.DoFn):
    """ImageBatch -> one saliency row per (image, method); failures to ``errors``.

    The model is loaded once per worker process through Beam's Shared handle and never
    per element. Gradients are enabled here on purpose: Beam's RunInference wraps
    inference in torch.no_grad(), which gradient explainers cannot run under.
    """

    def __init__(self, config: ExplainConfig, shared_handle: shared.Shared):
        self.config, self._shared = config, shared_handle

    def setup(self):
        config = self.config
        apply_threads(config.threads.resolve())
        self._state = self._shared.acquire(lambda: build_explainers(config), tag=repr(config))

    def process(self, batch: ImageBatch):
        state = self._state
        with state.lock:
            before, http = self._calls(), _http(state.model)
            outputs = list(self._explain_batch(batch))
            after, http_after = self._calls(), _http(state.model)
        if after is not None:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (ALL, after[0] - before[0], after[1] - before[1]))
            progress.model_asked(self.config.progress, "*", after[1] - before[1])
        else:  # a model that takes no hook (TorchScript): say so, rather than count nothing
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (NOT_COUNTED, 1, 0))
        if http_after != http:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (HTTP, http_after[0] - http[0], http_after[1] - http[1]))
        progress.images_explained(self.config.progress, len(batch.image_ids))
        yield beam.pvalue.TaggedOutput(DEVICE, str(self._state.device))
        yield from outputs

    def finish_bundle(self):
        progress.flush(self.config.progress)  # the bundle's last counts, not only those of WRITE_S ago

    def _calls(self) -> tuple[int, int] | None:
        counter = getattr(self._state, "counter", None)  # (a state built by hand, in tests, has none)
        return counter.snapshot() if counter is not None else None

    def _explain_batch(self, batch: ImageBatch):
        state, config = self._state, self.config
        images = torch.from_numpy(batch.pixels).to(state.device)
        try:
            logits, probabilities, predicted = predict(state.model, images)
        except Exception:
            # Alone, one at a time: a record the model fails on (an endpoint that keeps refusing
            # it) costs that record, not its batch.
            answered = []
            for i, (image_id, source) in enumerate(zip(batch.image_ids, batch.sources)):
                try:
                    answered.append((i, predict(state.model, images[i:i + 1])))
                except Exception as e:
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        image_id, source, "model", f"model forward failed: {type(e).__name__}: {e}"))
            if not answered:
                return
            keep = [i for i, _ in answered]
            batch = batch.take(keep)
            images = images[keep]
            logits, probabilities, predicted = (torch.cat(parts) for parts in zip(*(p for _, p in answered)))
        # A non-finite output costs that image only: its maps and scores would be NaN too.
        finite = (torch.isfinite(logits).all(dim=1) & torch.isfinite(probabilities).all(dim=1)).tolist()
        targets, reasons = choose_targets(config.target, predicted, batch.labels, probabilities.shape[1])
        keep = []
        for i, reason in enumerate(reasons):
            if not finite[i]:
                stage, reason = "model", "model output (logits or probabilities) is not finite"
            elif reason is None:
                keep.append(i)
                continue
            else:
                stage = "target"
            yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], stage, reason))
        if not keep:
            return
        index = torch.tensor(keep, device=images.device)
        images, targets = images[index], targets[index]
        seeds = torch.tensor([seed_for(batch.image_ids[i], config.seed) for i in keep], dtype=torch.int64)
        reference = self._random_reference(images, targets, seeds) if config.metrics else None
        for name, explainer in state.explainers.items():
            if batch.skip is None:
                yield from self._explain_method(name, explainer, batch, keep, images, targets, seeds,
                                                probabilities, predicted, reference)
                continue
            # an incremental audit: only the images whose history lacks this method
            chosen = [j for j, i in enumerate(keep) if name not in batch.skip[i]]
            if len(chosen) < len(keep):
                yield beam.pvalue.TaggedOutput(SKIPPED, ((name, batch.sources[0]), len(keep) - len(chosen)))
            if chosen:
                rows = torch.tensor(chosen, device=images.device)
                yield from self._explain_method(
                    name, explainer, batch, [keep[j] for j in chosen], images[rows], targets[rows], seeds[chosen],
                    probabilities, predicted, None if reference is None else {k: v[chosen] for k, v in reference.items()})

    def _metric_kwargs(self, seeds):
        return {"steps": self.config.metric_steps, "substrate": self.config.metric_substrate, "seeds": seeds}

    def _random_reference(self, images, targets, seeds) -> dict[str, torch.Tensor]:
        """Deletion/insertion AUCs of a random pixel order: the level a map must beat."""
        maps = quality.random_maps(images.shape[:1] + images.shape[2:], seeds, device=images.device)
        kwargs = self._metric_kwargs(seeds)
        return {"deletion_auc_random": quality.deletion_auc(self._state.model, images, maps, targets, **kwargs),
                "insertion_auc_random": quality.insertion_auc(self._state.model, images, maps, targets, **kwargs)}

    def _metrics(self, images, maps, targets, seeds) -> dict[str, torch.Tensor]:
        kwargs = self._metric_kwargs(seeds)
        return {"deletion_auc": quality.deletion_auc(self._state.model, images, maps, targets, **kwargs),
                "insertion_auc": quality.insertion_auc(self._state.model, images, maps, targets, **kwargs),
                "gini": quality.gini(maps)}

    def _explain_method(self, name, explainer, batch, keep, images, targets, seeds, probabilities, predicted,
                        reference):
        outcomes = []  # (position in keep, Explanation, index in it, ms per image)
        before = self._calls()
        try:
            start = time.perf_counter()
            result = explainer.explain(images, targets, seeds)
            ms = 1000 * (time.perf_counter() - start) / len(keep)
            outcomes = [(j, result, j, ms) for j in range(len(keep))]
        except Exception:
            # Isolate the failing images: explain one at a time, so one bad image does
            # not cost the whole batch.
            for j, i in enumerate(keep):
                try:
                    start = time.perf_counter()
                    single = explainer.explain(images[j:j + 1], targets[j:j + 1], seeds[j:j + 1])
                    outcomes.append((j, single, 0, 1000 * (time.perf_counter() - start)))
                except Exception as e:  # stage model: the model could not be asked (an endpoint down)
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        batch.image_ids[i], batch.sources[i], getattr(e, "stage", "explain"),
                        f"{type(e).__name__}: {e}", name))
        after = self._calls()
        if after is not None:
            yield beam.pvalue.TaggedOutput(MODEL_CALLS, (name, after[0] - before[0], after[1] - before[1]))
            progress.model_asked(self.config.progress, name, after[1] - before[1])
        if not outcomes:
            return
        # One array and one set of statistics for the batch's maps, not per row. A map with NaN or
        # inf costs that image and method; the metrics never see it.
        arrays = torch.stack([result.maps[k] for _, result, k, _ in outcomes]).detach().float().cpu().numpy()
        statistics = map_statistics(arrays)
        stored = []
        for n, (outcome, problem) in enumerate(zip(outcomes, map_problems(arrays, statistics))):
            if problem is None:
                stored.append((n, outcome))
            else:
                i = keep[outcome[0]]
                yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], "explain",
                                                                   problem, name))
        scores = {}
        truth = ground_truth(batch, keep, images.device)
        if stored and (reference is not None or self.config.abele is not None or self.config.road
                       or truth is not None):
            done = [outcome[0] for _, outcome in stored]
            maps = torch.from_numpy(arrays[[n for n, _ in stored]]).to(images.device)
            scores = self._scores(explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth)
        for n, (j, result, k, ms) in stored:
            row = self._row(name, batch, keep[j], result, k, targets[j], seeds[j], probabilities, predicted, ms,
                            arrays[n], {key: float(values[n]) for key, values in statistics.items()})
            row.update(scores.get(j, {}))
            yield row

    def _scores(self, explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth):
        """{position in keep: {metric: value}} for the explained images. A metric that fails
        on the batch is retried per image, and an image it still fails on gets nulls: a
        metric costs a value, never the row or the run."""
        try:
            return self._batch_scores(explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth)
        except Exception:
            scores = {}
            for n, j in enumerate(done):
                try:
                    scores.update(self._batch_scores(explainer, [j], maps[n:n + 1], keep, images, targets, seeds,
                                                     predicted, reference, truth))
                except Exception:
                    scores[j] = {}
            return scores

    def _batch_scores(self, explainer, done, maps, keep, images, targets, seeds, predicted, reference, truth):
        metrics = {}
        if self.config.road:
            curves = quality.road(self._state.model, images[done], maps, targets[done], seeds=seeds[done])
            metrics.update(road_morf_auc=curves.morf_auc, road_lerf_auc=curves.lerf_auc, road_gap=curves.gap)
        if truth is not None:
            metrics.update(localisation(maps, *(part[done] for part in truth)))
        if reference is not None:
            metrics.update(self._metrics(images[done], maps, targets[done], seeds[done]))
            metrics.update({key: values[done] for key, values in reference.items()})
        if self.config.abele is not None:
            metrics.update(abele_metrics(
                self._state.model, lambda x, t, s: explainer.explain(x, t, s).maps, images[done], maps,
                targets[done], predicted[[keep[j] for j in done]], seeds[done], self.config.abele,
                chunk=len(keep)))
        return {j: {key: metric_value(values[n]) for key, values in metrics.items()} for n, j in enumerate(done)}

    def _row(self, name, batch, i, result, k, target, seed, probabilities, predicted, ms, saliency, statistics):
        target = int(target)
        row = {
            "image_id": batch.image_ids[i], "source": batch.sources[i], "label": batch.labels[i],
            "content_sha256": batch.content_sha256[i] if batch.content_sha256 else None,
            "method": name, "method_fingerprint": self.config.fingerprints.get(name), "target": target, "predicted": int(predicted[i]),
            "score": float(probabilities[i, target]), "predicted_score": float(probabilities[i, predicted[i]]),
            "height": saliency.shape[0], "width": saliency.shape[1],
            "original_height": batch.sizes[i][0], "original_width": batch.sizes[i][1],
            "saliency": saliency.reshape(-1), "time_ms": float(ms), "seed": int(seed), **statistics,
        }
        for extra, values in result.extras.items():
            row[extra] = extra_value(values[k])
        return row
