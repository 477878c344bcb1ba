"""``saliency-audit diff DIR_A DIR_B --output DIR``: two audits of the same images (two model
versions, or two settings), compared per image and method.

Per (image, method) present in both: the Spearman rank correlation and the SSIM of the two
maps, the overlap of their top-k pixels (ranked by signed value, the convention of the
deletion metric: the evidence *for* the class), and the change in prediction and score.
Writes ``DIR/diff/part-00000-of-00001.parquet`` and ``DIR/diff.html``, which leads with the
images whose explanation moved most. Maps are read a chunk of images at a time, so memory
stays bounded on large audits.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from explainers.metrics import spearman_rank_correlation, ssim
from pipelines.reporting import render
from pipelines.reporting.audit_dir import AuditDir, saliency_map
from pipelines.reporting.html import Raw, esc, img, page, paragraph, table
from transforms import storage

CHUNK = 2048  # images whose maps are held in memory at once
DIFF_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("method", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("target_a", pa.int64()), pa.field("target_b", pa.int64()),
    pa.field("predicted_a", pa.int64()), pa.field("predicted_b", pa.int64()),
    pa.field("prediction_changed", pa.bool_()),
    pa.field("score_a", pa.float32()), pa.field("score_b", pa.float32()),
    pa.field("score_change", pa.float32()),           # score_b - score_a (each the target's probability)
    pa.field("rank_correlation", pa.float32()),       # Spearman of the signed maps; null if one is constant
    pa.field("top_k_overlap", pa.float32()),          # |top-k(a) & top-k(b)| / k
    pa.field("top_k", pa.int32()),
    pa.field("ssim", pa.float32()),                   # maps min-max scaled on their own first
])
_ROW_COLUMNS = ["image_id", "method", "label", "target", "predicted", "score", "height", "width", "saliency"]


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the k highest pixels of a [N,H,W] that are also among b's k highest -> [N]."""
    n = a.shape[0]
    top_a = a.reshape(n, -1).topk(k, dim=1).indices
    top_b = b.reshape(n, -1).topk(k, dim=1).indices
    hits = torch.zeros(n, a[0].numel(), dtype=torch.bool)
    hits.scatter_(1, top_a, True)
    return hits.gather(1, top_b).float().sum(dim=1) / k


def pixels_for(top_k: float, pixels: int) -> int:
    """--top-k as a fraction of the pixels (< 1) or a count, clamped to [1, pixels]."""
    k = round(top_k * pixels) if top_k < 1 else int(top_k)
    return max(1, min(pixels, k))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def compare(rows_a: list[dict], rows_b: dict[str, dict], top_k: float) -> list[dict]:
    """Diff rows of one method's image rows in A against B's rows by image id."""
    groups = defaultdict(list)  # maps of one shape are compared in one batch
    for a in rows_a:
        b = rows_b.get(a["image_id"])
        if b is not None and (a["height"], a["width"]) == (b["height"], b["width"]):
            groups[(a["height"], a["width"])].append((a, b))
    out = []
    for (height, width), pairs in groups.items():
        maps_a = torch.from_numpy(np.stack([saliency_map(a) for a, _ in pairs]))
        maps_b = torch.from_numpy(np.stack([saliency_map(b) for _, b in pairs]))
        k = pixels_for(top_k, height * width)
        rho = spearman_rank_correlation(maps_a, maps_b).tolist()
        overlap = top_k_overlap(maps_a, maps_b, k).tolist()
        similarity = ssim(maps_a, maps_b).tolist()
        for i, (a, b) in enumerate(pairs):
            out.append({"image_id": a["image_id"], "method": a["method"], "label": a["label"],
                        "target_a": a["target"], "target_b": b["target"],
                        "predicted_a": a["predicted"], "predicted_b": b["predicted"],
                        "prediction_changed": a["predicted"] != b["predicted"],
                        "score_a": a["score"], "score_b": b["score"], "score_change": b["score"] - a["score"],
                        "rank_correlation": _finite(rho[i]), "top_k_overlap": overlap[i], "top_k": k,
                        "ssim": _finite(similarity[i])})
    return out


def diff_rows(audit_a: AuditDir, audit_b: AuditDir, top_k: float) -> tuple[list[dict], dict[str, Any]]:
    """All diff rows, and what could not be compared (pairs only in A, only in B, other shapes)."""
    keys_a = {(r["image_id"], r["method"]) for r in audit_a.rows("saliency", ["image_id", "method"])}
    keys_b = {(r["image_id"], r["method"]) for r in audit_b.rows("saliency", ["image_id", "method"])}
    common = keys_a & keys_b
    by_method = defaultdict(list)
    for image_id, method in sorted(common):
        by_method[method].append(image_id)
    rows = []
    for method, ids in sorted(by_method.items()):
        for start in range(0, len(ids), CHUNK):
            where = (ds.field("method") == method) & ds.field("image_id").isin(ids[start:start + CHUNK])
            rows_a = audit_a.rows("saliency", _ROW_COLUMNS, where)
            rows_b = {r["image_id"]: r for r in audit_b.rows("saliency", _ROW_COLUMNS, where)}
            rows += compare(rows_a, rows_b, top_k)
    info = {"only_a": len(keys_a - keys_b), "only_b": len(keys_b - keys_a),
            "different_shapes": len(common) - len(rows)}
    return rows, info


