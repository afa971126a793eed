"""One place that builds every way GeoPix reaches object storage.

URIs are ``s3://bucket/key`` or local paths everywhere. The S3 endpoint and credentials come
from :class:`S3Settings`: from the environment by default (the exports of ``geopix stack env``
point them at the local stack), real AWS when no endpoint is set. From those settings this
module builds the s3fs filesystem, the pyarrow filesystem and the GDAL/rasterio environment, so
the three never disagree about where an object lives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs
    import rasterio
    import s3fs

ENDPOINT_ENV_VARS = ("GEOPIX_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# GDAL settings for reading Cloud Optimized GeoTIFFs from S3: no directory listing on open,
# merged range requests, HTTP/2 multiplexing, a VSI cache for header/tile reuse.
GDAL_S3_READ_PRESET = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.ovr,.msk",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(64 * 1024 * 1024),
}


SUCCESS_MARKER = "_SUCCESS"  # written last: a prefix is complete once it exists


class StorageError(RuntimeError):
    """An object store location that cannot be used (missing bucket, unreachable endpoint, ...)."""


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials for S3. ``endpoint_url=None`` means AWS itself."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> S3Settings:
        env = os.environ if environ is None else environ
        endpoint = next((env[k] for k in ENDPOINT_ENV_VARS if env.get(k)), None)
        settings = cls(
            endpoint_url=endpoint,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
        )
        return settings.replace(**{k: v for k, v in overrides.items() if v is not None})

    def replace(self, **changes) -> S3Settings:
        return S3Settings(**{**self.__dict__, **changes})

    @property
    def is_local(self) -> bool:
        return self.endpoint_url is not None

    @property
    def _endpoint(self):
        parsed = urlparse(self.endpoint_url or "")
        return parsed.scheme or "https", parsed.netloc or parsed.path

    def describe(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


def is_s3_uri(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


# Other spellings of S3 that users paste (Hadoop/Spark's s3a://, an upper-case scheme).
S3_SCHEME_ALIASES = ("s3a://", "s3n://")


def normalize_uri(uri: str | os.PathLike) -> str:
    """``S3://b/k``, ``s3a://b/k`` → ``s3://b/k``; a local path as it is. Any other ``scheme://``
    (gs://, https://, …) is a :class:`StorageError`: GeoPix would otherwise take it for a local path."""
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme:
        return text
    if scheme.lower() == "s3" or f"{scheme.lower()}://" in S3_SCHEME_ALIASES:
        return f"s3://{rest}"
    if scheme.lower() == "file":
        return rest
    raise StorageError(f"{text}: unsupported URI scheme {scheme!r}; use s3://bucket/key or a local path")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not is_s3_uri(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, key


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_s3_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def s3_filesystem(settings: S3Settings | None = None, **kwargs) -> s3fs.S3FileSystem:
    import s3fs

    settings = settings or S3Settings.from_env()
    client_kwargs = {"region_name": settings.region}
    if settings.endpoint_url:
        client_kwargs["endpoint_url"] = settings.endpoint_url
    return s3fs.S3FileSystem(
        key=settings.access_key_id,
        secret=settings.secret_access_key,
        token=settings.session_token,
        client_kwargs=client_kwargs,
        **kwargs,
    )


def boto3_client(settings: S3Settings | None = None):
    import boto3

    settings = settings or S3Settings.from_env()
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
    )


def arrow_filesystem(
    uri: str | os.PathLike, settings: S3Settings | None = None
) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to hand it (bucket/key or local path)."""
    import pyarrow.fs as pafs

    if not is_s3_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    settings = settings or S3Settings.from_env()
    kwargs = {"region": settings.region}
    if settings.access_key_id:
        kwargs.update(access_key=settings.access_key_id, secret_key=settings.secret_access_key)
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    if settings.endpoint_url:
        scheme, netloc = settings._endpoint
        kwargs.update(endpoint_override=netloc, scheme=scheme)
    bucket, key = split_s3_uri(str(uri))
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def gdal_options(settings: S3Settings | None = None) -> dict[str, str]:
    """GDAL configuration options that make ``/vsis3/`` (and rasterio's ``s3://``) use ``settings``."""
    settings = settings or S3Settings.from_env()
    options = dict(GDAL_S3_READ_PRESET)
    options["AWS_REGION"] = settings.region
    if settings.access_key_id:
        options["AWS_ACCESS_KEY_ID"] = settings.access_key_id
        options["AWS_SECRET_ACCESS_KEY"] = settings.secret_access_key or ""
        if settings.session_token:
            options["AWS_SESSION_TOKEN"] = settings.session_token
    if settings.endpoint_url:
        scheme, netloc = settings._endpoint
        options.update(
            AWS_S3_ENDPOINT=netloc,
            AWS_HTTPS="YES" if scheme == "https" else "NO",
            AWS_VIRTUAL_HOSTING="FALSE",
        )
    return options


def rasterio_env(settings: S3Settings | None = None, **gdal_overrides) -> rasterio.Env:
    """A ``rasterio.Env`` in which ``rasterio.open("s3://…")`` reads through ``settings``."""
    import rasterio
    from rasterio.session import AWSSession

    settings = settings or S3Settings.from_env()
    # Integers stay integers: rasterio hands GDAL_CACHEMAX to GDALSetCacheMax, which wants a number.
    options = gdal_options(settings) | {k: v if isinstance(v, int) else str(v) for k, v in gdal_overrides.items()}
    # rasterio takes credentials only through its session object, never as config options.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        options.pop(key, None)
    session = AWSSession(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
        endpoint_url=options.get("AWS_S3_ENDPOINT"),
    )
    return rasterio.Env(session=session, **options)


def require_bucket(uri: str, settings: S3Settings | None = None) -> None:
    """Raise :class:`StorageError` naming the bucket and endpoint when ``uri``'s bucket is unusable."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    if not is_s3_uri(uri):
        return
    settings = settings or S3Settings.from_env()
    bucket, _ = split_s3_uri(uri)
    try:
        boto3_client(settings).head_bucket(Bucket=bucket)
    except EndpointConnectionError:
        raise StorageError(
            f"cannot reach the S3 endpoint {settings.describe()} for {uri}; "
            "is the stack up (`geopix stack status`) and its environment loaded (`geopix stack env`)?"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(
                f"bucket {bucket!r} (for {uri}) does not exist at {settings.describe()}"
            ) from None
        raise StorageError(f"bucket {bucket!r} (for {uri}) is not usable: {exc}") from None


def list_files(uri: str, pattern: str = "*", settings: S3Settings | None = None) -> list[str]:
    """Files directly under ``uri`` matching ``pattern``, as sorted URIs (s3:// or local paths)."""
    if is_s3_uri(uri):
        fs = s3_filesystem(settings)
        root = uri[len("s3://") :].rstrip("/")
        # Another process may have rewritten these files since this process last listed them; a
        # stale listing hands s3fs old ETags, and its reads then fail with PreconditionFailed.
        fs.invalidate_cache(root)
        return sorted(f"s3://{p}" for p in fs.glob(f"{root}/{pattern}"))
    return sorted(str(p) for p in Path(uri).glob(pattern) if p.is_file())


def _s3_objects(uri: str, settings: S3Settings | None = None) -> dict[str, dict]:
    """Every object under an S3 prefix, freshly listed: its path relative to the prefix → its
    listing entry (ETag, size)."""
    fs = s3_filesystem(settings)
    root = uri.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache(root)  # another process may have written since
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {
        k[len(root) + 1 :]: v for k, v in found.items()
        if k.startswith(root + "/") and v.get("type") != "directory" and not k.endswith("/")
    }  # fmt: skip


def list_objects(uri: str, settings: S3Settings | None = None) -> list[str]:
    """Every object (file) anywhere under a prefix (directory), as sorted paths relative to it."""
    if is_s3_uri(uri):
        return sorted(_s3_objects(uri, settings))
    root = Path(uri)
    if root.is_file():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def delete_objects(uri: str, relative: list[str], settings: S3Settings | None = None) -> None:
    """Delete exactly these objects under a prefix (paths relative to it), nothing else."""
    if not relative:
        return
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        client = boto3_client(settings)
        keys = [f"{key.rstrip('/')}/{r}" if key else r for r in relative]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys per call
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]],
                                                         "Quiet": True})  # fmt: skip
        s3_filesystem(settings).invalidate_cache(uri.removeprefix("s3://"))
        return
    for rel in relative:
        Path(uri, rel).unlink(missing_ok=True)
    for directory in sorted({Path(uri, r).parent for r in relative}, key=lambda p: len(p.parts), reverse=True):
        while directory != Path(uri) and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent


