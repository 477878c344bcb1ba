"""The explain step without Beam (Beam's ml/inference ModelHandler seam): load the model and the
explainers once per worker, then for each batch predict, choose the targets, run every method and
every metric the run turns on (explainers.metrics' registry), and build the rows.
``BatchHandler.process`` yields what the step emits, the rows and the side outputs by tag;
transforms.explain adapts it to a DoFn, and the dry run's calibration calls it directly.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterator

import numpy as np
import torch

from saliency_audit.explainers import explainer_class, get_explainer
from saliency_audit.explainers.core.base import alone, decision_tolerance, stable_argmax
from saliency_audit.explainers.metrics import MetricBatch, enabled_metrics, metric_options
from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.records import ERRORS, SKIPPED, TARGETS, ErrorRecord, ImageBatch, seed_for
from saliency_audit.transforms.io.rows import base_row, extra_value, map_problems, map_statistics
from saliency_audit.transforms.model import targets
from saliency_audit.transforms.model.compiled import CompiledModel, compile_failure
from saliency_audit.transforms.model.fitting import explain_fitting
from saliency_audit.transforms.model.load import ModelSpec, load_model, resolve_device
from saliency_audit.transforms.model.precision import at_precision, set_matmul_precision
from saliency_audit.transforms.model.targets import resolve
from saliency_audit.transforms.model.threads import ThreadBudget

DEVICE = "device"  # side output: the device each batch ran on, so the manifest records the workers'
# side output: (what, calls, images) the model was asked: what = a method (its explain calls), ALL
# (everything: predictions, methods, metrics) or HTTP (an endpoint's requests, retries)
MODEL_CALLS = "model_calls"
ALL, HTTP, NOT_COUNTED = "*", "*http", "*not counted"
# side output: (method, images) when out of memory made a method's batch smaller, and (COMPILE,
# reason) when --compile fell back to eager; the manifest keeps the smallest batch per method.
ADAPTED = "adapted"
COMPILE = "*compile"


def default_settings() -> dict[str, Any]:
    """The metrics at their defaults (deletion and insertion on, the costly ones off)."""
    return {option.name: option.default for option in metric_options()}


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    model: ModelSpec
    methods: dict[str, dict[str, Any]]  # name -> options, in run order
    device: str = "auto"
    target: str = "predicted"  # predicted | label | topN | a class, or a comma list (transforms.model.targets)
    seed: int = 0
    # The run's options that change the rows (pipelines.config.options.fingerprint_values): the
    # metrics read theirs here, and what else they need (the normalisation, for ABELE's pixel values).
    settings: dict[str, Any] = dataclasses.field(default_factory=default_settings)
    threads: ThreadBudget = ThreadBudget()
    # Where the workers report images explained (saliency_audit.transforms.io.progress); not part of the model's identity.
    progress: progress.Sink | None = dataclasses.field(default=None, repr=False, compare=False)
    # method -> its fingerprint in an audit history (saliency_audit.pipelines.job.incremental), stored in its rows; empty outside one.
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    precision: str = "fp32"  # the model's forwards (transforms.model.precision)
    compile: bool = False  # torch.compile for the methods that allow it (transforms.model.compiled)
    # method -> images per explain call (--batch-size auto, found at preflight); absent: the whole batch
    batch_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


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
        self.model = load_model(config.model, self.device)  # float32, eager: the predictions, the targets
        set_matmul_precision(config.precision, self.device)
        # The methods' and metrics' model: at the run's precision, compiled where asked. A method
        # that must not autocast gets the float32 model; one that hooks layers, an eager one.
        precise = at_precision(self.model, config.precision, self.device)
        self.compiled = CompiledModel(precise) if config.compile else None
        self.metric_model = self.compiled or precise

        def model_for(name: str) -> torch.nn.Module:
            if not explainer_class(name).autocast:
                return self.model
            return self.compiled if runs_compiled(name, config.compile) else precise

        self.explainers = {name: get_explainer(name, model_for(name), **opts) for name, opts in config.methods.items()}
        self.batch_sizes = dict(config.batch_sizes)  # smaller after an out-of-memory error, for good
        self.counter = CallCounter.attach(self.model)


def runs_compiled(name: str, compile: bool) -> bool:
    """Whether method ``name`` explains with the compiled model under --compile."""
    cls = explainer_class(name)
    return compile and cls.autocast and cls.compiles


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
    """ImageBatch -> one row per (image, method, target class), and the side outputs by tag: ERRORS
    (a record, or one of its targets, that cost itself), SKIPPED (pairs an audit history holds),
    TARGETS (pairs beyond one per record), MODEL_CALLS, DEVICE and ADAPTED.

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
            compiled = getattr(state, "compiled", None)
            compiling = compiled is not None and compiled.active
            outputs = list(self.explain_batch(batch))
            after, http_after = self._calls(), _http(state.model)
        if compiling and not compiled.active:
            yield ADAPTED, (COMPILE, compiled.failure)
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
        # non-blocking: an asynchronous DMA where the reader pinned the pixels (a CUDA worker); a plain copy otherwise
        images = torch.from_numpy(batch.pixels).to(state.device, non_blocking=True)
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
        choices, failures = resolve(targets.parse_targets(config.target), logits, predicted, batch.labels,
                                    lambda rows: alone(state.model, images[rows.to(images.device)]),
                                    decision_tolerance(logits.dtype))
        keep, extra = [], 0
        for i in range(len(finite)):
            if not finite[i]:
                yield ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], "model",
                                          "model output (logits or probabilities) is not finite")
                continue
            for failure in failures[i]:  # a request the record cannot satisfy costs that target only
                yield ERRORS, ErrorRecord(batch.image_ids[i], batch.sources[i], "target", failure.reason, None,
                                          failure.cls, failure.source)
            extra += len(choices[i]) + len(failures[i]) - 1
            if choices[i]:
                keep.append(i)
        if extra:
            yield TARGETS, extra
        if not keep:
            return
        seeds = torch.tensor([seed_for(batch.image_ids[i], config.seed) for i in range(len(batch.image_ids))],
                             dtype=torch.int64)
        # One context per target slot (an image's first target, its second...): a method explains
        # a slot's images in one call of at most the batch's size, so memory grows with the batch,
        # not with the targets, and the first slot's call is the one a single --target makes.
        contexts = [_Context(batch, images, torch.tensor([c[j].cls if j < len(c) else 0 for c in choices],
                                                         dtype=torch.long, device=images.device),
                             seeds, probabilities, predicted, [c[j] if j < len(c) else None for c in choices])
                    for j in range(max(len(choices[i]) for i in keep))]
        references: dict[int, dict] = {}
        scorings = []  # every method's maps, scored a slot at once so that the metrics share forward chunks
        for name, explainer in state.explainers.items():
            for j, context in enumerate(contexts):
                slot = [i for i in keep if context.choices[i] is not None]
                rows = [i for i in slot if not self._held(batch, i, name, context.choices[i].cls)]
                if len(rows) < len(slot):  # an incremental audit: the history holds the others
                    yield SKIPPED, ((name, batch.sources[0]), len(slot) - len(rows))
                if not rows:
                    continue
                if j not in references:
                    references[j] = self._references(context, slot)
                scoring = yield from self._explain_method(name, explainer, context, rows,
                                                          {m: {k: v[[slot.index(i) for i in rows]] for k, v in r.items()}
                                                           for m, r in references[j].items()})
                if scoring is not None:
                    scorings.append(scoring)
        # A target slot's methods are scored together, apart from the other slots': a slot's values do
        # not depend on the others (a predicted row equals a single-target run's to the bit).
        scores = {}
        for context in contexts:
            group = [scoring for scoring in scorings if scoring.context is context]
            scores.update(zip(map(id, group), self._shared_scores(group)))
        for scoring in scorings:
            yield from self._rows(scoring, scores[id(scoring)])

    @staticmethod
    def _held(batch: ImageBatch, i: int, method: str, cls: int) -> bool:
        """Whether an audit history holds image i's map of class ``cls`` by ``method``."""
        return ((batch.skip is not None and method in batch.skip[i])
                or (batch.held is not None and cls in batch.held[i].get(method, ())))

    def _references(self, context: "_Context", keep: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Each metric's columns that the batch's methods share (the random-order reference), on the
        kept images."""
        batch = context.metric_batch(self._metric_model(), keep)
        return {metric.name: metric.reference(batch) for metric in self.metrics}

    def _metric_model(self) -> torch.nn.Module:
        return getattr(self.state, "metric_model", self.state.model)  # (a state built by hand has only a model)

    def _compile_fallback(self, error: BaseException) -> bool:
        """A compilation failure of a method's compiled model: eager from now on, and rerun."""
        compiled = getattr(self.state, "compiled", None)
        return compiled is not None and compile_failure(error) and compiled.fall_back(error)

    def _explain_method(self, name, explainer, context: "_Context", rows: list[int], references
                        ) -> Iterator[tuple[str | None, Any]]:
        """Explain ``rows`` with one method: yields its side outputs, returns its stored maps to score
        (a _Scoring), or None."""
        before = self._calls()
        images, targets, seeds = context.images[rows], context.targets[rows], context.seeds[rows]
        # In chunks of the method's batch size: one that runs out of memory is halved and retried,
        # one that fails otherwise is explained an image at a time, so one bad image costs itself only.
        sizes = getattr(self.state, "batch_sizes", {})
        fitted = explain_fitting(lambda lo, hi: explainer.explain(images[lo:hi], targets[lo:hi], seeds[lo:hi]),
                                 len(rows), sizes.get(name, len(rows)), self._compile_fallback, context.images.device)
        if fitted.size < sizes.get(name, len(rows)):
            sizes[name] = fitted.size
            yield ADAPTED, (name, fitted.size)
        outcomes = fitted.outcomes  # (position in rows, Explanation, index in it, ms per image)
        for j, e in sorted(fitted.failures, key=lambda failure: failure[0]):
            i = rows[j]  # stage model: the model could not be asked (an endpoint down)
            yield ERRORS, ErrorRecord(context.batch.image_ids[i], context.batch.sources[i],
                                      getattr(e, "stage", "explain"), f"{type(e).__name__}: {e}", name,
                                      *context.target_of(i))
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
                                          name, *context.target_of(i))
        if not stored:
            return None
        done = [outcomes[n][0] for n in stored]  # positions in rows of the stored maps
        maps = torch.from_numpy(arrays[stored]).to(context.images.device)
        batch = context.metric_batch(self._metric_model(), [rows[j] for j in done],
                                     explain=lambda x, t, s: explainer.explain(x, t, s).maps, chunk=fitted.size)
        return _Scoring(name, context, rows, outcomes, stored, arrays, statistics, batch, maps,
                        {m: {k: v[done] for k, v in r.items()} for m, r in references.items()})

    def _rows(self, scoring: "_Scoring", scores: list[dict[str, Any]]) -> Iterator[tuple[None, dict]]:
        """One row per stored map of a method, with its metrics' columns."""
        name, context, rows, outcomes, arrays, statistics = (scoring.name, scoring.context, scoring.rows,
                                                             scoring.outcomes, scoring.arrays, scoring.statistics)
        for n, values in zip(scoring.stored, scores):
            j, result, k, ms = outcomes[n]
            i = rows[j]
            row = base_row(batch=context.batch, index=i, method=name, fingerprint=self.config.fingerprints.get(name),
                           target=int(context.targets[i]), predicted=int(context.predicted[i]),
                           probabilities=context.probabilities[i], saliency=arrays[n], time_ms=ms,
                           seed=int(context.seeds[i]), statistics={key: v[n] for key, v in statistics.items()},
                           target_rank=context.choices[i].rank, target_source=context.choices[i].source)
            for extra, extra_values in result.extras.items():
                row[extra] = extra_value(extra_values[k])
            row.update(values)
            yield None, row

    def _shared_scores(self, scorings: list["_Scoring"]) -> list[list[dict[str, Any]]]:
        """Per method's stored maps, per map, every enabled metric's columns: each metric scores all the
        methods at once (Metric.score_all); if that fails, each method alone (_scores)."""
        if not self.metrics or len(scorings) < 2:
            return [self._scores(s.batch, s.maps, s.references) for s in scorings]
        try:
            columns = [{} for _ in scorings]
            for metric in self.metrics:
                scored = metric.score_all([(s.batch, s.maps, s.references[metric.name]) for s in scorings])
                for out, values in zip(columns, scored):
                    out.update(values)
            return [[{key: metric_value(values[n]) for key, values in out.items()} for n in range(len(s.maps))]
                    for s, out in zip(scorings, columns)]
        except Exception:
            return [self._scores(s.batch, s.maps, s.references) for s in scorings]

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
class _Scoring:
    """One method's stored maps of a batch slot, waiting for the metrics (scored with the batch's
    other methods), and what its rows need."""

    name: str
    context: "_Context"
    rows: list[int]          # batch positions the method was asked for
    outcomes: list[tuple]    # (position in rows, Explanation, its index, ms per image)
    stored: list[int]        # indices in outcomes of the maps stored (no NaN or inf)
    arrays: np.ndarray       # [len(outcomes),H,W] float32
    statistics: dict[str, np.ndarray]
    batch: MetricBatch       # the stored maps' images
    maps: torch.Tensor       # [len(stored),H,W] on the device
    references: dict[str, dict[str, torch.Tensor]]


@dataclasses.dataclass
class _Context:
    """A batch after prediction, for one target slot: its images, targets, seeds, probabilities,
    predicted classes and choices (class, rank, request), indexed by batch position."""

    batch: ImageBatch
    images: torch.Tensor
    targets: torch.Tensor
    seeds: torch.Tensor
    probabilities: torch.Tensor
    predicted: torch.Tensor
    choices: list  # per batch position, its target of this slot (targets.Choice), or None

    def target_of(self, i: int) -> tuple[int | None, str | None]:
        """(class, request) of image i's target here, for its error rows."""
        choice = self.choices[i]
        return (choice.cls, choice.source) if choice is not None else (None, None)

    def metric_batch(self, model, rows: list[int], explain=None, chunk: int = 32) -> MetricBatch:
        truth = ground_truth(self.batch, rows, self.images.device)
        # All of them: the batch's own tensor, so the methods' scorings share it (and a substrate) uncopied
        images = self.images if rows == list(range(len(self.images))) else self.images[rows]
        return MetricBatch(model=model, images=images, targets=self.targets[rows], seeds=self.seeds[rows],
                           predicted=self.predicted[rows], masks=None if truth is None else truth[0],
                           has_mask=None if truth is None else truth[1], explain=explain, chunk=chunk)
