"""The snapshot index of a remote store: which chunks make up which file.

A pushed snapshot is one object, the *envelope*::

    {"format": "warmstart-index/1",
     "index": "<the index, JSON, as a string: the exact bytes that are signed>",
     "signature": {"algorithm": "ed25519", "key_id": ..., "value": ...} | null}

The index lists every file of the snapshot directory (``manifest.json``,
``images/*``, ``logs/*``) as a list of chunks, each named by its BLAKE3 digest
(64 hex digits). BLAKE3 is both the chunk's address in the store and the
cryptographic digest every chunk is checked against when read, so a signature
over the index covers every byte of the snapshot.

Parsing is strict and total: anything that is not a valid envelope or index
raises :class:`SnapshotCorrupt` with a one-line message, never another error.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from warmstart.errors import SnapshotCorrupt
from warmstart.snapshot.manifest import MANIFEST_NAME

ENVELOPE_FORMAT = "warmstart-index/1"
INDEX_VERSION = 1
HASH = "blake3"
#: Largest chunk any writer produces; a reader refuses larger ones (bounded memory).
MAX_CHUNK = 64 << 20
#: Largest envelope a reader accepts (an index of ~1 M chunks).
MAX_ENVELOPE = 256 << 20

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ChunkRef(_Model):
    digest: str
    size: int = Field(ge=1, le=MAX_CHUNK)

    @field_validator("digest")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("not a 64-digit lowercase hex BLAKE3 digest")
        return v


def check_relpath(path: str) -> str:
    """A path inside a snapshot directory: relative, normalised, no '..'."""
    if (
        not path
        or len(path) > 1024
        or "\0" in path
        or "\\" in path
        or path.startswith("/")
        or posixpath.normpath(path) != path
        or any(part in ("", ".", "..") for part in path.split("/"))
        or path.split("/")[0].startswith(".")
    ):
        raise ValueError(f"unsafe file path {path[:80]!r}")
    return path


class FileRef(_Model):
    path: str
    size: int = Field(ge=0)
    mode: int = Field(default=0o600, ge=0, le=0o777)
    chunks: list[ChunkRef]

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return check_relpath(v)

    @model_validator(mode="after")
    def _sizes_add_up(self) -> FileRef:
        total = sum(c.size for c in self.chunks)
        if total != self.size:
            raise ValueError(f"chunks of {self.path} add up to {total} bytes, not {self.size}")
        return self


class SnapshotIndex(_Model):
    format_version: Literal[1] = INDEX_VERSION
    hash: Literal["blake3"] = HASH
    name: str
    snapshot_id: str = Field(min_length=1, max_length=256)
    created_at: dt.datetime
    pushed_at: dt.datetime
    pushed_from: str = Field(max_length=256)
    files: list[FileRef]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SNAPSHOT_NAME.match(v):
            raise ValueError("invalid snapshot name")
        return v

    @model_validator(mode="after")
    def _files(self) -> SnapshotIndex:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        if MANIFEST_NAME not in paths:
            raise ValueError(f"no {MANIFEST_NAME} listed")
        dirs = {posixpath.dirname(p) for p in paths}
        for d in dirs:
            # a file may not also be a directory of another file
            while d:
                if d in paths:
                    raise ValueError(f"{d} is both a file and a directory")
                d = posixpath.dirname(d)
        return self

    @property
    def logical_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_sizes(self) -> dict[str, int]:
        """Every chunk the snapshot references, once: digest -> size."""
        return {c.digest: c.size for f in self.files for c in f.chunks}

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Signature(_Model):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str
    value: str = Field(max_length=128)

    @field_validator("key_id")
    @classmethod
    def _kid(cls, v: str) -> str:
        if not _KEY_ID.match(v):
            raise ValueError("key_id is not 16 lowercase hex digits")
        return v

    @field_validator("value")
    @classmethod
    def _b64(cls, v: str) -> str:
        if not _B64.match(v):
            raise ValueError("signature is not base64")
        return v


class Envelope(_Model):
    format: Literal["warmstart-index/1"] = ENVELOPE_FORMAT
    index: str
    signature: Signature | None = None

    @field_validator("index")
    @classmethod
    def _utf8(cls, v: str) -> str:
        try:
            v.encode()
        except UnicodeEncodeError:
            raise ValueError("index is not valid UTF-8 text") from None
        return v

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def parse_index(self, *, where: str = "snapshot index") -> SnapshotIndex:
        return parse_index(self.index.encode(), where=where)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"])[:200]
    return f"{loc}: {msg}" if loc else msg


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_ENVELOPE:
        raise SnapshotCorrupt(f"{where} is {len(data)} bytes, larger than any index", hint=_HINT)
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SnapshotCorrupt(f"{where} is not valid JSON ({str(exc)[:120]})", hint=_HINT) from None
    if not isinstance(raw, dict):
        raise SnapshotCorrupt(f"{where} is not a JSON object", hint=_HINT)
    return raw


_HINT = "the pushed snapshot is damaged or was not written by warmstart; push it again"


def parse_envelope(data: bytes, *, where: str = "snapshot envelope") -> Envelope:
    raw = _load_json(data, where)
    if raw.get("format") != ENVELOPE_FORMAT:
        raise SnapshotCorrupt(
            f"{where} has format {str(raw.get('format'))[:40]!r}; this warmstart reads {ENVELOPE_FORMAT!r}",
            hint="pull it with the warmstart version that pushed it",
        )
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        raise SnapshotCorrupt(f"{where} is invalid: {_first_error(exc)}", hint=_HINT) from None


def parse_index(data: bytes, *, where: str = "snapshot index") -> SnapshotIndex:
    raw = _load_json(data, where)
    if raw.get("format_version") != INDEX_VERSION:
        raise SnapshotCorrupt(
            f"{where} has format version {str(raw.get('format_version'))[:20]}; "
            f"this warmstart reads {INDEX_VERSION}",
            hint="pull it with the warmstart version that pushed it",
        )
    try:
        # JSON has no datetime: let pydantic parse ISO strings for those two fields only
        for key in ("created_at", "pushed_at"):
            if isinstance(raw.get(key), str):
                raw[key] = dt.datetime.fromisoformat(raw[key])
        return SnapshotIndex.model_validate(raw)
    except ValueError as exc:  # ValidationError is a ValueError; so is a bad ISO date
        msg = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)[:200]
        raise SnapshotCorrupt(f"{where} is invalid: {msg}", hint=_HINT) from None
