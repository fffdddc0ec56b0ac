"""bench/serving_goals.py: one part per row of the serving-goals table, each writing the file the table reads;
a part that runs out of time is logged and the table drawn from what the directory holds (no GPU needed: the
parts run here only to be stopped)."""

import json
import os
import shutil

from bench import serving_goals
from bench.harness import REPO_ROOT
from bench.report import SERVING_GOAL_RUNS


def test_every_table_row_has_a_part_writing_its_file(tmp_path, capsys):
    assert list(serving_goals.PARTS) == list(SERVING_GOAL_RUNS)  # (the table's arguments, in order)
    runs = serving_goals.main(["--dry-run", "--out-dir", str(tmp_path)])["dry_run"]
    for argv, (part, name) in zip(runs, serving_goals.FILES.items(), strict=True):
        assert argv[argv.index("--out") + 1] == str(tmp_path / name), part
    out = capsys.readouterr().out
    assert "python -m bench.pipeline_bench --model granite-8b --parts Aconc --prompt-lens 65536 --no-plots --out" in out
    # one run's files (each part's result and the runs log) are as many as a device call brings back: 8
    assert len(set(serving_goals.FILES.values())) + 1 <= 8
    assert all("--no-plots" in argv for argv in runs if "bench.pipeline_bench" in argv)  # (its PNGs: more files)
    assert not list(tmp_path.iterdir())  # a dry run runs nothing


def test_a_part_out_of_time_is_logged_and_the_table_reads_the_directory(tmp_path, capsys):
    # a result already in the directory (the gRPC row), and a part whose limit no Python start can meet
    shutil.copy(os.path.join(REPO_ROOT, "bench/results/http_bench_h100.json"), tmp_path / serving_goals.FILES["grpc"])
    log = serving_goals.main(["--out-dir", str(tmp_path), "--parts", "decode_1k", "--time-scale", "1e-9"])
    assert log["decode_1k"]["rc"] == "timeout" and "bench.profile_step" in log["decode_1k"]["command"]
    assert json.loads((tmp_path / "serving_goals_runs.json").read_text()) == log
    out = capsys.readouterr().out
    assert "| 64 streams through gRPC vs in-process (loss %) | 2.62% |" in out
    # beside the README's run of that row (bench/results), the previous column
    assert "| measure | value | previous (device, commit) |" in out
    readme = json.load(open(os.path.join(REPO_ROOT, "bench/results", SERVING_GOAL_RUNS["grpc"])))
    before = f"{readme['loss_vs_inproc']['grpc'] * 100:.2f}% ({readme['device']}, {readme['commit'][:10]})"
    assert f"| 64 streams through gRPC vs in-process (loss %) | 2.62% | {before} | - |" in out
    assert "batch-1 decode step" not in out  # (no row without its file)
