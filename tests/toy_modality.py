"""A fourth modality for tests/test_modality_spec.py, written as a user would add one: an encoder and a
data module, registered with one ModalitySpec. Nothing in d2v names it.

Source: sequences of T = 12 vectors of C = 3 floats (B, T, C), drawn from a seed per sample.
Legend: B samples, M masks per sample, R = B*M rows, T tokens, K kept tokens, D width.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2v.blocks import BlockEncoder
from d2v.data.common import ProbeTask, WithMaskInfo
from d2v.data.sampler import build_loader
from d2v.masking import random_mask
from d2v.modalities.base import ModalityEncoder, keep_tokens
from d2v.modalities.decoders import build_decoder

T, C = 12, 3

SPEC = dict(
    name="toy", source_key="vectors", sample_unit="sequences", bench_unit="tokens/s",
    flavors={"tiny": dict(embed_dim=32, depth=2, num_heads=2, num_extra_tokens=0,
                          decoder=dict(dim=32, kernel=3, layers=1, groups=4, residual=True))},
    section_defaults={"masking": dict(mask_prob=0.5, mask_length=1, mask_prob_adjust=0.0, clone_batch=2),
                      "objective": dict(cls_loss=0.0, average_top_k_layers=2)},
    encoder="tests.toy_modality:ToyEncoder", data="tests.toy_modality",
)


class ToyEncoder(ModalityEncoder):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.local_encoder = nn.Linear(C, D)
        self.positions = nn.Parameter(torch.zeros(1, T, D))
        self.context_encoder = BlockEncoder([], nn.LayerNorm(D, eps=cfg.norm_eps))
        self.decoder = build_decoder(cfg)

    def local_features(self, x_BTC, padding_mask=None):
        return self.local_encoder(x_BTC), None  # (B, T, D)

    def contextualize(self, x_BTD, mask, clones=1, pad_BT=None):
        x = keep_tokens(x_BTD + self.positions, mask, clones)  # (R, K, D)
        return self.context_encoder(x), None


class ToySequences(torch.utils.data.Dataset):
    """Item v (a virtual index: any int) -> {"vectors": (T, C), "mask": (M, T), "label": 0/1}."""

    def __init__(self, n: int, seed: int, clones: int, mask_prob: float):
        self.n, self.seed, self.clones, self.mask_prob = n, seed, clones, mask_prob

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> list[int]:
        return [self[i]["label"] for i in range(self.n)]

    def __getitem__(self, v: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(v) % self.n)
        x = torch.randn(T, C, generator=g).cumsum(0)  # a random walk: neighbours predict each other
        mask = random_mask(self.clones, T, mask_prob=self.mask_prob, generator=g)
        return {"vectors": x, "mask": mask, "label": int(x[-1, 0] > 0)}


def collate(items: list[dict]) -> dict:
    return {"vectors": torch.stack([i["vectors"] for i in items]),
            "mask": torch.cat([i["mask"] for i in items]),  # (B*M, T), sample-major
            "label": torch.tensor([i["label"] for i in items])}


def pretrain_data(cfg, start_step, rank, world_size, pin_memory, resumed=False):
    ds = ToySequences(64, cfg.train.seed, cfg.masking.clone_batch, cfg.masking.mask_prob)
    loader = build_loader(ds, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_step=start_step,
                          num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                          collate_fn=WithMaskInfo(collate), pin_memory=pin_memory)
    return ds, loader


def probe_tasks(cfg, run_dir):
    train = ToySequences(128, cfg.train.seed + 1, 1, cfg.masking.mask_prob)
    return [ProbeTask("last_sign", train, None, collate, "vectors")]


def synthetic_batch(cfg, seed=0):
    ds = ToySequences(cfg.train.batch_size, seed, cfg.masking.clone_batch, cfg.masking.mask_prob)
    b = collate([ds[i] for i in range(len(ds))])
    return {"x": b["vectors"], "mask": b["mask"]}, T, float(T)
