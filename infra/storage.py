"""One filesystem seam: local paths, NFS mounts and bucket URIs (`s3://`, `gs://`, ...) through fsspec.

A location is a `pathlib.Path` for a local path and a `upath.UPath` for a URI (`to_path`), so stage code
joins, lists and reads both with the same pathlib calls. What differs lives here:

- writes are atomic everywhere: on POSIX a temporary name, fsync, then `os.replace`; on an object store
  one PUT (a multipart upload appears only when it completes), so no rename is needed there;
- `put_part` writes a write-once part file and returns its record {key, size, sha256};
- `create_once` writes only if the object does not exist (POSIX `O_EXCL`; on S3 a conditional PUT,
  `If-None-Match: *`); where a store has no conditional write it falls back to write-then-read-back;
- `read_range` is one ranged GET (one seek + read locally);
- `local_copy` gives a local file for a URI (for np.load / memory maps): a node-local cache keyed by the
  object's sha256 (or its ETag and size when no sha256 is known), filled once per node;
- `check_location` turns an unknown scheme, missing credentials, an unreachable endpoint or a missing
  bucket into one `StorageError` line before anything is written.

The endpoint and credentials come the standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws, instance
roles for S3; GOOGLE_APPLICATION_CREDENTIALS for GCS).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Union
from urllib.parse import urlparse

import fsspec
import numpy as np

# the S3 clients log every credential lookup at INFO: not news for a user
for _name in ("botocore", "aiobotocore", "s3fs", "boto3"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Listings are progress (which parts exist), written by other processes: never serve them from a cache.
for _proto in ("s3", "gcs", "gs"):
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
Location = Union[Path, "UPath"]  # noqa: F821 - upath imported lazily
CHUNK = 1 << 22


class StorageError(ValueError):
    """A location that cannot be used; the message is one line for the user."""


def scheme(uri) -> str:
    """'' for a local path (or file://), else the URI scheme ('s3', 'gs', ...)."""
    if isinstance(uri, Path):
        return ""
    if _is_upath(uri):
        return uri.protocol if isinstance(uri.protocol, str) else uri.protocol[0]
    text = str(uri)
    if "://" not in text:
        return ""
    return urlparse(text).scheme.lower()


def to_path(uri) -> Location:
    """A path or URI -> Path (local, file://) or UPath (a remote store). Raises StorageError on an
    unknown scheme."""
    if _is_upath(uri):
        return uri
    if not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"expected a path or URI, got {type(uri).__name__}")
    s = scheme(uri)
    if s in ("", "file"):
        return Path(str(uri)[len("file://"):] if s == "file" else uri)
    if s not in REMOTE_SCHEMES:
        raise StorageError(f"{uri}: unknown URI scheme {s}:// (use a local path, s3:// or gs://)")
    from upath import UPath

    return UPath(str(uri))


def _is_upath(p) -> bool:
    return type(p).__module__.startswith("upath")


def is_remote(p) -> bool:
    return scheme(p) not in ("", "file")


def absolute(uri) -> Location:
    """A local path made absolute (workers may run elsewhere); a URI as it is."""
    p = to_path(uri)
    return p if is_remote(p) else p.resolve()


def _fs(p) -> tuple[fsspec.AbstractFileSystem, str]:
    return p.fs, p.path


# -- writing ---------------------------------------------------------------------------------------------

def _record(p, data_or_sha, size: int) -> dict:
    sha = data_or_sha if isinstance(data_or_sha, str) else hashlib.sha256(data_or_sha).hexdigest()
    return {"key": str(p), "size": size, "sha256": sha}


def atomic_write_bytes(path, data: bytes) -> Location:
    """Writes `data` at `path` so that readers see the old object or the new one, never a part."""
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        fs.pipe_file(key, bytes(data))
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def atomic_write_text(path, text: str) -> Location:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Location:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def atomic_write_npz(path, **arrays) -> Location:
    """np.savez, atomically (arrays must load with allow_pickle=False: no object dtypes)."""
    return atomic_write_bytes(path, npz_bytes(**arrays))


