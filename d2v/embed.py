"""`d2v embed`: features of a folder of inputs from a pretrained encoder, written to one file.

    d2v embed --checkpoint RUN_OR_FAIRSEQ.pt --data PATH --out feats.npz [--pool mean|cls|none]

The inputs are read as the probe reads them (d2v.data.build.build_embed_source: the modality's eval
view), run through `d2v.load_encoder` and pooled: `mean` over each item's tokens (padding excluded),
`cls` the extra token (images), `none` every token. A file that cannot be read is skipped and named;
the rest are embedded. Output (.npz, or .pt with the same keys):
  names     (N,) str          the file (text: "file:line") of each row
  features  (N, D) float32    pooled; --pool none: (sum of T_i, D), item i = rows offsets[i]:offsets[i+1]
  offsets   (N + 1,) int64    --pool none only
  skipped   (S, 2) str        (name, reason) of every item left out
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from d2v.log import get_logger

log = get_logger(__name__)
POOLS = ("mean", "cls", "none")


class _Items(torch.utils.data.Dataset):
    def __init__(self, src):
        self.src = src

    def __len__(self) -> int:
        return len(self.src.names)

    def __getitem__(self, i: int):
        try:
            return i, self.src.load(i), None
        except Exception as e:  # noqa: BLE001 - any unreadable input is skipped and named
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _pool(feats_BTD: torch.Tensor, cls_BED, pad_BT, pool: str) -> list[torch.Tensor]:
    """Per item: (D,) for mean / cls, (T_i, D) for none."""
    B = feats_BTD.shape[0]
    keep = torch.ones(feats_BTD.shape[:2], dtype=torch.bool) if pad_BT is None else ~pad_BT.cpu()
    f = feats_BTD.float().cpu()
    if pool == "cls":
        return [cls_BED[b, 0].float().cpu() for b in range(B)]
    if pool == "mean":
        return [f[b][keep[b]].mean(0) for b in range(B)]
    return [f[b][keep[b]] for b in range(B)]


def embed(checkpoint: str | Path, data: str | Path, out: str | Path, *, pool: str = "mean",
          teacher: bool = False, batch_size: int = 32, device: str | None = None,
          progress: bool = True, tokenizer: str | Path | None = None) -> dict:
    """Write the features of every input under `data` to `out` (.npz or .pt) -> a summary dict."""
    from d2v.data.build import build_embed_source
    from d2v.encoder import load_encoder, run_folder

    out = Path(out).expanduser()
    if out.suffix not in (".npz", ".pt"):
        raise ValueError(f"--out {out}: the file name must end in .npz or .pt")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist (create it first)")
    if pool not in POOLS:
        raise ValueError(f"--pool {pool!r}: expected one of {POOLS}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc = load_encoder(checkpoint, teacher=teacher, device=dev, tokenizer=tokenizer)
    if pool == "cls" and enc.model.num_extra_tokens == 0:
        raise ValueError(f"--pool cls: this {enc.modality} model has no CLS token; use --pool mean")
    kw = {"tokenizer": enc.tokenizer} if enc.modality == "text" and enc.tokenizer is not None else {}
    src = build_embed_source(enc.config, data, run_folder(Path(checkpoint).expanduser()), **kw)
    loader = torch.utils.data.DataLoader(_Items(src), batch_size=batch_size, shuffle=False, num_workers=0,
                                         collate_fn=list)
    names, rows, skipped = [], [], list(src.skipped)
    bar = tqdm(loader, desc="embed", unit="batch", file=sys.stderr, disable=not progress, leave=False)
    for batch in bar:
        good = [(i, x) for i, x, why in batch if x is not None]
        skipped += [(src.names[i], why) for i, x, why in batch if x is None]
        if not good:
            continue
        source, pad = src.collate([x for _, x in good])
        res = enc(source.to(dev), padding_mask=None if pad is None else pad.to(dev))
        rows += _pool(res.features, res.cls, res.padding_mask, pool)
        names += [src.names[i] for i, _ in good]
    for name, why in skipped:
        log.warning(f"skipped {name}: {why}")
    if not rows:
        raise ValueError(f"--data {data}: none of the {len(src.names)} inputs could be read "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    result = {"names": np.array(names), "skipped": np.array(skipped, dtype=str).reshape(-1, 2)}
    if pool == "none":
        lengths = [r.shape[0] for r in rows]
        result["features"] = torch.cat(rows).numpy()
        result["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    else:
        result["features"] = torch.stack(rows).numpy()
    if out.suffix == ".npz":
        np.savez(out, **result)
    else:
        torch.save({k: v.tolist() if v.dtype.kind == "U" else torch.from_numpy(v) for k, v in result.items()},
                   out)
    return {"out": str(out), "items": len(names), "skipped": skipped, "dim": enc.embed_dim, "pool": pool,
            "modality": enc.modality}
