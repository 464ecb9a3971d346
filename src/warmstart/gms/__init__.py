"""GPU memory service: model weights that live outside the worker (and its snapshot).

``warmstart gms serve --gpu N`` owns the weights' GPU memory on one GPU; a
worker maps them from it (`warmstart.gms.client.GmsWeights`), unmaps them at
its checkpoint point and maps them again after a restore. See docs/gms.md.

Importing this package loads no driver and no torch.
"""

from warmstart.gms.layout import Layout, layout_hash, read_layout

__all__ = ["Layout", "layout_hash", "read_layout"]
