"""Object backends of a remote store: a directory tree, or an S3-compatible bucket.

A backend stores whole objects under ``/``-separated keys. It promises what
both a POSIX file system and S3 (strongly consistent since 2020) give: a put is
atomic (readers see the old object, or none, or the whole new one), an
*exclusive* put fails if the key exists, and a list started after a put
returns it. ``mtime`` is the *server's* clock, so that age comparisons made by
one client are only ever between times of the same clock.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from warmstart.errors import StoreError


class ObjectMissing(StoreError):
    """The key does not exist."""


class ObjectExists(StoreError):
    """An exclusive put found the key taken."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    #: seconds since the epoch, by the server's clock
    mtime: float


class Backend(Protocol):
    url: str

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None: ...

    def get(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def flush(self) -> None:
        """Make every put so far durable (before publishing what refers to them)."""
        ...


class FileBackend:
    """Objects as files below a directory (local disk, NFS, a Kubernetes PVC).

    Each object is written to ``.tmp/`` with mode 0600, fsynced, then renamed
    (or hard-linked, for an exclusive put) into place.
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self.url = f"file://{self.root}"
        self._dirty: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp(self) -> Path:
        tmp = self.root / ".tmp"
        self._mkdirs(tmp)
        return tmp / f"{uuid.uuid4().hex}.part"

    def _mkdirs(self, path: Path) -> None:
        """Create ``path`` and its missing parents owner-only (``mkdir -p`` applies the mode to the last only)."""
        if path.is_dir():
            return
        try:
            missing = [p for p in (path, *path.parents) if not p.exists()]
            for d in reversed(missing):
                try:
                    d.mkdir(mode=0o700)
                except FileExistsError:
                    pass
        except OSError as exc:
            raise StoreError(
                f"cannot create {path}: {exc.strerror}", hint="check the store directory's permissions"
            ) from None

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        final = self._path(key)
        self._mkdirs(final.parent)
        tmp = self._tmp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise ObjectExists(f"{self.url}/{key} already exists") from None
            else:
                os.replace(tmp, final)
            if self.durable:
                with self._lock:
                    self._dirty.add(final.parent)
                if exclusive:  # a publication: durable before it returns
                    self.flush()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"no space left in {self.root}", hint="free space or run `warmstart store gc`") from None
            raise StoreError(f"cannot write {final}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self._path(key)}: {exc.strerror}") from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(str(path.relative_to(self.root)), st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot remove {self._path(key)}: {exc.strerror}") from None

    def flush(self) -> None:
        with self._lock:
            dirs, self._dirty = self._dirty, set()
        for d in sorted(dirs):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class S3Backend:
    """Objects in an S3-compatible bucket, below a prefix.

    Endpoint, region and credentials come from boto3's usual sources
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``~/.aws/config``, instance roles...).
    Exclusive puts use ``If-None-Match: *`` (S3 conditional writes).
    """

    def __init__(self, bucket: str, prefix: str = "", *, connections: int = 32) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError(
                "s3:// stores need boto3", hint="pip install 'warmstart[store]'"
            ) from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(max_pool_connections=connections, retries={"max_attempts": 5, "mode": "standard"})
        self.client = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"no credentials for {self.url}",
                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile",
            )
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = err.get("Code", "?")
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist", hint="create it first")
            return StoreError(f"{what} {self.url}: {code} {err.get('Message', '')}".strip())
        return StoreError(
            f"{what} {self.url}: {type(exc).__name__}: {str(exc)[:200]}",
            hint="check AWS_ENDPOINT_URL and that the server is reachable",
        )

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if exclusive and (status in (409, 412) or exc.response["Error"].get("Code") in (
                "PreconditionFailed", "ConditionalRequestConflict"
            )):
                raise ObjectExists(f"{self.url}/{key} already exists") from None
            raise self._fail(exc, "cannot write to") from None
        except BotoCoreError as exc:
            raise self._fail(exc, "cannot write to") from None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read()
        except ClientError as exc:
            if exc.response["Error"].get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(f"{self.url}/{key} does not exist") from None
            raise self._fail(exc, "cannot read from") from None
        except BotoCoreError as exc:
            raise self._fail(exc, "cannot read from") from None

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"].get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail(exc, "cannot read from") from None
        except BotoCoreError as exc:
            raise self._fail(exc, "cannot read from") from None
        return ObjectInfo(key, resp["ContentLength"], resp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        strip = len(self._key(""))
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "cannot list") from None

    def flush(self) -> None:
        """Nothing to do: a completed PUT is durable."""

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, "cannot delete from") from None


def open_backend(url: str, *, connections: int = 32) -> Backend:
    """``file:///path`` or ``s3://bucket[/prefix]`` -> a backend."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreError(f"{url!r} is not a store URL", hint="use file:///PATH or s3://BUCKET/PREFIX")
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreError(f"{url!r}: a file URL needs an absolute path", hint="write file:///abs/path")
        return FileBackend(Path(rest))
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{url!r} names no bucket", hint="write s3://BUCKET/PREFIX")
        return S3Backend(bucket, prefix, connections=connections)
    raise StoreError(f"unsupported store URL scheme {scheme!r}", hint="use file:///PATH or s3://BUCKET/PREFIX")
