"""The stored form of saliency maps: float32 (exact) or float16 (half the bytes).

Metrics and map statistics are computed from the float32 maps before they are stored; only
the ``saliency`` column changes. float16 keeps about 3 significant digits and values up to
65504 in magnitude: larger ones are clipped (the row's saliency_min/max keep the exact range).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def saliency_schema(schema: pa.Schema, dtype: str) -> pa.Schema:
    index = schema.get_field_index("saliency")
    return schema.set(index, pa.field("saliency", pa.list_(DTYPES[dtype][1])))


def stored_row(row: dict, dtype: str) -> dict:
    if dtype == "float32":
        return row
    values = np.clip(np.asarray(row["saliency"], dtype=np.float32), -FLOAT16_MAX, FLOAT16_MAX)
    return {**row, "saliency": values.astype(np.float16)}


def convention(dtype: str) -> str:
    if dtype == "float32":
        return "float32, exact"
    return ("float16: about 3 significant digits, values beyond +-65504 clipped; metrics and "
            "saliency_min/max/sum/abs_mean come from the float32 maps")
