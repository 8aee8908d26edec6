"""Seeds for per-item / per-batch generators: every random choice in the data pipeline draws from a
torch.Generator seeded by a hash of (purpose, run seed, epoch, index), never from a global RNG, so
results do not depend on worker count and a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "seeded_generator"]


def derive_seed(*parts: int | str) -> int:
    """Hash a tuple of ints/strings into a 63-bit seed (no collisions between nearby tuples,
    unlike linear mixes such as seed*P + epoch*Q + i)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded with derive_seed(*parts)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
