"""Every row of the serving-goals table in one command: start-up, batch-1 decode at 1k and 64k, pipeline A
single and concurrent, prefill attention against cuDNN, gRPC against in-process.

    python -m bench.serving_goals --out-dir /root/out                      # GPU: every part (~7 min, H100)
    python -m bench.serving_goals --out-dir /root/out --parts startup decode_1k decode_64k   # a part of them
    python -m bench.serving_goals --dry-run                                # the commands, nothing run

Each part runs its own bench script in a child process (a fresh engine, as the scripts run alone) with a time
limit, writing its result file into `--out-dir` under the name the table reads (`FILES`); a part that fails
or runs out of time is reported and the next one runs. A device command is limited to 10 minutes; all the parts
fit in one (448 s of parts in one 451 s call on an H100 at 8d36705, `--time-scale 0.6`:
bench/results/serving_goals_runs_h100_8d36705.json), and `--parts` splits them over calls where less device
time is left.
The table is drawn from whatever files the directory holds (`bench/report.py serving_goals`), so the last
call prints every row. `serving_goals_runs.json` in the directory keeps each part's command, exit status and
seconds. To put a run into the README, copy its files into bench/results and name them in
`bench/report.py`'s SERVING_GOAL_RUNS.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from bench.harness import REPO_ROOT

# part -> (the bench module and its arguments, its result file, seconds it may take on an H100). A part writes
# its result file only (pipeline_bench: no plot), so one run's directory holds 8 files with the runs log: as
# many as a device call brings back.
PARTS = {
    "startup": (["bench.startup_gpu"], "startup_gpu.json", 300),
    "pipeline": (["bench.pipeline_bench", "--model", "granite-8b", "--parts", "ceilings,A", "--prompt-lens", "1024",
                  "65536", "--no-plots"], "pipeline_bench_granite-8b.json", 300),
    "concurrent": (["bench.pipeline_bench", "--model", "granite-8b", "--parts", "Aconc", "--prompt-lens", "65536",
                    "--no-plots"], "pipeline_bench_granite-8b_aconc.json", 200),
    "decode_1k": (["bench.profile_step", "--modes", "async", "--batch", "1", "--steps", "30"],
                  "profile_step_b1.json", 150),
    "decode_64k": (["bench.profile_step", "--modes", "async", "--batch", "1", "--context", "65536", "--steps", "30"],
                   "profile_step_b1_ctx65536.json", 150),
    "prefill_attention": (["bench.attention", "--prefill-only", "--skip-variants", "--no-chunks"],
                          "attention_prefill.json", 200),
    # (4 rounds, ~2 s each: three runs on one H200 with 7c67e61's engine gave 0.07% and 0.80% over 4 rounds and
    # 2.31% over 2, bench/results/http_bench_h200_*.json, against a 3% goal: one slow round moves a 2-round median)
    "grpc": (["bench.http_bench", "--modes", "inproc", "grpc", "--rounds", "4", "--clients", "4"],
             "http_bench.json", 300),
}  # fmt: skip
FILES = {part: name for part, (_, name, _) in PARTS.items()}


def commands(out_dir: str, parts: list[str]) -> list[tuple[str, list[str], float]]:
    """(part, argv, time limit) of each part, its result written into `out_dir`."""
    return [(p, [sys.executable, "-m", *PARTS[p][0], "--out", os.path.join(out_dir, PARTS[p][1])], PARTS[p][2])
            for p in parts]  # fmt: skip


def table(out_dir: str) -> list[str]:
    """The serving-goals table from the result files `out_dir` holds (a part without one has no row), beside
    the README's (bench/results, `SERVING_GOAL_RUNS`) as the previous values."""
    from bench.report import SERVING_GOAL_RUNS, load, serving_goals  # (its keys: serving_goals' arguments in order)

    def here(name):
        path = os.path.join(out_dir, name)
        return json.load(open(path)) if os.path.isfile(path) else None

    return serving_goals(*[here(FILES[p]) for p in SERVING_GOAL_RUNS],
                         *[load(name) for name in SERVING_GOAL_RUNS.values()])  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or "/tmp/jalora-serving-goals")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiplies every part's time limit")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    if args.time_scale <= 0:
        ap.error("--time-scale must be positive")
    runs = commands(args.out_dir, args.parts)
    if args.dry_run:
        for part, argv_, limit in runs:
            print(f"{part} (<= {limit * args.time_scale:.0f} s): {' '.join(['python', *argv_[1:]])}")
        return {"dry_run": [r[1] for r in runs]}
    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "serving_goals_runs.json")
    log = json.load(open(log_path)) if os.path.isfile(log_path) else {}
    for part, argv_, limit in runs:
        t0 = time.perf_counter()
        print(f"== {part}: {' '.join(['python', *argv_[1:]])}", flush=True)
        try:
            rc = subprocess.run(argv_, cwd=REPO_ROOT, timeout=limit * args.time_scale).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log[part] = {"command": " ".join(["python", *argv_[1:]]), "rc": rc, "seconds": time.perf_counter() - t0}
        print(f"== {part}: rc {rc} in {log[part]['seconds']:.0f} s", flush=True)
        with open(log_path, "w") as f:
            json.dump(log, f, indent=2)
    print("\n".join(table(args.out_dir)))
    return log


if __name__ == "__main__":
    main()
