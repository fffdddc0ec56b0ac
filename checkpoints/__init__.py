"""The embedded default checkpoint, shipped as package data so it is found from any working directory.

`default/` holds a tiny Granite-family decoder with random weights, its BPE tokenizer and three PEFT
aLoRA judges (made by `make_default.py` and `make_adapters.py`, whose output is committed).
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
