"""Seeding and the random-number state a checkpoint carries (torch, numpy, python, and every CUDA
device's generator when CUDA is present), so a resumed run draws the same noise as an uninterrupted one."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of data-parallel rank `rank` for its own draws (decoder noise, layerdrop): rank 0 keeps
    `seed`, so one rank draws what a single process draws."""
    return seed + 1_000_003 * rank


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
