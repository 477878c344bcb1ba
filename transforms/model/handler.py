"""The explain step without Beam (Beam's ml/inference ModelHandler seam): load the model and the
explainers once per worker, then for each batch predict, choose the targets, run every method and
every metric the run turns on (explainers.metrics' registry), and build the rows.
``BatchHandler.process`` yields what the step emits, the rows and the side outputs by tag;
transforms.explain adapts it to a DoFn, and the dry run's calibration calls it directly.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.base import alone, decision_tolerance, stable_argmax
from saliency_audit.explainers.metrics import MetricBatch, enabled_metrics, metric_options
from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.records import ERRORS, SKIPPED, ErrorRecord, ImageBatch, seed_for
from saliency_audit.transforms.io.rows import base_row, extra_value, map_problems, map_statistics
from saliency_audit.transforms.model.load import ModelSpec, load_model, resolve_device
from saliency_audit.transforms.model.threads import ThreadBudget

DEVICE = "device"  # side output: the device each batch ran on, so the manifest records the workers'
# side output: (what, calls, images) the model was asked: what = a method (its explain calls), ALL
# (everything: predictions, methods, metrics) or HTTP (an endpoint's requests, retries)
MODEL_CALLS = "model_calls"
ALL, HTTP, NOT_COUNTED = "*", "*http", "*not counted"


def default_settings() -> dict[str, Any]:
    """The metrics at their defaults (deletion and insertion on, the costly ones off)."""
    return {option.name: option.default for option in metric_options()}


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    model: ModelSpec
    methods: dict[str, dict[str, Any]]  # name -> options, in run order
    device: str = "auto"
    target: str = "predicted"  # predicted | label | an integer class
    seed: int = 0
    # The run's options that change the rows (pipelines.config.options.fingerprint_values): the
    # metrics read theirs here, and what else they need (the normalisation, for ABELE's pixel values).
    settings: dict[str, Any] = dataclasses.field(default_factory=default_settings)
    threads: ThreadBudget = ThreadBudget()
    # Where the workers report images explained (saliency_audit.transforms.io.progress); not part of the model's identity.
    progress: progress.Sink | None = dataclasses.field(default=None, repr=False, compare=False)
    # method -> its fingerprint in an audit history (saliency_audit.pipelines.job.incremental), stored in its rows; empty outside one.
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
    rounding noise are recomputed alone (saliency_audit.explainers.core.base.stable_argmax), so the target a
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


def metric_value(value: torch.Tensor) -> float | list[float] | None:
    """One image's metric as a Parquet value: NaN or infinite (no usable neighbour, constant
    map, a model that overflows on perturbed images) -> null."""
    values = value.float().cpu().numpy()
    if not np.isfinite(values).all():
        return None
    return float(values) if value.dim() == 0 else values


@dataclasses.dataclass
class _Method:
    """One method's explanations of a batch: the images it was asked for (positions in the batch),
    the maps it stored, and what made them."""

    name: str
    rows: list[int]                  # batch positions of its images
    explanations: list[tuple]       # per stored map: (position in rows, Explanation, its index, ms per image)
    arrays: np.ndarray              # [N,H,W] float32: the stored maps
    statistics: dict[str, np.ndarray]


class BatchHandler:
    """ImageBatch -> one row per (image, method), and the side outputs by tag: ERRORS (a record that
    cost itself), SKIPPED (pairs an audit history holds), MODEL_CALLS and DEVICE.

    Gradients are enabled on purpose: Beam's RunInference wraps inference in torch.no_grad(),
    which gradient explainers cannot run under."""

    def __init__(self, config: ExplainConfig, state: _Loaded):
        self.config, self.state = config, state
        self.metrics = enabled_metrics(config.settings)

    def process(self, batch: ImageBatch) -> Iterator[tuple[str | None, Any]]:
        """(None, row) for each row, (tag, value) for the side outputs."""
        state = self.state
        with state.lock:
            before, http = self._calls(), _http(state.model)
            outputs = list(self.explain_batch(batch))
            after, http_after = self._calls(), _http(state.model)
        if after is not None:
            yield MODEL_CALLS, (ALL, after[0] - before[0], after[1] - before[1])
            progress.model_asked(self.config.progress, "*", after[1] - before[1])
        else:  # a model that takes no hook (TorchScript): say so, rather than count nothing
            yield MODEL_CALLS, (NOT_COUNTED, 1, 0)
        if http_after != http:
            yield MODEL_CALLS, (HTTP, http_after[0] - http[0], http_after[1] - http[1])
        progress.images_explained(self.config.progress, len(batch.image_ids))
        yield DEVICE, str(state.device)
        yield from outputs

    def _calls(self) -> tuple[int, int] | None:
        counter = getattr(self.state, "counter", None)  # (a state built by hand, in tests, has none)
        return counter.snapshot() if counter is not None else None

    def explain_batch(self, batch: ImageBatch) -> Iterator[tuple[str | None, Any]]:
        state, config = self.state, self.config
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
                    yield ERRORS, ErrorRecord(image_id, source, "model",
                                              f"model forward failed: {type(e).__name__}: {e}")
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
            yield ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], stage, reason)
        if not keep:
            return
        seeds = torch.tensor([seed_for(batch.image_ids[i], config.seed) for i in range(len(batch.image_ids))],
                             dtype=torch.int64)
        context = _Context(batch, images, targets, seeds, probabilities, predicted)
        references = self._references(context, keep)
        for name, explainer in state.explainers.items():
            rows = keep if batch.skip is None else [i for i in keep if name not in batch.skip[i]]
            if len(rows) < len(keep):  # an incremental audit: the history holds the others
                yield SKIPPED, ((name, batch.sources[0]), len(keep) - len(rows))
            if rows:
                yield from self._explain_method(name, explainer, context, rows,
                                                {m: {k: v[[keep.index(i) for i in rows]] for k, v in r.items()}
                                                 for m, r in references.items()})

    def _references(self, context: "_Context", keep: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Each metric's columns that the batch's methods share (the random-order reference), on the
        kept images."""
        batch = context.metric_batch(self.state.model, keep)
        return {metric.name: metric.reference(batch) for metric in self.metrics}

    def _explain_method(self, name, explainer, context: "_Context", rows: list[int], references):
        outcomes = []  # (position in rows, Explanation, index in it, ms per image)
        before = self._calls()
        images, targets, seeds = context.images[rows], context.targets[rows], context.seeds[rows]
        try:
            start = time.perf_counter()
            result = explainer.explain(images, targets, seeds)
            ms = 1000 * (time.perf_counter() - start) / len(rows)
            outcomes = [(j, result, j, ms) for j in range(len(rows))]
        except Exception:
            # Isolate the failing images: explain one at a time, so one bad image does
            # not cost the whole batch.
            for j, i in enumerate(rows):
                try:
                    start = time.perf_counter()
                    single = explainer.explain(images[j:j + 1], targets[j:j + 1], seeds[j:j + 1])
                    outcomes.append((j, single, 0, 1000 * (time.perf_counter() - start)))
                except Exception as e:  # stage model: the model could not be asked (an endpoint down)
                    yield ERRORS, ErrorRecord(context.batch.image_ids[i], context.batch.sources[i],
                                              getattr(e, "stage", "explain"), f"{type(e).__name__}: {e}", name)
        after = self._calls()
        if after is not None:
            yield MODEL_CALLS, (name, after[0] - before[0], after[1] - before[1])
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
                stored.append(n)
            else:
                i = rows[outcome[0]]
                yield ERRORS, ErrorRecord(context.batch.image_ids[i], context.batch.sources[i], "explain", problem,
                                          name)
        if not stored:
            return
        done = [outcomes[n][0] for n in stored]  # positions in rows of the stored maps
        maps = torch.from_numpy(arrays[stored]).to(context.images.device)
        batch = context.metric_batch(self.state.model, [rows[j] for j in done],
                                     explain=lambda x, t, s: explainer.explain(x, t, s).maps, chunk=len(rows))
        scores = self._scores(batch, maps, {m: {k: v[done] for k, v in r.items()} for m, r in references.items()})
        for n, values in zip(stored, scores):
            j, result, k, ms = outcomes[n]
            i = rows[j]
            row = base_row(batch=context.batch, index=i, method=name, fingerprint=self.config.fingerprints.get(name),
                           target=int(context.targets[i]), predicted=int(context.predicted[i]),
                           probabilities=context.probabilities[i], saliency=arrays[n], time_ms=ms,
                           seed=int(context.seeds[i]), statistics={key: v[n] for key, v in statistics.items()})
            for extra, extra_values in result.extras.items():
                row[extra] = extra_value(extra_values[k])
            row.update(values)
            yield None, row

    def _scores(self, batch: MetricBatch, maps: torch.Tensor, references) -> list[dict[str, Any]]:
        """Per map, every enabled metric's columns. A metric that fails on the batch is retried per
        image, and an image it still fails on gets nulls: a metric costs a value, never the row or
        the run."""
        if not self.metrics:
            return [{} for _ in range(len(maps))]
        try:
            return self._batch_scores(batch, maps, references)
        except Exception:
            scores = []
            for n in range(len(maps)):
                try:
                    one = batch.take([n])
                    scores += self._batch_scores(one, maps[n:n + 1], {m: {k: v[n:n + 1] for k, v in r.items()}
                                                                      for m, r in references.items()})
                except Exception:
                    scores.append({})
            return scores

    def _batch_scores(self, batch: MetricBatch, maps: torch.Tensor, references) -> list[dict[str, Any]]:
        columns: dict[str, torch.Tensor] = {}
        for metric in self.metrics:
            columns.update(metric.score(batch, maps, references[metric.name]))
        return [{key: metric_value(values[n]) for key, values in columns.items()} for n in range(len(maps))]


@dataclasses.dataclass
class _Context:
    """A batch after prediction: its images, targets, seeds, probabilities and predicted classes,
    indexed by batch position."""

    batch: ImageBatch
    images: torch.Tensor
    targets: torch.Tensor
    seeds: torch.Tensor
    probabilities: torch.Tensor
    predicted: torch.Tensor

    def metric_batch(self, model, rows: list[int], explain=None, chunk: int = 32) -> MetricBatch:
        truth = ground_truth(self.batch, rows, self.images.device)
        return MetricBatch(model=model, images=self.images[rows], targets=self.targets[rows], seeds=self.seeds[rows],
                           predicted=self.predicted[rows], masks=None if truth is None else truth[0],
                           has_mask=None if truth is None else truth[1], explain=explain, chunk=chunk)