def _moved_most(rows: list[dict]) -> list[dict]:
    """Lowest rank correlation first (a constant map, with no ranking, after the rest)."""
    return sorted(rows, key=lambda r: (r["rank_correlation"] is None,
                                       r["rank_correlation"] if r["rank_correlation"] is not None else 0,
                                       r["top_k_overlap"], r["image_id"], r["method"]))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def diff_page(audit_a: AuditDir, audit_b: AuditDir, rows: list[dict], info: dict[str, Any], show: int) -> str:
    moved = _moved_most(rows)[:show]
    ids = {r["image_id"] for r in moved}
    maps_a, maps_b = audit_a.map_rows(ids), audit_b.map_rows(ids)
    images = audit_a.images({i: r["source"] for (i, _), r in maps_a.items()})

    def picture(maps, audit, row):
        found = maps.get((row["image_id"], row["method"]))
        image = images.get(row["image_id"])
        if found is None:
            return "\u2013"
        values, signed = saliency_map(found), audit.signed(row["method"])
        rgb = render.overlay(image, values, signed) if image is not None else render.colour_map(values, signed)
        return img(render.data_uri(render.fit(rgb, 128)), f"{row['method']} on {row['image_id']}", 96)

    def image_tag(image_id):
        image = images.get(image_id)
        if image is None:
            return "\u2013"
        return img(render.data_uri(render.fit(render.as_rgb(image), 128)), image_id, 96)

    lead = [[Raw(f"{image_tag(r['image_id'])}<br>{esc(r['image_id'])}"), r["method"],
             picture(maps_a, audit_a, r), picture(maps_b, audit_b, r), r["rank_correlation"], r["top_k_overlap"],
             r["ssim"], f"{r['predicted_a']} \u2192 {r['predicted_b']}", f"{r['score_change']:+.3f}"] for r in moved]
    per_method = defaultdict(list)
    for r in rows:
        per_method[r["method"]].append(r)
    summary = [[m, len(rs), _mean(r["rank_correlation"] for r in rs), _mean(r["top_k_overlap"] for r in rs),
                _mean(r["ssim"] for r in rs), sum(r["prediction_changed"] for r in rs),
                _mean(r["score_change"] for r in rs)] for m, rs in sorted(per_method.items())]
    ma, mb = audit_a.manifest, audit_b.manifest

    def describe(m):
        model = m.get("model") or {}
        digest = ", ".join(v[:12] for v in (model.get("sha256") or {}).values())
        return (f"run {m.get('run_id')} ({m.get('finished')}): {model.get('model')} {model.get('weights') or ''} "
                f"sha256 {digest}")

    k = rows[0]["top_k"] if rows else None
    sections = [
        ("moved", "Explanations that moved most",
         paragraph(f"The {len(moved)} (image, method) pairs with the lowest rank correlation between the two audits' "
                   f"maps (A left, B right, over the image; colours as in the report, normalised per map for "
                   f"display only).")
         + table(["image", "method", "A", "B", "rank correlation", f"top-{k} overlap", "SSIM", "prediction A \u2192 B",
                  "score change"], lead, "gallery")),
        ("methods", "Per method",
         table(["method", "pairs", "mean rank correlation", f"mean top-{k} overlap", "mean SSIM",
                "predictions changed", "mean score change"], summary)
         + paragraph(f"Not compared: {info['only_a']} pair(s) only in A, {info['only_b']} only in B, "
                     f"{info['different_shapes']} with maps of different sizes.")),
        ("audits", "The two audits", table([], [("A", describe(ma)), ("B", describe(mb))], "kv")
         + paragraph("Rank correlation: Spearman of the signed maps (1 = same ranking of pixels). Top-k overlap: the "
                     "share of A's k highest pixels that are also among B's. Score: the explained class's "
                     "probability; change = B - A.")),
    ]
    return page("Saliency audit diff", f"{len(rows)} (image, method) pairs compared; A = {audit_a.path}, "
                                       f"B = {audit_b.path}", sections)


def diff_audits(directory_a: str, directory_b: str, output: str, *, top_k: float = 0.1, show: int = 12,
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    if top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    audit_a, audit_b = AuditDir(directory_a, storage_options), AuditDir(directory_b, storage_options)
    rows, info = diff_rows(audit_a, audit_b, top_k)
    if not rows:
        raise ValueError(f"{directory_a} and {directory_b} share no (image, method) pair with maps of one size")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DIFF_SCHEMA), buffer, compression="zstd")
    table_url = storage.join(output, "diff", "part-00000-of-00001.parquet")
    storage.write_bytes_atomic(table_url, buffer.getvalue(), storage_options)
    page_url = storage.join(output, "diff.html")
    storage.write_bytes_atomic(page_url, diff_page(audit_a, audit_b, rows, info, show).encode(), storage_options)
    return {"pairs": len(rows), "table": table_url, "page": page_url, **info}
