"""bench/report.py's serving-goals table: rooflines from the model's bytes and the device's bandwidth, and each
row's verdict against its goal (no device run needed: the result files are built here)."""

from bench.harness import GRANITE_8B
from bench.report import bf16_bytes, serving_goals


def profile(device, context, ms):
    return {"device": device, "commit": "abc1234", "context": context, "batch": 1, "step_ms_median": ms}


def test_decode_rows_against_the_roofline_of_their_device():
    weights, kv = bf16_bytes(GRANITE_8B)
    assert weights == 16_341_696_512  # (what bench/pipeline_bench.py's ceilings recorded on the device)
    assert kv == 40 * 2 * 8 * 128 * 2  # 40 layers, K and V, 8 kv heads of 128, bf16
    h200_64k = (weights + 65536 * kv) / 4300e9 * 1e3  # 6.30 ms
    h100_1k = (weights + 1024 * kv) / 3350e9 * 1e3
    lines = serving_goals(None, None, None, profile("NVIDIA H100 80GB HBM3", 1024, 1.05 * h100_1k),
                          profile("NVIDIA H200", 65536, 1.2 * h200_64k), None, None)  # fmt: skip
    rows = [line for line in lines if line.startswith("| batch-1")]
    assert len(rows) == 2
    assert f"{h100_1k:.2f} ms (weights + KV at 3.35 TB/s, H100); 1.05x" in rows[0] and "| met |" in rows[0]
    assert f"{h200_64k:.2f} ms (weights + KV at 4.3 TB/s); 1.20x" in rows[1] and "| missed |" in rows[1]
    assert round(h200_64k, 2) == 6.30
    assert "matmul read rate" not in rows[0]  # (a run without its own ceiling: the data-sheet rate only)


def test_decode_rows_beside_the_runs_own_matmul_read_rate():
    weights, kv = bf16_bytes(GRANITE_8B)
    h100_1k = (weights + 1024 * kv) / 3350e9 * 1e3
    run = profile("NVIDIA H100 80GB HBM3", 1024, 1.3 * h100_1k)
    run["ceilings"] = {"hbm_gemv_GBps": 2680.0, "gemv_widths": [4096, 25600], "gemv_rows": 16}
    (row,) = [line for line in serving_goals(None, None, None, run, None, None, None) if line.startswith("| batch-1")]
    at_gemv = (weights + 1024 * kv) / 2680e9 * 1e3  # the same bytes at 80% of the data sheet's rate
    assert f"; {at_gemv:.2f} ms at the run's batch-1 matmul read rate (2.68 TB/s): 1.04x |" in row
    assert "1.30x" in row and "| missed |" in row  # (the goal stays against the data-sheet rate)
    # a rate from the one-shape measure (no widths recorded), or from one-row activations (no rows recorded),
    # is no ceiling: not shown
    for ceilings in ({"hbm_gemv_GBps": 2680.0}, {"hbm_gemv_GBps": 2680.0, "gemv_widths": [4096, 25600]}):
        run["ceilings"] = ceilings
        lines = serving_goals(None, None, None, run, None, None, None)
        (row,) = [line for line in lines if line.startswith("| batch-1")]
        assert "matmul read rate" not in row and "1.30x" in row


