"""Storage through fsspec: glob expansion, whole-file reads, single-step writes of small files."""
from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from saliency_audit.explainers.core.paths import has_query, keep_secret, shown, unquoted  # noqa: F401  (storage's messages use them)


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for a URL; storage_options go to the fsspec backend (e.g. S3 endpoint_url)."""
    keep_secret(storage_options)  # the backend may quote them in its errors
    return url_to_fs(url, **(storage_options or {}))


def glob_in(fs, folder: str, pattern: str, **kwargs):
    """``fs.glob`` of ``pattern`` inside ``folder``, the folder's path taken literally: an output
    directory named with glob characters ('audits/[eu]') matches itself, never a sibling ('audits/e')
    whose files a listing would count or a clean-up delete."""
    return fs.glob(f"{glob.escape(folder.rstrip('/'))}/{pattern}", **kwargs)


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
        raise OSError(f"cannot list {shown(pattern)}: {type(e).__name__}: {unquoted(e, pattern)}") from None
    if not matches:
        raise FileNotFoundError(f"no input files match {shown(pattern)}")
    return sorted(full_url(fs, p) for p in matches)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    keep_secret(storage_options)
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Replace one file in a single step, so readers see the old or the new content, never a part:
    on local disks a rename from a temporary name of this writer's own (two writers never share
    one), elsewhere one put (object stores make a put visible whole or not at all)."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # hidden ('.'), so a directory read (pyarrow.dataset skips '.' and '_' names) never sees it half-written
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def write_json_atomic(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage_options)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a file or folder; one already gone (a concurrent reclaim removed it) is no error."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