def delete_object(uri: str, settings: S3Settings | None = None) -> None:
    """Delete one object or file (none there is fine)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    delete_objects(parent, [name], settings)


def is_finished(uri: str, settings: S3Settings | None = None) -> bool:
    """Whether the prefix's writer finished it: its ``_SUCCESS`` marker exists (asked of the store,
    not of a listing cache)."""
    return exists(join_uri(uri, SUCCESS_MARKER), settings)


def is_container_root(uri: str) -> bool:
    """A bucket root (``s3://b``, ``s3://b/``) or a filesystem root: never a prefix to empty."""
    if is_s3_uri(uri):
        return not split_s3_uri(uri)[1].strip("/")
    return Path(uri).absolute() == Path(Path(uri).absolute().anchor)


def remove_prefix(uri: str, settings: S3Settings | None = None) -> None:
    """Delete everything under an S3 prefix or a local directory (nothing there is fine). Never a
    bucket root or a filesystem root. For outputs, :func:`geopix.outputs.prepare_output` decides
    what may go; this is for the places the caller itself created (tests, scratch directories)."""
    if is_container_root(uri):
        raise StorageError(f"refusing to delete everything in {uri}: a bucket or filesystem root")
    if is_s3_uri(uri):
        fs = s3_filesystem(settings)
        if fs.exists(uri):
            fs.rm(uri, recursive=True)
    else:
        import shutil

        shutil.rmtree(uri, ignore_errors=True)


def exists(uri: str, settings: S3Settings | None = None) -> bool:
    """Whether one object or file is there now (S3 listings are not taken from s3fs's cache)."""
    if is_s3_uri(uri):
        fs = s3_filesystem(settings)
        fs.invalidate_cache(uri)
        return fs.exists(uri)
    return Path(uri).exists()


def fingerprint(uri: str, settings: S3Settings | None = None) -> str:
    """A content identity of everything under a prefix: a hash of each file's relative path, size
    and ETag (S3: the MD5 of the content for single-part uploads, of the parts otherwise) or, for
    local files, modification time. Changes when any file is added, removed or rewritten."""
    import hashlib

    entries = []
    if is_s3_uri(uri):
        fs = s3_filesystem(settings)
        fs.invalidate_cache()
        root = uri.removeprefix("s3://").rstrip("/")
        for path, info in sorted(fs.find(root, detail=True).items()):
            entries.append((path[len(root) :], info.get("size"), info.get("ETag")))
    else:
        root = Path(uri)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    if not entries:
        raise StorageError(f"nothing under {uri}")
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def copy(src: str, dst: str, settings: S3Settings | None = None) -> None:
    """Copy one object or file (server-side within S3)."""
    if is_s3_uri(src) and is_s3_uri(dst):
        s3_filesystem(settings).copy(src, dst)
    else:
        write_bytes(dst, read_bytes(src, settings), settings)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one zstd-compressed Parquet file (small tables, written whole)."""
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_bytes(uri: str, payload: bytes, settings: S3Settings | None = None) -> None:
    """Write one object or file; for S3 the bucket is checked first for a clear error."""
    if is_s3_uri(uri):
        require_bucket(uri, settings)
        with s3_filesystem(settings).open(uri, "wb") as fh:
            fh.write(payload)
    else:
        write_local_atomic(Path(uri), payload)


def write_local_atomic(path: Path, payload: bytes, mode: int = 0o644) -> None:
    """Write a local file whole or not at all: a temporary file beside it (created with ``mode``, so
    a private file is never readable by others, not even for an instant), then a rename. A reader
    sees the old content or the new, never half; a killed writer leaves the old file intact."""
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read_object(uri: str, settings: S3Settings | None = None) -> tuple[bytes, str] | None:
    """(content, ETag) of one object, or None when there is none. Local files: a content hash."""
    import hashlib

    if is_s3_uri(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        try:
            response = boto3_client(settings).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return response["Body"].read(), response["ETag"].strip('"')
    try:
        payload = Path(uri).read_bytes()
    except FileNotFoundError:
        return None
    return payload, hashlib.md5(payload).hexdigest()  # an identity, not a security hash


def put_object_if(
    uri: str, payload: bytes, *, absent: bool = False, etag: str | None = None, settings: S3Settings | None = None
) -> str | None:
    """A conditional write: only if no object is there (``absent``) or only if the one there still
    has ``etag``. Returns the new ETag, or None when the condition did not hold (someone else won).

    S3: ``If-None-Match: *`` / ``If-Match``, decided by the server. Local files: the same under an
    exclusive ``flock`` on a lock file beside the object (one machine)."""
    import hashlib

    if absent == (etag is not None):
        raise ValueError("give exactly one condition: absent=True or etag=…")
    if is_s3_uri(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        condition = {"IfNoneMatch": "*"} if absent else {"IfMatch": f'"{etag}"'}
        try:
            response = boto3_client(settings).put_object(Bucket=bucket, Key=key, Body=payload, **condition)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
                return None
            raise
        return response["ETag"].strip('"')
    import fcntl

    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_object(uri)
        if (absent and current is not None) or (etag is not None and (current is None or current[1] != etag)):
            return None
        write_local_atomic(path, payload)
    return hashlib.md5(payload).hexdigest()


def read_bytes(uri: str, settings: S3Settings | None = None) -> bytes:
    if is_s3_uri(uri):
        require_bucket(uri, settings)
        fs = s3_filesystem(settings)
        try:
            # One GET: an object that a writer replaces meanwhile is read whole, the old or the new.
            # (fs.open reads with a HEAD and then GETs pinned to its ETag, which fail with
            # PreconditionFailed when the object is replaced in between: Ray rewrites its run state.)
            return fs.cat_file(uri.removeprefix("s3://"), max_concurrency=1)
        except FileNotFoundError:
            raise StorageError(f"object {uri} does not exist") from None
    return Path(uri).read_bytes()


def upload_file(local: str | os.PathLike, uri: str, settings: S3Settings | None = None) -> None:
    """Copy one local file to ``uri`` (an S3 object or a local path) without reading it into memory;
    a missing or unreachable bucket is a :class:`StorageError` naming it."""
    import shutil

    if is_s3_uri(uri):
        require_bucket(uri, settings)
        s3_filesystem(settings).put_file(str(local), uri)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, uri)


def upload_directory(
    local_dir: str | os.PathLike, uri: str, settings: S3Settings | None = None, *, marker: bool = True
) -> str:
    """Copy a local directory to ``uri`` (an S3 prefix or a local path); returns ``uri``.

    Files go first and ``_SUCCESS`` last, so a reader that waits for the marker never sees half a
    directory (:func:`local_copy` refuses a prefix without it). ``marker=False``: no ``_SUCCESS``,
    for a part of an output whose writer publishes the marker once the whole output is there.
    """
    import shutil

    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != SUCCESS_MARKER)
    if not is_s3_uri(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        if marker:
            Path(uri, SUCCESS_MARKER).write_text("")
        return uri
    fs = s3_filesystem(settings)
    for path in files:
        fs.put_file(str(path), join_uri(uri, path.relative_to(local_dir).as_posix()))
    if marker:
        fs.pipe_file(join_uri(uri, SUCCESS_MARKER), b"")
    return uri


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               settings: S3Settings | None = None) -> Path:
    """A local directory holding what ``uri`` holds: a local path as it is; an S3 prefix downloaded
    into ``cache_dir`` (default ``$GEOPIX_CACHE_DIR`` or ``~/.cache/geopix``), keyed by the URI.

    A second call downloads only objects whose ETag changed. The prefix must carry the
    ``_SUCCESS`` marker that :func:`upload_directory` writes last (a half-uploaded model is refused).
    """
    import hashlib
    import json
    import uuid

    if not is_s3_uri(uri):
        path = Path(uri)
        if not path.exists():
            raise StorageError(f"{uri}: no such file or directory")
        return path
    uri = str(uri).rstrip("/")
    fs = s3_filesystem(settings)
    objects = _s3_objects(uri, settings)
    if not objects:
        raise StorageError(f"{uri}: no objects under this prefix")
    if SUCCESS_MARKER not in objects:
        raise StorageError(f"{uri}: no {SUCCESS_MARKER} marker (an upload that did not finish?)")
    root = Path(cache_dir or os.environ.get("GEOPIX_CACHE_DIR") or Path.home() / ".cache" / "geopix")
    target = root / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    index_path = target / ".geopix-etags.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for rel, info in sorted(objects.items()):
        etag = str(info.get("ETag") or info.get("size"))
        dest = target / rel
        if index.get(rel) == etag and dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Several processes on one machine (Ray Train workers) may fetch the same prefix at once:
        # each downloads under its own name and renames, so a reader sees a whole file or none.
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fs.get_file(join_uri(uri, rel), str(partial))
        partial.replace(dest)
        index[rel] = etag
        index_partial = index_path.with_name(f"{index_path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        index_partial.write_text(json.dumps(index))
        index_partial.replace(index_path)
    return target
