"""Clever-Hans discovery: per (method, class), where the class's attribution mass sits and
whether the class's maps fall into distinct strategies (SpRAy). See docs/findings.md.

Every map is summed into a ``grid`` x ``grid`` map of cells and normalised to unit L1 of |map|:
each image then counts once whatever its scale, and signed and unsigned methods compare alike
(a shortcut can carry strong negative evidence too, and the positive part alone of a mostly
negative map is noise). Empty maps (all zero) say nothing and are skipped.

One score for every finding, in [0, 1], higher = more suspicious. For a group of maps (a class,
or one SpRAy cluster of it) and a candidate region r (a ``window`` x ``window`` block of cells at
any position, the four corners among them, and the border band):

- ``reference(r)``: the share of mass in r that 90% of the *other classes'* sampled maps do not
  exceed. Mass that every class puts in r (the centre, where digits are) is not the signal.
- ``excess = mean share of the group's maps in r - reference(r)``
- ``consistency = fraction of the group's maps whose own share in r exceeds reference(r)``
- ``score = max over r of max(excess, 0) * consistency``

Kinds: ``concentration`` (the whole class) and ``spray_cluster`` (Lapuschkin et al. 2019,
"Unmasking Clever Hans predictors and assessing what machines really learn": a deterministic
sample of at most ``sample`` maps per (method, class), the smallest hashes of the image ids; a
symmetric k-nearest-neighbour graph; the normalised Laplacian's smallest eigenvalues; the number
of clusters k at the largest eigengap lambda_(k+1) - lambda_k, k <= ``max_clusters``; k-means on
the row-normalised spectral embedding). A cluster is scored on its own maps, so a strategy that
only part of the class follows (a watermark on some of its images) stands out even when the
class as a whole does not; a class with one cluster gets one unscored row.

Memory holds one record batch and, per (method, class), one grid of sums and at most twice
``sample`` pooled maps: it depends on the number of classes, never on the number of images.

A run gathers the same per-(method, class) statistics inside its job
(saliency_audit.pipelines.job.findings_step) and the launcher computes the findings from them
(``findings_from_statistics``), without reading a map back: equal to ``find_clever_hans`` on the
run's files, since the statistics merge in any order to the same state (docs/findings.md).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from threadpoolctl import threadpool_limits

from saliency_audit.transforms.io import storage

SCORE_THRESHOLD = 0.35  # a finding above this is flagged (the findings gate's default too) (see docs/findings.md)
DEFAULT_GRID = 10
DEFAULT_WINDOW = 2
DEFAULT_SAMPLE = 400
DEFAULT_NEIGHBOURS = 10
DEFAULT_MAX_CLUSTERS = 6
MAX_IMAGES = 100     # image ids listed per finding
PROTOTYPES = 5
OTHERS_QUANTILE = 0.9
MIN_SUPPORT = 5      # maps a group needs before it is scored: 3 of 3 sparse maps in one place is chance, not a strategy
REFERENCE_POOL = 4000  # other classes' maps a class is compared with, at most (10 classes x 400: all of them)

FINDINGS_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("class", pa.int64()),
    pa.field("kind", pa.string()),               # "concentration" or "spray_cluster"
    pa.field("score", pa.float64()),             # excess share x consistency, in [0, 1]
    pa.field("flagged", pa.bool_()),             # score > the threshold
    pa.field("region", pa.string()),             # in pixels: "top-left corner (rows 0-5, cols 0-5)", ...
    pa.field("excess_share", pa.float64()),      # the group's mean share there minus the others' 90th percentile
    pa.field("consistency", pa.float64()),       # share of the group's maps above the others' 90th percentile there
    pa.field("images", pa.list_(pa.string())),   # the images that carry it, strongest first, capped
    pa.field("prototypes", pa.list_(pa.string())),  # spray: nearest to the cluster's mean map
    pa.field("cluster", pa.int32()),             # spray: the cluster's index in the class (largest first)
    pa.field("clusters", pa.int32()),            # spray: the number of clusters the eigengap gave
    pa.field("eigengap", pa.float64()),          # spray: lambda_(k+1) - lambda_k of the normalised Laplacian
    pa.field("size", pa.int64()),                # sampled maps that carry it / in the cluster
    pa.field("share_of_class", pa.float64()),    # size / the class's sampled images
    pa.field("class_images", pa.int64()),        # the class's non-empty maps, all of them
    pa.field("mean_map", pa.list_(pa.float32())),  # grid x grid, row-major, unit L1 of |map|
    pa.field("map_height", pa.int32()),
    pa.field("map_width", pa.int32()),
    pa.field("description", pa.string()),
])

_COLUMNS = ["image_id", "method", "target", "predicted", "height", "width", "saliency"]


def id_hash(image_id: str) -> int:
    """A stable 64-bit hash of an image id: the sample is the smallest ones, in any order."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8", "replace"), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=64)  # the job pools a few maps at a time: build each matrix once
