"""``saliency-audit diff DIR_A DIR_B --output DIR``: two audits of the same images (two model
versions, or two settings), compared per image and method.

Per (image, method) present in both: the Spearman rank correlation and the SSIM of the two
maps, the overlap of their top-k pixels (ranked by signed value, the convention of the
deletion metric: the evidence *for* the class), and the change in prediction and score.
Writes ``DIR/diff/part-00000-of-00001.parquet`` and ``DIR/diff.html``, which leads with the
images whose explanation moved most. Maps are streamed from Arrow to numpy a chunk at a time
(as many images as fit MAP_BUDGET bytes per audit) and the rows are written as each chunk is
compared, so memory stays bounded whatever the size of the audits.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from saliency_audit.explainers.metrics import spearman_rank_correlation, ssim
from saliency_audit.pipelines.reporting import render
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.html import img, markup, page, paragraph, table
from saliency_audit.transforms.io import storage

# Bytes of float32 maps held per audit at once (at least one image). The metrics' work arrays
# (float64 copies, sort indices, ranks, SSIM's blurred moments) take about 40 times as much, so
# diff peaks near 0.7 GB above the interpreter, whatever the size of the audits.
MAP_BUDGET = 16 << 20
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
_KEY_COLUMNS = ["image_id", "method", "label", "target", "predicted", "score", "height", "width"]


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


@dataclasses.dataclass
class Chunk:
    """Maps of one method that share a shape and fit the memory budget together: images, and with
    several targets per image the class of each (``targets``, beside ``ids``)."""
    method: str
    height: int
    width: int
    ids: list[str]
    targets: list[int] | None = None  # None: one map per (image, method)

    def keys(self) -> list[tuple[str, int | None]]:
        """Each map's (image id, class or None)."""
        return list(zip(self.ids, self.targets if self.targets is not None else [None] * len(self.ids)))


def _scalars(audit: AuditDir, by_class: bool = False) -> dict[tuple[str, str, int | None], dict]:
    """(image_id, method, target class if ``by_class`` else None) -> the row's scalar columns (no maps)."""
    return {(r["image_id"], r["method"], r["target"] if by_class else None): r
            for r in audit.rows("saliency", _KEY_COLUMNS)}


