"""Storage through fsspec: glob expansion, whole-file reads and atomic publication of outputs."""
from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for a URL; storage_options go to the fsspec backend (e.g. S3 endpoint_url)."""
    return url_to_fs(url, **(storage_options or {}))


def full_url(fs, path: str) -> str:
    """A path as returned by fs.glob turned back into a URL that any worker can open."""
    return fs.unstrip_protocol(path)


def expand_glob(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted URLs of the files matching ``pattern``; a plain file path matches itself.

    Raises FileNotFoundError with the pattern when nothing matches, and OSError with a
    one-line reason when the storage cannot be reached.
    """
    try:
        fs, path = filesystem(pattern, storage_options)
        if fs.isdir(path):
            path = path.rstrip("/") + "/**"
        matches = [p for p in fs.glob(path) if fs.isfile(p)] if any(c in path for c in "*?[") else (
            [path] if fs.isfile(path) else [])
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # the backends raise many types; reduce them to one clear message
        raise OSError(f"cannot list {pattern}: {type(e).__name__}: {e}") from e
    if not matches:
        raise FileNotFoundError(f"no input files match {pattern}")
    return sorted(full_url(fs, p) for p in matches)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write to a temporary name beside ``url`` and rename, so readers never see a partial file."""
    fs, path = filesystem(url, storage_options)
    tmp = f"{path}.tmp-writing"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage_options)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def publish(staging: str, output: str, names: list[str], storage_options: dict[str, Any] | None = None) -> None:
    """Move each ``staging/NAME`` directory to ``output/NAME``, replacing what was there.

    The old directory is first renamed aside and removed only after the new one is in
    place, so a rerun replaces results instead of adding to them, and at every moment
    ``output/NAME`` is either the complete old or the complete new result (on local
    disks; on object stores a move is a copy, and manifest.json, written last, tells
    which run the files belong to).
    """
    fs, out_path = filesystem(output, storage_options)
    _, staging_path = filesystem(staging, storage_options)
    fs.makedirs(out_path, exist_ok=True)
    for name in names:
        src, dst = f"{staging_path}/{name}", f"{out_path}/{name}"
        old = f"{staging_path}/_replaced-{name}"
        if fs.exists(dst):
            _move_tree(fs, dst, old)
        if fs.exists(src):
            _move_tree(fs, src, dst)
        else:
            fs.makedirs(dst, exist_ok=True)
        if fs.exists(old):
            fs.rm(old, recursive=True)


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _move_tree(fs, src: str, dst: str) -> None:
    """Rename a directory on local disks; on object stores, where directories are only
    key prefixes, copy every object and then delete the source."""
    if _is_local(fs):
        fs.mv(src, dst, recursive=True)
        return
    for path in fs.find(src):
        fs.copy(path, dst + path[len(src):])
    fs.rm(src, recursive=True)


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
