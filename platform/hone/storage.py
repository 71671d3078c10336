"""Object storage: the one place that knows a path may be a URI (``s3://bucket/runs``, ``gs://…``, ``abfs://…``).

Everything that stores or reads files (run storage, checkpoints, exports, the tokenised-data cache, data sources,
quantised artifacts) goes through these helpers, built on ``pyarrow.fs`` (what Ray Train and Ray Data use too):

- :func:`is_uri` tells a URI from a local path; :func:`check` validates one before any Ray work (a scheme pyarrow
  knows, credentials or an endpoint that answer, the bucket present) with a message saying what to set;
- :func:`upload` / :func:`download` copy files or folders; :func:`read_text` / :func:`write_text` small files;
- :func:`mirror` is the local folder that stands for a URI on this machine (``$HONE_HOME/remote/<scheme>/<path>``).

The endpoint and credentials come from the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …, or the
instance's role); hone forwards those variables to every Ray worker.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hone import assets
from hone.errors import StorageError

__all__ = [
    "STORAGE_SECRETS", "STORAGE_SETTINGS", "StorageError", "check", "content_sha256", "digest", "download", "exists", "filesystem",
    "glob_files", "is_uri", "join", "list_files", "mirror", "read_text", "upload", "uri_of", "write_text",
]

STORAGE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME")
"""Where the object store is and where its credentials live (paths, names): forwarded to every Ray worker (hone.runtime)."""
STORAGE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY")
"""The keys themselves: never forwarded (a runtime_env is readable through the dashboard and the Jobs API); workers of a
local Ray inherit them from its driver, a cluster's nodes read them from their own environment or an instance role."""
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS", "abfs": "Azure", "abfss": "Azure", "hdfs": "HDFS", "viewfs": "HDFS", "file": "local"}


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a URI with a scheme (``file://`` included), not a plain local path."""
    return path is not None and bool(_URI.match(str(path)))


def join(base: str | Path, *parts: str) -> str:
    """``base`` / parts, for URIs and local paths alike."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    scheme = _URI.match(uri).group(1).lower()
    if scheme not in _SCHEMES:
        raise StorageError(f"{uri!r}: unknown storage scheme {scheme!r}; use a local path or one of "
                           f"{', '.join(s + '://' for s in _SCHEMES)}")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow: unsupported scheme in this build, malformed URI
        raise StorageError(f"{uri!r}: cannot open this storage ({e})") from e


_CHECKED: set[tuple[str, bool]] = set()


def check(uri: str, *, must_exist: bool = False) -> None:
    """Refuse a URI that cannot work, before any Ray work: unknown scheme, no credentials or endpoint that answer,
    a missing bucket (or, with ``must_exist``, a missing file). A URI that passed is not looked up again in this process
    (config validation, the run's storage and the stages after it all ask)."""
    if not is_uri(uri) or (uri, must_exist) in _CHECKED:
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    hint = (" Set AWS_ENDPOINT_URL for an S3-compatible server, and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
            "(or run on a node with an instance role)." if uri.startswith("s3") else "")
    try:
        info = fs.get_file_info(bucket)
        target = fs.get_file_info(path) if must_exist else None
    except Exception as e:  # credentials refused, endpoint unreachable
        raise StorageError(f"cannot reach {uri}: {e}.{hint}") from e
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: the bucket {bucket!r} does not exist (or these credentials cannot see it).{hint}")
    if target is not None and target.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    _CHECKED.add((uri, must_exist))


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str) -> list[tuple[str, int, float]]:
    """(path relative to ``uri``, size, mtime) of every file at or under ``uri``, sorted by path."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [("", info.size, info.mtime.timestamp() if info.mtime else 0.0)]
    if info.type == pafs.FileType.NotFound:
        return []
    out = [(f.path[len(path):].lstrip("/"), f.size, f.mtime.timestamp() if f.mtime else 0.0)
           for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    return sorted(out)


def glob_files(pattern: str) -> list[str]:
    """The files (full URIs, sorted) matching an object-store pattern with ``*``, ``?`` or ``[…]``."""
    import fnmatch

    cut = min(pattern.find(c) for c in "*?[" if c in pattern)
    root = pattern[:cut].rsplit("/", 1)[0]
    return [u for u in (join(root, rel) for rel, _, _ in list_files(root)) if fnmatch.fnmatch(u, pattern)]


def digest(uri: str) -> str:
    """What an object-store path (a file, folder or pattern) holds, as a hash of its files' names, sizes and modification
    times (no download)."""
    import glob
    import hashlib

    h = hashlib.sha256(uri.encode())
    files = [(u, *list_files(u)[0][1:]) for u in glob_files(uri)] if glob.has_magic(uri) else list_files(uri)
    for rel, size, mtime in files:
        h.update(f"{rel}\0{size}\0{mtime}\0".encode())
    return h.hexdigest()


def content_sha256(location: str | Path) -> str:
    """What a folder (local, or a URI) holds, as one SHA-256 over its files' relative paths and bytes: the content a
    registry version records at registration and is checked against when it is loaded (:func:`digest` looks at names,
    sizes and times only)."""
    import hashlib

    fs, path = filesystem(str(location))
    h = hashlib.sha256()
    for rel, _, _ in list_files(str(location)):
        with fs.open_input_stream(f"{path}/{rel}" if rel else path) as fh:
            inner = hashlib.sha256()
            while chunk := fh.read(1 << 22):
                inner.update(chunk)
        h.update(f"{rel}\0{inner.hexdigest()}\0".encode())
    return h.hexdigest()


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a small file whole (an object store replaces the object atomically; a local file is renamed into place)."""
    if not is_uri(uri):
        p = Path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as fh:
        fh.write(text.encode())


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file or folder to ``uri`` (files replaced, nothing else under ``uri`` removed)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local = Path(local)
    if local.is_file():
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs, use_threads=True)


def download(uri: str, local: str | Path) -> Path:
    """Copy ``uri`` (a file or folder) to ``local``, whole: fetched into a temporary sibling, then renamed into place."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        target = staging / "x"
        if info.type == pafs.FileType.Directory:
            target.mkdir()  # copy_files fills a folder but does not create it
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        if local.is_dir():
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        os.replace(target, local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def mirror(uri: str) -> Path:
    """The local folder standing for ``uri`` on this machine: ``$HONE_HOME/remote/<scheme>/<bucket>/<path>``. A URI whose
    path has empty, ``.`` or ``..`` segments is refused: its mirror could land outside the mirror root (and
    :func:`download` replaces what is there)."""
    m = _URI.match(uri)
    rest = uri[m.end():].strip("/")
    if any(part in ("", ".", "..") for part in rest.split("/")):
        raise StorageError(f"{uri}: a path with empty, '.' or '..' segments cannot be mirrored here; write the path without them")
    root = assets.hone_home() / "remote"
    local = root / m.group(1).lower() / rest
    if not local.resolve().is_relative_to(root.resolve()):
        raise StorageError(f"{uri}: its local mirror {local.resolve()} would lie outside {root}")
    return local


def uri_of(path: str | Path) -> str | None:
    """The URI a :func:`mirror` folder stands for (None for any other local path)."""
    root = (assets.hone_home() / "remote").resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return None
    parts = rel.parts
    return f"{parts[0]}://{'/'.join(parts[1:])}" if len(parts) >= 2 else None