def plan_chunks(pairs: list[tuple], budget: int = MAP_BUDGET) -> Iterator[Chunk]:
    """(image_id, method, height, width) or (image_id, method, class, height, width) pairs -> chunks
    in (method, shape, image id, class) order, each holding as many maps as fit ``budget`` bytes of
    float32 maps, and at least one."""
    groups = defaultdict(list)
    by_class = bool(pairs) and len(next(iter(pairs))) == 5
    for pair in pairs:
        image_id, method, cls, height, width = pair if by_class else (pair[0], pair[1], None, *pair[2:])
        groups[(method, height, width)].append((image_id, cls))
    for (method, height, width), keys in sorted(groups.items()):
        keys.sort(key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        per_chunk = max(1, budget // (4 * height * width))
        for start in range(0, len(keys), per_chunk):
            part = keys[start:start + per_chunk]
            yield Chunk(method, height, width, [i for i, _ in part], [c for _, c in part] if by_class else None)


class MapReader:
    """Reads the maps of chunks of images from one audit's saliency files, bounded in memory.

    Each file's (image_id, method) keys are held as Arrow columns (some 30 bytes a row, no Python
    object per row). For a chunk, only the files and row groups that hold its rows are read, in
    record batches of about a quarter of the budget (a dataset scan would decode a whole row group,
    which the audit may write as one), each left as soon as it has given them, and maps go from
    Arrow buffers to numpy without a Python object per value."""

    def __init__(self, audit: AuditDir, budget: int = MAP_BUDGET):
        dataset = audit._dataset("saliency")
        self.budget, self.files = budget, list(dataset.files) if dataset is not None else []
        self.filesystem = dataset.filesystem if dataset is not None else None
        self.keys: list[pa.Table] = []  # per file: its rows' image_id and method, in file order
        self.group_starts: list[np.ndarray] = []  # per file: the first row of each of its row groups
        for path in self.files:
            with self.filesystem.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                self.keys.append(parquet.read(columns=["image_id", "method"]))  # (an image's several
                # targets: the chunk's rows of its images are read, and matched by class in _fill)
                sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
            self.group_starts.append(np.cumsum([0, *sizes])[:-1])

    def read(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's maps [N,H,W] float32 (in chunk.keys() order) and which of them were found."""
        position = {key: i for i, key in enumerate(chunk.keys())}
        columns = ["image_id", "method", "saliency"] + (["target"] if chunk.targets is not None else [])
        maps = np.zeros((len(chunk.ids), chunk.height, chunk.width), dtype=np.float32)
        found = np.zeros(len(chunk.ids), dtype=bool)
        pixels = chunk.height * chunk.width
        wanted = pa.array(chunk.ids, pa.string())
        for path, keys, starts in zip(self.files, self.keys, self.group_starts):
            rows = pc.indices_nonzero(pc.fill_null(pc.and_(pc.equal(keys["method"], chunk.method),
                                                           pc.is_in(keys["image_id"], value_set=wanted)), False))
            if not len(rows):
                continue
            expected = len(rows)
            groups = np.unique(np.searchsorted(starts, rows.to_numpy(), side="right") - 1).tolist()
            with self.filesystem.open_input_file(path) as f:
                batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(
                    batch_size=max(1, self.budget // 4 // (4 * pixels)), row_groups=groups, columns=columns)
                for batch in batches:
                    keep = pc.and_(pc.equal(batch.column("method"), chunk.method),
                                   pc.is_in(batch.column("image_id"), value_set=wanted))
                    batch = batch.filter(pc.fill_null(keep, False))
                    expected -= batch.num_rows
                    _fill(batch, position, pixels, maps, found)
                    if expected <= 0:
                        break
        return maps, found


def _fill(batch: pa.RecordBatch, position: dict[tuple, int], pixels: int, maps: np.ndarray, found: np.ndarray
          ) -> None:
    """Copy a batch's maps into their rows of ``maps`` (views of Arrow's buffers, no Python floats);
    ``position``: (image id, class or None) -> row; a row of another class is not the chunk's."""
    lists = batch.column("saliency")
    offsets, values = lists.offsets.to_numpy(), lists.values.to_numpy(zero_copy_only=False)
    valid = pc.is_valid(lists).to_numpy(zero_copy_only=False)
    ids = batch.column("image_id").to_pylist()
    classes = batch.column("target").to_pylist() if "target" in batch.schema.names else [None] * len(ids)
    for row, key in enumerate(zip(ids, classes)):
        start, stop = offsets[row], offsets[row + 1]
        at = position.get(key)
        if at is not None and valid[row] and stop - start == pixels:  # a map of another size is not compared
            maps[at].reshape(-1)[:] = values[start:stop]
            found[at] = True


def compare(chunk: Chunk, maps_a: np.ndarray, maps_b: np.ndarray, scalars_a: list[dict], scalars_b: list[dict],
            top_k: float) -> pa.Table:
    """The diff rows of one chunk (maps and scalar rows aligned with chunk.ids)."""
    a, b = torch.from_numpy(maps_a), torch.from_numpy(maps_b)
    k = pixels_for(top_k, chunk.height * chunk.width)
    rho = spearman_rank_correlation(a, b).numpy()
    similarity = ssim(a, b).numpy()
    score_a = np.array([r["score"] for r in scalars_a], dtype=np.float64)
    score_b = np.array([r["score"] for r in scalars_b], dtype=np.float64)
    columns = {
        "image_id": chunk.ids, "method": [chunk.method] * len(chunk.ids), "label": [r["label"] for r in scalars_a],
        "target_a": [r["target"] for r in scalars_a], "target_b": [r["target"] for r in scalars_b],
        "predicted_a": [r["predicted"] for r in scalars_a], "predicted_b": [r["predicted"] for r in scalars_b],
        "prediction_changed": [x["predicted"] != y["predicted"] for x, y in zip(scalars_a, scalars_b)],
        "score_a": score_a.astype(np.float32), "score_b": score_b.astype(np.float32),
        "score_change": (score_b - score_a).astype(np.float32),
        "rank_correlation": pa.array(rho, pa.float32(), mask=~np.isfinite(rho)),
        "top_k_overlap": top_k_overlap(a, b, k).numpy(), "top_k": np.full(len(chunk.ids), k, dtype=np.int32),
        "ssim": pa.array(similarity, pa.float32(), mask=~np.isfinite(similarity)),
    }
    return pa.Table.from_pydict(columns, schema=DIFF_SCHEMA)


class PageSummary:
    """What diff.html needs from the rows, gathered chunk by chunk: the ``show`` pairs that moved
    most, and per method the values behind the means."""

    _ORDER = [("rank_correlation", "ascending", "at_end"), ("top_k_overlap", "ascending", "at_end"),
              ("image_id", "ascending", "at_end"), ("method", "ascending", "at_end")]

    def __init__(self, show: int):
        self.show, self.moved, self.k = show, [], None
        self.per_method: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.pairs = 0

    def add(self, rows: pa.Table) -> None:
        self.pairs += rows.num_rows
        self.k = self.k if self.k is not None else rows.column("top_k")[0].as_py()
        order = pc.sort_indices(rows, sort_keys=self._ORDER)
        self.moved = _moved_most(self.moved + rows.take(order[: self.show]).to_pylist())[: self.show]
        for method in pc.unique(rows.column("method")).to_pylist():
            mine = rows.filter(pc.equal(rows.column("method"), method))
            columns = {name: mine.column(name).to_numpy(zero_copy_only=False)
                       for name in ("rank_correlation", "top_k_overlap", "ssim", "prediction_changed")}
            # the change in double precision, as the page has always shown it
            columns["score_change"] = (mine.column("score_b").to_numpy().astype(np.float64)
                                       - mine.column("score_a").to_numpy().astype(np.float64))
            for name, values in columns.items():
                self.per_method[method][name].append(values)

    def method_rows(self) -> list[list]:
        out = []
        for method, columns in sorted(self.per_method.items()):
            values = {name: np.concatenate(parts) for name, parts in columns.items()}
            out.append([method, len(values["top_k_overlap"]), _mean(values["rank_correlation"]),
                        _mean(values["top_k_overlap"]), _mean(values["ssim"]),
                        int(values["prediction_changed"].astype(bool).sum()), _mean(values["score_change"])])
        return out


def paired_maps(audit_a: AuditDir, audit_b: AuditDir, pairs: list[tuple], budget: int = MAP_BUDGET
                ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(chunk, maps of A, maps of B) for the (image, method, height, width) pairs both audits
    hold, a chunk of about ``budget`` bytes at a time; ``chunk.ids`` keeps only the images whose
    map both audits could read (a map missing or of another size than its row says is left out)."""
    yield from read_paired(MapReader(audit_a, budget), MapReader(audit_b, budget), plan_chunks(pairs, budget))


def read_paired(reader_a: MapReader, reader_b: MapReader, chunks: Iterable[Chunk]
                ) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
    """``paired_maps`` for chunks planned elsewhere (the gates plan theirs from Arrow tables)."""
    for chunk in chunks:
        maps_a, found_a = reader_a.read(chunk)
        maps_b, found_b = reader_b.read(chunk)
        keep = found_a & found_b
        if not keep.any():
            continue
        chunk.ids = [i for i, k in zip(chunk.ids, keep) if k]
        if chunk.targets is not None:
            chunk.targets = [t for t, k in zip(chunk.targets, keep) if k]
        if not keep.all():
            maps_a, maps_b = maps_a[keep], maps_b[keep]
        yield chunk, maps_a, maps_b


def diff_tables(audit_a: AuditDir, audit_b: AuditDir, top_k: float, budget: int = MAP_BUDGET
                ) -> tuple[Iterator[pa.Table], dict[str, Any]]:
    """The diff rows a chunk at a time, and what could not be compared (pairs only in A, only in B,
    maps of other shapes); info["different_shapes"] is final once the tables are consumed."""
    by_class = audit_a.several_targets or audit_b.several_targets  # pair maps of the same class
    scalars_a, scalars_b = _scalars(audit_a, by_class), _scalars(audit_b, by_class)
    common = scalars_a.keys() & scalars_b.keys()
    shape = {key: (scalars_a[key]["height"], scalars_a[key]["width"]) for key in common}
    same = [((i, m, t) if by_class else (i, m)) + shape[(i, m, t)] for i, m, t in common
            if shape[(i, m, t)] == (scalars_b[(i, m, t)]["height"], scalars_b[(i, m, t)]["width"])]
    info = {"only_a": len(scalars_a.keys() - scalars_b.keys()), "only_b": len(scalars_b.keys() - scalars_a.keys()),
            "different_shapes": len(common)}

    def tables() -> Iterator[pa.Table]:
        for chunk, maps_a, maps_b in paired_maps(audit_a, audit_b, same, budget):
            keys = [(i, chunk.method, t) for i, t in chunk.keys()]
            rows = compare(chunk, maps_a, maps_b, [scalars_a[k] for k in keys], [scalars_b[k] for k in keys], top_k)
            del maps_a, maps_b
            info["different_shapes"] -= rows.num_rows
            yield rows

    return tables(), info


def _moved_most(rows: list[dict]) -> list[dict]:
    """Lowest rank correlation first (a constant map, with no ranking, after the rest)."""
    return sorted(rows, key=lambda r: (r["rank_correlation"] is None,
                                       r["rank_correlation"] if r["rank_correlation"] is not None else 0,
                                       r["top_k_overlap"], r["image_id"], r["method"]))


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    return float(np.mean(values, dtype=np.float64)) if len(values) else None


def shown_maps(audit: AuditDir, pairs: set[tuple[str, str, int | None]]
               ) -> tuple[dict[tuple[str, str, int | None], np.ndarray], dict]:
    """The maps of a few (image_id, method, class or None) triples, read as the diff reads them,
    and their sources (class None: the image's one map of the method)."""
    where = ds.field("image_id").isin(sorted({i for i, _, _ in pairs}))
    by_class = any(t is not None for _, _, t in pairs)
    meta = {(r["image_id"], r["method"], r["target"] if by_class else None): r
            for r in audit.rows("saliency", ["image_id", "method", "target", "source", "height", "width"], where)}
    meta = {key: r for key, r in meta.items() if key in pairs}
    reader, maps = MapReader(audit, MAP_BUDGET), {}
    for chunk in plan_chunks([((i, m, t) if by_class else (i, m)) + (r["height"], r["width"])
                              for (i, m, t), r in meta.items()], MAP_BUDGET):
        values, found = reader.read(chunk)
        maps.update({(i, chunk.method, t): v for (i, t), v, ok in zip(chunk.keys(), values, found) if ok})
    return maps, {i: r["source"] for (i, _, _), r in meta.items()}


def diff_page(audit_a: AuditDir, audit_b: AuditDir, summary: PageSummary, info: dict[str, Any]) -> str:
    moved = summary.moved
    by_class = audit_a.several_targets or audit_b.several_targets

    def key(row):
        return row["image_id"], row["method"], row["target_a"] if by_class else None

    pairs = {key(r) for r in moved}
    (maps_a, sources), (maps_b, _) = shown_maps(audit_a, pairs), shown_maps(audit_b, pairs)
    images = audit_a.images(sources)

    def picture(maps, audit, row):
        values = maps.get(key(row))
        image = images.get(row["image_id"])
        if values is None:
            return "\u2013"
        signed = audit.signed(row["method"])
        rgb = render.overlay(image, values, signed) if image is not None else render.colour_map(values, signed)
        return img(render.data_uri(render.fit(rgb, 128)), f"{row['method']} on {row['image_id']}", 96)

    def image_tag(image_id):
        image = images.get(image_id)
        if image is None:
            return "\u2013"
        return img(render.data_uri(render.fit(render.as_rgb(image), 128)), image_id, 96)

    lead = [[markup("{}<br>{}", image_tag(r["image_id"]), r["image_id"] + (f", class {r['target_a']}" if by_class
                                                                         else "")), r["method"],
             picture(maps_a, audit_a, r), picture(maps_b, audit_b, r), r["rank_correlation"], r["top_k_overlap"],
             r["ssim"], f"{r['predicted_a']} \u2192 {r['predicted_b']}",
             f"{r['score_b'] - r['score_a']:+.3f}"] for r in moved]
    ma, mb = audit_a.manifest, audit_b.manifest

    def describe(m):
        model = m.get("model") or {}
        digest = ", ".join(v[:12] for v in (model.get("sha256") or {}).values())
        return (f"run {m.get('run_id')} ({m.get('finished')}): {model.get('model')} {model.get('weights') or ''} "
                f"sha256 {digest}")

    k = summary.k
    sections = [
        ("moved", "Explanations that moved most",
         paragraph(f"The {len(moved)} (image, method) pairs with the lowest rank correlation between the two audits' "
                   f"maps (A left, B right, over the image; colours as in the report, normalised per map for "
                   f"display only).")
         + table(["image", "method", "A", "B", "rank correlation", f"top-{k} overlap", "SSIM", "prediction A \u2192 B",
                  "score change"], lead, "gallery")),
        ("methods", "Per method",
         table(["method", "pairs", "mean rank correlation", f"mean top-{k} overlap", "mean SSIM",
                "predictions changed", "mean score change"], summary.method_rows())
         + paragraph(f"Not compared: {info['only_a']} pair(s) only in A, {info['only_b']} only in B, "
                     f"{info['different_shapes']} with maps of different sizes.")),
        ("audits", "The two audits", table([], [("A", describe(ma)), ("B", describe(mb))], "kv")
         + paragraph("Rank correlation: Spearman of the signed maps (1 = same ranking of pixels). Top-k overlap: the "
                     "share of A's k highest pixels that are also among B's. Score: the explained class's "
                     "probability; change = B - A.")),
    ]
    return page("Saliency audit diff", f"{summary.pairs} (image, method) pairs compared; A = {audit_a.path}, "
                                       f"B = {audit_b.path}", sections)


def diff_audits(directory_a: str, directory_b: str, output: str, *, top_k: float = 0.1, show: int = 12,
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    if top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    audit_a, audit_b = AuditDir(directory_a, storage_options), AuditDir(directory_b, storage_options)
    tables, info = diff_tables(audit_a, audit_b, top_k, MAP_BUDGET)
    summary = PageSummary(show)
    encoded = pa.BufferOutputStream()  # the compressed scalar rows only: tens of bytes a pair
    with pq.ParquetWriter(encoded, DIFF_SCHEMA, compression="zstd") as writer:
        for rows in tables:
            writer.write_table(rows)
            summary.add(rows)
    if not summary.pairs:
        raise ValueError(f"{directory_a} and {directory_b} share no (image, method) pair with maps of one size")
    table_url = storage.join(output, "diff", "part-00000-of-00001.parquet")
    storage.write_bytes_atomic(table_url, encoded.getvalue().to_pybytes(), storage_options)
    page_url = storage.join(output, "diff.html")
    storage.write_bytes_atomic(page_url, diff_page(audit_a, audit_b, summary, info).encode(), storage_options)
    return {"pairs": summary.pairs, "table": table_url, "page": page_url, **info}
