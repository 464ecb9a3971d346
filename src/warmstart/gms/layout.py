"""What a set of safetensors files looks like, and the hashes that name it.

A :class:`Layout` lists each file of a model directory (its name, size, where
its data section starts) and each tensor in it (name, dtype, shape, byte range
inside the data section). It is read from the safetensors headers alone, so a
worker can describe the weights it wants without reading them.

Two hashes name a layout:

* :meth:`Layout.structure_hash` covers names, sizes, offsets, dtypes, shapes:
  what a worker can compute from the headers;
* :func:`layout_hash` adds the files' content digests, which the service
  computes while it streams the bytes in. A worker records it when it first
  attaches and, after a restore, refuses weights whose layout hash differs, so
  it never maps another layout's (or another version's) weights.

Content digests are ``xxh3-128-c64m:<hex>``: the xxh3-128 of the concatenated
xxh3-128 digests of the file's 64 MiB chunks (chunks are hashed in parallel
while they are copied to the GPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict

from warmstart.errors import NotFoundError, UsageError

DIGEST_CHUNK = 64 << 20
DIGEST_ALGORITHM = "xxh3-128-c64m"

#: safetensors dtype names -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Frozen):
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: byte range inside the file's data section
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class FileSpec(_Frozen):
    #: file name inside the model directory
    name: str
    #: file size in bytes
    size: int
    #: where the data section starts (8 + header length)
    data_offset: int
    tensors: tuple[TensorSpec, ...]

    @property
    def data_size(self) -> int:
        return self.size - self.data_offset


class Layout(_Frozen):
    files: tuple[FileSpec, ...]

    def structure_hash(self) -> str:
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.data_size for f in self.files)

    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)


def layout_hash(layout: Layout, digests: dict[str, str]) -> str:
    """The hash that guards re-mapping: structure plus every file's content digest."""
    missing = [f.name for f in layout.files if f.name not in digests]
    if missing:
        raise UsageError(f"no content digest for {', '.join(missing)}")
    h = hashlib.sha256(layout.structure_hash().encode())
    for f in layout.files:
        h.update(f"\0{f.name}\0{digests[f.name]}".encode())
    return "sha256:" + h.hexdigest()


def read_header(path: Path) -> FileSpec:
    """Parse one safetensors file's header (reads only the header)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise UsageError(f"{path} is too short to be a safetensors file")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8 or hlen > 100 << 20:
                raise UsageError(f"{path} has a header length of {hlen}, past the file's end")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise NotFoundError(f"weights file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} has an unreadable safetensors header ({exc})") from None
    data_offset = 8 + hlen
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if dtype not in DTYPE_SIZES or end - start != count * DTYPE_SIZES[dtype]:
            raise UsageError(f"{path}: tensor {name} has an inconsistent dtype/shape/offsets")
        if end > size - data_offset:
            raise UsageError(f"{path}: tensor {name} ends past the end of the file")
        tensors.append(TensorSpec(name=name, dtype=dtype, shape=shape, start=start, end=end))
    tensors.sort(key=lambda t: t.start)
    return FileSpec(name=path.name, size=size, data_offset=data_offset, tensors=tuple(tensors))


def read_layout(model_dir: str | os.PathLike[str]) -> Layout:
    """The layout of every ``*.safetensors`` file in ``model_dir`` (sorted by name)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"{d} has no *.safetensors files", hint="point at a model directory")
    return Layout(files=tuple(read_header(p) for p in files))


class _XXH128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_xxh3_fn: Any = None


def _xxh3_128bits() -> Any:
    """``XXH3_128bits`` from the xxhash extension, called through ctypes so that the
    loader's lanes hash in parallel (the Python binding holds the GIL); False if absent."""
    global _xxh3_fn
    if _xxh3_fn is None:
        try:
            import xxhash._xxhash as ext

            fn = ctypes.CDLL(ext.__file__).XXH3_128bits
            fn.restype = _XXH128
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _xxh3_fn = fn
        except (ImportError, OSError, AttributeError):
            _xxh3_fn = False
    return _xxh3_fn


def chunk_digest(data: bytes | memoryview) -> bytes:
    """xxh3-128 of one chunk, canonical (big-endian) bytes."""
    fn = _xxh3_128bits()
    if fn and isinstance(data, memoryview) and not data.readonly and data.c_contiguous and data.nbytes:
        h = fn(ctypes.addressof(ctypes.c_char.from_buffer(data)), data.nbytes)
        return h.high64.to_bytes(8, "big") + h.low64.to_bytes(8, "big")
    return xxhash.xxh3_128_digest(data)


def combine_digests(chunks: list[bytes]) -> str:
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_128_hexdigest(b''.join(chunks))}"


def digest_file(path: str | os.PathLike[str], data_offset: int = 0) -> str:
    """The content digest of a file's bytes from ``data_offset`` on (the service's algorithm)."""
    parts: list[bytes] = []
    with open(path, "rb", buffering=0) as f:
        f.seek(data_offset)
        while chunk := f.read(DIGEST_CHUNK):
            parts.append(chunk_digest(chunk))
    return combine_digests(parts)
