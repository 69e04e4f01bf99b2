"""llmtrain: GPT-style pretraining on Hydra configs, Accelerate, DeepSpeed ZeRO or FSDP2."""

import os

# The process that started this one, read before torch is imported (over a second): a launcher
# that dies after this is noticed by llmtrain/signals.py.
PARENT_PID = os.getppid()
