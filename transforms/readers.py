"""Shard readers: WebDataset-style tar, Parquet with image bytes, and plain image files.

Each reader yields RawImage for every record it can read and ErrorRecord for every
record (or whole shard) it cannot, so nothing read is ever dropped silently.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Any, Iterator

import fsspec
import pyarrow.parquet as pq

from transforms.records import ErrorRecord, RawImage

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "npy")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_SUFFIXES = TAR_SUFFIXES + (".parquet",) + tuple("." + e for e in IMAGE_EXTENSIONS)


def shard_kind(url: str) -> str:
    name = url.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return "image"
    raise ValueError(f"unsupported shard type: {url} (expected one of {', '.join(SHARD_SUFFIXES)})")


def read_shard(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[RawImage | ErrorRecord]:
    """All records of one shard, in shard order."""
    try:
        kind = shard_kind(url)
    except ValueError as e:
        yield ErrorRecord(url, url, "read", str(e))
        return
    reader = {"tar": _read_tar, "parquet": _read_parquet, "image": _read_image_file}[kind]
    yield from reader(url, storage_options or {})


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(member_name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _read_tar(url: str, storage_options: dict) -> Iterator[RawImage | ErrorRecord]:
    # Members of one sample are adjacent in a WebDataset tar; stream them and emit a
    # sample when its key changes, so a shard never has to fit in memory.
    key, parts, seen = None, {}, 0
    try:
        with fsspec.open(url, "rb", **storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        seen += 1
                        yield _tar_sample(key, parts, url)
                    key, parts = member_key, {}
                try:
                    parts[ext] = tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError) as e:
                    # The archive ends inside this member: report it and stop reading.
                    yield ErrorRecord(member_key, url, "read", f"truncated tar member {member.name}: {e}")
                    return
            if key is not None:
                yield _tar_sample(key, parts, url)
            tail = _unread_tail(tar)
            if 0 < tail < tarfile.BLOCKSIZE:
                # tarfile takes a partial header block for the end of the archive;
                # a complete archive ends with whole zero blocks instead.
                yield ErrorRecord(f"{url}@{tar.offset}", url, "read",
                                  f"tar shard is truncated: it ends inside a member header at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f" after {seen} samples" if seen else ""
        yield ErrorRecord(key or url, url, "read", f"unreadable tar shard{where}: {type(e).__name__}: {e}")


def _unread_tail(tar: tarfile.TarFile) -> int:
    """Bytes of the (decompressed) stream after the last header tarfile looked at."""
    stream = tar.fileobj
    while stream.read(1 << 20):
        pass
    return stream.pos - tar.offset


def _tar_sample(key: str, parts: dict[str, bytes], url: str) -> RawImage | ErrorRecord:
    image_exts = [e for e in IMAGE_EXTENSIONS if e in parts]
    if not image_exts:
        return ErrorRecord(key, url, "read", f"sample has no image member (found: {', '.join(sorted(parts))})")
    label = None
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            return ErrorRecord(key, url, "read", f"label is not an integer: {parts['cls'][:20]!r}")
    ext = image_exts[0]
    return RawImage(key, url, parts[ext], ext, label)


def _read_parquet(url: str, storage_options: dict) -> Iterator[RawImage | ErrorRecord]:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = {"image_id", "image"} - set(names)
            if missing:
                yield ErrorRecord(url, url, "read", f"parquet shard lacks column(s) {', '.join(sorted(missing))}")
                return
            columns = ["image_id", "image"] + (["label"] if "label" in names else [])
            fmt_col = "format" if "format" in names else None
            for batch in pf.iter_batches(columns=columns + ([fmt_col] if fmt_col else []), batch_size=256):
                for row in batch.to_pylist():
                    image_id = str(row["image_id"])
                    data = row["image"]
                    if data is None:
                        yield ErrorRecord(image_id, url, "read", "image bytes are null")
                        continue
                    fmt = (row.get(fmt_col) or "") if fmt_col else ""
                    yield RawImage(image_id, url, data, fmt.lower() or sniff_format(data), row.get("label"))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        yield ErrorRecord(url, url, "read", f"unreadable parquet shard: {type(e).__name__}: {e}")


def _read_image_file(url: str, storage_options: dict) -> Iterator[RawImage | ErrorRecord]:
    image_id = posixpath.basename(url)
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read()
    except Exception as e:
        yield ErrorRecord(image_id, url, "read", f"cannot read file: {type(e).__name__}: {e}")
        return
    yield RawImage(image_id, url, data, url.rsplit(".", 1)[-1].lower())


def sniff_format(data: bytes) -> str:
    """Image format from magic bytes, for Parquet shards that do not say."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    return "unknown"
