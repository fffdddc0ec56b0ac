"""`jalora serve` on several hosts: a bad or absent coordinator is one clear error at start-up (JAX's own
client would abort the process with a fatal log), before any model loads."""

import socket

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
