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


COMPILE_CACHE_SUBDIR = "compile-cache"
COMPILE_CACHE_ENV_VAR = "JALORA_COMPILE_CACHE"


def compile_cache_path(setting: str | None) -> Path | None:
    """The directory of EngineConfig.compile_cache: None (off), a path, or 'auto': `$JALORA_COMPILE_CACHE`
    if set (a directory, or 'none' for off: the test suite sets it so that its many small engines neither
    write into the user's cache nor share executables between runs), else `compile-cache` under
    `cache_dir()`. Like `cache_dir()`, the environment is read on every call."""
    if setting == "auto":
        setting = os.environ.get(COMPILE_CACHE_ENV_VAR) or str(cache_dir() / COMPILE_CACHE_SUBDIR)
        if setting.lower() == "none":
            return None
    return None if setting is None else Path(setting).expanduser()


def use_compile_cache(setting: str | None) -> Path | None:
    """Points JAX's persistent compilation cache at EngineConfig.compile_cache's directory (created) and
    caches every executable, however small or quick to compile (JAX's defaults skip those under 1 s,
    which are most of an engine's). JAX reads these settings at a process's first compilation and keeps
    them: a later call with another directory resets its cache object, so the next compilation uses the
    new one. Off (None) leaves JAX's own settings (e.g. $JAX_COMPILATION_CACHE_DIR) as they are.

    Raises InvalidRequestError naming compile_cache if the directory cannot be created."""
    path = compile_cache_path(setting)
    if path is None:
        return None
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from jalora.errors import InvalidRequestError

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError("compile_cache", f"cannot create {path}: {e}") from e
    # The same names in JAX 0.10 and 0.11: these two options, jax_compilation_cache_dir and reset_cache().
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        compilation_cache.reset_cache()
    return path
