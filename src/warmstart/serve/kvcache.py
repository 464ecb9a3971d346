"""The preallocated KV cache and the memory it lives in.

On GPU the cache lives in a `warmstart.gpu.vmm.ReservedRegion`: its physical
memory can be released at the checkpoint point while the virtual range stays
reserved, and mapped again at the same address after a restore, so every
tensor view (and every captured CUDA graph) that points into it stays valid.
On CPU, `HostRegion` gives the same semantics with an anonymous mmap:
``release()`` is ``madvise(MADV_DONTNEED)`` (pages dropped, range kept; CRIU
then has nothing to dump for it) and the pages come back zeroed on touch.
"""

from __future__ import annotations

import mmap
from typing import Any, Protocol

import torch

try:  # transformers' cache base class; the model only calls update() on it
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # pragma: no cover
    _CacheBase = object  # type: ignore[assignment,misc]


class Region(Protocol):
    @property
    def address(self) -> int: ...

    @property
    def is_mapped(self) -> bool: ...

    def map(self) -> None: ...

    def release(self) -> None: ...

    def as_tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor: ...


class HostRegion:
    """Anonymous-mmap host memory with reserve/release semantics (see module doc)."""

    def __init__(self, size_bytes: int) -> None:
        self.size = size_bytes
        self._mm = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8, count=size_bytes)
        self._mapped = True

    @property
    def address(self) -> int:
        return self._bytes.data_ptr()

    @property
    def is_mapped(self) -> bool:
        return self._mapped

    def map(self) -> None:
        self._mapped = True  # pages fault back in, zero-filled

    def release(self) -> None:
        self._mm.madvise(mmap.MADV_DONTNEED)
        self._mapped = False

    def as_tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = dtype.itemsize
        for dim in shape:
            n *= dim
        return self._bytes[:n].view(dtype).view(shape)


def allocate_region(size_bytes: int, device: torch.device) -> Region:
    if device.type == "cuda":
        from warmstart.gpu.vmm import ReservedRegion

        region = ReservedRegion(size_bytes, device.index or 0)
        if not region.is_mapped:
            region.map()
        return region
    return HostRegion(size_bytes)


class KVStore:
    """``[layers, 2, max_seqs, kv_heads, max_len, head_dim]`` tensor over one region."""

    def __init__(
        self,
        region: Region,
        *,
        layers: int,
        max_seqs: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        self.region = region
        self.shape = (layers, 2, max_seqs, kv_heads, max_len, head_dim)
        self.tensor = region.as_tensor(dtype, self.shape)
        self.tensor.zero_()

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    def release(self) -> None:
        self.region.release()

    def reacquire(self) -> None:
        self.region.map()
        self.tensor.zero_()  # fresh physical memory holds garbage (maybe NaN bit patterns)


class RegionCache(_CacheBase):  # type: ignore[misc,valid-type]
    """A transformers ``Cache`` whose layers write into a `KVStore` at ``write_pos``.

    The engine sets ``rows`` (batch rows in use) and ``write_pos`` (a 1-D long
    tensor of cache columns) before each forward and passes a ready 4-D mask,
    so the model never asks the cache for lengths or masks.
    """

    is_compileable = True

    def __init__(self, store: KVStore) -> None:  # no super().__init__: we own the layout
        self.store = store
        self.layers: list[Any] = []
        self.write_pos: torch.Tensor = torch.zeros(1, dtype=torch.long, device=store.tensor.device)
        self._kv_heads = store.shape[3]
        self._head_dim = store.shape[5]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key_states.shape[0]
        if key_states.shape[1] != self._kv_heads or key_states.shape[-1] != self._head_dim:
            raise RuntimeError(
                f"model produced K/V of shape {tuple(key_states.shape)}, the KV cache was sized for "
                f"{self._kv_heads} heads x {self._head_dim} dims"
            )
        keys = self.store.tensor[layer_idx, 0, :rows]
        values = self.store.tensor[layer_idx, 1, :rows]
        keys.index_copy_(2, self.write_pos, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_pos, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.store.shape[4]

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.store.shape[4], 0

    def __len__(self) -> int:
        return self.store.shape[0]
