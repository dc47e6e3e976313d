"""Object storage for images, manifests and model weights (docs/architecture.md, step 9 of a job's path).

Two back ends behind one small interface: a local directory (plain paths and ``file://``, e.g. a mounted
volume) and ``s3://`` through boto3 with an endpoint override (MinIO, Ceph, any S3 API).

Objects are written whole so that a reader never sees a partial image:

* files go to a temporary name in the same directory and are renamed over the final name with
  ``os.replace`` (atomic on POSIX within one file system);
* S3 objects are written with a single ``PutObject``. S3 makes an object visible only once the whole body
  has arrived and been checksummed, so a single PUT is already atomic; a temporary key followed by
  copy + delete would double the traffic, cost three requests, and could leave stray temporary keys behind
  when the worker dies between them.

Credentials for S3 come from a mounted secret directory given by the caller (files named like the environment
variables, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, optionally ``AWS_SESSION_TOKEN`` and
``AWS_REGION``) or, without one, from boto3's usual chain (environment variables first).

Every failure surfaces as :class:`StorageError` with a one-line message naming the URI, the endpoint and
the cause. Connect timeouts are short and retries few, so an unreachable endpoint fails in seconds instead
of the minutes boto3's defaults would take.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")

# Short timeouts and one retry: a dead endpoint must fail a job in seconds, not after boto3's default
# 60 s connect timeout times 5 attempts.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 2


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the URI, endpoint and cause."""


@runtime_checkable
class Store(Protocol):
    """A flat namespace of objects under one prefix (a directory or an S3 prefix)."""

    base_uri: str

    def put(self, name: str, data: bytes) -> str:
        """Write ``data`` whole under ``name``; return the object's URI."""
        ...

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        ...

    def get(self, name: str) -> bytes:
        """The bytes stored under ``name`` (StorageError when missing)."""
        ...

    def get_at_most(self, name: str, limit: int) -> tuple[bytes, int]:
        """The object's bytes and its size, reading no more than ``limit`` + 1 bytes: an object larger than
        ``limit`` comes back empty with its size (never read into memory)."""
        ...

    def uri(self, name: str) -> str:
        """The URI of ``name`` (whether or not it exists)."""
        ...


def _check_name(name: str) -> str:
    # Names are single path segments chosen by the runner; refusing anything else keeps a crafted prompt
    # index or job name from escaping the output prefix.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise StorageError(f"invalid object name {name!r}: must be one path segment")
    return name


# --- local directories ----------------------------------------------------------------------------------


