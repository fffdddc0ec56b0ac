"""The Quickstart, as a user runs it: `jalora demo` on the default SmolLM2; `jalora serve` on the
bundled tiny model, then the pipeline and a generation against it over gRPC; and the flags `serve` /
`demo` derive from EngineConfig and ServerConfig."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from checkpoints import DEFAULT_MODEL_DIR
from jalora.config import EngineConfig
from server import cli
from server.config import ServerConfig
from tests.server.support import REPO

# A guard against a hang, not a margin: the demo (conversion, warm-up, six judge calls) takes 1-3 minutes.
DEMO_HANG = 900


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


@pytest.fixture(scope="module")
def default_server():
    """`jalora serve --model tiny --port 0`: the bundled tiny model (checkpoints/default) and its judges."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", "tiny", "--port", "0"],
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
    base_tokens = int(rows["base"][2]) + int(rows["base"][4])  # its prompt and its answer
    for k, judge in enumerate(("certainty", "hallucination", "safety")):
        prompt, cached, activation = int(rows[judge][2]), int(rows[judge][3]), int(rows[judge][5])
        # The judge's prompt is the base request's tokens (question + answer), the close of the
        # answer's turn, then the invocation: every full block of the base request is reused, and after
        # the first judge every full block before the invocation (base KV, whoever computed it).
        reusable = activation if k else min(activation, base_tokens)
        assert cached >= (reusable // 16) * 16 > 0 and prompt > activation, out
    assert rows["base"][5] == "-"
    assert re.search(r"judges reused \d+/\d+ prompt tokens", out)


def test_the_pipeline_closes_the_answers_turn_as_the_template_does(default_server):
    """A conversation's judges read the answer's turn closed as the bundled template closes a turn
    (`<|eos|>` and a newline), then their invocation: the Pipeline's judge equals a Generate of exactly
    that prompt, logprobs included."""
    from jalora.client import Client, PipelineJudge

    _, target = default_server
    with Client(target, timeout=DEMO_HANG) as c:
        conversation = [{"role": "user", "content": "Is the sky blue?"}]
        rendered = c.tokenize(conversation)
        name = sorted(a.name for a in c.list_adapters() if a.kind == "alora")[0]
        invocation = list(c.adapter(name).invocation_tokens)
        closing = c.tokenize("<|eos|>\n")[-2:]  # (after the BOS tokenize puts first)
        assert closing[0] in c.server_info().eos_token_ids
        judge_sampling = dict(max_tokens=4, logprobs=0, temperature=0.0)
        stages = c.pipeline(conversation, [PipelineJudge(name, sampling=judge_sampling)], max_tokens=6,
                            temperature=0.0, ignore_eos=True)  # fmt: skip
        base, judge = sorted(stages, key=lambda st: st.judge is not None)
        assert base.judge is None and len(base.token_ids) == 6 and base.token_ids[-1] != closing[0]  # cut: not closed
        prompt = rendered + base.token_ids + closing + invocation
        ref = c.generate(prompt, name, **judge_sampling)
        assert judge.usage.prompt_tokens == len(prompt) and judge.activation_index == len(prompt) - len(invocation)
        assert judge.token_ids == ref.token_ids and len(judge.logprobs) == len(ref.token_ids)
        for got, want in zip(judge.logprobs, ref.logprobs):
            assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-4 for t in got)
        assert base.logprobs is None  # (the base asked for none)


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


