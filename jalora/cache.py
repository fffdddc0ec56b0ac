"""jalora's cache directory: files it downloads (the default model) and builds (converted GGUF models).

`cache_dir()` is `$JALORA_CACHE_DIR` if set, else `$XDG_CACHE_HOME/jalora`, else `~/.cache/jalora`. The
environment is read on every call, never at import, so a process (or a test) may point it elsewhere
at any time. Everything under it is written atomically (a temporary name in the same directory, then
a rename), so a reader never sees half a file and a killed writer leaves only a temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ENV_VAR = "JALORA_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root (not created here)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "jalora"


def marker_says(d: Path, marker: str, key: str, value) -> bool:
    """Whether `d`/`marker` is a JSON object whose `key` is `value` (False if it is missing or unreadable):
    how a cached directory says which version of its writer made it."""
    try:
        with open(d / marker) as f:
            return json.load(f).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False


def install_dir(tmp: Path, final: Path, is_current) -> None:
    """Renames the finished directory `tmp` to `final`, replacing one there that `is_current(final)`
    rejects (moved aside first, so `final` never holds a half-deleted tree). If another process installed
    a current one meanwhile, that one stays (`tmp` is left for the caller to delete)."""
    if final.exists() and not is_current(final):
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name[:16]}.", suffix=".stale", dir=final.parent))
        try:
            os.rename(final, stale / "old")
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_current(final):
            raise
