"""A d2v text encoder as a HuggingFace `transformers` model folder (`d2v export --format hf`).

d2v's text encoder is RoBERTa's post-LN layout: token + learned position embeddings (positions count
from pad + 1, pads get the padding row) -> embedding LayerNorm -> post-LN blocks (attention, add, LN;
GELU MLP, add, LN). So `RobertaModel` computes exactly what it computes, given:
  - q/k/v: d2v's fused qkv Linear, split into its three row blocks (query, key, value);
  - token types: one all-zero row (d2v has none);
  - max_position_embeddings = model.max_positions + pad + 1 (RoBERTa's convention, same table);
  - no pooler (data2vec trains none): load with `RobertaModel.from_pretrained(dir, add_pooling_layer=False)`;
  - no prenet (model.prenet_depth 0, as in the released configs): d2v's prenet starts with a second
    LayerNorm after the embedding's, which RobertaModel has no place for, so such runs are refused.
Positions agree for right-padded batches (RoBERTa numbers non-pad tokens, d2v numbers every slot and
gives pads the padding row), which is what d2v's collate and every HF tokenizer call with
padding=True produce. The folder also holds the run's tokenizer as a `PreTrainedTokenizerFast`
that prepends <s> as d2v's probe and `d2v embed` do.

Image and audio have no exact HF class: the nearest are ViT/Data2VecVision (pre-LN blocks, a
learned position table, no sin-cos buffer) and Data2VecAudio / Wav2Vec2 (pre- or post-LN with a
single grouped positional conv, no ALiBi bias), each of which computes something else from the same
weights, so d2v does not export to them.

References: transformers models/roberta/modeling_roberta.py (RobertaEmbeddings, RobertaLayer).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from d2v._optional import require
from d2v.config import Config
from d2v.modalities.text import PAD_ID

BOS_ID, EOS_ID, UNK_ID = 0, 2, 3


def roberta_config(cfg: Config) -> dict:
    m = cfg.model
    return {
        "architectures": ["RobertaModel"], "model_type": "roberta",
        "vocab_size": m.vocab_size, "hidden_size": m.embed_dim,
        "num_hidden_layers": m.depth, "num_attention_heads": m.num_heads,
        "intermediate_size": int(m.embed_dim * m.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": m.encoder_dropout, "attention_probs_dropout_prob": m.attention_dropout,
        "max_position_embeddings": m.max_positions + PAD_ID + 1, "type_vocab_size": 1,
        "layer_norm_eps": m.norm_eps, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID, "position_embedding_type": "absolute", "initializer_range": 0.02,
    }


def roberta_state_dict(sd: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """d2v text student state dict -> RobertaModel's (no pooler). Every encoder key is used once."""
    D = cfg.model.embed_dim
    le = "modality_encoder.local_encoder."
    out = {
        "embeddings.word_embeddings.weight": sd[le + "embed_tokens.weight"],
        "embeddings.position_embeddings.weight": sd[le + "embed_positions.weight"],
        "embeddings.token_type_embeddings.weight": torch.zeros(1, D),
        "embeddings.LayerNorm.weight": sd[le + "layernorm_embedding.weight"],
        "embeddings.LayerNorm.bias": sd[le + "layernorm_embedding.bias"],
    }
    blocks = [f"blocks.{i}." for i in range(cfg.model.depth)]
    for j, b in enumerate(blocks):
        h = f"encoder.layer.{j}."
        w, bias = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]  # (3D, D), (3D,): [q; k; v]
        for n, name in enumerate(("query", "key", "value")):
            out[h + f"attention.self.{name}.weight"] = w[n * D:(n + 1) * D]
            out[h + f"attention.self.{name}.bias"] = bias[n * D:(n + 1) * D]
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
                             ("norm2", "output.LayerNorm")):
            out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Any d2v text checkpoint -> a transformers folder `out_dir` (config.json, model.safetensors,
    tokenizer files) -> (out_dir, the checkpoint folder read)."""
    from d2v.encoder import run_folder, run_tokenizer
    from d2v.weights import load_weights

    transformers = require("transformers", "d2v export --format hf")
    state, cfg_dict, ck = load_weights(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    if cfg.model.modality != "text":
        raise ValueError(f"{ck}: --format hf exports text models (RoBERTa layout); this run is "
                         f"{cfg.model.modality}, which no HF class computes exactly (see docs/weights.md): "
                         f"use --format fairseq or d2v")
    if cfg.model.prenet_depth:
        raise ValueError(f"{ck}: --format hf needs model.prenet_depth 0 (this run has "
                         f"{cfg.model.prenet_depth}): the prenet's input LayerNorm has no place in "
                         f"RobertaModel")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty (nothing was overwritten)")
    hf_cfg = transformers.RobertaConfig(**roberta_config(cfg))
    model = transformers.RobertaModel(hf_cfg, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(roberta_state_dict(state["model"], cfg), strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:  # a mapping bug, never a partial model
        raise RuntimeError(f"HF export: RobertaModel keys missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = run_tokenizer(cfg, run_folder(Path(ck)))
    if tok is not None:
        save_hf_tokenizer(tok, out)
    (out / "d2v_export.json").write_text(json.dumps({"checkpoint": str(ck), "step": int(state.get("step", 0)),
                                                     "tokenizer": tok is not None}, indent=2) + "\n")
    return out, ck


def save_hf_tokenizer(tok, out: Path) -> None:
    """Save a d2v tokenizer as a PreTrainedTokenizerFast that prepends <s> (as d2v's probe and embed)."""
    from tokenizers import processors

    transformers = require("transformers", "d2v export --format hf")
    tok = tok.__class__.from_str(tok.to_str())  # a copy: the post-processor is the export's
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out)
