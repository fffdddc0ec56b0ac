"""Two processes on localhost (`jax.distributed` over CPU devices, one device each) serve one engine with
tensor_parallel_size=2: process 0 schedules and sends every device call (jalora/engine/multihost.py),
process 1 follows, adapter swaps included. Its outputs equal one process's (process 1 reading no adapter
file: process 0 sends what it read); a lost follower is reported, not waited for."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jalora import LLM
from tests import hf_models
from tests.engine import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    base = hf_models.make_model(str(root / "llama"), "llama", num_attention_heads=8, num_key_value_heads=2)
    judges = [
        hf_models.make_adapter(base, str(root / name), hf_models.ALL_PROJ, r=8, invocation=worker.INV, seed=2 + i)
        for i, name in enumerate(worker.JUDGES)
    ]
    return base, ",".join(judges)


def free_port_pair() -> int:
    """A port p with p + 1 free too (the coordinator's and the engine's channel)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


@pytest.fixture
def processes():
    """Started worker processes, killed at the end whatever happened (SIGKILL: JAX's distributed
    runtime catches SIGTERM)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def start(processes, pid: int, port: int, model, *extra) -> subprocess.Popen:
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "tests.engine.multihost_worker", str(pid), str(port), *model, *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    return processes[-1]


def test_two_processes_give_one_process_tokens(model, processes):
    """Process 0 loads the judges from directories it deletes once read, before the loads reach process 1
    (which used to read each directory again itself, and died on a path its host lacked): process 1
    installs what process 0 sent, and the tokens are one process's."""
    port = free_port_pair()
    follower, leader = start(processes, 1, port, model), start(processes, 0, port, model, "--private-adapters")
    out, _ = leader.communicate(timeout=600)
    assert leader.returncode == 0 and follower.wait(timeout=60) == 0
    got = json.loads(out.strip().splitlines()[-1])
    llm = LLM(model[0], **worker.ENGINE)
    worker.load_judges(llm, model[1])
    want = worker.workload(llm)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert [g["cached"] for g in got] == [w["cached"] for w in want]
    assert want[2]["cached"] >= 8, "the judge was meant to reuse the base model's blocks"
    for g, w in zip(got, want):
        if w["logprobs"] is not None:
            np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=1e-4)


def test_a_lost_follower_is_reported_not_waited_for(model, processes):
    port = free_port_pair()
    follower, leader = start(processes, 1, port, model), start(processes, 0, port, model, "--lose-follower")
    while (line := leader.stdout.readline()) and line.strip() != "ready":  # (gloo prints to stdout too)
        pass
    assert line.strip() == "ready"
    follower.kill()
    follower.wait(timeout=60)
    leader.stdin.write("go\n")
    leader.stdin.flush()
    while (line := leader.stdout.readline()) and not line.startswith("{"):
        pass
    result = json.loads(line)
    leader.wait(timeout=60)
    assert result == {"error": "FollowerLostError", "message": "follower process 1 disconnected"}


def test_a_failure_on_process_0_after_sending_a_step_loses_the_group(model, processes):
    """Process 0 sent a step, then its own half failed: process 1 is one step ahead of it (in a collective
    process 0 never joins). That step and every later one fail with FollowerLostError (a server turns
    NOT_SERVING), instead of being retried as a single-process engine retries a failed step, which would
    put the two processes' collectives out of step."""
    port = free_port_pair()
    start(processes, 1, port, model)
    leader = start(processes, 0, port, model, "--fail-launch")
    while (line := leader.stdout.readline()) and not line.startswith("errors "):  # (gloo prints to stdout too)
        pass
    first, second = json.loads(line.removeprefix("errors "))
    assert leader.wait(timeout=60) == 0
    reason = "process 0 failed while its followers ran 'launch' (RuntimeError: injected fault)"
    assert first == ["FollowerLostError", reason]
    assert second == ["FollowerLostError", reason]