@pytest.fixture()
def refused_target():
    """host:port where nothing listens: the port is bound (so nobody else takes it) but not listening,
    so a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("command", [["generate", "hi"], ["pipeline"]])
def test_client_commands_fail_at_once_without_a_server(refused_target, capsys, command):
    """No --wait: one health check, a refused connection ends the command (no wait at all)."""
    assert cli.main([*command, "--target", refused_target]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"jalora {command[0]}: no server at {refused_target} (connection refused); start one with `jalora serve`, "
        "or pass --wait SECONDS to wait for one\n"
    )


def test_client_commands_wait_when_asked_and_say_so_once(refused_target, capsys):
    assert cli.main(["generate", "hi", "--target", refused_target, "--wait", "0.5"]) == 1
    assert capsys.readouterr().err == (
        f"jalora generate: waiting up to 0.5s for the server at {refused_target}\n"
        f"jalora generate: no SERVING server at {refused_target} after 0.5s (connection refused); "
        "start one with `jalora serve`\n"
    )


def _option_helps(text: str) -> dict[str, str]:
    """{option: its help} from argparse's --help output: an option line starts with two spaces and a
    dash, its help follows two spaces later on that line and on the more deeply indented lines below."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        option = re.fullmatch(r"  (-\S.*?)(?: {2,}(\S.*))?", line)
        if option:
            current = option.group(1)
            helps[current] = option.group(2) or ""
        elif current is not None and re.match(r" {3,}\S", line):
            helps[current] = f"{helps[current]} {line.strip()}".strip()
        else:
            current = None
    return helps


