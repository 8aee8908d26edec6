"""The tokenizer of a fairseq text checkpoint: GPT-2 byte-level BPE, re-indexed by fairseq's dict.txt.

fairseq's RoBERTa-style text models (data2vec 2.0 text included) encode text with the GPT-2 BPE
(encoder.json + vocab.bpe), write the BPE ids as decimal strings and look those up in dict.txt, whose
k-th line gets index 4 + k after the specials <s>=0, <pad>=1, </s>=2, <unk>=3; the masked-LM task adds
<mask> last. `fairseq_bpe_tokenizer` builds one `tokenizers` BPE whose ids are those indices, so a d2v
run's tokenizer produces the ids the imported embedding expects. (HF's roberta-base tokenizer.json
is this same mapping for the RoBERTa dictionary, which Meta's text checkpoints use.)

References: fairseq/data/encoders/gpt2_bpe_utils.py, fairseq/data/dictionary.py.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def read_dict_symbols(path: Path) -> list[str]:
    """The symbols of a fairseq dict.txt, in order (the count and '#fairseq:overwrite' dropped)."""
    symbols = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        fields = line.rstrip().split(" ")
        if fields[-1] == "#fairseq:overwrite":
            fields = fields[:-1]
        if len(fields) < 2 or not fields[-1].isdigit():
            raise ValueError(f"{path}, line {i}: expected '<symbol> <count>', got {line!r}")
        symbols.append(" ".join(fields[:-1]))
    return symbols


def fairseq_bpe_tokenizer(dict_path: Path, encoder_json: Path, vocab_bpe: Path,
                          vocab_size: int | None = None):
    """A tokenizers.Tokenizer: GPT-2 byte-level BPE whose token ids are the fairseq dictionary's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = read_dict_symbols(dict_path)
    try:
        gpt2 = json.loads(Path(encoder_json).read_text(encoding="utf-8"))  # BPE token -> GPT-2 id
    except (OSError, ValueError) as e:
        raise ValueError(f"{encoder_json}: not a GPT-2 encoder.json ({e})") from None
    by_id = {v: k for k, v in gpt2.items()}
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for k, s in enumerate(symbols):  # a BPE id as a decimal string, or a symbol of its own (madeupword)
        token = by_id.get(int(s)) if s.isdigit() else s
        if token is None:
            raise ValueError(f"{dict_path}: symbol {s!r} (line {k + 1}) is no id of {encoder_json}")
        vocab.setdefault(token, len(SPECIALS) + k)
    if vocab_size is None or vocab_size > len(SPECIALS) + len(symbols):
        vocab.setdefault("<mask>", len(SPECIALS) + len(symbols))
    merges = []
    for line in Path(vocab_bpe).read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        a, b = line.split()
        if a in vocab and b in vocab and a + b in vocab:  # merges into tokens the dict lacks: dropped
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
