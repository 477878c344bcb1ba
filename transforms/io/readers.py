"""Shard readers: WebDataset-style tar, Parquet with image bytes, and plain image files.

Each reader yields RawImage for every record it can read and ErrorRecord for every
record (or whole shard) it cannot, so nothing read is ever dropped silently.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import numbers
import posixpath
import tarfile
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq

from saliency_audit.explainers.core.paths import keep_secret
from saliency_audit.transforms.io.records import DEFAULT_MAX_PIXELS, ErrorRecord, RawImage

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "npy")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_SUFFIXES = TAR_SUFFIXES + (".parquet",) + tuple("." + e for e in IMAGE_EXTENSIONS)
INT64 = range(-2 ** 63, 2 ** 63)
# Bytes read ahead of an npy array to check its header (numpy refuses headers over 10000).
NPY_HEADER_PEEK = 16 * 1024
LABEL_MAX_BYTES = 1024
# Ground truth (docs/ground_truth.md): a KEY.mask.png member or `mask` column (PNG bytes), and
# boxes in a KEY.json member or a `boxes` column. A box JSON is small: 1 MiB holds ~40,000 boxes.
MASK_EXTENSION = "mask.png"
JSON_EXTENSION = "json"
JSON_MAX_BYTES = 1 << 20
MAX_BOXES = 65536
MEMBER_TYPES = {tarfile.LNKTYPE: "hard link", tarfile.SYMTYPE: "symbolic link", tarfile.CHRTYPE: "character device",
                tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def max_image_bytes(max_pixels: int) -> int:
    """The most bytes an image within --max-pixels can take: 4 channels of float64, plus a
    header allowance. Larger members are not read at all."""
    return max_pixels * 4 * 8 + 64 * 1024


def shard_kind(url: str) -> str:
    name = url.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return "image"
    raise ValueError(f"unsupported shard type: {url} (expected one of {', '.join(SHARD_SUFFIXES)})")


def read_shard(url: str, storage_options: dict[str, Any] | None = None, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[RawImage | ErrorRecord]:
    """All records of one shard, in shard order. Records larger than ``max_pixels`` allows
    are errors before their bytes are read."""
    try:
        kind = shard_kind(url)
    except ValueError as e:
        yield ErrorRecord(url, url, "read", str(e))
        return
    reader = {"tar": _read_tar, "parquet": _read_parquet, "image": _read_image_file}[kind]
    keep_secret(storage_options)  # their values are redacted from the reasons of error records
    try:
        yield from reader(url, storage_options or {}, max_pixels)
    except Exception as e:  # a reader bug must still cost only the rest of this shard
        yield ErrorRecord(url, url, "read", f"unreadable shard: {type(e).__name__}: {e}")


def parse_label(value: Any) -> int | None:
    """A record's label: an int in the int64 range or an integral float; None for no label.
    Anything else raises ValueError saying what the label was."""
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        number = _parse_number(value.strip())
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if isinstance(number, numbers.Integral) and not isinstance(number, bool) and int(number) in INT64:
        return int(number)
    raise ValueError(f"label is not an integer in the int64 range: {_shown(value, 40)}")


def _parse_number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def image_problem(fmt: str, size: int, prefix: bytes, max_pixels: int) -> str | None:
    """Why an image of ``size`` bytes starting with ``prefix`` must not be read, or None."""
    limit = max_image_bytes(max_pixels)
    if size > limit:
        return f"image of {size} bytes is over the limit of {limit} bytes for {max_pixels} pixels (--max-pixels)"
    return npy_problem(prefix, size, max_pixels) if fmt == "npy" else None


def npy_problem(prefix: bytes, size: int, max_pixels: int) -> str | None:
    """Check an npy array's shape and dtype from its header alone. An unreadable header is
    left to the decoder to report."""
    stream = io.BytesIO(prefix)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return f"unsupported npy format version {version}"
        shape, _, dtype = read_header(stream)
    except Exception:
        return None
    if dtype.hasobject or not (dtype.kind == "f" or (dtype.kind == "u" and dtype.itemsize <= 2)):
        return f"unsupported npy dtype {dtype}"
    pixels = math.prod(shape[:2]) if len(shape) in (2, 3) else math.prod(shape)
    if pixels > max_pixels or math.prod(shape) > 4 * max_pixels:
        return f"npy image of shape {shape}: over the limit of {max_pixels} pixels (--max-pixels)"
    needed = stream.tell() + math.prod(shape) * dtype.itemsize
    if needed > size:
        return f"npy array is truncated: shape {shape} of {dtype} needs {needed} bytes, the data has {size}"
    return None


def parse_boxes(value: Any, *, xywh: bool = False) -> list[list[float]]:
    """Boxes [[x0, y0, x1, y1], ...] (``xywh``: one COCO box [x, y, w, h]) as finite floats
    with x0 <= x1 and y0 <= y1. Anything else raises ValueError saying which box is wrong
    and why. Coordinates outside the image are left to be clipped."""
    if xywh:
        x, y, w, h = _box(value, "bbox")
        if w < 0 or h < 0:
            raise ValueError(f"ground truth bbox has a negative width or height: {_shown(value)}")
        return [[x, y, x + w, y + h]]
    if not isinstance(value, list):
        raise ValueError(f"ground truth boxes must be a list of [x0, y0, x1, y1], got {_shown(value)}")
    if len(value) > MAX_BOXES:
        raise ValueError(f"ground truth has {len(value)} boxes, over the limit of {MAX_BOXES}")
    boxes = [_box(box, f"box {i}") for i, box in enumerate(value)]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if x1 < x0 or y1 < y0:
            raise ValueError(f"ground truth box {i} is inverted (x1 < x0 or y1 < y0): {_shown(value[i])}")
    return boxes


def _box(value: Any, name: str) -> list[float]:
    """Four finite numbers as floats, or ValueError naming the box."""
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        try:
            box = [float(v) for v in value]
        except OverflowError:  # an int beyond float's range
            box = [math.inf]
        if all(math.isfinite(v) for v in box):
            return box
        raise ValueError(f"ground truth {name} has a NaN or infinite coordinate: {_shown(value)}")
    raise ValueError(f"ground truth {name} is not 4 numbers: {_shown(value)}")


def boxes_from_json(data: bytes) -> list[list[float]] | None:
    """The boxes of a KEY.json member: its "boxes" ([[x0, y0, x1, y1], ...]) and "bbox" (one
    COCO [x, y, w, h]) together; None when it has neither (a JSON of other metadata). Other
    keys are ignored. Malformed JSON, or JSON that is not an object, raises ValueError."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"ground truth JSON is malformed: {type(e).__name__}: {_shown(str(e))}") from None
    if not isinstance(document, dict):
        raise ValueError(f"ground truth JSON must be an object, got {type(document).__name__}")
    found = [parse_boxes(document[key], xywh=key == "bbox") for key in ("boxes", "bbox")
             if document.get(key) is not None]
    return [box for boxes in found for box in boxes] if found else None