@dataclass
class LocalStore:
    """Objects as files in one directory (created on first use)."""

    root: Path

    @property
    def base_uri(self) -> str:
        return self.root.as_uri()

    def uri(self, name: str) -> str:
        return (self.root / _check_name(name)).as_uri()

    def put(self, name: str, data: bytes) -> str:
        target = self.root / _check_name(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Same directory as the target so os.replace is a rename on one file system (atomic).
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be read by others
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            raise StorageError(f"cannot write {target.as_uri()}: {error.strerror or error}") from error
        log.debug("object written", extra={"uri": target.as_uri(), "bytes": len(data)})
        return target.as_uri()

    def exists(self, name: str) -> bool:
        return (self.root / _check_name(name)).is_file()

    def get(self, name: str) -> bytes:
        path = self.root / _check_name(name)
        try:
            return path.read_bytes()
        except OSError as error:
            raise StorageError(f"cannot read {path.as_uri()}: {error.strerror or error}") from error

    def get_at_most(self, name: str, limit: int) -> tuple[bytes, int]:
        path = self.root / _check_name(name)
        try:
            size = path.stat().st_size
            if size > limit:
                return b"", size
            with path.open("rb") as fh:
                data = fh.read(limit + 1)  # the file may have grown since the stat
        except OSError as error:
            raise StorageError(f"cannot read {path.as_uri()}: {error.strerror or error}") from error
        return data, len(data)


# --- S3 -------------------------------------------------------------------------------------------------


def _read_secret_dir(directory: Path) -> dict[str, str]:
    """Credential files of a mounted Secret; missing files are simply absent."""
    found: dict[str, str] = {}
    for key in _CREDENTIAL_KEYS:
        for candidate in (key, key.lower()):
            path = directory / candidate
            if path.is_file():
                found[key] = path.read_text().strip()
                break
    return found


def s3_client(endpoint: str | None = None, credentials_dir: Path | None = None) -> Any:
    """A boto3 S3 client with short timeouts; credentials from ``credentials_dir`` (a mounted Secret) or, without
    one, boto3's chain (the environment first)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:  # pragma: no cover - boto3 is a worker dependency
        raise StorageError("s3:// needs boto3: pip install 'stadi[worker]'") from error

    directory = Path(credentials_dir) if credentials_dir is not None else None
    secret: dict[str, str] = {}
    if directory is not None:
        if not directory.is_dir():
            raise StorageError(f"credentials directory {directory} does not exist")
        secret = _read_secret_dir(directory)
        if bool(secret.get("AWS_ACCESS_KEY_ID")) != bool(secret.get("AWS_SECRET_ACCESS_KEY")):
            raise StorageError(
                f"credentials directory {directory} needs both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
    kwargs: dict[str, Any] = {}
    if secret.get("AWS_ACCESS_KEY_ID"):
        kwargs["aws_access_key_id"] = secret["AWS_ACCESS_KEY_ID"]
        kwargs["aws_secret_access_key"] = secret["AWS_SECRET_ACCESS_KEY"]
        if secret.get("AWS_SESSION_TOKEN"):
            kwargs["aws_session_token"] = secret["AWS_SESSION_TOKEN"]
    region = (
        secret.get("AWS_REGION")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"  # MinIO and moto accept any region; boto3 needs one to sign
    )
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        # Path-style addressing works with every S3 API (MinIO, Ceph, moto) and with bucket names that
        # are not DNS-safe; AWS accepts it too.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=region, config=config, **kwargs
    )


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/prefix URI: {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def _describe(error: BaseException) -> str:
    """The cause of a boto3/botocore failure in a few words."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(error, ClientError):
        err = error.response.get("Error", {})
        code = str(err.get("Code", "")) or "?"
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            return "bucket does not exist (NoSuchBucket)"
        if code in ("403", "AccessDenied", "AllAccessDisabled"):
            return "access denied (HTTP 403): check the credentials and the bucket policy"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"credentials rejected ({code})"
        message = err.get("Message") or ""
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    if isinstance(error, ConnectTimeoutError):
        return f"endpoint unreachable: connect timed out after {CONNECT_TIMEOUT_S:g} s"
    if isinstance(error, EndpointConnectionError):
        return "endpoint unreachable: connection failed"
    if isinstance(error, ReadTimeoutError):
        return "endpoint did not answer in time"
    if isinstance(error, NoCredentialsError):
        return "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or mount the credentials secret"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _storage_error(what: str, uri: str, endpoint: str | None, error: BaseException) -> StorageError:
    where = endpoint or "AWS S3"
    return StorageError(f"cannot {what} {uri} (endpoint {where}): {_describe(error)}")


def _is_not_found(error: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    return str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


@dataclass
class S3Store:
    """Objects under ``s3://bucket/prefix``."""

    bucket: str
    prefix: str
    client: Any
    endpoint: str | None = None

    @property
    def base_uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, name: str) -> str:
        name = _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def check(self) -> None:
        """Fail now, with a clear message, when the endpoint is down or the bucket missing or denied."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as error:
            raise _storage_error("open", self.base_uri, self.endpoint, error) from error

    def put(self, name: str, data: bytes) -> str:
        key = self._key(name)
        try:
            # One PutObject: S3 exposes the object only when the whole body has arrived (atomic).
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=_content_type(name))
        except Exception as error:
            raise _storage_error("write", self.uri(name), self.endpoint, error) from error
        log.debug("object written", extra={"uri": self.uri(name), "bytes": len(data)})
        return self.uri(name)

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as error:
            if _is_not_found(error):
                return False
            raise _storage_error("check", self.uri(name), self.endpoint, error) from error
        return True

    def get(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except Exception as error:
            raise _storage_error("read", self.uri(name), self.endpoint, error) from error

    def get_at_most(self, name: str, limit: int) -> tuple[bytes, int]:
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])
            if size > limit:
                return b"", size
            # A range bounds the body even if the object was replaced by a larger one since the HEAD.
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=f"bytes=0-{limit}")["Body"]
            data = body.read(limit + 1)
            body.close()
        except Exception as error:
            raise _storage_error("read", self.uri(name), self.endpoint, error) from error
        return data, len(data)


def _content_type(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower()
    return {
        "png": "image/png",
        "jpeg": "image/jpeg",
        "jpg": "image/jpeg",
        "webp": "image/webp",
        "json": "application/json",
    }.get(suffix, "application/octet-stream")


# --- entry points ---------------------------------------------------------------------------------------


def local_path(uri: str) -> Path | None:
    """The local path of a plain path or ``file://`` URI; None for other schemes."""
    if "://" not in uri:
        return Path(uri).expanduser().absolute()
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"file:// URI with a host is not supported: {uri!r}")
    return Path(unquote(parsed.path))


