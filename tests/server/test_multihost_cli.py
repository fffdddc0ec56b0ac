"""`jalora serve` on several hosts: a bad or absent coordinator is one clear error at start-up (JAX's own
client would abort the process with a fatal log), before any model loads."""

import socket

import pytest

from server import cli


def test_a_malformed_coordinator_address_is_a_usage_error(capsys):
    assert cli.main(["serve", "--model", "tiny", "--coordinator-address", "nonsense", "--num-processes", "2",
                     "--process-id", "1"]) == 2  # fmt: skip
    assert capsys.readouterr().err == "jalora serve: coordinator_address: must be HOST:PORT, got 'nonsense'\n"


def test_a_missing_coordinator_fails_the_start_with_one_error(capsys):
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        assert cli.main(["serve", "--model", "tiny", "--coordinator-address", address, "--num-processes", "2",
                         "--process-id", "1", "--multihost-timeout", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(f"jalora serve: coordinator_address: no coordinator answered at {address} within 1 s")
    assert err.count("\n") == 1


def test_the_three_flags_go_together(capsys):
    assert cli.main(["serve", "--model", "tiny", "--coordinator-address", "127.0.0.1:9", "--process-id", "1"]) == 2
    assert "coordinator_address: the coordinator address, the number of processes and the process id go together" \
        in capsys.readouterr().err


@pytest.mark.parametrize("flags, field", [
    (["--num-processes", "2", "--process-id", "1", "--multihost-timeout", "-1"], "multihost_timeout"),
    (["--num-processes", "2", "--process-id", "1", "--multihost-timeout", "0"], "multihost_timeout"),
    (["--num-processes", "0", "--process-id", "0"], "num_processes"),
    (["--num-processes", "1", "--process-id", "3"], "process_id"),
    (["--num-processes", "2", "--process-id", "-1"], "process_id"),
])  # fmt: skip
def test_group_values_are_checked_before_anything_starts(capsys, flags, field):
    """Refused at once, naming the flag's field: not after the model load, not after waiting --multihost-timeout
    for a coordinator (127.0.0.1:9 has none), not as a traceback."""
    assert cli.main(["serve", "--model", "/nowhere", "--coordinator-address", "127.0.0.1:9", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jalora serve: {field}: ") and err.count("\n") == 1, err
    if field == "multihost_timeout":  # the same with --multihost (JAX finds the group: a TPU slice)
        assert cli.main(["serve", "--model", "/nowhere", "--multihost", *flags[-2:]]) == 2
        assert capsys.readouterr().err.startswith("jalora serve: multihost_timeout: ")


@pytest.mark.parametrize("flags", [["--multihost-key-file", "/nowhere/key"], ["--multihost-timeout", "5"]])
def test_a_group_flag_without_a_group_is_refused(capsys, flags):
    """It used to be ignored: a one-process server started without the key it was given."""
    assert cli.main(["serve", "--model", "/nowhere", *flags]) == 2
    assert capsys.readouterr().err == (f"jalora serve: {flags[0]}: applies to a group of processes: give it with "
                                       "--coordinator-address, --num-processes and --process-id, or with --multihost\n")


def test_with_multihost_only_process_0_checks_adapter_directories(capsys):
    """On a TPU slice (--multihost) each worker learns its index once the group forms, and only worker 0 reads the
    adapters: a worker without their directories used to refuse to start. Here no group can form (no slice), so
    the start fails joining it, not on the missing directory; an adapter's name is still checked first."""
    argv = ["serve", "--model", "tiny", "--multihost", "--multihost-timeout", "2", "--port", "0"]
    assert cli.main([*argv, "--adapter", "j=/nonexistent/j"]) == 2
    err = capsys.readouterr().err
    assert "cannot start the process group" in err and "does not exist" not in err and err.count("\n") == 1
    assert cli.main([*argv, "--adapter", "no/name=/nonexistent/j"]) == 2
    assert "adapter no/name: not an adapter name" in capsys.readouterr().err


def test_two_processes_serve_and_a_lost_one_turns_health_not_serving(tmp_path):
    """`jalora serve` as process 0 and 1 of a group on localhost (one CPU device each, tp=2): process 0
    serves the one-process tokens; once process 1 dies, health turns NOT_SERVING (watched, not polled)
    and a call gets UNAVAILABLE."""
    import os
    import subprocess
    import sys

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from checkpoints import DEFAULT_MODEL_DIR
    from jalora import LLM, SamplingParams
    from jalora.client import Client, ServerError
    from tests.engine.test_multihost import ROOT, free_port_pair

    port = free_port_pair()
    one_device = "--xla_force_host_platform_device_count=1"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": one_device}
    log = open(tmp_path / "leader.err", "w")  # noqa: SIM115 (closed below, once the process has ended)
    procs = [subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", "tiny", "--no-warmup",
                               "--tensor-parallel-size", "2", "--coordinator-address", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--port", "0"],
                              cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=log if i == 0 else subprocess.DEVNULL)
             for i in (1, 0)]  # fmt: skip
    follower, leader = procs
    try:
        while (line := leader.stdout.readline()) and not line.startswith("jalora serving on "):
            pass
        target = line.split()[-1]
        with Client(target, timeout=300) as client:
            got = client.generate([5, 6, 7, 8], max_tokens=4).token_ids
        want = LLM(str(DEFAULT_MODEL_DIR), warmup=False).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4))
        assert got == want[0].token_ids
        with grpc.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            follower.kill()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(target, timeout=60) as client, pytest.raises(ServerError) as e:
            client.generate([5, 6, 7, 8], max_tokens=4)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "follower process 1 disconnected" in str(e.value)
        # SIGTERM then stops it with one line and status 1: JAX's shutdown barrier, which would wait for the lost
        # process until its coordination service aborted this one (SIGABRT), is skipped
        leader.terminate()
        assert leader.wait(timeout=200) == 1
        assert "stopped after the process group was lost (follower process 1 disconnected)" in \
            (tmp_path / "leader.err").read_text()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        log.close()


def _serve_group(tmp_path, port: int, flags_of) -> list:
    """`jalora serve` as process 1 then 0 of a group on localhost (one CPU device each, tp=2), with
    `flags_of(process_id)` added; stdout and stderr piped."""
    import os
    import subprocess
    import sys

    from tests.engine.test_multihost import ROOT

    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JALORA_COMPILE_CACHE": "none"}  # fmt: skip
    return [subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--no-warmup", "--tensor-parallel-size",
                              "2", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i), "--port", "0", *flags_of(i)],
                             cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in (1, 0)]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama (8 query heads, 2 KV heads: tp=2 splits them) and an aLoRA adapter of rank 8."""
    from tests import hf_models
    from tests.engine import multihost_worker as worker

    root = tmp_path_factory.mktemp("multihost_cli")
    base = hf_models.make_model(str(root / "llama"), "llama", num_attention_heads=8, num_key_value_heads=2)
    adapter = hf_models.make_adapter(base, str(root / "judge"), hf_models.ALL_PROJ, r=8, invocation=worker.INV)
    return base, adapter


def test_a_start_up_failure_on_process_0_ends_both_processes(tmp_path, llama):
    """Process 0 refuses its start-up adapter (rank 8 above --max-lora-rank 4) once the group has formed: it
    exits 2 with its one-line error, and lets the follower go, which exits 1 saying why. Both used to wait
    for each other (the follower for process 0's next call, process 0 in JAX's shutdown barrier) until
    that barrier gave up, 5 minutes later: the timeout below only guards against that hang."""
    from tests.engine.test_multihost import free_port_pair

    base, adapter = llama
    procs = _serve_group(tmp_path, free_port_pair(),
                         lambda i: ["--model", base, "--max-lora-rank", "4", "--adapter", f"j={adapter}"])
    try:
        follower, leader = procs
        _, leader_err = leader.communicate(timeout=200)
        _, follower_err = follower.communicate(timeout=200)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    error = [line for line in leader_err.splitlines() if line.startswith("jalora serve: ")]
    assert leader.returncode == 2 and len(error) == 1, leader_err
    assert error[0].startswith("jalora serve: adapter j: ") and "rank" in error[0], error
    why = error[0].removeprefix("jalora serve: ")
    assert follower.returncode == 1, follower_err
    assert f"jalora serve: process 0 stopped: {why}" in follower_err.splitlines(), follower_err


def test_start_up_adapters_are_read_by_process_0_only(tmp_path, llama):
    """The follower's --adapter names a directory its host lacks: it installs what process 0 read (it
    reads no adapter file), and the group serves the adapter's one-process tokens."""
    from jalora import LLM, SamplingParams
    from jalora.client import Client
    from tests.engine import multihost_worker as worker
    from tests.engine.test_multihost import free_port_pair

    base, adapter = llama
    missing = str(tmp_path / "not-on-this-host")
    procs = _serve_group(tmp_path, free_port_pair(), lambda i: ["--model", base, "--max-lora-rank", "8",
                                                               "--adapter", f"j={missing if i else adapter}"])
    prompt = [20, 21, 22, 23, *worker.INV]
    try:
        follower, leader = procs
        while (line := leader.stdout.readline()) and not line.startswith("jalora serving on "):
            pass
        assert line.startswith("jalora serving on "), leader.communicate(timeout=60)
        with Client(line.split()[-1], timeout=300) as client:
            got = client.generate(prompt, max_tokens=6, ignore_eos=True, adapter="j").token_ids
            base_got = client.generate(prompt, max_tokens=6, ignore_eos=True).token_ids
    finally:
        for p in procs:
            p.kill()
            p.wait()
    llm = LLM(base, max_lora_rank=8, warmup=False)
    llm.load_adapter("j", adapter)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    want = llm.generate([prompt], sp, adapter="j")[0].token_ids
    assert got == want
    assert base_got == llm.generate([prompt], sp)[0].token_ids
    assert got != base_got, "the adapter was meant to change the tokens"
