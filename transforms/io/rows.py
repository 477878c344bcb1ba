"""Arrow schemas of the outputs and the conversion of explanations to rows."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from saliency_audit.explainers import explainer_class
from saliency_audit.explainers.metrics import metric_classes, metric_columns

_TYPES = {
    "float32": pa.float32(), "float64": pa.float64(), "int32": pa.int32(), "int64": pa.int64(),
    "string": pa.string(), "bool": pa.bool_(),
    "float32[]": pa.list_(pa.float32()), "int32[]": pa.list_(pa.int32()), "string[]": pa.list_(pa.string()),
}



def _arrow(arrow: pa.DataType, doc: str = "", nullable: bool = True):
    return dataclasses.field(metadata={"arrow": arrow, "doc": doc, "nullable": nullable})


@dataclasses.dataclass
class BaseRow:
    """The columns every saliency row has, in their order, each with its Arrow type: the one
    definition of the row (the schema below is made from it, the explain step fills it). The
    metrics' columns follow (explainers.metrics registry), then the run's methods' extras."""

    image_id: str = _arrow(pa.string(), nullable=False)
    source: str = _arrow(pa.string(), "the shard's URL")
    content_sha256: str | None = _arrow(pa.string(), "hex sha256 of the image's encoded bytes in the shard")
    record_sha256: str | None = _arrow(pa.string(), "hex sha256 of those bytes, the label and the ground truth")
    label: int | None = _arrow(pa.int64())
    method: str = _arrow(pa.string(), nullable=False)
    method_fingerprint: str | None = _arrow(pa.string(), "in an audit history: what made the map but the model and image")
    target: int = _arrow(pa.int64())
    predicted: int = _arrow(pa.int64())
    score: float = _arrow(pa.float32(), "softmax probability of the target")
    predicted_score: float = _arrow(pa.float32(), "softmax probability of the predicted class")
    height: int = _arrow(pa.int32(), "of the map = of the model input")
    width: int = _arrow(pa.int32())
    original_height: int = _arrow(pa.int32())
    original_width: int = _arrow(pa.int32())
    saliency: Any = _arrow(pa.list_(pa.float32()), "row-major height*width raw values")
    saliency_min: float = _arrow(pa.float32())
    saliency_max: float = _arrow(pa.float32())
    saliency_sum: float = _arrow(pa.float32())
    saliency_abs_mean: float = _arrow(pa.float32())
    time_ms: float = _arrow(pa.float32(), "explanation time per image (batch time / batch size)")
    seed: int = _arrow(pa.int64())
    target_rank: int = _arrow(pa.int32(), "rank of the target in the model's scores: 1 = the predicted class")
    target_source: str = _arrow(pa.string(), "the --target request that asked for it: predicted, label, topN, a class")


def base_row(*, batch, index: int, method: str, fingerprint: str | None, target: int, predicted: int,
             probabilities, saliency: np.ndarray, time_ms: float, seed: int, statistics: dict,
             target_rank: int = 1, target_source: str = "predicted") -> dict[str, Any]:
    """The BaseRow of image ``index`` of ``batch`` (an ImageBatch) for one method's map, as a dict."""
    return vars(BaseRow(
        image_id=batch.image_ids[index], source=batch.sources[index],
        content_sha256=batch.content_sha256[index] if batch.content_sha256 else None,
        record_sha256=batch.record_sha256[index] if batch.record_sha256 else None,
        label=batch.labels[index], method=method, method_fingerprint=fingerprint, target=target, predicted=predicted,
        score=float(probabilities[target]), predicted_score=float(probabilities[predicted]),
        height=saliency.shape[0], width=saliency.shape[1],
        original_height=batch.sizes[index][0], original_width=batch.sizes[index][1],
        saliency=saliency.reshape(-1), time_ms=float(time_ms), seed=seed, target_rank=target_rank,
        target_source=target_source,
        **{key: float(value) for key, value in statistics.items()}))


SALIENCY_FIELDS = [pa.field(f.name, f.metadata["arrow"], nullable=f.metadata["nullable"])
                   for f in dataclasses.fields(BaseRow)]
SALIENCY_FIELDS += [pa.field(column, _TYPES[kind]) for cls in metric_classes() for column, kind in cls.columns.items()]
METRIC_COLUMNS = metric_columns()  # per-image scalars the summary aggregates
SUMMARY_STATISTICS = ("mean", "median", "p10", "p90")

ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("method", pa.string()),  # null: failed before any method ran, counts against every method
    pa.field("target", pa.int64()),  # the class of a failed target, where known
    pa.field("target_source", pa.string()),  # the --target request it failed for; null: before targets
])

SUMMARY_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("target", pa.int64()),   # null: all classes
    # The --target request whose rows (those that answer it: targets.satisfies) the row sums up; a
    # row answering several requests (the predicted class is also top3's first) counts in each.
    pa.field("target_source", pa.string()),
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