def _shown(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(member_name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


@dataclasses.dataclass
class _Sample:
    """The members of one tar sample read so far, and why any could not be."""

    key: str
    duplicate: bool = False
    parts: dict[str, bytes] = dataclasses.field(default_factory=dict)  # ext -> data
    names: dict[str, str] = dataclasses.field(default_factory=dict)    # member name -> ext
    problems: list[str] = dataclasses.field(default_factory=list)


def _read_tar(url: str, storage_options: dict, max_pixels: int) -> Iterator[RawImage | ErrorRecord]:
    # Members of one sample are adjacent in a WebDataset tar; stream them and emit a
    # sample when its key changes, so a shard never has to fit in memory.
    sample: _Sample | None = None
    seen: set[str] = set()
    try:
        with fsspec.open(url, "rb", **storage_options) as f, _open_tar_stream(f) as tar:
            for member in tar:
                if member.isdir():
                    continue
                member_key, ext = _split_key(member.name)
                if sample is None or member_key != sample.key:
                    if sample is not None:
                        yield _tar_sample(sample, url)
                    sample = _Sample(member_key, duplicate=member_key in seen)
                    seen.add(member_key)
                if sample.duplicate:
                    continue  # stream past it unread
                try:
                    _add_member(tar, member, ext, sample, max_pixels)
                except (tarfile.TarError, EOFError, OSError) as e:
                    # The archive ends inside this member: report it and stop reading.
                    yield ErrorRecord(member_key, url, "read", f"truncated tar member {member.name}: {e}")
                    return
            if sample is not None:
                last, sample = sample, None
                yield _tar_sample(last, url)
            tail = _unread_tail(tar)
            if 0 < tail < tarfile.BLOCKSIZE:
                # tarfile takes a partial header block for the end of the archive;
                # a complete archive ends with whole zero blocks instead.
                yield ErrorRecord(f"{url}@{tar.offset}", url, "read",
                                  f"tar shard is truncated: it ends inside a member header at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f" after {len(seen) - 1} samples" if len(seen) > 1 else ""
        yield ErrorRecord(sample.key if sample else url, url, "read",
                          f"unreadable tar shard{where}: {type(e).__name__}: {e}")


def _open_tar_stream(f) -> tarfile.TarFile:
    """A streaming TarFile. Gzip is inflated by GzipFile, which inflates at most what is
    asked for: tarfile's own gzip stream inflates whole input chunks and copies what is
    left on every read, so skipping a large, very compressible member takes minutes."""
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return tarfile.open(fileobj=gzip.GzipFile(fileobj=f, mode="rb"), mode="r|")
    return tarfile.open(fileobj=f, mode="r|*")


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, sample: _Sample, max_pixels: int) -> None:
    """Read one member into its sample, or note why it cannot be; never follow a link out of
    the sample, and never read a member too large for its kind."""
    if member.islnk() and member.linkname in sample.names:
        sample.parts[ext] = sample.parts[sample.names[member.linkname]]
        return
    if not member.isfile():
        kind = MEMBER_TYPES.get(member.type, f"member of tar type {member.type!r}")
        target = f" to {member.linkname!r}" if member.issym() or member.islnk() else ""
        sample.problems.append(f"member {member.name!r} is a {kind}{target}, not a regular file")
        return
    if ext.startswith("mask.") and ext != MASK_EXTENSION:  # a lossy mask would blur its edge: refuse, not ignore
        sample.problems.append(f"ground truth mask member {member.name!r} must be a PNG (KEY.{MASK_EXTENSION})")
        return
    limit = _member_limit(ext, max_pixels)
    if limit is None:
        sample.parts[ext] = b""  # not used: listed, not read
        return
    if member.size > limit[0]:
        sample.problems.append(f"member {member.name!r} is {member.size} bytes, over the limit of {limit[0]} bytes"
                               + limit[1])
        return
    stream = tar.extractfile(member)
    data = stream.read(NPY_HEADER_PEEK) if ext == "npy" else b""
    problem = npy_problem(data, member.size, max_pixels) if ext == "npy" else None
    if problem:
        sample.problems.append(f"member {member.name!r}: {problem}")
        return
    data += stream.read()
    if len(data) != member.size:
        raise EOFError(f"{len(data)} of {member.size} bytes")
    sample.parts[ext] = data
    sample.names[member.name] = ext


def _member_limit(ext: str, max_pixels: int) -> tuple[int, str] | None:
    """The most bytes a member of this kind may have, with the words that say why; None for a
    member that is not read. A mask has no more pixels than its image."""
    if ext in IMAGE_EXTENSIONS or ext == MASK_EXTENSION:
        return max_image_bytes(max_pixels), f" for {max_pixels} pixels (--max-pixels)"
    return {"cls": (LABEL_MAX_BYTES, ""), JSON_EXTENSION: (JSON_MAX_BYTES, "")}.get(ext)


def _unread_tail(tar: tarfile.TarFile) -> int:
    """Bytes of the (decompressed) stream after the last header tarfile looked at."""
    stream = tar.fileobj
    while stream.read(1 << 20):
        pass
    return stream.pos - tar.offset


def _tar_sample(sample: _Sample, url: str) -> RawImage | ErrorRecord:
    key, parts = sample.key, sample.parts
    if sample.duplicate:
        return ErrorRecord(key, url, "read", "duplicate image id within the shard (the first one was read)")
    if sample.problems:
        return ErrorRecord(key, url, "read", "; ".join(sample.problems))
    image_exts = [e for e in IMAGE_EXTENSIONS if e in parts]
    if not image_exts:
        return ErrorRecord(key, url, "read", f"sample has no image member (found: {', '.join(sorted(parts))})")
    try:
        label = parse_label(_cls_text(parts["cls"])) if "cls" in parts else None
        boxes = boxes_from_json(parts[JSON_EXTENSION]) if JSON_EXTENSION in parts else None
    except ValueError as e:
        return ErrorRecord(key, url, "read", str(e))
    ext = image_exts[0]
    return RawImage(key, url, parts[ext], ext, label, mask=parts.get(MASK_EXTENSION), boxes=boxes)


def _cls_text(data: bytes) -> str | bytes:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def _read_parquet(url: str, storage_options: dict, max_pixels: int) -> Iterator[RawImage | ErrorRecord]:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = {"image_id", "image"} - set(names)
            if missing:
                yield ErrorRecord(url, url, "read", f"parquet shard lacks column(s) {', '.join(sorted(missing))}")
                return
            columns = ["image_id", "image"] + [c for c in ("label", "format", "mask", "boxes") if c in names]
            seen: set[str] = set()
            for batch in pf.iter_batches(columns=columns, batch_size=64):
                for row in batch.to_pylist():
                    yield _parquet_record(row, url, seen, max_pixels)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        yield ErrorRecord(url, url, "read", f"unreadable parquet shard: {type(e).__name__}: {e}")


def _parquet_record(row: dict, url: str, seen: set[str], max_pixels: int) -> RawImage | ErrorRecord:
    image_id, data = str(row["image_id"]), row["image"]
    if image_id in seen:
        return ErrorRecord(image_id, url, "read", "duplicate image id within the shard (the first one was read)")
    seen.add(image_id)
    if data is None:
        return ErrorRecord(image_id, url, "read", "image bytes are null")
    if not isinstance(data, bytes):
        return ErrorRecord(image_id, url, "read", f"image column holds {type(data).__name__}, not bytes")
    fmt = row.get("format")
    fmt = fmt.lower() if isinstance(fmt, str) and fmt else sniff_format(data)
    problem = image_problem(fmt, len(data), data[:NPY_HEADER_PEEK], max_pixels) \
        or _mask_column_problem(row.get("mask"), max_pixels)
    if problem:
        return ErrorRecord(image_id, url, "read", problem)
    try:
        boxes = None if row.get("boxes") is None else parse_boxes(row["boxes"])
        return RawImage(image_id, url, data, fmt, parse_label(row.get("label")), mask=row.get("mask"), boxes=boxes)
    except ValueError as e:
        return ErrorRecord(image_id, url, "read", str(e))


def _mask_column_problem(mask: Any, max_pixels: int) -> str | None:
    """Why a Parquet `mask` value cannot be a mask (null is no mask), or None."""
    if mask is None:
        return None
    if not isinstance(mask, bytes):
        return f"ground truth mask column holds {type(mask).__name__}, not PNG bytes"
    limit = max_image_bytes(max_pixels)
    if len(mask) > limit:
        return f"ground truth mask of {len(mask)} bytes is over the limit of {limit} bytes for {max_pixels} pixels"
    return None


def _read_image_file(url: str, storage_options: dict, max_pixels: int) -> Iterator[RawImage | ErrorRecord]:
    image_id, fmt = posixpath.basename(url), url.rsplit(".", 1)[-1].lower()
    try:
        opened = fsspec.open(url, "rb", **storage_options)
        with opened as f:
            size = opened.fs.size(opened.path)
            head = f.read(NPY_HEADER_PEEK)
            problem = image_problem(fmt, size, head, max_pixels) if size is not None else None
            if not problem:  # read at most one byte over the limit, whatever the size said
                data = head + f.read(max_image_bytes(max_pixels) + 1 - len(head))
                problem = image_problem(fmt, len(data), head, max_pixels)
    except Exception as e:
        yield ErrorRecord(image_id, url, "read", f"cannot read file: {type(e).__name__}: {e}")
        return
    if problem:
        yield ErrorRecord(image_id, url, "read", problem)
        return
    yield RawImage(image_id, url, data, fmt)


def sniff_format(data: bytes) -> str:
    """Image format from magic bytes, for Parquet shards that do not say."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    return "unknown"