@pytest.mark.parametrize("command", [[], ["serve"], ["generate"], ["pipeline"], ["demo"], ["train"], ["export-orbax"]])
def test_every_flag_has_help_that_shows_its_default(command, capsys):
    """Flags written here and flags derived from EngineConfig / ServerConfig alike; a subcommand that sets its
    own default shows that one (demo's shorter sequences), and a help that only mentions the word (a client's
    default deadline) still gets the value."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    helps = _option_helps(text)
    usage = text.split("\n\n")[0]
    assert {option.split(",")[0].split()[0] for option in helps} == set(re.findall(r"\[(-[\w-]+)", usage)), text
    del helps["-h, --help"]
    assert helps
    for option, help_text in helps.items():
        assert help_text, f"{option} has no help"
        assert re.search(r"default( here)?: ", help_text), f"{option} does not show its default: {help_text!r}"
    if command == ["demo"]:
        assert helps["--max-model-len MAX_MODEL_LEN"].endswith("(default here: 2048)"), helps
    if command == ["serve"]:
        assert helps["--max-connection-age-grace MAX_CONNECTION_AGE_GRACE"].endswith("(default: 600.0)"), helps


def test_with_invocation_needs_an_adapter(refused_target, capsys):
    """Checked before connecting: the target refuses connections, yet the answer is this usage error."""
    assert cli.main(["generate", "hi", "--with-invocation", "--target", refused_target]) == 2
    assert capsys.readouterr() == (
        "", "jalora generate: --with-invocation needs --adapter NAME (whose invocation to append)\n"
    )


@pytest.mark.parametrize("argv, flag", [
    (["generate", "3 x", "--token-ids"], "PROMPT"),
    (["generate", "3 -4", "--token-ids"], "PROMPT"),
    (["generate", "hi", "--top-k", "3000000000"], "--top-k"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--wait", "nan"], "--wait"),
    (["generate", "hi", "--wait", "-3"], "--wait"),
    (["generate", "hi", "--timeout", "0"], "--timeout"),
    (["pipeline", "--rounds", "0"], "--rounds"),
    (["pipeline", "--max-tokens", "3000000000"], "--max-tokens"),
    (["pipeline", "--judge-max-tokens", "-1"], "--judge-max-tokens"),
    (["demo", "--model", "/nowhere", "--rounds", "0"], "--rounds"),
    (["demo", "--model", "/nowhere", "--max-tokens", "0"], "--max-tokens"),
])  # fmt: skip
def test_client_flags_are_checked_before_connecting_or_starting(refused_target, capsys, argv, flag):
    """A bad value is one usage error naming its flag, before any connection (the target refuses them, which
    would be a different error) or, for demo, before the model is read (it does not exist)."""
    target = [] if argv[0] == "demo" else ["--target", refused_target]
    assert cli.main([*argv, *target]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jalora {argv[0]}: {flag}: ") and err.count("\n") == 1 and err.count(flag) == 1, err


def test_bad_adapter_argument_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--adapter", "no-equals-sign"])
    assert exit_.value.code == 2


def test_demo_serves_and_runs_the_pipeline_in_one_command(smollm2_gguf):
    """The Quickstart's main job: `jalora demo` (SmolLM2 served on a free port + pipeline over gRPC)
    answers real questions, each trained judge gives its verdict with its probability, and every judge
    reuses the answer's blocks."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo"],
        capture_output=True, text=True, env=env, cwd="/", timeout=DEMO_HANG,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^jalora serving on 127\.0\.0\.1:\d+$", proc.stdout, re.M)
    # Greedy float32 on a CPU: the same answer transformers gives (tests/model/test_gguf.py checks parity).
    assert "answer:   'The capital of France is Paris.'" in proc.stdout, proc.stdout
    judges = re.findall(r"^(correctness|format)\s+(\d+)\s+(\d+)", proc.stdout, re.M)
    assert len(judges) >= 2 and all(int(cached) >= 48 for _, _, cached in judges), proc.stdout
    verdicts = re.findall(r"^verdict:  (correctness|format) '([YN])' \(p=(0\.\d\d|1\.00)\), reused (\d+) of (\d+) "
                          r"prompt tokens from the cache$", proc.stdout, re.M)  # fmt: skip
    assert len(verdicts) == len(judges) and {v[0] for v in verdicts} == {"correctness", "format"}, proc.stdout
    assert all(float(p) >= 0.5 for _, _, p, _, _ in verdicts)  # greedy: the verdict is the likelier answer
    # The answer to the first question is right, and in one sentence, as it asked.
    assert next(v[1] for v in verdicts if v[0] == "correctness") == "Y", proc.stdout
    assert next(v[1] for v in verdicts if v[0] == "format") == "Y", proc.stdout
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
    # demo always serves on a free port, to its own client, which brings no certificate or token
    demo_only = set(cli.DEMO_EXCLUDED) if command == "demo" else set()
    for cls in (EngineConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            if f.name not in demo_only:
                assert hasattr(args, f.name), f"no flag for {cls.__name__}.{f.name}"
    plan = cli.serve_plan(args)
    # demo's own defaults: short prompts, so smaller steps and sequences (fewer compilations on a CPU)
    demo = dict(max_num_batched_tokens=256, max_model_len=2048) if command == "demo" else {}
    assert plan.engine_config == EngineConfig(model=model, **demo)
    assert plan.server_config == (ServerConfig(port=0) if command == "demo" else ServerConfig())
    assert plan.adapters == ()


def test_serve_without_flags_is_the_bundled_smollm2(smollm2_gguf):
    """No --model: SmolLM2 (fetched and converted once) with its trained judges (committed in
    checkpoints/smollm2_judges) as start-up adapters and adapter root. The plan names it before any file
    is read."""
    from checkpoints.bundled import SMOLLM2_JUDGES
    from jalora.model.gguf import converted_dir

    plan = _plan("serve")
    assert plan.bundled == "smollm2" and plan.engine_config == EngineConfig(model="smollm2")
    resolved = cli.resolve_bundled(plan)
    assert resolved.engine_config == EngineConfig(model=str(smollm2_gguf))
    assert resolved.server_config == ServerConfig(adapter_roots=(str(SMOLLM2_JUDGES),))
    trained = sorted(d.name for d in SMOLLM2_JUDGES.iterdir() if (d / "adapter_config.json").is_file())
    assert trained == ["correctness", "format"]
    assert dict(resolved.adapters) == {n: str(SMOLLM2_JUDGES / n) for n in trained}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(converted_dir(smollm2_gguf) / "tokenizer.json"))
    for name, path in resolved.adapters:  # each judge answers in a chat turn of its own role
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        opening = f"<|im_start|>{name}\n"
        assert config["invocation_string"] == opening
        assert config["alora_invocation_tokens"] == tokenizer.encode(opening, add_special_tokens=False).ids
    assert cli.resolve_bundled(_plan("serve")) == resolved


