"""Arrow schemas of the outputs and the conversion of explanations to rows."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from saliency_audit.explainers import explainer_class

_TYPES = {
    "float32": pa.float32(), "float64": pa.float64(), "int32": pa.int32(), "int64": pa.int64(),
    "string": pa.string(), "bool": pa.bool_(),
    "float32[]": pa.list_(pa.float32()), "int32[]": pa.list_(pa.int32()), "string[]": pa.list_(pa.string()),
}

SALIENCY_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("content_sha256", pa.string()),      # hex sha256 of the image's encoded bytes in the shard
    pa.field("label", pa.int64()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("method_fingerprint", pa.string()),  # in an audit history: what made the map but the model and image
    pa.field("target", pa.int64()),
    pa.field("predicted", pa.int64()),
    pa.field("score", pa.float32()),           # softmax probability of the target
    pa.field("predicted_score", pa.float32()), # softmax probability of the predicted class
    pa.field("height", pa.int32()),            # of the map = of the model input
    pa.field("width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("saliency", pa.list_(pa.float32())),  # row-major height*width raw values
    pa.field("saliency_min", pa.float32()),
    pa.field("saliency_max", pa.float32()),
    pa.field("saliency_sum", pa.float32()),
    pa.field("saliency_abs_mean", pa.float32()),
    pa.field("time_ms", pa.float32()),         # explanation time per image (batch time / batch size)
    pa.field("seed", pa.int64()),
    # Quality metrics (null with --no-metrics): RISE deletion/insertion AUC of the target's
    # probability, the same for a random pixel order as the reference, and Gini sparsity.
    pa.field("deletion_auc", pa.float32()),
    pa.field("insertion_auc", pa.float32()),
    pa.field("deletion_auc_random", pa.float32()),
    pa.field("insertion_auc_random", pa.float32()),
    pa.field("gini", pa.float32()),
    # ABELE's protocol (null unless --abele-metrics; see saliency_audit.explainers.metrics.abele_protocol): mean
    # label-flip rate as the least relevant pixels become 0 / 127 / 255, the 3 x 21 flips
    # (fill-major, percentiles min, 5, ..., 95, max), and local Lipschitz ratios against
    # same-class images of the batch (coherence) and salt-and-pepper copies (stability).
    pa.field("relevance_0", pa.float32()),
    pa.field("relevance_127", pa.float32()),
    pa.field("relevance_255", pa.float32()),
    pa.field("relevance_curve", pa.list_(pa.float32())),
    pa.field("coherence_mean", pa.float32()),
    pa.field("coherence_max", pa.float32()),
    pa.field("stability_mean", pa.float32()),
    pa.field("stability_max", pa.float32()),
    # ROAD (null unless --road): mean of the target's probability as 1%, 3%, ..., 99% of the pixels
    # are removed most relevant first (MoRF, lower is better) or least relevant first (LeRF, higher
    # is better), removed pixels filled by noisy linear imputation; road_gap = LeRF - MoRF.
    pa.field("road_morf_auc", pa.float32()),
    pa.field("road_lerf_auc", pa.float32()),
    pa.field("road_gap", pa.float32()),
    # Localisation (null where the image has no ground-truth mask or boxes): the map's maximum in
    # the mask (pointing game; ties: the share of tied maxima inside), the share of positive
    # relevance inside (relevance mass), the share of the |mask| top pixels inside (relevance rank).
    pa.field("pointing_game", pa.float32()),
    pa.field("relevance_mass", pa.float32()),
    pa.field("relevance_rank", pa.float32()),
]
RISE_COLUMNS = ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "gini")
ABELE_COLUMNS = ("relevance_0", "relevance_127", "relevance_255", "coherence_mean", "coherence_max",
                 "stability_mean", "stability_max")
ROAD_COLUMNS = ("road_morf_auc", "road_lerf_auc", "road_gap")
LOCALISATION_COLUMNS = ("pointing_game", "relevance_mass", "relevance_rank")
METRIC_COLUMNS = RISE_COLUMNS + ABELE_COLUMNS + ROAD_COLUMNS + LOCALISATION_COLUMNS  # per-image scalars the summary aggregates
SUMMARY_STATISTICS = ("mean", "median", "p10", "p90")

ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("method", pa.string()),  # null: failed before any method ran, counts against every method
])

SUMMARY_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("target", pa.int64()),   # null: all classes
    pa.field("count", pa.int64()),
    pa.field("labelled", pa.int64()),
    pa.field("accuracy", pa.float64()),  # predicted == label among labelled rows; null if none
    pa.field("mean_score", pa.float64()),
    pa.field("mean_time_ms", pa.float64()),
    pa.field("mean_saliency_abs", pa.float64()),
    pa.field("mean_saliency_sum", pa.float64()),
    # Maps that say nothing: all zero (empty), or one value everywhere (constant, empty included).
    pa.field("empty_maps", pa.int64()),
    pa.field("constant_maps", pa.int64()),
    pa.field("empty_share", pa.float64()),
    pa.field("constant_share", pa.float64()),
    *[pa.field(f"{stat}_{name}", pa.float64()) for name in METRIC_COLUMNS for stat in SUMMARY_STATISTICS],
    # From the driver-side sanity check (null without --sanity-check): the mean Spearman rank
    # correlation between the trained and the fully randomised model's maps, and whether it
    # stays above the threshold (the method's maps do not depend on the model).
    pa.field("sanity_rank_correlation", pa.float64()),
    pa.field("sanity_flagged", pa.bool_()),
    # The random logit test (Sixt et al. 2020), in the same step: the mean rank correlation between
    # the maps of the target and of another class, and whether it stays above the threshold (the
    # method's maps do not depend on the class explained).
    pa.field("random_logit_rank_correlation", pa.float64()),
    pa.field("random_logit_flagged", pa.bool_()),
])


def saliency_schema(methods: Iterable[str]) -> pa.Schema:
    """The base columns plus the extras of every method in the run (null for the others)."""
    fields = {f.name: f for f in SALIENCY_FIELDS}
    for method in methods:
        for name, kind in explainer_class(method).extras.items():
            if kind not in _TYPES:
                raise TypeError(f"method {method}: extra {name!r} has unknown type {kind!r}")
            field = pa.field(name, _TYPES[kind])
            if name in fields and fields[name].type != field.type:
                raise TypeError(f"extra {name!r} of {method} is {field.type}, elsewhere {fields[name].type}")
            fields.setdefault(name, field)
    return pa.schema(list(fields.values()))


def extra_value(value: Any) -> Any:
    """One image's extra (tensor, array, number, string) as a Parquet-ready Python value."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.reshape(-1).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def map_statistics(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Per map of ``maps`` [N,H,W]: min, max, sum and mean |value| (float64 sums), vectorised
    over the batch."""
    flat = maps.reshape(len(maps), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        return {"saliency_min": flat.min(axis=1), "saliency_max": flat.max(axis=1),
                "saliency_sum": flat.sum(axis=1, dtype=np.float64),
                "saliency_abs_mean": np.abs(flat).mean(axis=1, dtype=np.float64)}


def map_problems(maps: np.ndarray, statistics: dict[str, np.ndarray]) -> list[str | None]:
    """Per map, why it cannot be stored (NaN or infinite values, in it or in its float32
    statistics), or None."""
    finite = np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    with np.errstate(over="ignore"):
        stored = np.stack([np.isfinite(v.astype(np.float32)) for v in statistics.values()]).all(axis=0)
    return [None if ok and fits else "the map has NaN or infinite values" if not ok
            else "the map's sum or mean overflows float32" for ok, fits in zip(finite, stored)]


_NUMPY = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64,
          pa.int32(): np.int32, pa.int64(): np.int64}


def _column(values: list, field: pa.Field) -> pa.Array:
    """One column; lists of 1-D arrays (the maps) are built from one concatenated buffer instead
    of value by value."""
    dtype = _NUMPY.get(field.type.value_type) if pa.types.is_list(field.type) else None
    if dtype is not None and values and all(isinstance(v, np.ndarray) and v.ndim == 1 for v in values):
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([len(v) for v in values], out=offsets[1:])
        flat = np.concatenate(values).astype(dtype, copy=False)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field.type.value_type))
    return pa.array(values, type=field.type)


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([_column([row.get(f.name) for row in rows], f) for f in schema], schema=schema)
