"""d2v.kernels: fused kernels for data2vec 2.0's hot spots, each module holding its pure-torch
`*_ref` reference beside the kernel. Installed as the subpackage `d2v.kernels`.

The references are what `d2v.ops` runs where no fused path applies; the Triton kernels live beside
them (defined lazily at first launch, so TRITON_INTERPRET set later is honoured), the C++/CUDA EMA in
d2v/csrc/. `d2v.ops` is the one dispatch point.
"""
from .build_targets import build_targets_fairseq, build_targets_ref
from .ema_update import ema_update_ref_
from .masked_gather import masked_gather_ref, masked_scatter_ref

__all__ = ["build_targets_fairseq", "build_targets_ref", "ema_update_ref_", "masked_gather_ref",
           "masked_scatter_ref"]
