"""jalora's cache directory: files it downloads (the default model) and builds (converted GGUF models).

`cache_dir()` is `$JALORA_CACHE_DIR` if set, else `$XDG_CACHE_HOME/jalora`, else `~/.cache/jalora`. The
environment is read on every call, never at import, so a process (or a test) may point it elsewhere
at any time. Everything under it is written atomically (a temporary name in the same directory, then
a rename), so a reader never sees half a file and a killed writer leaves only a temporary behind.
"""

from __future__ import annotations

import os
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
