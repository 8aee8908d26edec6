"""Build datasets and loaders from the config: the pretraining stream and the labelled probe tasks,
from the data module the modality registered (its ModalitySpec.data: d2v/data/build_<modality>.py).

`data.path: null` selects the modality's embedded default (image: sklearn's real handwritten
digits; audio: words spoken by espeak-ng voices; text: the Debian fortunes collection), prepared
into a cache on first use. Otherwise `data.path` is an image folder, an audio manifest (.tsv) or
folder, or a text file or folder. A folder holding train/ and test/ parts (audio: train.tsv and
test.tsv) pretrains on train and probes train -> test; anything else pretrains on everything and
the probe splits its labelled examples 80/20.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from d2v.config import Config
from d2v.data.common import ProbeTask
from d2v.registry import get_modality


def data_module(cfg: Config) -> ModuleType:
    """The data module registered for cfg.model.modality (pretrain_data, probe_tasks, synthetic_batch)."""
    return importlib.import_module(get_modality(cfg.model.modality).data)


def build_pretrain_data(cfg: Config, start_step: int = 0, rank: int = 0, world_size: int = 1,
                        pin_memory: bool = False, resumed: bool = False):
    """-> (dataset, loader): an endless, resumable stream of batches with M masks per sample and their
    gather/restore indices (batch["maskinfo"], computed in the loader workers). `pin_memory` (set it when
    training on CUDA): batches arrive in page-locked memory, so `.to(device, non_blocking=True)` is an
    asynchronous copy instead of a staged one that may wait for the device. `resumed`: the run continues
    from a checkpoint (text: reuse the run's tokenizer.json after checking it against the corpus; a fresh
    run retrains a leftover one)."""
    return data_module(cfg).pretrain_data(cfg, start_step, rank, world_size, pin_memory, resumed=resumed)


def build_probe_tasks(cfg: Config, run_dir: Path | None = None) -> list[ProbeTask]:
    """Labelled eval-mode datasets for the linear probe, one task per label kind (speech: the spoken
    word and the speaker)."""
    return data_module(cfg).probe_tasks(cfg, run_dir)


def synthetic_batch(cfg: Config, seed: int = 0) -> tuple[dict, int, float]:
    """One random batch of the recipe's shapes, for benchmarks -> ({"x": source (B, ...), "mask": (B*M, T)
    bool}, tokens per view, the modality's throughput unit per sample (ModalitySpec.bench_unit))."""
    return data_module(cfg).synthetic_batch(cfg, seed)


def build_embed_source(cfg: Config, path: Path, run_dir: Path | None = None, **kw):
    """The inputs of `d2v embed` from `path` in the modality's eval form (d2v.data.common.EmbedSource)."""
    mod = data_module(cfg)
    if not hasattr(mod, "embed_source"):
        raise ValueError(f"d2v embed: the {cfg.model.modality} modality's data module ({mod.__name__}) "
                         f"has no embed_source")
    return mod.embed_source(cfg, Path(path).expanduser(), run_dir, **kw)
