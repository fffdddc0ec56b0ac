"""The compilation caches under EngineConfig.compile_cache: a second start with the same directory compiles
nothing, every executable of the engine (its steps, the adapted steps, the functions behind them) is read
from jalora's directory of compiled variants (neither traced nor lowered), whatever else it compiles comes
from JAX's persistent cache, and it serves the same tokens. A model whose config differs in a value that
changes no shape gets none of them. Each start runs in a fresh process, as a
restarted server does; the counts come from JAX's own monitoring events (tests/engine/compile_cache_worker.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jalora.cache import compile_cache_path, use_compile_cache
from jalora.config import EngineConfig
from jalora.errors import InvalidRequestError
from tests import hf_models


def _start(model: str, adapter: str, cache: str, tp: int = 1) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.compile_cache_worker", model, adapter, cache, str(tp)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_start_compiles_nothing(tiny_models, tmp_path):
    model = tiny_models["llama"]
    adapter = hf_models.make_adapter(model, str(tmp_path / "alora"), ["q_proj", "v_proj"], r=4, invocation=[7, 8])
    cache = tmp_path / "xla"
    first = _start(model, adapter, str(cache))
    assert first["cache"] == str(cache)
    assert first["requests"] > first["hits"]  # a fresh directory: the first start compiles
    assert os.listdir(cache), "nothing was written to the cache"
    assert first["loaded"] == 0 and first["executables"] > 0
    second = _start(model, adapter, str(cache))
    assert second["requests"] > 0
    assert second["hits"] == second["requests"], "the second start compiled something the first had cached"
    assert second["loaded"] == second["executables"] == first["executables"], "a step variant was traced again"
    assert second["tokens"] == first["tokens"]
    other = tmp_path / "other"  # the same shapes, another RMSNorm epsilon: other executables
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] *= 10
    (other / "config.json").write_text(json.dumps(config))
    third = _start(str(other), adapter, str(cache))
    assert third["loaded"] == 0 and third["executables"] == first["executables"]


def test_sharded_steps_load_onto_their_devices(tmp_path):
    """Tensor parallel over 2 of the 8 host devices: a loaded executable runs on the devices it was
    compiled for, in their order (not on every device), and serves the same tokens."""
    model = hf_models.make_model(str(tmp_path / "llama"), "llama", num_attention_heads=8, num_key_value_heads=2)
    adapter = hf_models.make_adapter(model, str(tmp_path / "alora"), ["q_proj", "v_proj"], r=4, invocation=[7, 8])
    first = _start(model, adapter, str(tmp_path / "xla"), tp=2)
    second = _start(model, adapter, str(tmp_path / "xla"), tp=2)
    assert first["loaded"] == 0 and second["loaded"] == second["executables"] == first["executables"]
    assert second["tokens"] == first["tokens"]


def test_compile_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "jc"))
    monkeypatch.delenv("JALORA_COMPILE_CACHE")  # tests/conftest.py sets it: the default as users see it
    assert EngineConfig(model="m").compile_cache == "auto"
    assert compile_cache_path("auto") == tmp_path / "jc" / "compile-cache"
    monkeypatch.setenv("JALORA_COMPILE_CACHE", str(tmp_path / "env"))  # 'auto' as the environment says
    assert compile_cache_path("auto") == tmp_path / "env"
    monkeypatch.setenv("JALORA_COMPILE_CACHE", "None")
    assert compile_cache_path("auto") is None and use_compile_cache("auto") is None
    assert EngineConfig(model="m", compile_cache="none").compile_cache is None
    assert EngineConfig(model="m", compile_cache=tmp_path / "d").compile_cache == str(tmp_path / "d")
    for bad in ("", 3):
        with pytest.raises(InvalidRequestError, match="compile_cache"):
            EngineConfig(model="m", compile_cache=bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidRequestError, match="compile_cache"):  # a directory under a file
        use_compile_cache(str(tmp_path / "file" / "xla"))


def test_serve_flags(tiny_models, tmp_path):
    from server import cli

    def plan(*flags):
        return cli.serve_plan(cli.build_parser().parse_args(["serve", "--model", tiny_models["llama"], *flags]))

    assert plan().engine_config.compile_cache == "auto"
    assert plan("--compile-cache", "none").engine_config.compile_cache is None
    assert plan("--compile-cache", str(tmp_path)).engine_config.compile_cache == str(tmp_path)
