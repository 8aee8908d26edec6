"""The DeepSpeed backend: config.py (the DeepSpeed config derived from d2v's), ema.py (the EMA teacher
per ZeRO stage), backend.py (the step, checkpoints), export.py (consolidating a checkpoint). Importing
this package does not import deepspeed; its modules do, on use."""
