"""The explain step without Beam: load the model and the explainers once per worker, predict a
batch, choose the targets, and what the rows and metrics need (Beam's ml/inference ModelHandler
seam). transforms.explain adapts it to a DoFn; preflight, the sanity check and the dry run call it directly."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers import metrics as quality
from saliency_audit.explainers.core.base import alone, decision_tolerance, stable_argmax
from saliency_audit.explainers.metrics.abele_protocol import AbeleProtocol
from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.records import ImageBatch
from saliency_audit.transforms.model.load import ModelSpec, load_model, resolve_device
from saliency_audit.transforms.model.threads import ThreadBudget

DEVICE = "device"  # side output: the device each batch ran on, so the manifest records the workers'


# side output: (what, calls, images) the model was asked: what = a method (its explain calls), ALL
# (everything: predictions, methods, metrics) or HTTP (an endpoint's requests, retries)
MODEL_CALLS = "model_calls"


ALL, HTTP, NOT_COUNTED = "*", "*http", "*not counted"


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    model: ModelSpec
    methods: dict[str, dict[str, Any]]  # name -> options, in run order
    device: str = "auto"
    target: str = "predicted"  # predicted | label | an integer class
    seed: int = 0
    metrics: bool = True
    metric_steps: int | None = 16  # None: one image row per step (saliency_audit.explainers.metrics.default_steps)
    metric_substrate: str = "zero"
    abele: AbeleProtocol | None = None  # ABELE's relevance/coherence/stability (--abele-metrics)
    road: bool = False  # ROAD MoRF/LeRF per image (--road)
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
