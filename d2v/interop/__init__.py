"""Weights in and out of d2v: fairseq data2vec 2.0 checkpoints (fairseq.py, with the key table in
fairseq_keys.py and the config mapping in fairseq_config.py) and HF transformers for text (hf.py)."""