def put_part(path, data: bytes) -> dict:
    """A write-once part file (atomic on every store) -> its record {key, size, sha256}."""
    atomic_write_bytes(path, data)
    return _record(path, data, len(data))


def put_file(local: str | Path, path, move: bool = False) -> dict:
    """Uploads (or, locally, copies / moves) a finished local file to `path`, atomically -> its record."""
    local = Path(local)
    sha = sha256_file(local)
    size = local.stat().st_size
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        fs.put_file(str(local), key)
        if move:
            local.unlink()
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        if move:
            shutil.move(str(local), tmp)
        else:
            shutil.copyfile(local, tmp)
        os.replace(tmp, p)
    return _record(p, sha, size)


def append_line(path, line: str) -> None:
    """Appends one line to a small log (metrics.jsonl): an append locally; on a store, where objects
    cannot grow, the log is rewritten whole with one PUT (so keep such logs small)."""
    p = to_path(path)
    text = line if line.endswith("\n") else line + "\n"
    if not is_remote(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(text)
        return
    try:
        old = p.read_bytes()
    except FileNotFoundError:
        old = b""
    atomic_write_bytes(p, old + text.encode("utf-8"))


def copy(src, dst) -> None:
    """Copies one file: locally to a temporary name then renamed; on one store, a server-side copy."""
    a, b = to_path(src), to_path(dst)
    if is_remote(a) and is_remote(b) and scheme(a) == scheme(b):
        a.fs.copy(a.path, b.path)
    elif is_remote(a) or is_remote(b):
        atomic_write_bytes(b, a.read_bytes())
    else:
        put_file(a, b)


def create_once(path, data: bytes) -> bool:
    """Writes `data` only if nothing is at `path`; -> whether this call created it. POSIX: O_EXCL; S3:
    a conditional PUT. A store without conditional writes: write, read back, and compare (two writers
    at the same instant may both believe they won; the lease's heartbeat then finds out)."""
    p = to_path(path)
    if not is_remote(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, key = _fs(p)
    try:
        fs.pipe_file(key, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (NotImplementedError, TypeError):  # no conditional write on this store
        if fs.exists(key):
            return False
        fs.pipe_file(key, data)
        return fs.cat_file(key) == data


# -- reading ---------------------------------------------------------------------------------------------

def sha256_file(path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with to_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def size_of(path) -> int | None:
    """The object's size in bytes, or None when there is none."""
    p = to_path(path)
    if not is_remote(p):
        return p.stat().st_size if p.is_file() else None
    fs, key = _fs(p)
    try:
        info = fs.info(key)
    except FileNotFoundError:
        return None
    return int(info["size"]) if info.get("type") == "file" else None


def read_range(path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (one ranged GET on a store); fewer at the end of the object."""
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        return fs.cat_file(key, start=int(offset), end=int(offset) + int(size))
    with open(p, "rb") as f:
        f.seek(offset)
        return f.read(size)


def open_read(path, block_size: int = 1 << 22):
    """A seekable binary reader: a local file, or an fsspec file doing ranged GETs of `block_size`."""
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        return fs.open(key, "rb", block_size=block_size, cache_type="readahead")
    return open(p, "rb")


def list_names(path, prefix: str = "") -> list[str]:
    """Names of the files directly under `path` that start with `prefix` (a listing, no cache)."""
    p = to_path(path)
    if not is_remote(p):
        return sorted(c.name for c in p.iterdir() if c.is_file() and c.name.startswith(prefix)) if p.is_dir() else []
    fs, key = _fs(p)
    try:
        found = fs.ls(key, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(n for n in (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in found if e["type"] == "file")
                  if n.startswith(prefix))


def remove(path) -> None:
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        try:
            fs.rm_file(key)
        except FileNotFoundError:
            pass
    else:
        p.unlink(missing_ok=True)


def rmtree(path) -> None:
    """Removes a directory (every object under a prefix) if it is there."""
    p = to_path(path)
    if is_remote(p):
        fs, key = _fs(p)
        if fs.exists(key):
            fs.rm(key, recursive=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def makedirs(path) -> None:
    """A local directory; nothing on an object store (prefixes need no creating)."""
    p = to_path(path)
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)


# -- node-local copies -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """This node's cache: $DISCOATTR_CACHE, else ~/.cache/discoattr."""
    return Path(os.environ.get("DISCOATTR_CACHE") or Path.home() / ".cache" / "discoattr")


def scratch_dir(prefix: str = "work-") -> Path:
    """A fresh node-local working directory (outputs are built here, then uploaded)."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=prefix))


def etag(info: dict) -> str:
    """An object's version tag from its fsspec info (S3 ETag, GCS md5/generation), '' when it has none."""
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation") or "")


def local_copy(path, sha256: str | None = None) -> Path:
    """A local file with the object's bytes: the path itself when local; else a copy in this node's
    cache, keyed by `sha256` (checked after download) or by the object's ETag and size, fetched once."""
    p = to_path(path)
    if not is_remote(p):
        return p
    fs, key = _fs(p)
    if sha256 is None:
        try:
            info = fs.info(key)
        except FileNotFoundError:
            raise FileNotFoundError(str(p)) from None
        tag = etag(info) or str(info.get("LastModified"))
        name = hashlib.sha256(f"{p}|{info['size']}|{tag}".encode()).hexdigest()
    else:
        name = sha256
    suffix = "".join(p.suffixes[-2:]) if p.suffix else ""
    dst = cache_dir() / "objects" / name[:2] / (name + suffix)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        fs.get_file(key, str(tmp))
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise StorageError(f"{p}: content does not match its recorded sha256 (changed under the run?)")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# -- checks and Ray Train --------------------------------------------------------------------------------

def check_location(uri, *, what: str = "location") -> None:
    """One-line StorageError for an unknown scheme, missing credentials, an unreachable endpoint or a
    missing bucket; reads only (a HEAD / list of the bucket), writes nothing."""
    p = to_path(uri)
    if not is_remote(p):
        return
    s = scheme(p)
    bucket = urlparse(str(p)).netloc
    if not bucket:
        raise StorageError(f"{what} {uri}: no bucket in the URI")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if s in ("s3", "s3a") \
        else None
    try:
        if s in ("s3", "s3a"):
            _check_s3(p, bucket, endpoint)
        else:
            p.fs.ls(bucket, refresh=True)
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{what} {uri}: bucket {bucket} does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"{what} {uri}: access denied to bucket {bucket} ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - each store's client has its own error types
        raise StorageError(f"{what} {uri}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _check_s3(p, bucket: str, endpoint: str | None) -> None:
    import botocore.config
    import botocore.exceptions as bx
    import botocore.session

    session = botocore.session.get_session()
    if session.get_credentials() is None:
        raise StorageError(f"{p}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or run where an instance role is available)")
    if endpoint:
        u = urlparse(endpoint)
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=5).close()
        except OSError as exc:
            raise StorageError(f"{p}: cannot reach the S3 endpoint {endpoint} ({exc.strerror or exc})") from None
    cfg = botocore.config.Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1})
    client = session.create_client("s3", endpoint_url=endpoint, config=cfg)
    try:
        client.head_bucket(Bucket=bucket)
    except bx.NoCredentialsError:
        raise StorageError(f"{p}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
    except bx.EndpointConnectionError as exc:
        raise StorageError(f"{p}: cannot reach the S3 endpoint ({exc})") from None
    except bx.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"{p}: bucket {bucket} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{p}: access to bucket {bucket} denied ({code}); check the credentials") from None
        raise StorageError(f"{p}: {_first_line(exc)}") from None


def ray_storage(uri) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local absolute path and None, or
    the bucket path with the same fsspec filesystem wrapped as a pyarrow one (so Ray Train and the stages
    see one store, with one endpoint and one set of credentials)."""
    p = absolute(uri)
    if not is_remote(p):
        return str(p), None
    import pyarrow.fs as pafs

    return p.path, pafs.PyFileSystem(pafs.FSSpecHandler(p.fs))