def pool_matrix(size: int, grid: int) -> np.ndarray:
    """[grid, size] 0/1: pixel i belongs to cell floor(i * grid / size) (cells differ by one pixel at most)."""
    cells = (np.arange(size) * grid) // size
    matrix = (cells[None, :] == np.arange(grid)[:, None]).astype(np.float32)
    matrix.flags.writeable = False  # shared by every caller
    return matrix


def pooled(maps: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """maps [N,H,W] -> (cells [N,grid,grid] of |map| summed, unit L1 per map; non-empty mask [N])."""
    n, h, w = maps.shape
    cells = pool_matrix(h, grid) @ np.abs(maps) @ pool_matrix(w, grid).T
    total = cells.reshape(n, -1).sum(axis=1)
    keep = np.isfinite(total) & (total > 0)
    cells[keep] /= total[keep, None, None]
    return cells, keep


@dataclass
class Region:
    name: str
    mask: np.ndarray  # [grid, grid] bool


def regions(grid: int, window: int, height: int, width: int) -> list[Region]:
    """The candidate regions: every window position, the border band (outer ring of cells) and
    the four corners (window-sized); named in pixels of a height x width map."""
    rows = [np.flatnonzero(pool_matrix(height, grid)[g]) for g in range(grid)]
    cols = [np.flatnonzero(pool_matrix(width, grid)[g]) for g in range(grid)]

    def block(r0: int, c0: int, label: str = "") -> Region:
        mask = np.zeros((grid, grid), bool)
        mask[r0:r0 + window, c0:c0 + window] = True
        r1, c1 = r0 + window - 1, c0 + window - 1
        text = f"rows {rows[r0][0]}-{rows[r1][-1]}, cols {cols[c0][0]}-{cols[c1][-1]}"
        return Region(f"{label} ({text})" if label else text, mask)

    corners = {(0, 0): "top-left corner", (0, grid - window): "top-right corner",
               (grid - window, 0): "bottom-left corner", (grid - window, grid - window): "bottom-right corner"}
    found = [block(r, c, corners.get((r, c), "")) for r in range(grid - window + 1) for c in range(grid - window + 1)]
    border = np.ones((grid, grid), bool)
    border[1:-1, 1:-1] = False
    found.append(Region(f"border band (outer {len(rows[0])} pixels)", border))
    return found


def _fixed_point(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells in [0, 1] [N, grid, grid] -> their sum as two integer limbs (hi / 2^32 + lo / 2^64 per
    cell). Integer sums are exact, so a class's total is the same in any order of rows, bundles and
    merges (a float sum is not). Scaling a float32 by 2^32 in float64 and taking the floor and the
    remainder are exact; lo is rounded only below 2^-64. int64 holds 2^31 maps per (method, class)."""
    scaled = cells.astype(np.float64) * 2.0 ** 32
    high = np.floor(scaled)
    low = np.rint((scaled - high) * 2.0 ** 32)
    return high.astype(np.int64).sum(axis=0), low.astype(np.int64).sum(axis=0)


@dataclass
class ClassMaps:
    """One (method, class): the exact sum of its maps and a bounded, order-independent sample (the
    ``sample_size`` smallest (hash, id)). Accumulators merge in any order to the same state, so the
    job can build them bundle by bundle (saliency_audit.pipelines.job.findings_step) and the launcher
    reads only them."""
    sample_size: int
    count: int = 0
    high: Any = 0  # the sum of the maps' cells in fixed point (_fixed_point)
    low: Any = 0
    shape: tuple[int, int] | None = None  # the maps' height and width: that of the smallest (hash, id)
    shape_key: tuple[int, str] | None = None
    hashes: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)

    def add(self, image_ids: list[str], cells: np.ndarray, shape: tuple[int, int]) -> None:
        high, low = _fixed_point(cells)
        hashes = [id_hash(i) for i in image_ids]
        self._absorb(len(cells), high, low, min(zip(hashes, image_ids)), shape, hashes, list(image_ids), list(cells))

    def merge(self, other: ClassMaps) -> None:
        if other.count:
            self._absorb(other.count, other.high, other.low, other.shape_key, other.shape, other.hashes, other.ids,
                         other.maps)

    def _absorb(self, count, high, low, shape_key, shape, hashes, ids, maps) -> None:
        self.count += count
        self.high, self.low = self.high + high, self.low + low
        if self.shape_key is None or shape_key < self.shape_key:
            self.shape_key, self.shape = shape_key, tuple(shape)
        self.hashes.extend(hashes)
        self.ids.extend(ids)
        self.maps.extend(maps)
        if len(self.ids) > 2 * self.sample_size:
            self._trim()

    def mean(self) -> np.ndarray:
        """The class's mean map [grid, grid]: a function of the exact total, so the same in any order."""
        return (self.high.astype(np.float64) + self.low.astype(np.float64) / 2.0 ** 32) / 2.0 ** 32 / self.count

    def _trim(self) -> None:
        order = sorted(range(len(self.ids)), key=lambda i: (self.hashes[i], self.ids[i]))[: self.sample_size]
        self.hashes, self.ids, self.maps = ([xs[i] for i in order] for xs in (self.hashes, self.ids, self.maps))

    def sample(self) -> tuple[list[str], np.ndarray]:
        self._trim()
        order = sorted(range(len(self.ids)), key=lambda i: self.ids[i])  # a stable order for clustering
        return [self.ids[i] for i in order], np.stack([self.maps[i] for i in order])

    def __getstate__(self) -> dict:  # Beam pickles accumulators between stages: the maps as one array
        state = dict(self.__dict__)
        state["maps"] = np.stack(self.maps) if self.maps else None
        return state

    def __setstate__(self, state: dict) -> None:
        maps = state.pop("maps")
        self.__dict__.update(state, maps=list(maps) if maps is not None else [])


def _dataset(source: ds.Dataset | str | Iterable[str], storage_options: dict[str, Any] | None) -> ds.Dataset | None:
    """The saliency files as one dataset; None for no files (a run without rows has no findings)."""
    if isinstance(source, ds.Dataset):
        return source
    files = [source] if isinstance(source, str) else list(source)
    if not files:
        return None
    fs, _ = storage.filesystem(files[0], storage_options)
    return ds.dataset([storage.filesystem(f, storage_options)[1] for f in files], format="parquet", filesystem=fs)


def _usable(image_id, method, label, height, width, length) -> bool:
    """A row with an id, a method, a class and a map of height x width values (the file and the job
    paths skip the same rows)."""
    return (image_id is not None and method is not None and label is not None and bool(height) and bool(width)
            and height > 0 and width > 0 and length == height * width)


def _batch_maps(batch: pa.RecordBatch) -> Iterable[tuple[str, int, list[str], np.ndarray]]:
    """(method, class, image ids, maps [N,H,W] float32) per group of same-shaped valid rows.
    A row without a map, a class or a consistent shape is skipped."""
    if batch.num_rows == 0:
        return
    column = batch.column("saliency")
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    target = batch.column("target").to_pylist()
    predicted = batch.column("predicted").to_pylist() if "predicted" in batch.schema.names else [None] * len(target)
    meta = zip(batch.column("image_id").to_pylist(), batch.column("method").to_pylist(), target, predicted,
               batch.column("height").to_pylist(), batch.column("width").to_pylist(), column.is_valid().to_pylist())
    groups: dict[tuple, list[int]] = {}
    ids: list[str] = []
    for i, (image_id, method, t, p, h, w, valid) in enumerate(meta):
        ids.append(image_id)
        label = t if t is not None else p
        if valid and _usable(image_id, method, label, h, w, offsets[i + 1] - offsets[i]):
            groups.setdefault((method, int(label), h, w), []).append(i)
    for (method, label, h, w), rows in groups.items():
        maps = np.stack([values[offsets[i]:offsets[i + 1]] for i in rows]).reshape(len(rows), h, w)
        yield method, label, [ids[i] for i in rows], maps


def collect(dataset: ds.Dataset, grid: int, sample: int, batch_size: int = 128,
            where=None) -> dict[tuple[str, int], ClassMaps]:
    """Stream the saliency rows once: per (method, class), the sum and the sample of pooled maps."""
    names = set(dataset.schema.names)
    missing = {"image_id", "method", "target", "height", "width", "saliency"} - names
    if missing:
        raise ValueError(f"the saliency table lacks the columns {sorted(missing)}")
    groups: dict[tuple[str, int], ClassMaps] = {}
    for batch in dataset.to_batches(columns=[c for c in _COLUMNS if c in names], batch_size=batch_size,
                                    filter=where):
        for method, label, image_ids, maps in _batch_maps(batch):
            _add(groups, method, label, image_ids, maps, grid, sample)
    return groups


def _add(groups: dict[tuple[str, int], ClassMaps], method: str, label: int, image_ids: list[str], maps: np.ndarray,
         grid: int, sample: int) -> None:
    """Pool same-shaped maps [N,H,W] of one (method, class) into its group."""
    cells, keep = _cells(maps, grid)
    if keep.any():
        groups.setdefault((method, label), ClassMaps(sample)).add(
            [i for i, k in zip(image_ids, keep) if k], cells[keep], maps.shape[1:])


def _cells(maps: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``pooled``, with nothing kept of maps smaller than the grid (a cell would hold no pixel:
    too small to locate anything) or empty ones."""
    if min(maps.shape[1:]) < grid:
        return maps[:, :0, :0], np.zeros(len(maps), bool)
    return pooled(maps, grid)


def add_rows(groups: dict[tuple[str, int], ClassMaps], rows: list[dict], grid: int, sample: int) -> None:
    """Saliency rows (dicts, as the job stores them) into their groups, as ``collect`` adds them from
    the files: the same rows skipped, the maps of one (method, class, shape) pooled together."""
    batches: dict[tuple, list[dict]] = {}
    for row in rows:
        label = row.get("target") if row.get("target") is not None else row.get("predicted")
        values = row.get("saliency")
        if values is not None and _usable(row.get("image_id"), row.get("method"), label, row.get("height"),
                                          row.get("width"), len(values)):
            batches.setdefault((row["method"], int(label), int(row["height"]), int(row["width"])), []).append(row)
    for (method, label, height, width), batch in batches.items():
        maps = np.stack([np.asarray(r["saliency"]) for r in batch]).astype(np.float32, copy=False)
        _add(groups, method, label, [r["image_id"] for r in batch], maps.reshape(len(batch), height, width),
             grid, sample)


def knn_affinity(x: np.ndarray, neighbours: int) -> np.ndarray:
    """Symmetric 0/1 k-nearest-neighbour graph of the rows of x (no self-loops)."""
    n = len(x)
    k = min(neighbours, max(2, round(np.sqrt(n))), n - 1)  # a small class: fewer neighbours, or it is one blob
    squared = (x * x).sum(axis=1)
    distance = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    affinity = np.zeros((n, n))
    affinity[np.repeat(np.arange(n), k), nearest.ravel()] = 1.0
    return np.maximum(affinity, affinity.T)


def spectral_clusters(x: np.ndarray, neighbours: int, max_clusters: int,
                      seed: int = 0) -> tuple[np.ndarray, int, float]:
    """SpRAy's clustering of the rows of x: (labels, k, eigengap). The normalised Laplacian's
    eigenvalues lambda_1 <= lambda_2 <= ...; k maximises lambda_(k+1) - lambda_k, k <= max_clusters."""
    import scipy.linalg  # already loaded with the explainers (scikit-image, captum)

    n = len(x)
    if n < 3:
        return np.zeros(n, int), 1, 0.0
    affinity = knn_affinity(x, neighbours)
    scale = 1.0 / np.sqrt(affinity.sum(axis=1))
    normalised = scale[:, None] * affinity * scale[None, :]
    top = min(max_clusters, n - 1)
    # Only the top + 1 largest eigenpairs (the Laplacian's smallest) are used: LAPACK's subset solver
    # finds them in a third of the time of all n (400 maps: 45 ms against 123 ms).
    eigenvalues, eigenvectors = scipy.linalg.eigh(normalised, subset_by_index=[n - top - 1, n - 1])
    laplacian = 1.0 - eigenvalues[::-1]
    vectors = eigenvectors[:, ::-1]
    gaps = np.diff(laplacian)
    k = int(np.argmax(gaps)) + 1
    if k == 1:
        return np.zeros(n, int), 1, float(gaps[0])
    embedding = vectors[:, :k]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    # a cluster k-means left empty (fewer distinct rows than k) is dropped: labels stay 0..k-1, all used
    labels = np.unique(kmeans(embedding, k, seed), return_inverse=True)[1].reshape(-1)
    return labels, int(labels.max()) + 1, float(gaps[k - 1])


def kmeans(x: np.ndarray, k: int, seed: int = 0, starts: int = 10, iterations: int = 300) -> np.ndarray:
    """Labels of the rows of x in k clusters: Lloyd's iterations from k-means++ seeds (Arthur and
    Vassilvitskii 2007), the lowest inertia of ``starts`` seedings. At most a few hundred rows in
    k <= max_clusters dimensions here: 18 ms in NumPy, and the same clusters as scikit-learn's KMeans
    (ten starts) on 37 of 37 synthetic spectral embeddings, whose import alone took a second of every run."""
    rng = np.random.default_rng(seed)
    best_inertia, best = np.inf, np.zeros(len(x), int)
    for _ in range(starts):
        centres = x[[rng.integers(len(x))]]
        for _ in range(1, k):  # each next seed drawn with probability proportional to its squared distance
            distance = ((x[:, None, :] - centres[None]) ** 2).sum(-1).min(axis=1)
            pick = rng.choice(len(x), p=distance / distance.sum()) if distance.sum() > 0 else rng.integers(len(x))
            centres = np.vstack([centres, x[pick]])
        for _ in range(iterations):
            labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
            moved = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else centres[c] for c in range(k)])
            if np.array_equal(moved, centres):
                break
            centres = moved
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best = inertia, labels
    return best


def references(samples: dict[int, np.ndarray], masks: np.ndarray, pool: int = REFERENCE_POOL) -> dict[int, np.ndarray]:
    """Per class and region, the share of its mass that 90% of the other classes' sampled maps do
    not exceed (with one class only: a uniform map's share). The other classes' maps come from one
    pool of at most ``pool`` maps, evenly spread over each class's sample, so a model with many
    classes costs classes x pool, not classes squared x sample."""
    shares = {c: s.reshape(len(s), -1) @ masks.T for c, s in samples.items()}
    area = masks.sum(axis=1) / masks.shape[1]
    if len(shares) < 2:
        return {c: area for c in shares}
    per_class = max(1, pool // len(shares))
    picked = {c: v[np.unique(np.linspace(0, len(v) - 1, min(per_class, len(v))).round().astype(int))]
              for c, v in shares.items()}
    owners = np.concatenate([np.full(len(v), c) for c, v in picked.items()])
    pooled = np.concatenate(list(picked.values()))
    return {c: np.quantile(pooled[owners != c], OTHERS_QUANTILE, axis=0) for c in shares}


@dataclass
class Scored:
    region: int
    score: float
    excess: float
    consistency: float
    shares: np.ndarray  # each map's share in the region
    mean_share: float


def score_group(maps: np.ndarray, reference: np.ndarray, masks: np.ndarray) -> Scored:
    """The region where excess share x consistency is highest, for a group of maps."""
    shares = maps.reshape(len(maps), -1) @ masks.T           # [N, R]
    excess = shares.mean(axis=0) - reference
    consistency = (shares > reference).mean(axis=0)
    scores = np.clip(excess, 0.0, None) * consistency
    best = int(np.argmax(scores))
    return Scored(best, float(scores[best]), float(excess[best]), float(consistency[best]),
                  shares[:, best], float(shares[:, best].mean()))


def _describe(group: str, region: str, scored: Scored) -> str:
    if scored.score <= 0:
        return f"{group}: no region stands out"
    usual = scored.mean_share - scored.excess
    return (f"{group}: {100 * scored.mean_share:.0f}% of its attribution mass in {region}, where 90% of the "
            f"other classes' maps put at most {100 * usual:.0f}%; {100 * scored.consistency:.0f}% of its maps "
            f"put more than that there")


@dataclass
class Context:
    """One method's fixed inputs to its findings."""
    method: str
    regions: list[Region]
    masks: np.ndarray  # [R, grid*grid]
    threshold: float
    max_images: int
    grid: int

    def row(self, kind: str, label: int, scored: Scored, carriers: list[str], mean_map: np.ndarray, *, size: int,
            sampled: int, class_images: int, description: str, **spray: Any) -> dict:
        return {"method": self.method, "class": label, "kind": kind, "score": scored.score,
                "flagged": scored.score > self.threshold,
                "region": self.regions[scored.region].name if scored.score > 0 else None,
                "excess_share": scored.excess, "consistency": scored.consistency,
                "images": carriers[:self.max_images], "prototypes": spray.get("prototypes", []),
                "cluster": spray.get("cluster"), "clusters": spray.get("clusters"), "eigengap": spray.get("eigengap"),
                "size": size, "share_of_class": size / sampled if sampled else None, "class_images": class_images,
                "mean_map": mean_map.astype(np.float32).ravel(), "map_height": self.grid, "map_width": self.grid,
                "description": description}


def find_clever_hans(source: ds.Dataset | str | Iterable[str], storage_options: dict[str, Any] | None = None, *,
                     grid: int = DEFAULT_GRID, window: int = DEFAULT_WINDOW, sample: int = DEFAULT_SAMPLE,
                     neighbours: int = DEFAULT_NEIGHBOURS, max_clusters: int = DEFAULT_MAX_CLUSTERS,
                     threshold: float = SCORE_THRESHOLD, max_images: int = MAX_IMAGES, where=None) -> pa.Table:
    """The findings of a run's saliency files (or a pyarrow dataset of them), most suspicious first.

    One ``concentration`` row per (method, class) and one ``spray_cluster`` row per cluster;
    ``flagged`` where the score is above ``threshold``. ``where``: the rows to read (an audit with
    several targets per image: its main request's, so that each image counts once per method).
    A run computes the same from the statistics its job gathered (``findings_from_statistics``)."""
    _check(grid, window, sample, neighbours, max_clusters)
    dataset = _dataset(source, storage_options)
    if dataset is None:
        return FINDINGS_SCHEMA.empty_table()
    return findings_table(collect(dataset, grid, sample, where=where), grid, window=window, neighbours=neighbours,
                          max_clusters=max_clusters, threshold=threshold, max_images=max_images)


def _check(grid: int, window: int, sample: int, neighbours: int, max_clusters: int) -> None:
    if not (grid >= 2 and 1 <= window < grid and sample >= 3 and neighbours >= 1 and max_clusters >= 1):
        raise ValueError(f"need grid >= 2, 1 <= window < grid, sample >= 3, neighbours >= 1 and max_clusters >= 1; "
                         f"got grid={grid}, window={window}, sample={sample}, neighbours={neighbours}, "
                         f"max_clusters={max_clusters}")


def findings_table(groups: dict[tuple[str, int], ClassMaps], grid: int, *, window: int = DEFAULT_WINDOW,
                   neighbours: int = DEFAULT_NEIGHBOURS, max_clusters: int = DEFAULT_MAX_CLUSTERS,
                   threshold: float = SCORE_THRESHOLD, max_images: int = MAX_IMAGES) -> pa.Table:
    """The findings table of the per-(method, class) statistics, most suspicious first."""
    shapes: dict[str, tuple[tuple[int, str], tuple[int, int]]] = {}
    for (method, _), group in groups.items():  # per method, the shape of its smallest (hash, id): any order agrees
        if method not in shapes or group.shape_key < shapes[method][0]:
            shapes[method] = (group.shape_key, group.shape)
    rows: list[dict] = []
    # One BLAS/OpenMP thread: the eigendecompositions and k-means here are small (at most ``sample``
    # maps), and a thread pool per core made them 10x slower on a busy 2-core machine (issue 26).
    with threadpool_limits(1):
        for method in sorted(shapes):
            candidates = regions(grid, window, *shapes[method][1])
            context = Context(method, candidates, np.stack([r.mask.ravel() for r in candidates]).astype(np.float64),
                              threshold, max_images, grid)
            classes = {label: g for (m, label), g in groups.items() if m == method}
            samples = {label: g.sample() for label, g in classes.items()}
            refs = references({c: s[1] for c, s in samples.items()}, context.masks)
            for label in sorted(classes):
                ids, maps = samples[label]
                rows.append(concentration(context, label, classes[label], ids, maps, refs[label]))
                rows += spray(context, label, classes[label].count, ids, maps, refs[label], neighbours, max_clusters)
    rows.sort(key=lambda r: (-r["score"], r["method"], r["class"], r["kind"], r["cluster"] or 0))
    return pa.Table.from_pylist(rows, schema=FINDINGS_SCHEMA)


# --- the statistics a run's job gathers: small, whatever the number of maps -------------------------

STATISTICS_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("class", pa.int64()),
    pa.field("grid", pa.int32()),
    pa.field("sample", pa.int32()),                # the sample's cap
    pa.field("count", pa.int64()),                 # the group's non-empty maps, all of them
    pa.field("sum_high", pa.list_(pa.int64())),    # their cells' exact sum, grid x grid (_fixed_point)
    pa.field("sum_low", pa.list_(pa.int64())),
    pa.field("height", pa.int32()),                # the maps' shape, and the image it was taken from
    pa.field("width", pa.int32()),
    pa.field("shape_image", pa.string()),
    pa.field("image_ids", pa.list_(pa.string())),  # the sample, by id
    pa.field("cells", pa.list_(pa.float32())),     # its pooled maps, sample x grid x grid, row-major
])


def statistics_table(groups: dict[tuple[str, int], ClassMaps], grid: int) -> pa.Table:
    """The groups as a table of one row per (method, class): the sample trimmed to its cap."""
    rows = []
    for (method, label), group in sorted(groups.items()):
        ids, maps = group.sample()
        rows.append({"method": method, "class": label, "grid": grid, "sample": group.sample_size, "count": group.count,
                     "sum_high": group.high.ravel(), "sum_low": group.low.ravel(), "height": group.shape[0],
                     "width": group.shape[1], "shape_image": group.shape_key[1], "image_ids": ids,
                     "cells": maps.astype(np.float32).ravel()})
    return pa.Table.from_pylist(rows, schema=STATISTICS_SCHEMA)


def groups_from_statistics(table: pa.Table) -> tuple[dict[tuple[str, int], ClassMaps], int]:
    """``statistics_table`` read back: the groups, as the job left them, and their grid."""
    if missing := set(STATISTICS_SCHEMA.names) - set(table.column_names):
        raise ValueError(f"the findings statistics lack the columns {sorted(missing)}")
    grids = set(table.column("grid").to_pylist())
    if len(grids) > 1:
        raise ValueError(f"the findings statistics mix grids {sorted(grids)}")
    grid = grids.pop() if grids else DEFAULT_GRID
    groups = {}
    for row in table.to_pylist():
        ids = row["image_ids"]
        cells = np.asarray(row["cells"], np.float32).reshape(len(ids), grid, grid)
        groups[(row["method"], row["class"])] = ClassMaps(
            row["sample"], row["count"], np.asarray(row["sum_high"], np.int64).reshape(grid, grid),
            np.asarray(row["sum_low"], np.int64).reshape(grid, grid), (row["height"], row["width"]),
            (id_hash(row["shape_image"]), row["shape_image"]), [id_hash(i) for i in ids], list(ids), list(cells))
    return groups, grid


def findings_from_statistics(table: pa.Table, *, window: int = DEFAULT_WINDOW, neighbours: int = DEFAULT_NEIGHBOURS,
                             max_clusters: int = DEFAULT_MAX_CLUSTERS, threshold: float = SCORE_THRESHOLD,
                             max_images: int = MAX_IMAGES) -> pa.Table:
    """The findings of a run from the statistics its job gathered (saliency_audit.pipelines.job.findings_step):
    the same table as ``find_clever_hans`` on the run's saliency files, without reading them."""
    groups, grid = groups_from_statistics(table)
    _check(grid, window, 3, neighbours, max_clusters)  # the sample's cap was the job's to choose
    return findings_table(groups, grid, window=window, neighbours=neighbours, max_clusters=max_clusters,
                          threshold=threshold, max_images=max_images)


def concentration(context: Context, label: int, group: ClassMaps, ids: list[str], maps: np.ndarray,
                  reference: np.ndarray) -> dict:
    """The class's region with the most class-specific mass (unscored under MIN_SUPPORT maps)."""
    scored = score_group(maps, reference, context.masks)
    if len(maps) < MIN_SUPPORT:
        scored = Scored(scored.region, 0.0, scored.excess, scored.consistency, scored.shares, scored.mean_share)
    carrying = np.flatnonzero(scored.shares > reference[scored.region])
    carriers = [ids[i] for i in carrying[np.argsort(-scored.shares[carrying], kind="stable")]]
    description = (_describe(f"{context.method}, class {label}", context.regions[scored.region].name, scored)
                   if len(maps) >= MIN_SUPPORT else
                   f"{context.method}, class {label}: too few maps to call a strategy ({len(maps)} < {MIN_SUPPORT})")
    return context.row("concentration", label, scored, carriers, group.mean(), size=len(carriers),
                       sampled=len(ids), class_images=group.count, description=description)


def spray(context: Context, label: int, class_images: int, ids: list[str], maps: np.ndarray, reference: np.ndarray,
          neighbours: int, max_clusters: int) -> list[dict]:
    """SpRAy's clusters of the class's sampled maps, largest first, each scored on its own maps: a
    strategy that only part of the class follows. A class with one cluster gets one row, unscored
    (its concentration row speaks for it)."""
    flat = maps.reshape(len(maps), -1)
    labels, k, gap = spectral_clusters(flat, neighbours, max_clusters)
    order = sorted(range(k), key=lambda c: (-int((labels == c).sum()), c))
    found = []
    for index, c in enumerate(order):
        members = np.flatnonzero(labels == c)
        centre = flat[members].mean(axis=0)
        nearest = members[np.argsort(((flat[members] - centre) ** 2).sum(axis=1), kind="stable")]
        enough = len(members) >= MIN_SUPPORT
        if k > 1 and enough:
            scored = score_group(maps[members], reference, context.masks)
        else:
            scored = Scored(0, 0.0, 0.0, 0.0, np.zeros(len(members)), 0.0)
        group = (f"{context.method}, class {label}, SpRAy cluster {index + 1} of {k} ({len(members)} of "
                 f"{len(ids)} sampled maps, eigengap {gap:.2f})")
        description = (f"{group}: one strategy for the whole class" if k == 1 else
                       _describe(group, context.regions[scored.region].name, scored) if enough else
                       f"{group}: too few maps to call a strategy (fewer than {MIN_SUPPORT})")
        found.append(context.row("spray_cluster", label, scored, [ids[i] for i in nearest], centre,
                                 size=len(members), sampled=len(ids), class_images=class_images,
                                 description=description, prototypes=[ids[i] for i in nearest[:PROTOTYPES]],
                                 cluster=index, clusters=k, eigengap=gap))
    return found
