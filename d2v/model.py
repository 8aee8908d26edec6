"""The data2vec 2.0 model: the student (encoder + decoder); its forward is handed the EMA teacher, which
builds the targets (d2v/ema.py: EMATeacher.targets); the loss itself is d2v/objective.py.

One training step (docs/architecture.md): the student embeds each sample once, repeats it for the M
clones, encodes only the kept tokens, and its decoder fills the masked slots from noise; the EMA
teacher encodes the unmasked sample once; targets are the average of its instance-normed top-K FFN
outputs, indexed per clone (never copied M times); the loss is L2 at masked positions plus the CLS
regression (d2v.objective). Model code knows nothing of optimizers, logging or checkpoints.

Legend: B samples, M clones, R = B*M rows, T tokens, K kept, N = T - K masked per row,
E extra (CLS) tokens, D width.

Module names follow the reference's (fairseq data2vec_multi) where its layout allows; the full key
table between the two, per modality and for the teacher, is d2v.interop.fairseq_keys (`d2v import` /
`d2v export --format fairseq` use it).

References: fairseq examples/data2vec/models/data2vec2.py (forward, d2v_loss).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from d2v import ops
from d2v.blocks import Attention, Block
from d2v.config import ModelConfig, ObjectiveConfig
from d2v.masking import MaskInfo
from d2v.modalities import build_modality_encoder
from d2v.objective import data2vec_loss


def _bert_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):  # tokens and learned positions; the padding row stays zero
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Data2Vec2(nn.Module):
    def __init__(self, cfg: ModelConfig, objective: ObjectiveConfig):
        super().__init__()
        self.cfg, self.objective = cfg, objective
        self.modality_encoder = build_modality_encoder(cfg)
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.encoder_dropout,
                  cfg.attention_dropout, cfg.activation_dropout, cfg.post_mlp_dropout)
            for _ in range(cfg.depth)
        ])
        self.decoder_dropout = nn.Dropout(cfg.decoder.input_dropout)
        D = cfg.embed_dim
        with torch.no_grad():
            self.apply(_bert_init)
        self.modality_encoder.after_init()  # modality-specific re-initializations after the BERT init
        # data2vec 1.0 modes: learned mask embedding for the full-length student, linear regression head.
        # Drawn last, so every mode starts from the same encoder weights for the same seed.
        self.mask_emb = None if cfg.skip_masked else nn.Parameter(torch.empty(D).normal_(std=0.02))
        self.final_proj = nn.Linear(D, D) if cfg.head == "linear" else None
        if cfg.head == "linear":
            self.modality_encoder.decoder = None
            with torch.no_grad():
                _bert_init(self.final_proj)
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = cfg.attention

    # ----------------------------------------------------------------------------------- teacher
    def strip_to_teacher(self) -> "Data2Vec2":
        """Turn this (deep-copied) model into the EMA teacher's module, keeping only the parts the
        teacher averages (spec §5): never the decoder; with `ema_encoder_only` (text) only the main
        blocks; without `ema_local_encoder` (audio) no feature extractor (the student's is used)."""
        me = self.modality_encoder
        self.mask_emb = self.final_proj = None  # student-only (data2vec 1.0 modes)
        if self.cfg.ema_encoder_only:
            self.modality_encoder = None
        else:
            me.decoder = None
            if not self.cfg.ema_local_encoder:
                for name in me.local_modules:
                    setattr(me, name, None)
        return self

    # ----------------------------------------------------------------------------------- encoder
    def encode(self, source: torch.Tensor | None = None, *, padding_mask: torch.Tensor | None = None,
               mask: MaskInfo | None = None, clones: int = 1, collect_ffn: bool = False,
               local: torch.Tensor | None = None, context: nn.Module | None = None):
        """-> x (R, E + K, D), the main blocks' FFN outputs (R, E + K, D) each, and the token padding
        mask (B, T) or None.

        `source` goes through this model's feature extractor, unless its output `local` (B, T, D) is
        given (then `padding_mask` is at token level). With a mask, the features are repeated for
        `clones` masked copies per sample (sample-major rows) and only the kept tokens are encoded.
        `context` contextualizes with another model's modality encoder (the text teacher uses the
        student's)."""
        if local is None:
            local, padding_mask = self.modality_encoder.local_features(source, padding_mask)
        ctx = context if context is not None else self.modality_encoder
        x, bias = ctx.contextualize(local, mask, clones, padding_mask)  # (R, E + K, D)
        ffn = []
        for blk in self.blocks:
            if self.training and self.cfg.layerdrop > 0 and torch.rand(()) < self.cfg.layerdrop:
                continue
            x, t = blk(x, bias)
            if collect_ffn:
                ffn.append(t)
        return x, ffn, padding_mask

    @torch.no_grad()
    def extract_features(self, source: torch.Tensor, pool: str = "mean",
                         padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unmasked features for probing: mean of the final tokens (padding excluded) or the CLS
        output -> (B, D) float32."""
        x, _, pad = self.encode(source, padding_mask=padding_mask)
        E = self.num_extra_tokens
        if pool == "cls":
            if E == 0:
                raise ValueError("pool='cls' needs model.num_extra_tokens >= 1")
            return x[:, 0].float()
        tokens = x[:, E:].float()  # (B, T, D)
        if pad is None:
            return tokens.mean(dim=1)
        keep = (~pad).unsqueeze(-1).float()  # (B, T, 1)
        return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1.0)

    @property
    def num_extra_tokens(self) -> int:
        return self.modality_encoder.num_extra_tokens

    # ----------------------------------------------------------------------------------- objective
    def forward(self, source: torch.Tensor, mask: MaskInfo, teacher) -> dict[str, torch.Tensor]:
        """source (B, ...), mask over R = B*M rows, the EMA teacher (d2v.ema.EMATeacher) -> the
        STAT_KEYS as scalar tensors (no host sync): the student's predictions and the teacher's targets
        (`teacher.targets`, from the student's features for audio/text) at the masked positions,
        scored by d2v.objective.data2vec_loss."""
        B, R = source.shape[0], mask.ids_keep.shape[0]
        if R % B:
            raise ValueError(f"mask has {R} rows, not a multiple of the batch size {B}")
        M, obj, me = R // B, self.objective, self.modality_encoder
        E, ids_masked = self.num_extra_tokens, mask.ids_masked  # ids_masked (R, N)
        local, _ = me.local_features(source)  # (B, T, D), once per sample
        if self.cfg.skip_masked:
            x, _, _ = self.encode(local=local, mask=mask, clones=M)  # (R, E + K, D)
        else:  # full length, learned mask embedding at masked tokens (data2vec 1.0)
            x, _, _ = self.encode(local=me.masked_input(local, mask, M, self.mask_emb))  # (R, E + T, D)
        if self.final_proj is not None:  # data2vec 1.0: a Linear on the student's masked outputs
            p_m = self.final_proj(ops.masked_gather(x[:, E:], ids_masked)).float()  # (R, N, D)
        else:
            dec_in = self.decoder_dropout(x[:, E:])  # (R, K, D), or (R, T, D) at full length
            if self.cfg.skip_masked:
                noise = torch.randn(R, mask.mask.shape[1], x.shape[-1], device=x.device, dtype=x.dtype)
                dec_in = ops.masked_scatter(dec_in, mask.ids_keep, noise * obj.decoder_noise_std)  # (R, T, D)
            pred = me.decoder(dec_in)  # (R, T, D)
            p_m = ops.masked_gather(pred, ids_masked).float()  # (R, N, D)

        y = teacher.targets(source, local.detach(), self)  # (B, T, D) fp32
        y_m = ops.masked_targets(y, ids_masked, M)  # (R, N, D), per-clone index into the shared targets
        return data2vec_loss(p_m, y_m, y, x[:, 0] if E > 0 else None, M, obj)


def build_model(cfg) -> Data2Vec2:
    """Build the student Data2Vec2 for a full Config (seed the RNG first for a reproducible init)."""
    return Data2Vec2(cfg.model, cfg.objective)