def test_judge_rows_and_missing_runs():
    run = {"device": "NVIDIA H200", "commit": "abc1234"}
    judge = lambda e2e: {"e2e_s": e2e, "completion_tokens": 16, "prompt_tokens": 65794}  # noqa: E731
    rows = [{"prompt_len": 65536, "kind": "alora", "judge": judge(0.120), "compilations": 0},
            {"prompt_len": 65536, "kind": "lora", "judge": judge(4.8), "compilations": 1}]  # fmt: skip
    a = {"rows": rows, "run": run}
    lines = serving_goals(None, {"parts": {"A": a}}, None, None, None, None, None)
    text = "\n".join(lines)
    assert "| compilations while serving (pipeline A rows) | 1 |" in text and "| 0 | missed |" in text
    assert "| aLoRA judge e2e at 64k, 16 tokens (ms) | 120.00 ms |" in text and "<= 130 ms | met |" in text
    # (the goal asks the aLoRA judge for 4800 / 50 = 96 ms, under its 16 steps' roofline at 4.3 TB/s)
    w, kv = bf16_bytes(GRANITE_8B)
    roof = 16 * (w + 65794 * kv) / 4300.0 / 1e6
    assert roof > 96
    assert (f"| judge e2e, LoRA / aLoRA at 64k (x) | 40.00x | needs aLoRA e2e <= 96.0 ms (LoRA's 4800 / 50); "
            f"its roofline ~{roof:.1f} ms: below it | >= 50x | missed |") in text
    assert "start to ready" not in text  # no start-up run: no row
    # rows that never recorded their compilations (runs before the count existed) measured nothing, not 0
    for x in rows:
        del x["compilations"]
    text = "\n".join(serving_goals(None, {"parts": {"A": a}}, None, None, None, None, None))
    assert "| compilations while serving (pipeline A rows) | not measured |" in text


def test_a_previous_column_beside_each_row_from_earlier_runs():
    run = lambda device, commit: {"device": device, "commit": commit}  # noqa: E731
    now = {"device": "NVIDIA H200", "commit": "new1234", "loss_vs_inproc": {"grpc": 0.012}}
    before = {"device": "NVIDIA H100 80GB HBM3", "commit": "old5678", "loss_vs_inproc": {"grpc": 0.026}}
    nones = [None] * 6
    lines = serving_goals(*nones, now, *nones, before)
    assert "| measure | value | previous (device, commit) | roofline / anchor |" in lines[2]
    (row,) = [line for line in lines if line.startswith("| 64 streams")]
    assert row == ("| 64 streams through gRPC vs in-process (loss %) | 1.20% | 2.60% (NVIDIA H100 80GB HBM3, old5678) "
                   "| - | <= 3% | met | NVIDIA H200, new1234 |")
    # a row the earlier runs did not measure: "-"; no earlier runs at all: no column
    decode = run("NVIDIA H200", "new1234") | {"context": 1024, "batch": 1, "step_ms_median": 5.0}
    lines = serving_goals(None, None, None, decode, None, None, now, *nones, before)
    assert [line for line in lines if line.startswith("| batch-1")][0].split(" | ")[2] == "-"
    assert "previous" not in serving_goals(*nones, now)[2]
    # rows are matched by what they measure, not by their words about the run (a route, a batch size)
    prefill = lambda pct, split: {"device": "NVIDIA H200", "commit": "c", "prefill": [  # noqa: E731
        {"tokens": 8192, "pct_cudnn": pct, "split_pct_cudnn": split, "cudnn_ms": 1.0}]}
    lines = serving_goals(*[None] * 5, prefill(85.0, 70.0), None, *[None] * 5, prefill(60.0, 81.0), None)
    (row,) = [line for line in lines if line.startswith("| prefill")]
    assert row.startswith("| prefill attention 8k, % of cuDNN (kernel) | 85.00% | 81.00% (NVIDIA H200, c) |")


def test_the_streaming_table_names_what_the_in_process_rounds_called():
    """Runs since 084790b time `LLM.chat` (their rounds carry the engine's clock), older ones `LLM.generate`
    over prompts rendered before the clock: the README's row says which one its number is."""
    from bench.report import http_bench

    run = {"streams": 2, "prompt_tokens": 8, "max_tokens": 4, "preset": "tiny", "clients": 1, "command": "c",
           "device": "cpu", "jax_version": "0", "commit": "abc1234", "loss_vs_inproc": {"grpc": 0.5},
           "median_tokens_per_s": {"inproc": 100.0, "grpc": 50.0}}  # fmt: skip
    old = http_bench({**run, "rounds": [{"mode": "inproc", "tokens_per_s": 100.0}]})
    new = http_bench({**run, "rounds": [{"mode": "inproc", "tokens_per_s": 100.0, "engine_steps": 3}]})
    assert "| in-process (`LLM.generate`, the chat template rendered before the round) | 100 | - |" in old
    assert "| in-process (`LLM.chat`, the chat template rendered inside the round) | 100 | - |" in new
    assert "| gRPC (`AsyncClient.chat_stream`) | 50 | 50.0% |" in new