def test_bundled_tiny_and_explicit_adapters():
    plan = cli.resolve_bundled(_plan("serve", "--model", "tiny"))
    assert plan.engine_config == EngineConfig(model=str(DEFAULT_MODEL_DIR))
    assert plan.server_config == ServerConfig(adapter_roots=(str(DEFAULT_MODEL_DIR / "adapters"),))
    assert {name for name, _ in plan.adapters} == {"certainty", "hallucination", "safety"}
    # --adapter replaces the judges; --adapter-roots replaces their folder as root.
    judge = str(DEFAULT_MODEL_DIR / "adapters" / "safety")
    plan = cli.resolve_bundled(_plan("serve", "--model", "tiny", "--adapter", f"s={judge}", "--adapter-roots", "/r"))
    assert plan.adapters == (("s", judge),) and plan.server_config.adapter_roots == ("/r",)


def test_flags_reach_the_configs(tiny_models, tmp_path):
    model = tiny_models["llama"]
    plan = _plan(
        "serve", "--model", model, "--no-enable-prefix-caching", "--no-async-scheduling", "--no-warmup",
        "--block-size", "32", "--max-model-len", "64", "--attention-impl", "reference", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.5", "--adapter-roots", "/a", "--adapter-roots", "/b", "--port", "0",
        "--host", "0.0.0.0", "--insecure", "--max-pending-requests", "3", "--grace", "1.5", "--model-name", "tiny",
        "--metrics-port", "9100",
    )  # fmt: skip
    assert plan.engine_config == EngineConfig(
        model=model, enable_prefix_caching=False, async_scheduling=False, warmup=False, block_size=32,
        max_model_len=64, attention_impl="reference", dtype="bfloat16", gpu_memory_utilization=0.5,
    )  # fmt: skip
    assert plan.server_config == ServerConfig(
        host="0.0.0.0", insecure=True, port=0, adapter_roots=("/a", "/b"), max_pending_requests=3, grace=1.5,
        model_name="tiny", metrics_port=9100,
    )
    # --max-loras is raised to the number of start-up adapters.
    adapters = [f"--adapter=a{i}={tmp_path}" for i in range(6)]
    assert _plan("serve", "--model", model, *adapters).engine_config.max_loras == 6
    assert _plan("serve", "--model", model, "--max-loras", "8", *adapters).engine_config.max_loras == 8
    # With --max-cpu-loras, the adapters beyond the slots wait in host memory: that limit is raised instead.
    swapping = _plan("serve", "--model", model, "--max-loras", "2", "--max-cpu-loras", "4", *adapters).engine_config
    assert (swapping.max_loras, swapping.max_cpu_loras) == (2, 6)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["serve", "--block-size", "0"], "block_size"),
        (["serve", "--max-num-seqs", "-1"], "max_num_seqs"),
        (["serve", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
        (["serve", "--host-kv-cache-gb", "-1"], "host_kv_cache_gb"),
        (["serve", "--max-pending-requests", "0"], "max_pending_requests"),
        (["serve", "--port", "70000"], "port"),
        (["serve", "--metrics-port", "70000"], "metrics_port"),
        (["serve", "--port", "9100", "--metrics-port", "9100"], "metrics_port"),
        (["demo", "--max-loras", "0"], "max_loras"),
        (["serve", "--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras"),
        (["serve", "--compile-cache", ""], "compile_cache"),
    ],
)
def test_bad_flag_value_is_one_error_naming_the_field(tiny_models, capsys, argv, field):
    """Checked before the model is read: the only output is one line naming the field, exit status 2."""
    assert cli.main([*argv, "--model", tiny_models["llama"]]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"jalora {argv[0]}: {field}: "), err
    assert "loading" not in err


@pytest.fixture()
def unloadable_model(tmp_path):
    """A model directory that cannot be loaded: its config.json is not JSON. A command that reads it
    fails with `config.json: ...` after a `loading` line, so a check that should come first shows."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json: reading this model is a test failure")
    return str(model)


def _half_adapter(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    return half


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_start_up_paths_are_checked_before_the_model_loads(unloadable_model, tmp_path, capsys, command):
    """Every --adapter directory and adapter root, each problem one line, exit status 2, no traceback."""
    missing, half, not_a_dir = tmp_path / "missing", _half_adapter(tmp_path), tmp_path / "model" / "config.json"
    argv = [command, "--model", unloadable_model, "--adapter", f"x={missing}", "--adapter", f"y={half}",
            "--adapter", f"z={not_a_dir}", "--adapter-roots", str(tmp_path / "roots")]  # fmt: skip
    argv += ["--port", "0"] if command == "serve" else []  # demo always takes a free port
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"jalora {command}: adapter x: {missing} does not exist",
        f"jalora {command}: adapter y: {half} has no adapter_model.safetensors (a PEFT adapter directory holds both)",
        f"jalora {command}: adapter z: {not_a_dir} is not a directory",
        f"jalora {command}: adapter_roots: {tmp_path / 'roots'} does not exist",
    ]


def test_compile_cache_that_cannot_be_created_is_one_error(unloadable_model, tmp_path, capsys):
    """The cache directory is made before anything of the model is read (a directory under a file)."""
    (tmp_path / "file").write_text("")
    argv = ["serve", "--model", unloadable_model, "--compile-cache", str(tmp_path / "file" / "xla"), "--port", "0"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith(f"jalora serve: compile_cache: cannot create {tmp_path / 'file' / 'xla'}")
    assert "config.json" not in out + err


def test_missing_adapter_is_one_line(unloadable_model, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert cli.main(["serve", "--model", unloadable_model, "--port", "0", "--adapter", f"x={missing}"]) == 2
    assert capsys.readouterr() == ("", f"jalora serve: adapter x: {missing} does not exist\n")


def test_start_up_adapter_name_is_checked_before_the_model_loads(unloadable_model, tmp_path, capsys):
    """Adapter names follow one pattern (jalora/api/limits.py), at start-up as over gRPC."""
    from jalora.api.limits import ADAPTER_NAME_RULE

    half = _half_adapter(tmp_path)
    assert cli.main(["serve", "--model", unloadable_model, "--port", "0", "--adapter", f"../x={half}"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"jalora serve: adapter ../x: not an adapter name ({ADAPTER_NAME_RULE})"


def test_a_bad_start_up_adapter_is_named(tiny_models, tmp_path, capsys):
    """The full validation happens at load: its error says which --adapter it is about."""
    broken = _half_adapter(tmp_path)
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"")
    argv = ["serve", "--model", tiny_models["llama"], "--port", "0", "--no-warmup", "--adapter", f"y={broken}"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 2 and err.startswith("jalora: loading "), err
    assert err.splitlines()[1].startswith("jalora serve: adapter y: adapter_config.json: not valid JSON"), err


def test_busy_port_fails_before_the_model_loads(unloadable_model):
    """As a user runs it: `jalora serve` on a port another program listens on."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--model", unloadable_model, "--port", str(port)],
            capture_output=True, text=True, env=env, cwd="/", timeout=120,
        )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"jalora serve: port {port}: address already in use\n"


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


def test_busy_metrics_port_fails_before_the_model_loads(unloadable_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        plan = _plan("serve", "--model", unloadable_model, "--port", "0", "--metrics-port", str(port))
        with pytest.raises(cli.StartupError) as err:
            cli.preflight(plan)
    assert err.value.problems == [f"metrics_port {port}: address already in use"]



@pytest.mark.parametrize("flags, modules", [
    ([], ("q_proj", "k_proj", "v_proj")),
    (["--target-modules", "o_proj"], ("o_proj",)),
    (["--target-modules", "q_proj", "v_proj", "--target-modules", "down_proj", "q_proj"],
     ("q_proj", "v_proj", "down_proj")),
])  # fmt: skip
def test_train_target_modules_may_repeat(flags, modules):
    """A repeated flag adds its projections: it used to keep only the last list, training fewer projections than
    asked for without a word."""
    args = cli.build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", *flags])
    assert cli._train_config(args).target_modules == modules
