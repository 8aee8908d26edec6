"""d2v.kernels: fused kernels for data2vec 2.0's hot spots, each module holding its pure-torch
`*_ref` reference beside the kernel. Installed as the subpackage `d2v.kernels`.

The references are what `d2v.ops` runs on machines without a fused path; the fused Triton/CUDA
kernels land beside them (see issue "Fused kernels for the hot spots").
"""
from .build_targets import build_targets_ref
from .ema_update import ema_update_ref_
from .masked_gather import masked_gather_ref, masked_scatter_ref

__all__ = ["build_targets_ref", "ema_update_ref_", "masked_gather_ref", "masked_scatter_ref"]
