"""Every code snippet of the README, as written: the Python blocks run (the client blocks against
`jalora serve` on its default addresses, gRPC and HTTP), every `jalora ...` command parses with the real CLI, every
`python -m bench.<name>` names a module that exists, and the JSON a grpcurl line sends is a valid
jalora.v1 request. (The Quickstart's two commands are what CI runs.)"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from google.protobuf import json_format

from jalora.api.v1 import jalora_pb2 as pb
from server import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def _commands() -> list[str]:
    """Shell commands of the bash blocks: continuations joined, comments dropped, `&&` chains split."""
    out = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def _run_snippet(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=600)  # fmt: skip


def test_the_readme_has_the_snippets_this_test_expects():
    assert len(PYTHON_BLOCKS) == 4 and any("Client(" in b for b in PYTHON_BLOCKS)
    assert any("OpenAI(" in b for b in PYTHON_BLOCKS)
    assert sum("train_adapter(" in b for b in PYTHON_BLOCKS) == 1
    assert sum(c.startswith("jalora ") for c in _commands()) >= 5


def test_offline_snippet_runs():
    (code,) = [b for b in PYTHON_BLOCKS if not any(k in b for k in ("Client(", "OpenAI(", "train_adapter("))]
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr
    assert "[length]" in proc.stdout or "[stop]" in proc.stdout
    assert "The capital of France is Paris.\n" in proc.stdout  # SmolLM2's greedy answer, as the comment says


def test_training_snippet_runs():
    (code,) = [b for b in PYTHON_BLOCKS if "train_adapter(" in b]
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr
    losses, verdict = proc.stdout.splitlines()[-2:]
    train_loss, eval_loss, accuracy = (float(x) for x in losses.split())
    assert 0 <= accuracy <= 1 and train_loss > 0 and eval_loss > 0
    from tokenizers import Tokenizer

    from checkpoints import DEFAULT_MODEL_DIR
    from jalora.engine.chat import ChatTemplate, read_chat_template

    template = ChatTemplate(*read_chat_template(str(DEFAULT_MODEL_DIR)),
                            Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json")))  # fmt: skip
    conversation = [{"role": "user", "content": "question 99"}, {"role": "assistant", "content": "yes"}]
    # the activation index: where the judge's turn opens, right after the conversation
    assert int(verdict.split()[-1]) == len(template.render(conversation, add_generation_prompt=False))


@pytest.fixture(scope="module")
def default_serve():
    """`jalora serve --http-port 8000` as the README's client snippets expect it: the default model on
    127.0.0.1:50051, and over HTTP on 127.0.0.1:8000 (one server for both snippets)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--no-warmup", "--http-port", "8000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")] + [lines.put(None)],
                     daemon=True).start()  # fmt: skip
    try:
        first = lines.get(timeout=300)
        assert first == "jalora serving on 127.0.0.1:50051\n", first
        second = lines.get(timeout=60)
        assert second == "jalora OpenAI-compatible HTTP on http://127.0.0.1:8000/v1\n", second
        # The server skipped its warm-up (minutes on two cores): one pass of the client snippet with a
        # deadline that compiling cannot exceed compiles what its calls use, so that the snippet's own
        # 60 s deadlines then time serving alone, as against a `jalora serve` that warmed up.
        (code,) = [b for b in PYTHON_BLOCKS if "Client(" in b]
        assert code.count("timeout=60") == 1
        warm = _run_snippet(code.replace("timeout=60", "timeout=600"))
        assert warm.returncode == 0, warm.stderr
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_client_snippet_runs_against_jalora_serve(default_serve):
    (code,) = [b for b in PYTHON_BLOCKS if "Client(" in b]
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr
    assert "The capital of France is Paris.\n" in proc.stdout


def test_openai_snippet_runs_against_jalora_serve_over_http(default_serve):
    (code,) = [b for b in PYTHON_BLOCKS if "OpenAI(" in b]
    proc = _run_snippet(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "The capital of France is Paris."
    cached, activation = map(int, lines[1].split())
    assert cached > 0 and activation > 0  # the judge read the conversation's KV from the prefix cache


@pytest.mark.parametrize("command", [c for c in _commands() if c.startswith("jalora ")])
def test_jalora_commands_parse(command):
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == shlex.split(command)[1]


def test_bench_modules_exist():
    modules = {m for c in _commands() + re.findall(r"`(python -m [^`]+)`", README)
               for m in re.findall(r"python -m (bench\.\w+)", c)}  # fmt: skip
    assert modules
    for name in modules:
        assert importlib.util.find_spec(name) is not None, name


def test_grpcurl_requests_are_valid_jalora_messages():
    sent = [c for c in _commands() if c.startswith("grpcurl") and " -d " in c]
    assert sent
    for command in sent:
        words = shlex.split(command)
        body, method = words[words.index("-d") + 1], words[-1]
        assert method == "jalora.v1.Jalora/Generate"
        json_format.Parse(json.dumps(json.loads(body)), pb.GenerateRequest())  # raises on an unknown field


TPU_GUIDE = (REPO / "docs" / "tpu.md").read_text()


def _guide_commands() -> list[str]:
    """The `jalora ...` commands of docs/tpu.md's bash blocks, also those inside gcloud's --command='...'."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", TPU_GUIDE, re.S):
        text = block.replace("\\\n", " ")
        out += [" ".join(c.split()) for c in re.findall(r"\b(jalora (?:serve|generate|export-orbax)[^'\n]*)", text)]
    return out


@pytest.mark.parametrize("command", _guide_commands())
def test_tpu_guide_commands_parse(command):
    """docs/tpu.md uses only flags the CLI has (environment assignments before a command are the shell's)."""
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == "serve"


def test_tpu_guide_installs_an_extra_that_exists():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert '"./jalora[tpu]"' in TPU_GUIDE and "tpu" in extras
    assert len(_guide_commands()) >= 2