def open_store(
    uri: str, endpoint: str | None = None, credentials_dir: Path | None = None, *, check: bool = True
) -> Store:
    """The store behind ``uri``: a local path, ``file:///dir`` or ``s3://bucket/prefix``.

    With ``check`` (the default) an S3 bucket is probed once, so that an unreachable endpoint, a missing
    bucket or denied credentials fail here, before any GPU time is spent.
    """
    path = local_path(uri)
    if path is not None:
        return LocalStore(path)
    scheme = uri.split("://", 1)[0]
    if scheme != "s3":
        raise StorageError(f"unsupported storage URI {uri!r}: use a path, file:///dir or s3://bucket/prefix")
    bucket, prefix = _split_s3(uri)
    store = S3Store(bucket, prefix, s3_client(endpoint, credentials_dir), endpoint)
    if check:
        store.check()
    return store


def download_prefix(
    uri: str, dest: Path, endpoint: str | None = None, credentials_dir: Path | None = None
) -> Path:
    """Make the objects under ``uri`` available as a local directory and return it (for model loading).

    ``s3://bucket/prefix`` is copied to ``dest`` (each file written to a temporary name, then renamed;
    files already there with the same size are kept, so a second call is a cache hit and an interrupted
    copy resumes). A local path or ``file://`` directory is returned as it is: it is already on a local or
    mounted file system and copying gigabytes of weights would only cost time and disk.
    """
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise StorageError(f"model directory {uri} does not exist")
        return path
    bucket, prefix = _split_s3(uri)
    client = s3_client(endpoint, credentials_dir)
    dest = Path(dest)
    base = f"{prefix}/" if prefix else ""
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", []):
                key: str = obj["Key"]
                rel = key[len(base) :]
                if not rel or rel.endswith("/"):
                    continue  # "directory" placeholder objects
                target = (dest / rel).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise StorageError(f"refusing object key {key!r}: it escapes {dest}")
                count += 1
                if target.is_file() and target.stat().st_size == obj["Size"]:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                try:
                    client.download_file(bucket, key, str(tmp))
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"cannot copy {uri} to {dest}: {error.strerror or error}") from error
    except Exception as error:
        raise _storage_error("download", uri, endpoint, error) from error
    if count == 0:
        raise StorageError(f"no objects under {uri} (endpoint {endpoint or 'AWS S3'})")
    log.info("model copied", extra={"uri": uri, "dest": str(dest), "files": count})
    return dest

