"""Shared test setup: offline, quiet, deterministic on two CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