def test_the_concurrent_ratio_row_sets_the_goal_against_the_judges_batched_roofline():
    """The concurrent batch's judges decode together: each step reads the weights and every sequence's KV. A
    LoRA arm slow enough leaves the goal within reach (no "below it"); a faster one puts it under the roofline."""
    w, kv = bf16_bytes(GRANITE_8B)
    run = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}
    roof = 8 * (w + 3 * 65810 * kv) / 3350.0 / 1e6  # (8 judged tokens: 8 steps)

    def conc(lora_e2e):
        rows = [{"kind": "alora", "judge_e2e_s_mean": 0.25}, {"kind": "lora", "judge_e2e_s_mean": lora_e2e}]
        c = {"batch": 3, "longest_seq": 65810, "eval_len": 8, "rows": rows, "run": run}
        (line,) = [x for x in serving_goals(None, None, {"parts": {"Aconc": c}}, None, None, None, None)
                   if x.startswith("| same, the paper's concurrent batch (3 pipelines)")]  # fmt: skip
        return line

    assert f"needs aLoRA e2e <= 100.0 ms (LoRA's 5800 / 58); its roofline ~{roof:.1f} ms (3 sequences a step): " \
           "below it | >= 58x | missed |" in conc(5.8)
    assert f"~{roof:.1f} ms (3 sequences a step): at it |" in conc(roof * 58 / 1e3)  # (within 3%: at it)
    slow = conc(10.0)  # (40x: missed, but 172.4 ms is above the roofline: within reach)
    assert "needs aLoRA e2e <= 172.4 ms" in slow and ": below it" not in slow and ": at it" not in slow


def test_a_decode_steps_time_by_part_with_the_floors_of_the_parts_that_have_one():
    """Kernels sorted into parts by name; the rest of the busy time (what the top list left out too) is
    "other"; the GEMMs and the attention kernel against the bytes they must read."""
    from bench.report import decode_time, step_parts

    w, kv = bf16_bytes(GRANITE_8B)
    top = [{"name": "gemm_fusion_dot_general_34", "us_per_step": 3000.0},
           {"name": "gemm_fusion_dot", "us_per_step": 1000.0}, {"name": "ragged_paged_attention", "us_per_step": 500.0},
           {"name": "ragged_paged_attention_combine", "us_per_step": 100.0}, {"name": "write_kv", "us_per_step": 50.0},
           {"name": "loop_add_fusion_14", "us_per_step": 200.0}]  # fmt: skip
    trace = {"busy_us_per_step": 5000.0, "gap_us_per_step": 300.0, "top": top}
    r = {**profile("NVIDIA H200", 65536, 5.2), "device_trace": {"/device:GPU:0 | Stream #14(Compute)": trace}}
    parts = step_parts(r)
    assert list(parts.values()) == [4000.0, 500.0, 100.0, 50.0, 350.0, 300.0]  # (other: 200 listed + 150 not)
    text = "\n".join(decode_time(r, None))
    assert f"| weight GEMMs (q/k/v, o, gate/up, down, LM head) | 4000 ({w / 4000 / 1e6:.2f} TB/s; " \
           f"{w / 4300 / 1e3:.0f} at 4.30) |" in text
    kv_64k = 65536 * kv
    assert f"| attention kernel | 500 ({kv_64k / 500 / 1e6:.2f} TB/s; {kv_64k / 4300 / 1e3:.0f} at 4.30) |" in text
    assert "| its split merge | 100 |" in text and "| gaps between launches | 300 |" in text
    roof = (w + 65536 * kv) / 4300 / 1e6
    assert f"| roofline (ms) | {roof:.2f}; goal 1.15x = {roof * 1.15:.2f} |" in text
    assert decode_time(None, {**r, "device_trace": {}}) == []  # (no traced run: no table)
