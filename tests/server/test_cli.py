"""The Quickstart, as a user runs it: `jalora serve` on the embedded default, then the pipeline demo
and a generation against it over gRPC; and the flags `serve` / `demo` derive from EngineConfig and
ServerConfig."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest

from checkpoints import DEFAULT_MODEL_DIR
from jalora.config import EngineConfig
from server import cli
from server.config import ServerConfig
from tests.server.support import REPO


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


@pytest.fixture(scope="module")
def default_server():
    """`jalora serve --port 0` with no --model: the embedded checkpoints/default and its judges."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
    )  # fmt: skip
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    try:
        line = out.get(timeout=180)
        match = re.fullmatch(r"jalora serving on (\S+)\n", line or "")
        assert match, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if line is None else ''}"
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_pipeline_demo_reuses_the_base_answer(default_server, capsys):
    _, target = default_server
    assert cli.main(["pipeline", "--target", target]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)", out, re.M)}
    assert {"base", "certainty", "hallucination", "safety"} <= set(rows), out
    for judge in ("certainty", "hallucination", "safety"):
        prompt, cached, activation = int(rows[judge][2]), int(rows[judge][3]), int(rows[judge][5])
        # The judge's prompt is question + base answer + invocation: every full block before the
        # invocation is the base request's KV.
        assert cached >= (activation // 16) * 16 > 0 and prompt > activation, out
    assert rows["base"][5] == "-"
    assert re.search(r"judges reused \d+/\d+ prompt tokens", out)


def test_generate_with_invocation(default_server, capsys):
    _, target = default_server
    args = ["generate", "What is the capital of France?", "--target", target, "--max-tokens", "5"]
    assert cli.main(args + ["--adapter", "safety", "--with-invocation"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[length\] prompt=\d+ completion=5 cached=\d+ activation=\d+", err), err
    assert cli.main(args + ["--adapter", "safety"]) == 1  # no invocation: FAILED_PRECONDITION
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert cli.main(args + ["--show-ids"]) == 0
    assert "activation=None" in capsys.readouterr().err


def test_serve_stops_cleanly_on_sigterm(default_server):
    proc, _ = default_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "shutting down" in proc.stderr.read()


def test_client_commands_report_an_unreachable_server(capsys):
    assert cli.main(["generate", "hi", "--target", "127.0.0.1:1", "--wait", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bad_adapter_argument_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--adapter", "no-equals-sign"])
    assert exit_.value.code == 2


def test_demo_serves_and_runs_the_pipeline_in_one_command():
    """The Quickstart's main job: `jalora demo` (server on a free port + pipeline over gRPC)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo"], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^jalora serving on 127\.0\.0\.1:\d+$", proc.stdout, re.M)
    reused = re.search(r"judges reused (\d+)/(\d+) prompt tokens", proc.stdout)
    assert reused and int(reused.group(1)) > 0, proc.stdout


@pytest.mark.parametrize("flag, want", [([], True), (["--no-async-scheduling"], False)])
def test_engine_flags_reach_the_engine(tiny_models, flag, want):
    """`serve`/`demo` build their engine from the flags: async scheduling is on unless turned off."""
    args = cli.build_parser().parse_args(
        ["serve", "--model", tiny_models["llama"], "--max-model-len", "64", "--max-num-batched-tokens", "16", *flag]
    )
    engine = cli.build_engine(cli.serve_plan(args))
    assert engine.config.async_scheduling is want
    assert engine.max_model_len == 64


def _plan(*argv: str) -> cli.ServePlan:
    return cli.serve_plan(cli.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_derived_flags_carry_the_config_defaults(tiny_models, command):
    """Every config field has a flag, and no flag given means the config's own defaults."""
    model = tiny_models["llama"]
    args = cli.build_parser().parse_args([command, "--model", model])
    demo_port = {"port"} if command == "demo" else set()  # demo always serves on a free port
    for cls in (EngineConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            if f.name not in demo_port:
                assert hasattr(args, f.name), f"no flag for {cls.__name__}.{f.name}"
    plan = cli.serve_plan(args)
    assert plan.engine_config == EngineConfig(model=model)
    assert plan.server_config == (ServerConfig(port=0) if command == "demo" else ServerConfig())
    assert plan.adapters == ()


def test_serve_without_flags_is_the_embedded_default():
    plan = _plan("serve")
    assert plan.engine_config == EngineConfig(model=str(DEFAULT_MODEL_DIR))  # its 3 judges fit max_loras' default
    assert plan.server_config == ServerConfig(adapter_roots=[str(DEFAULT_MODEL_DIR / "adapters")])
    assert {name for name, _ in plan.adapters} == {"certainty", "hallucination", "safety"}


def test_flags_reach_the_configs(tiny_models, tmp_path):
    model = tiny_models["llama"]
    plan = _plan(
        "serve", "--model", model, "--no-enable-prefix-caching", "--no-async-scheduling", "--no-warmup",
        "--block-size", "32", "--max-model-len", "64", "--attention-impl", "reference", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.5", "--adapter-roots", "/a", "--adapter-roots", "/b", "--port", "0",
        "--host", "0.0.0.0", "--max-pending-requests", "3", "--grace", "1.5", "--model-name", "tiny",
    )  # fmt: skip
    assert plan.engine_config == EngineConfig(
        model=model, enable_prefix_caching=False, async_scheduling=False, warmup=False, block_size=32,
        max_model_len=64, attention_impl="reference", dtype="bfloat16", gpu_memory_utilization=0.5,
    )  # fmt: skip
    assert plan.server_config == ServerConfig(
        host="0.0.0.0", port=0, adapter_roots=("/a", "/b"), max_pending_requests=3, grace=1.5, model_name="tiny"
    )
    # --max-loras is raised to the number of start-up adapters.
    adapters = [f"--adapter=a{i}={tmp_path}" for i in range(6)]
    assert _plan("serve", "--model", model, *adapters).engine_config.max_loras == 6
    assert _plan("serve", "--model", model, "--max-loras", "8", *adapters).engine_config.max_loras == 8


@pytest.mark.parametrize(
    "argv, field",
    [
        (["serve", "--block-size", "0"], "block_size"),
        (["serve", "--max-num-seqs", "-1"], "max_num_seqs"),
        (["serve", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
        (["serve", "--max-pending-requests", "0"], "max_pending_requests"),
        (["serve", "--port", "70000"], "port"),
        (["demo", "--max-loras", "0"], "max_loras"),
    ],
)
def test_bad_flag_value_is_one_error_naming_the_field(tiny_models, capsys, argv, field):
    """Checked before the model is read: the only output is one line naming the field, exit status 2."""
    assert cli.main([*argv, "--model", tiny_models["llama"]]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"jalora {argv[0]}: {field}: "), err
    assert "loading" not in err


def test_missing_model_is_one_error(tmp_path, capsys):
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"jalora serve: model: {tmp_path} has no config.json\n"


def test_serve_takes_a_gguf_file(tiny_models, tmp_path, monkeypatch, capsys):
    """`--model x.gguf`: the plan keeps the file's name and the engine loads its converted directory."""
    from tests.gguf_models import write_gguf

    monkeypatch.setenv("JALORA_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tiny_models["llama"], tmp_path / "tiny.gguf", "Q8_0")
    plan = _plan("serve", "--model", str(path), "--max-model-len", "64", "--no-warmup")
    assert plan.engine_config.model == str(path)
    engine = cli.build_engine(plan)
    assert engine.info().model == str(path) and engine.model_dir.startswith(str(tmp_path / "cache" / "gguf"))
    capsys.readouterr()
    assert cli.main(["serve", "--model", str(tmp_path / "absent.gguf")]) == 2
    assert capsys.readouterr().err == f"jalora serve: model: {tmp_path / 'absent.gguf'} does not exist\n"
