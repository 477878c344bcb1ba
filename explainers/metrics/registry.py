"""The one registry of per-image quality metrics, as the methods have theirs.

A metric is one class in one file (its computation beside it): the columns it adds to every
saliency row, the run options it takes (flags, spec keys and fingerprint follow from them), its
cost in forward passes, the convention the manifest records, and how it scores one method's maps
on a batch. The explain step runs every registered metric its options turn on, and the row
schema, the summary, the plan's cost and the manifest take their columns and texts from here: a
new metric touches no other file.

    @register_metric
    class Sparsity(Metric):
        name = "sparsity"
        columns = {"sparsity": "float32"}
        options = (Option("sparsity", "switch", help="..."),)
        switch = "sparsity"

        def score(self, batch, maps, reference):
            return {"sparsity": ...}  # [N]

        def passes(self, height, width):  # it asks the model nothing
            return {"per_map": 0, "per_image": 0, "explanations": 0}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from saliency_audit.explainers.core.options import Option

# Column types a metric may declare (as the methods' extras): one value or one list per row.
COLUMN_TYPES = ("float32", "float32[]")


@dataclasses.dataclass
class MetricBatch:
    """What a metric sees of one batch for one method: the images the method explained (model-input
    space), their targets, seeds and predicted classes, their ground truth where the shards carry
    it, and the method under test (for metrics that explain perturbed copies again)."""

    model: torch.nn.Module
    images: torch.Tensor                     # [N,C,H,W]
    targets: torch.Tensor                    # [N]
    seeds: torch.Tensor                      # [N] int64
    predicted: torch.Tensor                  # [N]
    masks: torch.Tensor | None = None        # [N,H,W] bool, or None when no image has ground truth
    has_mask: torch.Tensor | None = None     # [N] bool
    explain: Callable[..., torch.Tensor] | None = None  # (images, targets, seeds) -> maps [n,H,W]
    chunk: int = 32                          # images per call of ``explain``

    def take(self, rows: list[int]) -> "MetricBatch":
        """The same for the images at ``rows``."""
        index = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return dataclasses.replace(self, images=pick(self.images), targets=pick(self.targets), seeds=pick(self.seeds),
                                   predicted=pick(self.predicted), masks=pick(self.masks),
                                   has_mask=pick(self.has_mask))


class Metric:
    """Base class of every registered metric.

    Subclasses set ``name``, ``columns`` (column -> type, see COLUMN_TYPES), ``options`` (their run
    options; each must be declared fingerprint=True, since it changes the metric's columns), ``switch`` (the option that turns the metric
    on; None: always on, e.g. where its inputs exist), and implement ``score`` and ``passes`` (its
    cost: the plan, the manifest and the report read it there); ``reference`` computes, once per
    batch, columns every method of the batch shares; ``score_all`` may share work between methods.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # its heading in the report (default: its name)
    columns: ClassVar[dict[str, str]] = {}
    options: ClassVar[tuple[Option, ...]] = ()
    switch: ClassVar[str | None] = None

    def __init__(self, settings: Mapping[str, Any]):
        """``settings``: the run's option values by name (its own options and any other it reads)."""
        self.settings = settings

    @classmethod
    def enabled(cls, settings: Mapping[str, Any]) -> bool:
        return cls.switch is None or bool(settings.get(cls.switch))

    def reference(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        """Columns [N] the batch's methods share (a random-order reference), computed once a batch."""
        return {}

    def score(self, batch: MetricBatch, maps: torch.Tensor, reference: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """Column -> [N] (or [N, n] for a list column) for the maps [N,H,W] of one method;
        ``reference``: this metric's reference() of the same images. NaN stores a null."""
        raise NotImplementedError

    def score_all(self, items: Sequence[tuple[MetricBatch, torch.Tensor, dict[str, torch.Tensor]]]
                  ) -> list[dict[str, torch.Tensor]]:
        """score() of several (batch, maps, reference) at once, e.g. every method's maps of one batch,
        so that a metric can share work between them (deletion and insertion share forward chunks).
        Must equal ``[self.score(*item) for item in items]`` within float rounding; the items' batches
        share the model."""
        return [self.score(*item) for item in items]

    def check(self, height: int, width: int) -> str | None:
        """Why the metric cannot run on model inputs of this size with these settings, or None
        (checked in preflight on a sample image, so it fails before the job starts)."""
        return None

    def passes(self, height: int, width: int) -> dict[str, int]:
        """The cost per image on model inputs of ``height`` x ``width`` with these settings, counted
        as the model sees it: ``per_map`` forward passes for each method's map, ``per_image`` forward
        passes shared by the batch's methods (the reference), ``explanations`` per map (the method
        run again, at the method's own cost; an upper bound where some are skipped). Every metric
        declares it (register_metric checks); tests/explainers/test_metric_costs.py counts it."""
        raise NotImplementedError(f"metric {self.name!r} declares no cost")

    def convention(self) -> str:
        """What the columns mean, for the manifest."""
        return ""


_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: make ``cls`` a metric of every run its switch turns on."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"metric {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    loose = [option.name for option in cls.options if not option.fingerprint]
    if loose:  # its options change its columns: a history must explain again when they change
        raise TypeError(f"metric {cls.name!r}: option(s) {', '.join(loose)} must be declared fingerprint=True")
    bad = {column: kind for column, kind in cls.columns.items() if kind not in COLUMN_TYPES}
    if bad:
        raise TypeError(f"metric {cls.name!r}: column types {bad} not in {COLUMN_TYPES}")
    if cls.passes is Metric.passes:  # the plan, the manifest and the report print its cost
        raise TypeError(f"metric {cls.name!r} declares no cost: define passes(height, width)")
    taken = {column: other.name for other in _REGISTRY.values() if other is not cls for column in other.columns}
    clash = sorted(set(cls.columns) & set(taken))
    if clash:
        raise TypeError(f"metric {cls.name!r}: column(s) {', '.join(clash)} belong to metric {taken[clash[0]]!r}")
    _REGISTRY[cls.name] = cls
    return cls


def metric_classes() -> list[type[Metric]]:
    """The registered metrics, in registration order (the order of their columns)."""
    return list(_REGISTRY.values())


def metric_class(name: str) -> type[Metric]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(_REGISTRY)}") from None


def metric_options() -> list[Option]:
    """Every registered metric's options."""
    return [option for cls in metric_classes() for option in cls.options]


def metric_columns(name: str | None = None, scalar: bool = True) -> tuple[str, ...]:
    """The columns of metric ``name`` (None: of every metric), scalars only unless ``scalar`` is False."""
    return tuple(column for cls in metric_classes() if name in (None, cls.name)
                 for column, kind in cls.columns.items() if not scalar or kind == "float32")


def enabled_metrics(settings: Mapping[str, Any]) -> list[Metric]:
    """The metrics a run's settings turn on, built for it."""
    return [cls(settings) for cls in metric_classes() if cls.enabled(settings)]


def metric_costs(settings: Mapping[str, Any], height: int, width: int) -> dict[str, dict[str, int]]:
    """Each metric the settings turn on -> its passes() on model inputs of this size."""
    return {metric.name: metric.passes(height, width) for metric in enabled_metrics(settings)}


def metric_forward_passes(costs: Mapping[str, Mapping[str, int]], method_forwards: Sequence[int]) -> int:
    """The metrics' forward passes per image and target for methods of ``method_forwards`` forward
    passes each: every reference once, every per-map cost once per method, and each explanation
    again at its method's forwards."""
    return sum(cost["per_image"] + sum(cost["per_map"] + cost["explanations"] * forwards for forwards in method_forwards)
               for cost in costs.values())
