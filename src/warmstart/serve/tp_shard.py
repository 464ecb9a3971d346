"""Tensor-parallel sharding of a loaded transformers decoder (Llama/Qwen-style blocks).

Megatron-style, in place, per rank:

* attention: ``q_proj``/``k_proj``/``v_proj`` are column-parallel (this rank
  keeps its slice of query heads and of KV heads), ``o_proj`` is
  row-parallel (its input columns for those heads, then an all-reduce);
* MLP: ``gate_proj``/``up_proj`` column-parallel, ``down_proj`` row-parallel.

Embeddings, norms and the LM head stay replicated, so every rank computes the
same logits. A row-parallel layer adds its bias once, after the all-reduce.
Heads and the intermediate size must divide by the world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from warmstart.errors import UsageError


class RowParallelLinear(nn.Module):
    """``all_reduce(x_local @ W_local^T) + b`` over the default process group."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


def _rows(linear: nn.Linear, start: int, stop: int) -> None:
    """Keep output features ``[start, stop)`` of ``linear`` (column parallel)."""
    linear.weight = nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


def _row_parallel(linear: nn.Linear, start: int, stop: int) -> RowParallelLinear:
    weight = linear.weight.data[:, start:stop].clone()
    bias = None if linear.bias is None else linear.bias.data.clone()
    return RowParallelLinear(weight, bias)


def _split(total: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if total % world:
        raise UsageError(
            f"the model's {what} ({total}) does not divide by --tensor-parallel {world}",
            hint="choose a tensor-parallel size that divides the head counts and the MLP size",
        )
    part = total // world
    return rank * part, (rank + 1) * part


def shard_model(model: nn.Module, rank: int, world: int) -> dict[str, int]:
    """Shard ``model`` in place for ``rank`` of ``world``; returns the local head counts."""
    if world == 1:
        cfg = model.config.get_text_config()  # type: ignore[operator,union-attr]
        return {"heads": cfg.num_attention_heads, "kv_heads": getattr(cfg, "num_key_value_heads", None)
                or cfg.num_attention_heads}
    attn_done = mlp_done = 0
    local: dict[str, int] = {}
    for module in list(model.modules()):
        if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            head_dim = int(module.head_dim)
            heads = module.q_proj.out_features // head_dim
            kv_heads = module.k_proj.out_features // head_dim
            h0, h1 = _split(heads, rank, world, "attention heads")
            k0, k1 = _split(kv_heads, rank, world, "key/value heads")
            _rows(module.q_proj, h0 * head_dim, h1 * head_dim)
            _rows(module.k_proj, k0 * head_dim, k1 * head_dim)
            _rows(module.v_proj, k0 * head_dim, k1 * head_dim)
            module.o_proj = _row_parallel(module.o_proj, h0 * head_dim, h1 * head_dim)
            _set_if_present(module, "num_heads", h1 - h0)
            _set_if_present(module, "num_key_value_heads", k1 - k0)
            module.num_key_value_groups = (h1 - h0) // (k1 - k0)
            local = {"heads": h1 - h0, "kv_heads": k1 - k0}
            attn_done += 1
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            inter = module.gate_proj.out_features
            i0, i1 = _split(inter, rank, world, "MLP intermediate size")
            _rows(module.gate_proj, i0, i1)
            _rows(module.up_proj, i0, i1)
            module.down_proj = _row_parallel(module.down_proj, i0, i1)
            _set_if_present(module, "intermediate_size", i1 - i0)
            mlp_done += 1
    if not attn_done or not mlp_done:
        raise UsageError(
            f"cannot shard {type(model).__name__} for tensor parallelism "
            f"(found {attn_done} attention and {mlp_done} MLP blocks of the Llama/Qwen shape)",
            hint="tensor parallelism supports decoders with q/k/v/o_proj attention and gate/up/down_proj MLPs",
        )
    return local


def _set_if_present(obj: Any, name: str, value: int) -> None:
    if hasattr(obj, name):
        setattr(obj, name, value)
