"""bench/startup_gpu.py: its --tuning reaches the start's own process, and a bad field stops it first."""

import glob
import json
import os
import tempfile

import pytest


def test_tuning_is_in_effect_in_the_start_and_recorded(tmp_path):
    """A CPU smoke start (tiny shapes, cold only) with a tuning field replaced: the child process that builds the
    engine reads the replaced value, and the result file records the change."""
    from bench.startup_gpu import main

    out = tmp_path / "startup.json"
    main(["--quick", "--cold-only", "--tuning", "combine_axis_min_splits=1", "decode_block_k=128", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["gpu_tuning_changes"] == {"combine_axis_min_splits": 1, "decode_block_k": 128}
    assert result["runs"]["cold"]["tuning_in_effect"] == {"combine_axis_min_splits": 1, "decode_block_k": 128}
    assert result["runs"]["cold"]["executables"] > 0


def test_an_unknown_tuning_field_is_refused_before_the_start(tmp_path, capsys):
    from bench.startup_gpu import main

    made = set(glob.glob(os.path.join(tempfile.gettempdir(), "jalora-startup-gpu-*")))
    with pytest.raises(SystemExit, match="--tuning: expected FIELD=VALUE.*'no_such_field=1'"):
        main(["--quick", "--cold-only", "--tuning", "no_such_field=1", "--out", str(tmp_path / "s.json")])
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "jalora-startup-gpu-*"))) == made  # (no model written)
    assert not (tmp_path / "s.json").exists()
    assert "start:" not in capsys.readouterr().err
