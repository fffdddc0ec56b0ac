"""Renders the README's benchmark tables from bench/results/*.json (no number is typed by hand).

    python -m bench.report                     # print the tables
    python -m bench.report --write README.md   # replace the block between the bench markers

Every markdown table of the benchmarks is rendered here: the README's sections (`render`), and the
summary each script prints at the end of its run (the `*_stdout` functions).

Ratios are given twice where a ceiling matters: against the ceiling measured by the same run
(through XLA) and against H200 reference figures measured on this machine type through PyTorch (a
device-to-device copy at about 4.3 TB/s, read + write bytes; an 8192^3 bf16 matmul at about 790
TFLOP/s), because the XLA measurements of the same card come out lower and a ratio over a low
ceiling flatters.
"""

import argparse
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
REF_HBM_GBPS = 4300.0  # H200, PyTorch device-to-device copy, read + write bytes
REF_MATMUL_TFLOPS = 790.0  # H200, PyTorch 8192^3 bf16 matmul on random data
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(name):
    if name is None:
        return None
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def commit_of(r) -> str:
    """The run's commit, short (some result files hold it as `git_commit`)."""
    return str(r.get("commit") or r.get("git_commit") or "?")[:10]


def provenance(r) -> str:
    return f"`{r['command']}` on {r['device']}, JAX {r['jax_version']}, commit {commit_of(r)}"


def throughput(r) -> list[str]:
    c = r["ceilings"]
    out = [f"Engine throughput, Granite-3.2-8B shapes, dummy bf16 weights ({provenance(r)}). Measured in the "
           f"same run: bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s, HBM {c['hbm_GBps']:.0f} GB/s.", "",
           "| prefill prompt | tokens/s | TFLOP/s | vs measured matmul | vs 790 TFLOP/s |", "|---|---|---|---|---|"]
    for p in r["prefill"]:
        out.append(f"| {p['prompt_tokens']} | {p['tokens_per_s']:.0f} | {p['TFLOPs']:.0f} | "
                   f"{p['TFLOPs'] / c['bf16_matmul_TFLOPs']:.0%} | {p['TFLOPs'] / REF_MATMUL_TFLOPS:.0%} |")
    out += ["", "| decode batch (1k context) | step ms | replay ms | tokens/s | roofline ms (measured BW) | "
            "x roofline | roofline ms (4.3 TB/s) | x roofline |", "|---|---|---|---|---|---|---|---|"]
    for d in r["decode"]:
        ref = decode_roofline(d, None)
        out.append(f"| {d['batch']} | {d['step_seconds'] * 1e3:.2f} | {d['device_step_seconds'] * 1e3:.2f} | "
                   f"{d['tokens_per_s']:.0f} | {d['roofline_seconds'] * 1e3:.2f} | {d['step_over_roofline']:.2f} | "
                   f"{ref * 1e3:.2f} | {d['step_seconds'] / ref:.2f} |")
    return out


def attention(r) -> list[str]:
    copy = r["copy_gbs_read_plus_write"]
    out = [f"Ragged paged attention kernel, bf16, 32 q / 8 kv heads, head_dim 128 ({provenance(r)}). Copy "
           f"bandwidth measured in the run: {copy:.0f} GB/s.", "",
           "| decode batch | context | us | KV GB/s | % of measured copy | % of 4.3 TB/s |",
           "|---|---|---|---|---|---|"]
    for d in r["decode"]:
        if "skipped" in d:
            out.append(f"| {d['batch']} | {d['context']} | skipped: {d['skipped']} | | | |")
        elif d["batch"] >= 8 and d["context"] >= 4096:
            out.append(f"| {d['batch']} | {d['context']} | {d['ms'] * 1e3:.0f} | {d['gbs']:.0f} | "
                       f"{d['gbs'] / copy:.0%} | {d['gbs'] / REF_HBM_GBPS:.0%} |")
    out += ["", "| prefill tokens (causal) | kernel TFLOP/s | cuDNN TFLOP/s | % of cuDNN | jnp reference TFLOP/s |",
            "|---|---|---|---|---|"]
    for p in r["prefill"]:
        ref = f"{p['reference_tflops']:.1f}" if p.get("reference_tflops") else "skipped (memory)"
        out.append(f"| {p['tokens']} | {p['kernel_tflops']:.0f} | {p['cudnn_tflops']:.0f} | "
                   f"{p['pct_cudnn']:.0f}% | {ref} |")
    return out


def split_prefill(r, a_kernel, a_split) -> list[str]:
    """bench/attention.py --prefill-only: the split prefill route against the kernel and cuDNN; and pipeline A's
    judge at each prompt length with the kernel's prefill and with the split (two runs on the same device)."""
    out = []
    if r:
        nan = float("nan")
        out += [f"One sequence's prefill through cuDNN, prefix and own keys apart (`split_prefill_attention`), "
                f"against the kernel and cuDNN's dense causal attention ({provenance(r)}):", "",
                "| prefill tokens (causal) | kernel TFLOP/s | split route TFLOP/s | cuDNN dense TFLOP/s | kernel % of "
                "cuDNN | split % of cuDNN |", "|---|---|---|---|---|---|"]  # fmt: skip
        for p in r["prefill"]:
            out.append(f"| {p['tokens']} | {p.get('kernel_tflops', nan):.0f} | {p.get('split_tflops', nan):.0f} | "
                       f"{p.get('cudnn_tflops', nan):.0f} | {p.get('pct_cudnn', nan):.0f}% | "
                       f"{p.get('split_pct_cudnn', nan):.0f}% |")  # fmt: skip
        out += ["", "The engine's shape: one chunk after a prefix, its blocks scattered in a cache of "
                f"{r['chunks'][0]['cache_blocks']} blocks:", "",
                "| chunk rows | prefix keys | kernel ms | split ms | split speed-up | rel. error vs kernel |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for c in r.get("chunks", []):
            out.append(f"| {c['rows']} | {c['prefix']} | {c['kernel_ms']:.3f} | {c['split_ms']:.3f} | "
                       f"{c['speedup']:.2f}x | {c['split_rel_err_vs_kernel']:.1e} |")
    if a_kernel and a_split:
        rows = lambda res: {(x["prompt_len"], x["kind"]): x for x in res["parts"]["A"]["rows"]}  # noqa: E731
        k, s = rows(a_kernel), rows(a_split)
        out += ["", f"Pipeline A's judge, the kernel's prefill ({provenance(a_kernel['parts']['A']['run'])}) and the "
                f"split ({provenance(a_split['parts']['A']['run'])}). The kernel's run warmed up with the bench's "
                "old loop of short prompts: its first 64k pipeline (aLoRA) compiled the long-context decode variants "
                "while serving (13.2 s of its judge's TTFT; fixed since): compare the LoRA rows, whose judge prefill "
                "is the 64k recompute the split speeds up.",
                "", "| prompt | kind | judge TTFT ms, kernel | judge TTFT ms, split | judge e2e ms, kernel | "
                "judge e2e ms, split |", "|---|---|---|---|---|---|"]  # fmt: skip
        for key in sorted(set(k) & set(s)):
            mark = lambda x: " (compiled while serving)" if x.get("compilations") else ""  # noqa: E731
            out.append(f"| {key[0]} | {key[1]} | {k[key]['judge']['ttft_s'] * 1e3:.1f}{mark(k[key])} | "
                       f"{s[key]['judge']['ttft_s'] * 1e3:.1f}{mark(s[key])} | {k[key]['judge']['e2e_s'] * 1e3:.1f} | "
                       f"{s[key]['judge']['e2e_s'] * 1e3:.1f} |")  # fmt: skip
    return out


def lora(stack, step) -> list[str]:
    out = []
    if step:
        d, p = step["decode"], step["prefill"]
        sync = d.get("sync")
        mode = d.get("scheduling", "sync")
        out += [f"Masked multi-LoRA in the whole engine step ({provenance(step)}); {d['lora_impl']}; "
                f"median engine.step() with {mode} scheduling"
                + (f", and the synchronous loop in the same run (base {sync['base_step_s'] * 1e3:.2f} ms, aLoRA "
                   f"{sync['alora_step_s'] * 1e3:.2f} ms: {sync['overhead']:+.1%})" if sync else "") + ".", "",
                "| workload | base ms | aLoRA ms | overhead (replay) | goal |", "|---|---|---|---|---|",
                f"| decode, {d['batch']} seqs over {d['adapters']} aLoRAs (r={d['rank']}, {d['targets']}), "
                f"{d['context']} context | {d['base_step_s'] * 1e3:.2f} | {d['alora_step_s'] * 1e3:.2f} | "
                f"{d['overhead']:+.1%} ({d['device_overhead']:+.1%}) | <= 10% |",
                f"| prefill {p['tokens']} tokens, last {p['adapted_tokens']} adapted | {p['base_s'] * 1e3:.1f} | "
                f"{p['alora_s'] * 1e3:.1f} | {p['overhead']:+.1%} | <= 2% |"]
    if stack:
        out += ["", f"One fused-qkv delta (Din 4096, 3r=96, Dout 6144), us per call ({provenance(stack)}):", "",
                "| case | Pallas kernel | kernel, packed B | jax.lax.ragged_dot | one-hot einsum |",
                "|---|---|---|---|---|"]
        for k in stack["kernel_vs"]:
            out.append(f"| {k['case']} | {k['kernel_us_per_call']:.1f} | {k['kernel_packed_us_per_call']:.1f} | "
                       f"{k['ragged_dot_us_per_call']:.1f} | {k['one_hot_us_per_call']:.1f} |")
    return out


def pipeline(r) -> list[str]:
    out = [f"Base -> 3 judges, aLoRA (r=32, base-aligned reuse) vs LoRA (r=8, recompute), answer "
           f"{r['answer_len']} tokens, judge {r['eval_len']} tokens, model {r['model']} ({provenance(r)}); "
           f"pass {r['pass'] + 1} of {r['passes']} (earlier passes compile).", "",
           "| prompt | judge prompt tokens | aLoRA cached | aLoRA TTFT ms | LoRA TTFT ms | TTFT ratio | "
           "aLoRA e2e ms | LoRA e2e ms | e2e ratio |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(x["prompt_len"], x["kind"]): x for x in r["runs"]}
    for n in sorted({x["prompt_len"] for x in r["runs"]}):
        if (n, "alora") not in by or (n, "lora") not in by:
            continue
        a, lo = by[(n, "alora")]["judges"], by[(n, "lora")]["judges"]
        mean = lambda js, k: sum(j[k] for j in js.values()) / len(js)  # noqa: E731
        out.append(f"| {n} | {mean(a, 'prompt_tokens'):.0f} | {mean(a, 'cached_tokens'):.0f} | "
                   f"{mean(a, 'ttft_s') * 1e3:.1f} | {mean(lo, 'ttft_s') * 1e3:.1f} | "
                   f"{mean(lo, 'ttft_s') / mean(a, 'ttft_s'):.1f}x | {mean(a, 'e2e_s') * 1e3:.1f} | "
                   f"{mean(lo, 'e2e_s') * 1e3:.1f} | {mean(lo, 'e2e_s') / mean(a, 'e2e_s'):.1f}x |")
    return out


def pipeline_bench_tables(r: dict) -> list[str]:
    """Every part of bench/pipeline_bench.py's result (also printed by that script at the end of a run)."""
    parts = r.get("parts", {})
    out = []
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    xr = lambda x: "-" if x is None else f"{x:.1f}x"  # noqa: E731
    out += pb_goals(r)
    if "A" in parts:
        a = parts["A"]
        out += ["", f"Run: {provenance(parts['A']['run'])}.", ""]
        out += [f"A. base -> adapter, one pipeline at a time (answer {a['answer_len']}, evaluation {a['eval_len']}):",
                "", "| prompt | kind | judge prompt | cached | hit | queue ms | prefill ms | decode ms | TTFT ms | "
                "e2e ms | pipeline ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for x in a["rows"]:
            j = x["judge"]
            out.append(f"| {x['prompt_len']} | {x['kind']} | {j['prompt_tokens']} | {j['cached_tokens']} | "
                       f"{j['hit_rate']:.0%} | {ms(j['queue_s'])} | {ms(j['prefill_s'])} | {ms(j['decode_s'])} | "
                       f"{ms(j['ttft_s'])} | {ms(j['e2e_s'])} | {ms(x['pipeline_s'])} |")  # fmt: skip
        late = [x for x in a["rows"] if x.get("compilations")]
        if late:  # (rows of a run that recorded them; a compile while serving is in that row's times)
            out += ["", "Compiled while serving (in these rows' times): " + ", ".join(
                f"{x['prompt_len']} {x['kind']}: {x['compilations']} ({x['compile_s']:.1f} s)" for x in late)]
        out += [""] + pb_ratio_table(a["rows"], lambda x: x["judge"]["ttft_s"], lambda x: x["judge"]["e2e_s"],
                                  parts.get("Aconc"))  # fmt: skip
    if "Aconc" in parts:
        c = parts["Aconc"]
        out += ["", f"Run: {provenance(parts['Aconc']['run'])}.", ""]
        out += ["", f"A, concurrent: {c['batch']} pipelines at once (KV capacity {c['kv_tokens']} tokens / longest "
                f"sequence {c['longest_seq']}):", "", "| prompt | kind | judge TTFT ms (mean) | judge e2e ms (mean) | "
                "judge queue ms | hit | wall s | pipelines/s | preemptions |", "|---|---|---|---|---|---|---|---|---|"]
        for x in c["rows"]:
            out.append(f"| {x['prompt_len']} | {x['kind']} | {ms(x['judge_ttft_s_mean'])} | "
                       f"{ms(x['judge_e2e_s_mean'])} | "
                       f"{ms(x['judge_queue_s_mean'])} | {x['judge_hit_rate_mean']:.0%} | {x['wall_s']:.2f} | "
                       f"{x['pipelines_per_s']:.2f} | {x['preemptions']} |")  # fmt: skip
    if "B" in parts:
        b = parts["B"]
        out += ["", f"Run: {provenance(parts['B']['run'])}.", ""]
        out += ["", f"B. base -> {b['judges']} adapters in parallel -> base consolidation ({b['consolidation_len']} "
                "tokens):", "", "| prompt | kind | pipeline ms | judges (parallel) ms | slowest judge TTFT ms | "
                "consolidation ms | judge hit | LoRA / aLoRA |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        by = {(x["prompt_len"], x["kind"]): x for x in b["rows"]}
        for x in b["rows"]:
            a = by.get((x["prompt_len"], "alora"))
            rr = ratio(a["pipeline_s"], x["pipeline_s"]) if a and x["kind"] == "lora" else None
            out.append(f"| {x['prompt_len']} | {x['kind']} | {ms(x['pipeline_s'])} | {ms(x['judges_wall_s'])} | "
                       f"{ms(x['judge_ttft_max_s'])} | {ms(x['consolidation']['e2e_s'])} | "
                       f"{x['judge_hit_rate_mean']:.0%} | {xr(rr)} |")  # fmt: skip
    if "C" in parts:
        c = parts["C"]
        out += ["", f"Run: {provenance(parts['C']['run'])}.", ""]
        out += ["", f"C. Poisson arrivals: prompt {c['prompt']}, answer {c['answer']}, evaluation {c['eval']}, "
                f"{c['pipelines']} pipelines per rate, KV cache capped at {c['kv_blocks']} blocks "
                f"({c['kv_pipelines']} pipelines' worth), {c['time_limit_s']:.0f} s limit per rate:", "",
                "| kind | rate /s | done | pipelines/s | p50 ms | p90 ms | p99 ms | judge TTFT p50 ms | hit (mean) | "
                "hit (p10) | preemptions |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for x in c["rows"]:
            p, t = x["latency"], x["judge_ttft"]
            hit = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
            kind = x["kind"] + (f" + host {x['host_kv_gb']:g} GiB" if x.get("host_kv_gb") else "")
            kind += " + sessions" if x.get("sessions") else ""
            out.append(f"| {kind} | {x['rate']:g} | {x['completed']}/{x['offered']} | {x['completed_per_s']:.2f} "
                       f"| {ms(p['p50'])} | {ms(p['p90'])} | {ms(p['p99'])} | {ms(t['p50'])} | "
                       f"{hit(x['hit_rate_mean'])} | {hit(x['hit_rate_p10'])} | {x['preemptions']} |")  # fmt: skip
    if "baseline" in parts:
        out += ["", f"Run: {provenance(parts['baseline']['run'])}.", ""]
        out += pb_baseline_table(parts["baseline"], parts.get("A"))
    if "ceilings" in parts:
        ce = parts["ceilings"]
        c = ce["ceilings"]
        out += ["", f"Run: {provenance(ce['run'])}.", ""]
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        head = (f"Ceilings (same run): bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s, HBM {c['hbm_GBps']:.0f} GB/s."
                if c else "Ceilings: not measured on this device (GPU only); the engine side only.")  # fmt: skip
        out += ["", head, "", "| prefill tokens | TFLOP/s | MFU (vs measured matmul) | vs 790 TFLOP/s |",
                "|---|---|---|---|"]
        for p in ce["prefill"]:
            out.append(f"| {p['prompt_tokens']} | {p['TFLOPs']:.2f} | {pct(p.get('mfu_vs_measured_matmul'))} | "
                       f"{p['TFLOPs'] / REF_MATMUL_TFLOPS:.0%} |")
        out += ["", "| decode batch | context | step ms | replay ms | roofline ms (in-run BW) | x | "
                f"roofline ms ({REF_HBM_GBPS / 1e3:.1f} TB/s) | x |", "|---|---|---|---|---|---|---|---|"]
        for d in ce["decode"]:
            xr_, ref = d.get("step_over_roofline"), decode_roofline(d, c)
            out.append(f"| {d['batch']} | {d['context']} | {ms(d['step_seconds'])} | {ms(d['device_step_seconds'])} | "
                       f"{ms(d.get('roofline_seconds'))} | {'-' if xr_ is None else f'{xr_:.2f}'} | "
                       f"{ms(ref)} | {d['step_seconds'] / ref:.2f} |")
        out += ["", "Replay: the same step run again with its inputs prepared once, waiting for each (dispatch plus "
                "device time, not overlapped); with async scheduling the engine's step hides its dispatch behind "
                "the previous step and can be shorter."]
    return out


def pb_ratio_table(rows, ttft, e2e, conc=None) -> list[str]:
    """LoRA / aLoRA ratios per prompt length (single pipeline, and concurrent if present)."""
    by = {(x["prompt_len"], x["kind"]): x for x in rows}
    cby = {(x["prompt_len"], x["kind"]): x for x in conc["rows"]} if conc else {}
    out = ["| prompt | TTFT LoRA / aLoRA | e2e LoRA / aLoRA | concurrent TTFT ratio | concurrent e2e ratio |",
           "|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.1f}x"  # noqa: E731
    for n in sorted({x["prompt_len"] for x in rows}):
        a, lo = by.get((n, "alora")), by.get((n, "lora"))
        if not a or not lo:
            continue
        ca, cl = cby.get((n, "alora")), cby.get((n, "lora"))
        ct = ratio(ca["judge_ttft_s_mean"], cl["judge_ttft_s_mean"]) if ca and cl else None
        ce = ratio(ca["judge_e2e_s_mean"], cl["judge_e2e_s_mean"]) if ca and cl else None
        out.append(f"| {n} | {f(ratio(ttft(a), ttft(lo)))} | {f(ratio(e2e(a), e2e(lo)))} | {f(ct)} | {f(ce)} |")
    return out


def pb_baseline_table(b: dict, a_part: dict | None) -> list[str]:
    if "error" in b.get("peft", {}):
        return [f"Baseline: transformers + PEFT failed: {b['peft']['error']}"]
    peft, jal = b["peft"], b.get("jalora_throughput", {})
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    out = [f"Baseline: transformers {peft['transformers']} + PEFT {peft['peft']} on {peft['device']} "
           f"({peft['dtype']}, attention {peft['attn_implementation']}); PEFT aLoRA reuses the base's past_key_values.",
           *([f"The PEFT numbers come from an earlier run (`{peft['measured_in_run']['command']}`, commit "
              f"{peft['measured_in_run']['commit'][:10]}); jalora's side was measured again."]
             if peft.get("measured_in_run") else []),
           "", "| prompt | kind | PEFT judge TTFT ms | PEFT judge e2e ms | PEFT pipeline ms | jalora judge TTFT ms | "
           "jalora pipeline ms | pipeline PEFT / jalora |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    jby = {(x["prompt_len"], x["kind"]): x for x in (a_part or {}).get("rows", [])}
    for x in peft["rows"]:
        j = jby.get((x["prompt_len"], x["kind"]))
        jt = j["judge"]["ttft_s"] if j else None
        jp = j["pipeline_s"] if j else None
        rr = f"{x['pipeline_s'] / jp:.1f}x" if jp else "-"
        out.append(f"| {x['prompt_len']} | {x['kind']} | {ms(x['judge'].get('ttft_s'))} | {ms(x['judge']['e2e_s'])} | "
                   f"{ms(x['pipeline_s'])} | {ms(jt)} | {ms(jp)} | {rr} |")  # fmt: skip
    out += ["", f"Pipeline throughput, {b['tp_pipelines']} concurrent pipelines, prompt {b['tp_prompt']}:", "",
            "| kind | PEFT batched pipelines/s | jalora pipelines/s | jalora / PEFT |", "|---|---|---|---|"]
    for kind in ("alora", "lora"):
        p, q = peft["throughput"].get(kind), jal.get(kind)
        if p and q:
            out.append(f"| {kind} | {p['pipelines_per_s']:.2f} | {q['pipelines_per_s']:.2f} | "
                       f"{q['pipelines_per_s'] / p['pipelines_per_s']:.1f}x |")
    return out




def ratio(a, b):
    """b / a, or None when either is missing."""
    return None if not a or b is None else b / a


def pb_goals(r: dict) -> list[str]:
    """The pipeline benchmark's goals against the measured numbers; a missed goal says by how much."""
    parts, rows = r.get("parts", {}), []

    def row(what, value, goal, higher=True):
        if value is None:
            return
        ok = value >= goal if higher else value <= goal
        miss = "met" if ok else f"missed by {goal / value if higher else value / goal:.2f}x"
        rows.append(f"| {what} | {value:.2f} | {'>=' if higher else '<='} {goal:g} | {miss} |")

    if "A" in parts:
        by = {(x["prompt_len"], x["kind"]): x for x in parts["A"]["rows"]}
        ns = sorted(n for n, k in by if k == "alora" and (n, "lora") in by)
        if ns:
            a, lo = by[(ns[-1], "alora")]["judge"], by[(ns[-1], "lora")]["judge"]
            row(f"adapter TTFT, LoRA / aLoRA at {ns[-1]} (x)", ratio(a["ttft_s"], lo["ttft_s"]), 100)
            row(f"adapter e2e, LoRA / aLoRA at {ns[-1]} (x)", ratio(a["e2e_s"], lo["e2e_s"]), 58)
    b = parts.get("baseline")
    if b and "throughput" in b.get("peft", {}):
        best = max(v["pipelines_per_s"] for v in b["peft"]["throughput"].values())
        jal = b.get("jalora_throughput", {}).get("alora")
        if jal:
            row(f"pipelines/s, jalora aLoRA / best PEFT ({b['tp_pipelines']} concurrent) (x)",
                jal["pipelines_per_s"] / best, 20)  # fmt: skip
    ce = parts.get("ceilings")
    if ce and ce.get("ceilings"):
        c = ce["ceilings"]
        mm = max(c["bf16_matmul_TFLOPs"], REF_MATMUL_TFLOPS)
        pre = [p for p in ce["prefill"] if p["prompt_tokens"] == 8192]
        if pre:
            row(f"prefill 8k, fraction of the matmul rate ({mm:.0f} TFLOP/s)", pre[0]["TFLOPs"] / mm, 0.6)
        dec = [d for d in ce["decode"] if d["batch"] == 1]
        if dec:
            x = dec[0]["step_seconds"] / decode_roofline(dec[0], c)
            row(f"batch-1 decode step / roofline at {roofline_bandwidth(c) / 1e3:.1f} TB/s (x)", x, 1.15,
                higher=False)  # fmt: skip
    if not rows:
        return []
    where = "CPU smoke run (tiny model): the goals are for the H200" if r.get("quick") else r.get("device")
    return [f"Goals ({where}):", "", "| measure | value | goal | |", "|---|---|---|---|", *rows, ""]


# The serving goals' table: which result file each row reads (the latest run of each measure; a device run
# that measures a row again replaces its file here).
SERVING_GOAL_RUNS = {
    "startup": "startup_gpu_h200_7c67e61.json",
    "pipeline": "pipeline_bench_granite-8b_h200_7c67e61.json",
    "concurrent": "pipeline_bench_granite-8b_aconc_h100_8d36705.json",
    "decode_1k": "profile_step_b1_h200_7c67e61.json",
    "decode_64k": "profile_step_b1_ctx65536_h200_7c67e61.json",
    "prefill_attention": "attention_prefill_h200_7c67e61.json",
    "grpc": "http_bench_h200_084790b.json",
}
# The earlier run each row is shown beside (the README's "previous" column), by part: the last run before
# these of the same measure on the same card where one exists. The 7c67e61 files are two calls on one warm
# H200 (serving_goals_runs_h200_7c67e61.json). The gRPC row is the 4-round run on the same H200 just before
# them, at 084790b: 7c67e61's server rendered chat templates in the tokenizing job (5d31a18, since reverted:
# 0.80% loss on that H200 against 0.07%, within the rounds' spread), and 084790b's server is main's again. The
# device time ran out in the concurrent part, whose row is still the one-call H100 run at 8d36705
# (serving_goals_runs_h100_8d36705.json), beside the H100 run at 74d6c06. The H200 runs before (7cbd39d,
# b916b6c, 26f4920) had cuDNN's prefill chunks and long chunks off (on since bffa835), and the gRPC one
# rendered the in-process round's chat template before its clock started (084790b puts it inside, as the
# server renders it). No H200 run measured prefill attention's split route before, so that row's previous
# is the H100's.
SERVING_GOAL_PREVIOUS: dict[str, str] = {
    "startup": "startup_gpu.json",
    "pipeline": "pipeline_bench_granite-8b.json",
    "concurrent": "pipeline_bench_granite-8b_aconc_h100_74d6c06.json",
    "decode_1k": "profile_step_b1_onelaunch_baseline_h200.json",
    "decode_64k": "profile_step_b1_ctx65536_longgrid_h200.json",
    "prefill_attention": "attention_prefill_h100_8d36705.json",
    "grpc": "http_bench.json",
}


# The same rows on an H100, the card most device calls get: every part in one call at 45df62d
# (serving_goals_runs_h100_45df62d.json), beside the H100's one-call run at e954969
# (serving_goals_runs_h100_e954969.json). Each was its machine's first start (a cold start there is slower than a
# second one on the same machine: 65.6 s against 54.9 s at e954969).
SERVING_GOAL_RUNS_H100 = {
    "startup": "startup_gpu_h100_45df62d.json",
    "pipeline": "pipeline_bench_granite-8b_h100_45df62d.json",
    "concurrent": "pipeline_bench_granite-8b_aconc_h100_45df62d.json",
    "decode_1k": "profile_step_b1_h100_45df62d.json",
    "decode_64k": "profile_step_b1_ctx65536_h100_45df62d.json",
    "prefill_attention": "attention_prefill_h100_45df62d.json",
    "grpc": "http_bench_h100_45df62d.json",
}
SERVING_GOAL_PREVIOUS_H100 = {part: name.replace("45df62d", "e954969") for part, name in SERVING_GOAL_RUNS_H100.items()}


def serving_goal_files(runs: dict | None = None, previous: dict | None = None) -> tuple:
    """A serving-goals table's result files: `runs` (default `SERVING_GOAL_RUNS`), then each part's file of
    `previous` (default `SERVING_GOAL_PREVIOUS`; None where it has none)."""
    runs = SERVING_GOAL_RUNS if runs is None else runs
    previous = SERVING_GOAL_PREVIOUS if previous is None else previous
    return (*runs.values(), *(previous.get(p) for p in runs))


def serving_goals_h100(*runs) -> list[str]:
    """`serving_goals` of the H100's runs (`SERVING_GOAL_RUNS_H100`, beside `SERVING_GOAL_PREVIOUS_H100`)."""
    return ["The same rows measured on an H100 (its rooflines at its 3.35 TB/s data-sheet rate), every part in one "
            "call (`SERVING_GOAL_RUNS_H100` in bench/report.py, beside `SERVING_GOAL_PREVIOUS_H100`):",
            *serving_goals(*runs)[1:]]  # fmt: skip


def device_bandwidth(r: dict) -> tuple[float, str]:
    """GB/s a run's decode roofline is drawn at, and how it is named: the H200's 4.3 TB/s reference copy, or
    the H100's 3.35 TB/s data-sheet rate (no copy reaches it either)."""
    return (3350.0, "3.35 TB/s, H100") if "H100" in (r.get("device") or "") else (REF_HBM_GBPS, "4.3 TB/s")


def bf16_bytes(cfg: dict) -> tuple[int, int]:
    """(weight bytes, K + V bytes of one token over every layer) of a model's HF config in bf16, as the engine's
    ModelConfig counts them (bench/throughput.py's decode rows do the same)."""
    from jalora.model.config import ModelConfig

    c = ModelConfig.from_dict(cfg)
    return c.num_params() * 2, c.num_layers * 2 * c.kv_size * 2


# batch-1 decode step against its roofline, the goal by context length (the serving goals' decode_1k and
# decode_64k rows, in that order)
DECODE_GOALS = {1024: 1.10, 65536: 1.15}


def read_ms(run: dict, kv_tokens: int, steps: int = 1) -> float:
    """Milliseconds `steps` steps take to read Granite-8B's bf16 weights and `kv_tokens` tokens' K and V each, at
    the roofline bandwidth of `run`'s device (`device_bandwidth`): a decode step's or a judge's roofline."""
    from bench.harness import GRANITE_8B

    weight_bytes, kv = bf16_bytes(GRANITE_8B)
    return steps * (weight_bytes + kv_tokens * kv) / device_bandwidth(run)[0] / 1e6


def serving_goals(*runs) -> list[str]:
    """One row per serving goal (start-up, decode at the roofline, the judge at 64k, prefill attention, gRPC), each
    from the latest run that measured it, with its roofline or anchor, device and commit. `runs`: the result
    files of `SERVING_GOAL_RUNS`' parts in its order, then optionally as many earlier ones (a "previous" column,
    matched by row)."""
    now, before = runs[:len(SERVING_GOAL_RUNS)], runs[len(SERVING_GOAL_RUNS):]
    previous = {r[0]: f"{r[2]} ({r[6]})" for r in _goal_rows(*before)} if any(before) else None
    head = ("| measure | value | " + ("previous (device, commit) | " if previous is not None else "")
            + "roofline / anchor | goal | | device, commit |")  # fmt: skip
    lines = []
    for key, what, shown, anchor, goal, status, where in _goal_rows(*now):
        earlier = "" if previous is None else f"{previous.get(key, '-')} | "
        lines.append(f"| {what} | {shown} | {earlier}{anchor} | {goal} | {status} | {where} |")
    return ["Each row from the latest run that measured it (device and commit in the last column; the result files "
            "are `SERVING_GOAL_RUNS` in bench/report.py, the previous ones `SERVING_GOAL_PREVIOUS`). "
            "`python -m bench.serving_goals --out-dir DIR` measures every row again in one command (`--parts` splits "
            "it over device calls) and prints this table from DIR.", "",
            head, "|---|---|" + ("---|" if previous is not None else "") + "---|---|---|---|", *lines]  # fmt: skip


def _goal_rows(startup=None, pipeline=None, concurrent=None, decode_1k=None, decode_64k=None, prefill_attention=None,
               grpc=None) -> list[tuple[str, str, str, str, str, str, str]]:
    """(key, measure, value, anchor, goal, verdict, device and commit) of each serving goal its runs measured;
    the key names the row whatever its measure's words say of the run (a route, a batch), to match runs."""
    rows = []

    def row(key, what, value, unit, anchor, goal, ok, r):
        status = "—" if value is None else ("met" if ok else "missed")
        shown = "not measured" if value is None else f"{value:.{0 if unit == '' else 2}f}{unit}"
        where = "" if r is None else f"{r.get('device', r.get('run', {}).get('device', '?'))}, {commit_of(r)}"
        rows.append((key, what, shown, anchor, goal, status, where))

    if startup:
        cold, warm = startup["runs"]["cold"]["ready_s"], startup["runs"].get("warm", {}).get("ready_s")
        row("cold", "start to ready, cold compilation cache (s)", cold, " s", "-", "<= 30 s", cold <= 30, startup)
        row("warm", "start to ready, warm compilation cache (s)", warm, " s", "-", "<= 10 s",
            warm is not None and warm <= 10, startup)  # fmt: skip
    for r, ctx_goal in zip((decode_1k, decode_64k), DECODE_GOALS.values(), strict=True):
        if r:
            ctx, (gbps, named) = r["context"], device_bandwidth(r)
            roof = read_ms(r, r["batch"] * ctx)
            x = r["step_ms_median"] / roof
            anchor = f"{roof:.2f} ms (weights + KV at {named}); {x:.2f}x"
            # (the same bytes at the rate a batch-1 matmul reached in the same run: only where it is the best of
            # several widths over the step's own rows, `gemv_widths` and `gemv_rows`; one [4096, 262144] matrix,
            # and then one-row activations, read slower than the step's GEMMs: no ceiling)
            c = r.get("ceilings", {})
            gemv = c.get("hbm_gemv_GBps") if c.get("gemv_widths") and c.get("gemv_rows") else None
            if gemv:
                measured = roof * gbps / gemv
                anchor += (f"; {measured:.2f} ms at the run's batch-1 matmul read rate ({gemv / 1e3:.2f} TB/s): "
                           f"{r['step_ms_median'] / measured:.2f}x")
            row(f"decode {ctx}", f"batch-1 decode step, {ctx // 1024}k context (ms)", r["step_ms_median"], " ms",
                anchor, f"<= {ctx_goal:.2f}x", x <= ctx_goal, r)  # fmt: skip
    a_rows = (pipeline or {}).get("parts", {}).get("A", {}).get("rows", [])
    if a_rows:
        # (a run whose rows did not record them, before the count existed, measured nothing: not 0)
        recorded = all("compilations" in x for x in a_rows)
        compiles = sum(x["compilations"] for x in a_rows) if recorded else None
        run = pipeline["parts"]["A"]["run"]
        row("compiles", "compilations while serving (pipeline A rows)", compiles, "", "-", "0", compiles == 0, run)
        by = {(x["prompt_len"], x["kind"]): x for x in a_rows}
        n = max((n for n, k in by if k == "alora" and (n, "lora") in by), default=None)
        if n:
            a, lo = by[(n, "alora")]["judge"], by[(n, "lora")]["judge"]
            steps = a["completion_tokens"]
            roof = read_ms(run, a["prompt_tokens"], steps)
            anchor = f"~{roof:.0f} ms ({steps} steps at the decode roofline)"
            row(f"judge {n}", f"aLoRA judge e2e at {n // 1024}k, {steps} tokens (ms)", a["e2e_s"] * 1e3, " ms",
                anchor, "<= 130 ms", a["e2e_s"] <= 0.130, run)  # fmt: skip
            row(f"ratio {n}", f"judge e2e, LoRA / aLoRA at {n // 1024}k (x)", lo["e2e_s"] / a["e2e_s"], "x",
                ratio_bound(lo["e2e_s"], 50, roof), ">= 50x", lo["e2e_s"] / a["e2e_s"] >= 50, run)  # fmt: skip
    c_rows = (concurrent or {}).get("parts", {}).get("Aconc", {})
    if c_rows:
        by = {x["kind"]: x for x in c_rows["rows"]}
        if "alora" in by and "lora" in by:
            x = by["lora"]["judge_e2e_s_mean"] / by["alora"]["judge_e2e_s_mean"]
            # (the judges decode together: each of their steps reads the weights and every sequence's KV)
            batch, ctx = c_rows["batch"], c_rows.get("longest_seq")
            steps = c_rows.get("eval_len", 16)  # (16: what every run before the field was recorded judged)
            roof = read_ms(c_rows["run"], batch * ctx, steps) if ctx else None
            bound = ratio_bound(by["lora"]["judge_e2e_s_mean"], 58, roof, f"{batch} sequences a step")
            row("concurrent", f"same, the paper's concurrent batch ({batch} pipelines) (x)", x, "x",
                f"paper: 58x; {bound}", ">= 58x", x >= 58, c_rows["run"])  # fmt: skip
    if prefill_attention:
        for p in prefill_attention.get("prefill", []):
            if p["tokens"] in (8192, 32768):
                best = max(p["pct_cudnn"], p.get("split_pct_cudnn", 0.0))
                how = "split route" if p.get("split_pct_cudnn", 0.0) > p["pct_cudnn"] else "kernel"
                row(f"prefill {p['tokens']}", f"prefill attention {p['tokens'] // 1024}k, % of cuDNN ({how})", best,
                    "%", f"cuDNN {p['cudnn_ms']:.2f} ms", ">= 80%", best >= 80, prefill_attention)  # fmt: skip
    if grpc:
        loss = grpc["loss_vs_inproc"]["grpc"] * 100
        row("grpc", "64 streams through gRPC vs in-process (loss %)", loss, "%", "-", "<= 3%", loss <= 3, grpc)
    return rows


def ratio_bound(lora_e2e_s: float, goal: float, alora_roofline_ms: float | None, how: str = "") -> str:
    """What a LoRA / aLoRA e2e ratio goal asks of the aLoRA judge, beside the judge's own decode roofline (a
    step per judged token, each reading the weights and the KV it attends to): at the LoRA arm's measured
    time, the goal is out of reach where the aLoRA judge would have to beat its roofline."""
    need = lora_e2e_s * 1e3 / goal
    text = f"needs aLoRA e2e <= {need:.1f} ms (LoRA's {lora_e2e_s * 1e3:.0f} / {goal:g})"
    if alora_roofline_ms:
        text += f"; its roofline ~{alora_roofline_ms:.1f} ms" + (f" ({how})" if how else "")
        # (within 3% of it: at it; a roofline drawn at a reference copy rate is no sharper than that)
        if need < 0.97 * alora_roofline_ms:
            text += ": below it"
        elif need < 1.03 * alora_roofline_ms:
            text += ": at it"
    return text


def roofline_bandwidth(ceilings: dict | None) -> float:
    """GB/s a decode step is judged against: the higher of the run's own copy measurement (XLA's
    elementwise copy reaches 3.3-3.6 TB/s, which the engine's own weight GEMMs already exceed at
    3.9-4.2 TB/s, bench/results/profile_step_b1.json) and the 4.3 TB/s reference copy."""
    return max((ceilings or {}).get("hbm_GBps", 0.0), REF_HBM_GBPS)


def decode_roofline(d: dict, ceilings: dict | None) -> float:
    """Seconds to read a decode step's weights and KV once at `roofline_bandwidth`."""
    return (d["weight_bytes"] + d["kv_bytes"]) / (roofline_bandwidth(ceilings) * 1e9)


def attention_splits(r) -> list[str]:
    splits = sorted({k for row in r["rows"] for k in row["us"] if k != "None"}, key=int)
    out = [f"Decode attention at the engine's padded step shapes (T = token bucket, 64 sequence slots), us per "
           f"call by kv-split count; `default` is the kernel's own choice, made on the device from the real "
           f"sequence count ({provenance(r)}; `default` here is the static heuristic that run replaced).", "",
           "| batch | context | default | " + " | ".join(f"{k} splits" for k in splits) + " | best GB/s |",
           "|---|---|---|" + "---|" * len(splits) + "---|"]  # fmt: skip
    for row in r["rows"]:
        cells = [row["us"].get(k) for k in ["None", *splits]]
        text = " | ".join(f"{v:.0f}" if isinstance(v, float) else "err" for v in cells)
        out.append(f"| {row['batch']} | {row['context']} | {text} | {row['best']['GBps']:.0f} |")
    return out


def pipeline_summary(pb) -> list[str]:
    parts = pb.get("parts", {})
    out = []
    a = parts.get("A")
    if a:
        rows = {(r["prompt_len"], r["kind"]): r for r in a["rows"]}
        n = max(p for p, _ in rows)
        al, lo = rows.get((n, "alora")), rows.get((n, "lora"))
        if al and lo:
            j, jl = al["judge"], lo["judge"]
            steps = max(j["completion_tokens"] - 1, 1)
            out.append(
                f"- Paper pipeline A at {n} prompt tokens: the aLoRA judge reuses {j['hit_rate']:.0%} of its prompt, "
                f"so its TTFT is {j['ttft_s'] * 1e3:.0f} ms against {jl['ttft_s'] * 1e3:.0f} ms for LoRA's recompute "
                f"({jl['ttft_s'] / j['ttft_s']:.0f}x). End to end the ratio is {jl['e2e_s'] / j['e2e_s']:.1f}x: "
                f"both judges then decode {j['completion_tokens']} tokens at this context "
                f"({j['decode_s'] / steps * 1e3:.1f} ms per step), and that decode, not prefill, is what is left of "
                "the aLoRA judge's time."
            )
    b = parts.get("baseline")
    if b and b.get("peft") and "throughput" in b["peft"]:
        peft = b["peft"]["throughput"]
        jal = b["jalora_throughput"]
        out.append(
            f"- Against transformers + PEFT on the same GPU, 32 concurrent pipelines: jalora aLoRA "
            f"{jal['alora']['pipelines_per_s']:.1f} pipelines/s, PEFT's batched generate "
            f"{peft['alora']['pipelines_per_s']:.2f} (aLoRA) and {peft['lora']['pipelines_per_s']:.2f} (LoRA). "
            "Both run the same 256-token base answer; jalora's pipelines are bound by that decode."
        )
    c = parts.get("C")
    if c and c.get("rows"):
        tiers = lambda r: (r.get("host_kv_gb") or 0.0, bool(r.get("sessions")))  # noqa: E731
        rows = sorted((r for r in c["rows"] if r["kind"] == "alora" and tiers(r) == (0.0, False)),
                      key=lambda r: r["rate"])  # fmt: skip
        kept = [r for r in rows if (r["hit_rate_mean"] or 0) >= 0.9]
        lost = [r for r in rows if kept and r["rate"] > kept[-1]["rate"] and (r["hit_rate_mean"] or 0) < 0.9
                and r["latency"]["p99"] is not None]  # fmt: skip
        if kept and lost:
            k, lo = kept[-1], lost[0]
            out.append(
                f"- Poisson arrivals (C): with the KV cache capped at {c['kv_pipelines']} pipelines' worth, aLoRA "
                f"judges reuse {k['hit_rate_mean']:.0%} of their prompts at {k['rate']:g} pipelines/s (p50 "
                f"{k['latency']['p50']:.2f} s); at {lo['rate']:g}/s the cache overflows ({lo['preemptions']} "
                f"preemptions), reuse falls to {lo['hit_rate_mean']:.0%} on average and p99 latency reaches "
                f"{lo['latency']['p99']:.1f} s: under that pressure cached blocks are evicted (and preempted requests "
                "recompute) before the judges that would reuse them arrive."
            )
        for tier in sorted({tiers(r) for r in c["rows"]} - {(0.0, False)}):
            on = {r["rate"]: r for r in c["rows"] if r["kind"] == "alora" and tiers(r) == tier}
            name = " and ".join([f"a {tier[0]:g} GiB host tier"] * bool(tier[0]) + ["pipeline sessions"] * tier[1])
            cells = [f"{rate:g}/s {on[rate]['hit_rate_mean'] or 0:.0%} (p99 {on[rate]['latency']['p99']:.2f} s, "
                     f"plain {p['hit_rate_mean'] or 0:.0%}, {p['latency']['p99']:.2f} s)"
                     for rate, p in ((r["rate"], r) for r in rows) if rate in on]  # fmt: skip
            if cells:
                out.append(f"- The same arrivals with {name}: judge reuse " + "; ".join(cells) + ".")
    return out


def pipeline_bench_section(r) -> list[str]:
    """bench/pipeline_bench.py: every part, each with the run that produced it; plots beside the JSON."""
    shapes = "tiny random model (CPU smoke sizes)" if r.get("quick") else "Granite-3.2-8B shapes, dummy bf16 weights"
    out = [f"{shapes}; aLoRA r=32 (base-aligned reuse) vs LoRA r=8 (recompute) on "
           f"q/k/v ({provenance(r)}; parts of a split run carry their own run line). Plots: "
           f"`bench/results/pipeline_bench_{r['model']}_A.png`, `..._C.png`.", ""]
    return out + pipeline_bench_tables(r)


def summary(tp, att, step, split=None) -> list[str]:
    """The reading of the tables, with every number taken from the results."""
    out = []
    if tp:
        c, d1 = tp["ceilings"], tp["decode"][0]
        tf = [p["TFLOPs"] for p in tp["prefill"]]
        ref = decode_roofline(d1, None)
        when = (f" Measured at commit {tp['commit'][:10]} with the synchronous step loop (async scheduling, which "
                "overlaps host and device work, is in the step profile above)."
                if d1.get("scheduling", "sync") == "sync" else "")  # fmt: skip
        out += [
            f"- Prefill runs at {min(tf):.0f}-{max(tf):.0f} TFLOP/s of model FLOPs, "
            f"{min(tf) / REF_MATMUL_TFLOPS:.0%}-{max(tf) / REF_MATMUL_TFLOPS:.0%} of the {REF_MATMUL_TFLOPS:.0f} "
            f"TFLOP/s matmul reference ({max(tf) / c['bf16_matmul_TFLOPs']:.0%} of XLA's own 8192^3 matmul in the "
            "same run).",
            f"- Decode at batch {d1['batch']} takes {d1['step_seconds'] * 1e3:.2f} ms per step against a "
            f"{ref * 1e3:.2f} ms roofline ({(d1['weight_bytes'] + d1['kv_bytes']) / 1e9:.1f} GB at "
            f"{REF_HBM_GBPS / 1e3:.1f} TB/s): {d1['step_seconds'] / ref:.2f}x.{when}",
        ]
    if att:
        rows = [d for d in att["decode"] if "gbs" in d and d["batch"] >= 8 and d["context"] >= 4096]
        worst = min(rows, key=lambda d: d["gbs"])
        best = max(rows, key=lambda d: d["gbs"])
        pre = [p["pct_cudnn"] for p in att["prefill"]]
        sp = [p["split_pct_cudnn"] for p in (split or {}).get("prefill", []) if "split_pct_cudnn" in p]
        split_range = f": {min(sp):.0f}-{max(sp):.0f}% of cuDNN, section above" if sp else ""
        out.append(
            f"- Decode attention (batch >= 8, context >= 4k) reads KV at {worst['gbs'] / REF_HBM_GBPS:.0%}-"
            f"{best['gbs'] / REF_HBM_GBPS:.0%} of {REF_HBM_GBPS / 1e3:.1f} TB/s; the low end is batch "
            f"{worst['batch']} at {worst['context']} tokens (launch cost, few programs). Prefill attention reaches "
            f"{min(pre):.0f}-{max(pre):.0f}% of cuDNN (goal 80%): the Triton lowering gathers K/V pages with "
            "pointer loads, without the bulk-copy engine or warp specialisation. On NVIDIA GPUs the engine's long "
            f"prefill chunks go through cuDNN instead (split prefill, the default{split_range})."
        )
    if step:
        d, p = step["decode"], step["prefill"]
        verdict = lambda x, goal: "met" if x <= goal else f"missed by {x - goal:.1%}"  # noqa: E731
        out.append(
            f"- Masked multi-LoRA: a {p['tokens']}-token prefill activated in its last {p['adapted_tokens']} tokens "
            f"costs {p['overhead']:+.1%} (goal <= 2%: {verdict(p['overhead'], 0.02)}); decode of {d['batch']} "
            f"sequences over {d['adapters']} aLoRAs costs {d['overhead']:+.1%} per engine step "
            f"({d['device_overhead']:+.1%} in a replay of the step; goal <= 10%: {verdict(d['overhead'], 0.10)})."
        )
    return out


def step_profiles(b1, b64, b1_baseline=None, b64_baseline=None) -> list[str]:
    """bench/profile_step.py: the engine's step, async against synchronous scheduling, and its kernels;
    beside it, where the same device call also ran an earlier commit's profile_step (`*_baseline.json`),
    that commit's async step time."""
    profiles = (b1, b64)
    out = ["The decode step of the engine (`python -m bench.profile_step`): median engine.step() with async scheduling "
           "(the next step is enqueued before the last one is read back) and with the synchronous loop, in one "
           "run; device busy time and the largest kernels from a profiler trace of the steps in the run's first "
           "mode (`trace` column).", "",
           "| batch | adapters | context | async ms | sync ms | trace | device busy ms | top kernels (us/step) | run |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in profiles:
        if not r or "by_mode" not in r:
            continue
        modes = r["by_mode"]
        line = next((v for k, v in r.get("device_trace", {}).items() if "Compute" in k), None)
        if line is None:  # no GPU compute stream in the trace (CPU runs)
            continue
        top = ", ".join(f"{k['name'][:28]} {k['us_per_step']:.0f}" for k in line["top"][:4])
        async_ms, sync_ms = (f"{modes[m]['step_ms_median']:.2f}" if m in modes else "-" for m in ("async", "sync"))
        out.append(f"| {r['batch']} | {r['adapters']} | {r['context']} | {async_ms} | {sync_ms} | {r['mode']} | "
                   f"{line['busy_us_per_step'] / 1e3:.2f} | {top} | {provenance(r)} |")  # fmt: skip
    pairs = [(r, base) for r, base in ((b1, b1_baseline), (b64, b64_baseline)) if r and base]
    if pairs:
        out += ["", "The same step against an earlier commit's code (async scheduling, median engine.step()); "
                "the runs' start times say whether they shared a device call:", "",
                "| batch | adapters | this code ms | this run (UTC) | earlier code ms | earlier run (UTC) | change | "
                "earlier run |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r, base in pairs:
            new_ms, old_ms = r["by_mode"]["async"]["step_ms_median"], base["by_mode"]["async"]["step_ms_median"]
            out.append(f"| {r['batch']} | {r['adapters']} | {new_ms:.2f} | {r.get('time_utc', '?')} | {old_ms:.2f} | "
                       f"{base.get('time_utc', '?')} | {new_ms / old_ms - 1:+.1%} | {provenance(base)} |")  # fmt: skip
    return out


def host_stream(r) -> list[str]:
    """bench/host_stream.py: the host's output work per token, early and late in a long stream."""
    new, old = r["output_processor"], r["decode_whole_output"]
    w = r["window"]
    out = [f"One request's output stream of {r['tokens']} token ids of the embedded default tokenizer (text with "
           f"multi-byte characters), host only, median microseconds per token over its first and last {w} tokens "
           f"({provenance(r)}; host CPU {r['host_cpu']}, Python {r['python']}).", "",
           f"| per-token output work | first {w} tokens us | last {w} tokens us | last / first |", "|---|---|---|---|",
           f"| the engine's OutputProcessor: append, stop check, incremental detokenizer, delta of the new token | "
           f"{new['first_us']:.1f} | {new['last_us']:.1f} | {new['last_over_first']:.2f} |",
           f"| cumulative: decode the whole output again and copy the token list | {old['first_us']:.1f} | "
           f"{old['last_us']:.1f} | {old['last_over_first']:.2f} |", "",
           f"Over the last {w} tokens the cumulative way costs "
           f"{r['decode_whole_over_output_processor']['last']:.0f}x the OutputProcessor per token."]  # fmt: skip
    return out


def admission(r) -> list[str]:
    """bench/admission.py: the host's lookup of an aLoRA judge after its base request, donors against hashing all."""
    out = [f"An aLoRA judge's prefix-cache lookup on the engine's thread (its blocks' hashes and cached blocks) after "
           f"a base request of the length shown and its {r['answer']}-token answer; host only, median of "
           f"{r['repeats']} ({provenance(r)}; host CPU {r['host_cpu']}, Python {r['python']}).", ""]  # fmt: skip
    return out + admission_stdout(r)


def admission_stdout(r) -> list[str]:
    """bench/admission.py's table: one row per context length."""
    out = ["| context | judge blocks | judge lookup ms: donors | hashing all | saved | base lookup ms |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        j = row["judge_lookup_ms"]
        out.append(f"| {row['length']} | {row['judge_blocks']} | {j['donors']:.3f} | {j['hash all']:.3f} | "
                   f"{j['hash all'] - j['donors']:.3f} | {row['base_lookup_ms']:.3f} |")  # fmt: skip
    return out


def default_model_cpu(startup, decode) -> list[str]:
    """bench/startup.py and bench/cpu_decode.py: SmolLM2-135M-Instruct on a CPU."""
    from bench import cpu_decode as cpu_decode_bench
    from bench import startup as startup_bench

    out = []
    if startup:
        out += [f"Start-up of `LLM(<SmolLM2 .gguf>)` in two fresh processes sharing one empty cache: the first "
                f"converts the GGUF ({startup['gguf_bytes'] / 1e6:.0f} MB) into a "
                f"{startup['converted_bytes'] / 1e6:.0f} MB checkpoint, the second loads it ({provenance(startup)}).",
                "", startup_bench.stdout_table(startup), ""]  # fmt: skip
    if decode:
        out += [f"Batch-1 greedy decode, ms per token, jalora beside transformers on the same converted checkpoint "
                f"(float32), and the ceiling: the weights read once per token at the copy bandwidth measured in "
                f"the run ({provenance(decode)}).", "", cpu_decode_bench.stdout_table(decode), ""]  # fmt: skip
    return out


# -- what each script prints at the end of its run -----------------------------------------------------


def tp_cost(r) -> list[str]:
    """The tensor-parallel step on paper (bench/tp_cost.py): communication and roofline per deployment."""
    out = [
        f"What the sharded step moves between devices, and the step time left (`{r['command']}`; no device: "
        f"the hardware figures are the script's parameters, the H200's memory bandwidth the one measured "
        f"here, the rest nominal, and a latency per small collective assumed). Decode: batch 1 at "
        f"{r['context']} tokens of context; prefill: one {r['prefill_tokens']}-token chunk.",
        "",
        "| model | devices | weights / device GB | all-reduced per layer, decode / prefill | link GB/s, latency us "
        "| decode: comm ms, step ms, tokens/s | prefill: comm ms, step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        d, p, c = row["decode"], row["prefill"], row["chip_params"]
        out.append(
            f"| {row['model']} | {row['devices']} x {row['chip']} | {d['weights_gb_per_device']:.1f} "
            f"| {d['all_reduce_bytes_per_layer'] / 1e3:.0f} KB / {p['all_reduce_bytes_per_layer'] / 1e6:.1f} MB "
            f"| {c['link_gb_s']:.0f}, {c['latency_us']:.0f} | {d['comm_ms']:.2f}, {d['step_ms']:.2f}, "
            f"{d['tokens_per_s']:.0f} | {p['comm_ms']:.1f}, {p['step_ms']:.1f} |"
        )
    return out


def tp_one_vs_before(*runs) -> list[str]:
    """tensor_parallel_size=1 against the commit before tensor parallelism (bench/profile_step.py), pairs
    of (this code, the code before) in the order they ran."""
    out = ["The decode step with `tensor_parallel_size=1` (the default) against the code before tensor "
           "parallelism existed, median engine.step() in ms:", "",
           "| batch | adapters | this code async / sync | commit | before async / sync | commit | async change "
           "| runs (UTC) |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for now, before in zip(runs[::2], runs[1::2]):
        if now is None or before is None:
            continue
        a, b = now["by_mode"], before["by_mode"]
        change = a["async"]["step_ms_median"] / b["async"]["step_ms_median"] - 1
        out.append(
            f"| {now['batch']} | {now['adapters']} | {a['async']['step_ms_median']:.2f} / "
            f"{a['sync']['step_ms_median']:.2f} | {commit_of(now)} | {b['async']['step_ms_median']:.2f} / "
            f"{b['sync']['step_ms_median']:.2f} | {commit_of(before)} | {change:+.1%} | "
            f"{now['time_utc']}, {before['time_utc']} |"
        )
    out += ["", f"On {provenance(runs[0])}; each row's two runs share one device call."]
    return out


def _inproc_call(r: dict) -> str:
    """What an http_bench run's in-process rounds called: `LLM.chat` since 084790b (its rounds record the
    engine's clock), before it `LLM.generate` over prompts rendered before the clock started."""
    if any("engine_steps" in round_ for round_ in r["rounds"]):
        return "`LLM.chat`, the chat template rendered inside the round"
    return "`LLM.generate`, the chat template rendered before the round"


def http_bench(r) -> list[str]:
    """Streaming chat through each front against the engine alone (bench/http_bench.py)."""
    med, loss = r["median_tokens_per_s"], r["loss_vs_inproc"]
    return [
        f"{r['streams']} concurrent streaming chat requests (about {r['prompt_tokens']} prompt tokens, "
        f"{r['max_tokens']} new tokens each, {r['preset']} shapes) from {r.get('clients', 1)} client "
        f"process(es), median of the measured rounds "
        f"(`{r['command']}` on {r['device']}, JAX {r['jax_version']}, commit {commit_of(r)}):",
        "",
        "| front | completion tokens/s | loss vs in-process |",
        "|---|---|---|",
        f"| in-process ({_inproc_call(r)}) | {med['inproc']:.0f} | - |",
        *(f"| {name} | {med[m]:.0f} | {loss[m]:.1%} |"
          for m, name in (("grpc", "gRPC (`AsyncClient.chat_stream`)"), ("http", "HTTP (`openai.AsyncOpenAI`, SSE)"))
          if m in med),
    ]  # fmt: skip


def train_throughput(r) -> list[str]:
    c = r["ceilings"]
    return [
        f"`jalora train` on {r['shapes']} shapes ({r['dtype']}, r={r['lora_rank']} on "
        f"{'/'.join(t.removesuffix('_proj') for t in r['targets'])}, {r['seq_len']}-token sequences, "
        f"{r['adapted_tokens_per_seq']} adapted, layers recomputed in the backward pass: {r['remat']}, "
        f"{r['attention']} attention; `{r['command']}` on {r['device']}, JAX {r['jax_version']}, commit "
        f"{commit_of(r)}): {r['tokens_per_s']:.0f} tokens/s, {r['TFLOPs']:.0f} TFLOP/s of model FLOPs "
        f"(forward, and the backward's activation gradients: the frozen weights get none), "
        f"{r['mfu_vs_measured_matmul']:.0%} of the bf16 matmul rate measured in the same run "
        f"({c['bf16_matmul_TFLOPs']:.0f} TFLOP/s), {r['mfu_vs_790']:.0%} of 790 TFLOP/s (the rate measured on "
        f"other days); counted as 6 x parameters x tokens, {r['six_n_TFLOPs']:.0f} TFLOP/s. Compiling the step "
        f"took {r['compile_seconds']:.0f} s. Goal: {r['goal']}.",
    ]


def judge_accuracy(r) -> list[str]:
    out = [
        f"The default model's trained aLoRA judges on held-out questions (facts training never asks), read as "
        f"P(Y) > P(N) of the judge's next token, against SmolLM2 itself asked the same question by prompting "
        f"(the better of two phrasings) (`{r['command']}` on {r['device']}, {r['dtype']}, JAX {r['jax_version']}, "
        f"commit {commit_of(r)}; goal: {r['goal']}):",
        "",
        "| judge | held-out examples | aLoRA judge | base prompting | points above | trained |",
        "|---|---|---|---|---|---|",
    ]
    for name, j in r["judges"].items():
        if "judge_accuracy" not in j:
            out.append(f"| `{name}` | - | not trained | - | - | - |")
            continue
        t = j.get("training") or {}
        trained = f"{t['steps']} steps on {t['train_examples']} examples" if t else "-"
        base = j["base_prompting_best_accuracy"]
        out.append(f"| `{name}` | {j['heldout_examples']} | {j['judge_accuracy']:.1%} | {base:.1%} | "
                   f"{j['points_above_base']:+.1f} | {trained} |")  # fmt: skip
    return out


def adapter_swap(r) -> list[str]:
    z, res = r["sizes"], r["results"]
    note = f"; {r['note']}" if r.get("note") else ""
    rows = ["| engine | device slots | output tokens/s | steps | ms per step | swaps | mean swap (host ms) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, slots in (("resident", z["adapters"]), ("swapping", z["slots"])):
        x = res[name]
        swap = "-" if x["swap_host_ms_mean"] is None else f"{x['swap_host_ms_mean']:.1f}"
        per_step = 1e3 * x["seconds"] / x["steps"]
        rows.append(f"| {name} | {slots} | {x['output_tokens_per_s']:.0f} | {x['steps']} | {per_step:.1f} | "
                    f"{x['swaps']} | {swap} |")  # fmt: skip
    return [
        f"{z['adapters']} aLoRA adapters (r={z['rank']}, q/k/v, {z['dtype']}) on {r['model']}, a random adapter per "
        f"request ({z['requests']} requests, {z['prompt_len']}-token prompts, {z['max_tokens']} new tokens, after a "
        f"warm pass), all resident vs {z['slots']} device slots swapped on demand, same run (`{r['command']}` on "
        f"{r['device']}, JAX {r['jax_version']}, commit {commit_of(r)}{note}): swapping keeps "
        f"{r['throughput_ratio']:.0%} of the resident throughput (goal: >= 80%).",
        "",
        *rows,
    ]


def host_tier_cost(now, before) -> list[str]:
    """bench/host_tier_cost.py: a decode step with the host tier's copies, this build beside an earlier one."""
    runs = [("this build", now)] + ([("before", before)] if before else [])
    rows = ["| build | blocks per step | copies | step ms (median) | step ms (mean) | engine thread: issue ms | "
            "engine thread: land ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in runs:
        res = r["results"]
        for key, moves, what in (("none", 0, "none"), ("out16-full", 16, "out (device -> host)"),
                                 ("in16", 16, "back (host -> device)")):  # fmt: skip
            x = res.get(key)
            if x is None:
                continue
            land = x.get("land_ms_per_step")
            rows.append(f"| {label} ({commit_of(r)}) | {moves} | {what} | {x['step_ms_median']:.2f} | "
                        f"{x['step_ms_mean']:.2f} | {x['issue_ms_per_step']:.2f} | {_f(land, '.2f')} |")  # fmt: skip
    return [f"{now['batch']} sequences decoding (context {now['context']}) on {now['device']}, "
            f"{now['block_bytes'] / 2**20:.1f} MiB per block, {now['steps']} timed steps per row; `before`: an "
            "earlier build, whose engine thread started the copies out and ran the copies back. This build: "
            f"{provenance(now)}" + (f"; before: {provenance(before)}." if before else "."), "", *rows]  # fmt: skip


def startup_gpu(r, fused=None, unrolled=None, executables=None) -> list[str]:
    """bench/startup_gpu.py: start to ready on the GPU, with a cold and a warm compilation cache, this
    build's run (layer groups) beside the fused step's cold start in the same device call, and the earlier
    builds' runs where there are (`unrolled`: the last build that compiled every layer unrolled;
    `executables`: the build that first kept compiled variants on disk)."""
    from bench import startup_gpu as startup_gpu_bench

    m = r["model"]
    builds = [(r, f"{r['runs']['cold'].get('layers_per_launch', 0)} layers per launch"),
              (fused, "one compiled step of every layer, same device call"),
              (unrolled, "one compiled step of every layer"),
              (executables, "compiled variants kept on disk, layers traced one by one")]  # fmt: skip
    runs = {}
    for b, what in builds:
        if b is not None:
            runs.update({f"{k} ({commit_of(b)}{': ' + what if what else ''})": v for k, v in b["runs"].items()})
    text = (f"`LLM(...)` with its warm-up, then {r['engine']['adapters']} adapters loaded and `warmup_adapters()`, "
            f"{m['num_hidden_layers']} layers of hidden size {m['hidden_size']} (dummy weights), each start a fresh "
            f"process, cold starts with an empty compilation cache, warm ones with the cold start's "
            f"({provenance(r)}); goal {r['goal_s']['cold']:.0f} s cold, {r['goal_s']['warm']:.0f} s warm. Trace, "
            "lower and compile-or-load seconds are summed over threads: a cold start's compilations overlap, its "
            "tracing and lowering do not.")  # fmt: skip
    if "warm" not in r["runs"]:
        text += (" This build's run ended after its cold start (the session's device time ran out); a warm start "
                 "traces nothing, so it is not expected to differ from the earlier build's, but it is not measured.")
    for b, _ in builds[1:]:
        if b is not None:
            text += f" {commit_of(b)}: {provenance(b)}."
    return [text, "", startup_gpu_bench.stdout_table({**r, "runs": runs})]


LAYER_GROUP_RUNS = tuple(
    f"layers_h100_{c}_{n}.json"
    for c, names in (("b8196e0", ("pb1_fused", "pb1_layers", "pb64_fused", "pb64_layers")),
                     ("c1b1273", ("pb1_fused", "pb1_g4", "pb1_g8", "pb64_fused", "pb64_g4", "pb64_g8")))
    for n in names
) + ("profile_step_b1_g8_h200.json", "profile_step_b1_ctx65536_fused.json",
     "profile_step_b1_ctx65536.json")  # fmt: skip


def _per_launch(r) -> int:
    """A profile's decoder layers per launch (0: the fused step; the first build recorded a flag: 1 layer)."""
    return int(r["layers_per_launch"]) if "layers_per_launch" in r else int(bool(r.get("layer_launches")))


def layer_groups(*runs) -> list[str]:
    """bench/profile_step.py with --layers-per-launch N beside the fused step (N = 0) in the same device call
    (same commit and device): the step, the host's time enqueuing it, and the device's busy time."""
    runs = [r for r in runs if r is not None]
    out = ["The decode step run as compiled groups of layers against the fused step, each pair in one device call "
           "(`python -m bench.profile_step --modes async --layers-per-launch N`; N = 0 is the fused step): median "
           "engine.step() with async scheduling, the host's time to enqueue a step's launches (profile_step's "
           "`dispatch`), and the device's busy time per step from the profiler trace.", "",
           "| device | commit | batch | adapters | context | layers per launch | step ms | vs fused | "
           "host enqueue ms | device busy ms |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        key = (r["device"], commit_of(r), r["batch"], r["adapters"], r["context"])
        fused = next((f for f in runs if _per_launch(f) == 0 and
                      (f["device"], commit_of(f), f["batch"], f["adapters"], f["context"]) == key), None)  # fmt: skip
        busy = next((v["busy_us_per_step"] for k, v in r["device_trace"].items() if "Compute" in k), None)
        change = "-" if fused is None or fused is r else f"{r['step_ms_median'] / fused['step_ms_median'] - 1:+.1%}"
        out.append(f"| {r['device']} | {commit_of(r)} | {r['batch']} | {r['adapters']} | {r['context']} | "
                   f"{_per_launch(r)} | {r['step_ms_median']:.2f} | {change} | "
                   f"{r['host_ms_per_step']['dispatch']:.2f} | "
                   f"{_f(None if busy is None else busy / 1e3, '.2f')} |")  # fmt: skip
    return out


DECODE_PAIRS = (
    ("profile_step_b1_ctx65536_nolonggrid_h200.json", "profile_step_b1_ctx65536_longgrid_h200.json"),
    ("profile_step_b1_onelaunch_baseline_h200.json", "profile_step_b1_onelaunch_h200.json"),
    ("profile_step_b1_onelaunch2_baseline_h100.json", "profile_step_b1_onelaunch2_h100.json"),
    ("profile_step_b1_ctx65536_onelaunch2_baseline_h100.json", "profile_step_b1_ctx65536_onelaunch2_h100.json"),
    # (the split-axis merge at the long grid's 64 splits: three pairs on one H100 machine; then the first form of
    # the query rotation in the K/V write, one program per row)
    *((f"profile_step_b1_ctx65536_h100_7912fae_combine_unrolled{i}.json",
       f"profile_step_b1_ctx65536_h100_7912fae_combine_axis{i}.json") for i in ("", "2", "3")),
    ("profile_step_b1_h100_7912fae.json", "profile_step_b1_h100_7912fae_ropeq.json"),
    # (the query rotation in blocks of Hkv * D columns, two pairs; then 128-key tiles for decode, three pairs at 1k
    # and two at 64k; all on one H100 machine at e954969)
    *((f"profile_step_b1_h100_e954969_ropeq_off{i}.json", f"profile_step_b1_h100_e954969_ropeq_on{i}.json")
      for i in ("", "2")),
    *((f"profile_step_b1_h100_e954969_k64{i}.json", f"profile_step_b1_h100_e954969_k128{i}.json")
      for i in ("", "_2", "_3")),
    *((f"profile_step_b1_ctx65536_h100_e954969_k64{i}.json", f"profile_step_b1_ctx65536_h100_e954969_k128{i}.json")
      for i in ("", "_2")),
)


def _change_of(r) -> str:
    """What a profile changed against the engine's defaults of its commit (tuning fields, norm kernel)."""
    parts = [f"{k}={v}" for k, v in (r.get("gpu_tuning_changes") or {}).items()]
    if r.get("norm_impl") == "gpu":
        parts.append("norm_impl=gpu")
    return ", ".join(parts) or "defaults"


def decode_pairs(*runs) -> list[str]:
    """bench/profile_step.py pairs, each pair from one device call (same commit and device): a change to the
    decode step's kernels against its baseline, with the attention kernel's and all launches' device time."""
    out = ["Batch-1 decode step, one change at a time, each pair in one device call (`python -m bench.profile_step "
           "--modes async --batch 1 [--context 65536] [--no-long-grid | --tuning FIELD=VALUE ... | --norm-impl gpu]`"
           "): median engine.step(), the device's busy time and launches per step and the attention kernel's "
           "time per step, from the profiler trace. The field values are those of the run's commit (the "
           "one-launch kernels were switches then, on by default since; `combine_split_axis=True` became "
           "`combine_axis_min_splits`, 32 by default: the axis merge for the long grid's 64 splits).", "",
           "| device | commit | context | run | step ms | vs baseline | device busy ms | launches | attention ms |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i in range(0, len(runs), 2):
        base, new = runs[i], runs[i + 1]
        if base is None or new is None:
            continue
        for r in (base, new):
            trace = next(v for k, v in r["device_trace"].items() if "Compute" in k)
            attn = sum(t["us_per_step"] for t in trace["top"] if t["name"] == "ragged_paged_attention")
            change = "-" if r is base else f"{r['step_ms_median'] / base['step_ms_median'] - 1:+.1%}"
            out.append(f"| {r['device']} | {commit_of(r)} | {r['context']} | {_change_of(r)} | "
                       f"{r['step_ms_median']:.2f} | {change} | {trace['busy_us_per_step'] / 1e3:.2f} | "
                       f"{trace['events_per_step']:.0f} | {attn / 1e3:.2f} |")  # fmt: skip
    return out


# A decode step's device kernels by what they do, from their names in the profiler trace (XLA's fusions and the
# Pallas kernels'): (part, does the name belong to it). The first match wins; what matches none is "other".
STEP_PARTS = (
    ("weight GEMMs (q/k/v, o, gate/up, down, LM head)",
     lambda n: n.startswith(("gemm_fusion", "cutlass", "sm90_", "nvjet_"))),  # (XLA's Triton GEMMs, cuBLAS's)
    ("attention kernel", lambda n: n == "ragged_paged_attention"),
    ("its split merge", lambda n: n == "ragged_paged_attention_combine"),
    ("KV write", lambda n: n == "write_kv"),
)


def step_parts(r: dict) -> dict[str, float]:
    """Microseconds a step of a bench/profile_step.py run spends in each of `STEP_PARTS`, in the other kernels
    (norms, residual adds, q's RoPE, converts, sampling: the trace's other names and what its top list left
    out) and between launches."""
    trace = next(v for k, v in r["device_trace"].items() if "Compute" in k)
    parts = dict.fromkeys([name for name, _ in STEP_PARTS], 0.0)
    for t in trace["top"]:
        part = next((name for name, match in STEP_PARTS if match(t["name"])), None)
        if part is not None:
            parts[part] += t["us_per_step"]
    parts["other kernels (norms, residual adds, q's RoPE, converts, sampling)"] = (
        trace["busy_us_per_step"] - sum(parts.values()))
    parts["gaps between launches"] = trace["gap_us_per_step"]
    return parts


def decode_time(*runs) -> list[str]:
    """Where the serving goals' batch-1 decode steps spend their device time (their profiler traces), each part
    against the bytes it must read where it has a floor: the weights for the GEMMs, the context's K and V for
    the attention kernel, at the device's roofline bandwidth."""
    from bench.harness import GRANITE_8B

    runs = [r for r in runs if r is not None and r.get("device_trace")]
    if not runs:
        return []
    weight_bytes, kv = bf16_bytes(GRANITE_8B)
    out = ["Each serving-goal decode row's device trace (`python -m bench.profile_step --modes async --batch 1 "
           "[--context 65536] --steps 30`), per step; in brackets the rate at which the part reads the bytes it "
           "must (weights; the context's K and V) and its time at the device's roofline bandwidth. The parts add "
           "up to the traced steps' span, which is longer than the untraced median below them: the profiler's "
           "own cost, mostly in the gaps (where the kernels' busy time alone exceeds the median, as at 1k, the "
           "gaps are the tracer's, not the step's).", "",
           "| part | " + " | ".join(f"{r['context'] // 1024}k: us ({r['device']}, {commit_of(r)})" for r in runs)
           + " |", "|---|" + "---|" * len(runs)]  # fmt: skip
    parts = [step_parts(r) for r in runs]
    floors = {STEP_PARTS[0][0]: lambda r: weight_bytes, STEP_PARTS[1][0]: lambda r: r["batch"] * r["context"] * kv}
    for name in parts[0]:
        cells = []
        for r, p in zip(runs, parts, strict=True):
            cell = f"{p[name]:.0f}"
            if name in floors and p[name] > 0:
                nbytes, gbps = floors[name](r), device_bandwidth(r)[0]
                cell += f" ({nbytes / p[name] / 1e6:.2f} TB/s; {nbytes / gbps / 1e3:.0f} at {gbps / 1e3:.2f})"
            cells.append(cell)
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| step (median engine.step(), ms) | " + " | ".join(f"{r['step_ms_median']:.2f}" for r in runs) + " |")
    budget = []
    for r in runs:
        roof = read_ms(r, r["batch"] * r["context"])
        g = DECODE_GOALS.get(r["context"])
        budget.append(f"{roof:.2f}" + (f"; goal {g:.2f}x = {roof * g:.2f}" if g else ""))
    out.append("| roofline (ms) | " + " | ".join(budget) + " |")
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def throughput_stdout(r) -> list[str]:
    """bench/throughput.py's result (ceilings and rooflines only where the run measured them)."""
    out = ["| prefill tokens | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|"]
    for p in r["prefill"]:
        out.append(f"| {p['prompt_tokens']} | {p['tokens_per_s']:.0f} | {p['TFLOPs']:.1f} | "
                   f"{_f(p.get('mfu_vs_measured_matmul'), '.2f')} |")  # fmt: skip
    out += ["", "| decode batch | ctx | step ms | replay ms | tokens/s | roofline ms | x roofline |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in r["decode"]:
        roof = d.get("roofline_seconds")
        out.append(f"| {d['batch']} | {d['context']} | {d['step_seconds'] * 1e3:.2f} | "
                   f"{d['device_step_seconds'] * 1e3:.2f} | {d['tokens_per_s']:.0f} | "
                   f"{_f(None if roof is None else roof * 1e3, '.2f')} | {_f(d.get('step_over_roofline'), '.2f')} |")
    return out


def pipeline_stdout(r) -> list[str]:
    """bench/pipeline.py's result: every judge call."""
    out = ["| prompt | judge | kind | prompt tokens | cached | prefill computed | saved | TTFT ms | e2e ms |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["runs"]:
        for name, j in x["judges"].items():
            saved = j["cached_tokens"] / j["prompt_tokens"]
            out.append(f"| {x['prompt_len']} | {name} | {x['kind']} | {j['prompt_tokens']} | {j['cached_tokens']} | "
                       f"{j['prefill_tokens']} | {saved:.0%} | {j['ttft_s'] * 1e3:.1f} | {j['e2e_s'] * 1e3:.1f} |")
    return out


def lora_step_stdout(r) -> list[str]:
    """bench/lora_step.py's result."""
    d, p = r["decode"], r["prefill"]
    return ["| workload | base ms | aLoRA ms | overhead | goal |", "|---|---|---|---|---|",
            f"| decode, {d['batch']} seqs over {d['adapters']} aLoRAs (r={d['rank']} qkv), ctx {d['context']} | "
            f"{d['base_step_s'] * 1e3:.2f} (again {d['base_step_again_s'] * 1e3:.2f}) | "
            f"{d['alora_step_s'] * 1e3:.2f} | {d['overhead']:+.1%} (replay {d['device_overhead']:+.1%}; sync loop "
            f"{d['sync']['overhead']:+.1%}) | <= 10% |",
            f"| prefill {p['tokens']} tokens, last {p['adapted_tokens']} adapted | {p['base_s'] * 1e3:.1f} | "
            f"{p['alora_s'] * 1e3:.1f} | {p['overhead']:+.1%} | <= 2% |"]  # fmt: skip


def attention_stdout(r) -> list[str]:
    """bench/attention.py's result: every decode shape and prefill length."""
    lines = [f"device {r['device']}, jax {r['jax_version']}, commit {commit_of(r)}, "
             f"copy {r['copy_gbs_read_plus_write']:.0f} GB/s", "",
             "| decode B | context | ms | GB/s | % of copy |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in r["decode"]:
        if "gbs" in row:
            lines.append(f"| {row['batch']} | {row['context']} | {row['ms']:.3f} | {row['gbs']:.0f} | "
                         f"{row['pct_copy']:.0f}% |")  # fmt: skip
        else:
            lines.append(f"| {row['batch']} | {row['context']} | - | - | "
                         f"{row.get('skipped') or row.get('error', '')[:60]} |")  # fmt: skip
    nan = float("nan")
    lines += ["", "| prefill tokens | kernel TFLOP/s | cuDNN TFLOP/s | % of cuDNN | split route TFLOP/s | % of cuDNN | "
              "reference TFLOP/s |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in r["prefill"]:
        ref = f"{row['reference_tflops']:.1f}" if "reference_tflops" in row else "skipped (OOM)"
        lines.append(f"| {row['tokens']} | {row.get('kernel_tflops', nan):.0f} | "
                     f"{row.get('cudnn_tflops', nan):.0f} | {row.get('pct_cudnn', nan):.0f}% | "
                     f"{row.get('split_tflops', nan):.0f} | {row.get('split_pct_cudnn', nan):.0f}% | "
                     f"{ref} |")  # fmt: skip
    if r.get("chunks"):
        lines += ["", "| chunk rows | prefix | cache blocks | kernel ms | TFLOP/s | split ms | TFLOP/s | speed-up | "
                  "rel. error vs kernel |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in r["chunks"]:
            lines.append(f"| {row['rows']} | {row['prefix']} | {row['cache_blocks']} | "
                         f"{row.get('kernel_ms', nan):.3f} | "
                         f"{row.get('kernel_tflops', nan):.0f} | {row.get('split_ms', nan):.3f} | "
                         f"{row.get('split_tflops', nan):.0f} | {row.get('speedup', nan):.2f}x | "
                         f"{row.get('split_rel_err_vs_kernel', nan):.1e} |")  # fmt: skip
    if r.get("small_chunks"):
        lines += ["", *small_chunks_table(r["small_chunks"])]
    return lines


def small_chunks_table(rows: list) -> list[str]:
    """bench/attention.py's small chunks: a few rows after a long context, decode's query blocks vs the long chunk."""
    nan = float("nan")
    out = ["| chunk rows (bucket) | context | decode blocks us | GB/s | long chunk us | GB/s | speed-up | rel. error |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        out.append(f"| {row['rows']} ({row['bucket']}) | {row['context']} | "
                   f"{row.get('decode_blocks_us', nan):.0f} | {row.get('decode_blocks_gbs', nan):.0f} | "
                   f"{row.get('long_chunk_us', nan):.0f} | {row.get('long_chunk_gbs', nan):.0f} | "
                   f"{row.get('speedup', nan):.2f}x | {row.get('rel_err', nan):.1e} |")  # fmt: skip
    return out


def long_chunk_and_cudnn(small, default, optin, start, start_cudnn) -> list[str]:
    """The long-chunk variant and cuDNN prefill chunks, measured off (the defaults then) and on in one H100 session
    before they became the defaults: the kernel alone, pipeline A at 64k, a cold start."""
    out = [f"Per layer, K + V of 8 kv heads read by one sequence's chunk after its context ({provenance(small)}; "
           f"{small['note']}):", "", *small_chunks_table(small["small_chunks"]), ""]  # fmt: skip
    rows = {}
    for name, r in (("off", default), ("on", optin)):
        for x in r["parts"]["A"]["rows"]:
            if x["prompt_len"] == 65536:
                rows[(name, x["kind"])] = x
    out += [f"Pipeline A at 65536 with both off ({provenance(default['parts']['A']['run'])}) and on "
            f"({provenance(optin['parts']['A']['run'])}):", "",
            "| kind | both | base prefill ms | judge queue ms | judge prefill ms | judge TTFT ms | judge e2e ms |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in ("alora", "lora"):
        for name in ("off", "on"):
            x = rows.get((name, kind))
            if x:
                b, j = x["base"], x["judge"]
                ms = [b["prefill_s"], j["queue_s"], j["prefill_s"], j["ttft_s"], j["e2e_s"]]
                out.append(f"| {kind} | {name} | " + " | ".join(f"{1e3 * v:.1f}" for v in ms) + " |")
    c0, c1 = start["runs"]["cold"], start_cudnn["runs"]["cold"]
    alone = sum(p.get("compiled_alone", 0) for p in c1["warmup_phases"])
    out += ["", f"A cold start ({c0['device']}): {c0['ready_s']:.1f} s with the kernel's prefill, "
            f"{c1['ready_s']:.1f} s with cuDNN's chunks ({c1['executables']} executables against "
            f"{c0['executables']}; compiled again alone after running out of device memory: {alone}) "
            f"({provenance(start_cudnn)})."]  # fmt: skip
    return out


def attention_splits_stdout(r, splits) -> list[str]:
    """bench/attention_splits.py's result (not --grid): us per call by split count."""
    out = ["| B | ctx | default us | " + " | ".join(f"splits={s}" for s in splits) + " |",
           "|---|---|---|" + "---|" * len(splits)]  # fmt: skip
    for row in r["rows"]:
        cells = [row["us"][str(s)] for s in [None, *splits]]
        out.append(f"| {row['batch']} | {row['context']} | "
                   + " | ".join(f"{v:.1f}" if isinstance(v, float) else "err" for v in cells) + " |")  # fmt: skip
    return out


def host_stream_stdout(r) -> list[str]:
    """bench/host_stream.py's result: the README's table."""
    return host_stream(r)


def lora_stdout(r) -> list[str]:
    """bench/lora.py's result: the projection stack's overheads, and the kernel against its alternatives."""
    d, p = r.get("decode"), r.get("prefill")
    out = ["", f"{r['device']}, jax {r['jax_version']}, commit {commit_of(r)}; {r['what']}", "",
           "| workload (projection stack) | base ms | + LoRA ms: kernel add | packed add | delta | goal |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    rows = []
    if d:
        rows.append((f"(a) decode {d['tokens']} seqs, 8 aLoRA r=32 q/k/v", d))
    if p:
        rows.append((f"(b) prefill {p['tokens']}, last {p['adapted_tokens']} adapted", p))
    for name, x in rows:
        ms, o = x["ms"], x["overhead_vs_base"]
        cells = [f"{ms[m]:.3f} ({o[m]:+.1%})" if m in o else "failed"
                 for m in ("kernel_add", "kernel_add_packed", "kernel_delta")]  # fmt: skip
        out.append(f"| {name} | {ms['base']:.3f} | " + " | ".join(cells) + f" | <= {x['goal_overhead']:.0%} |")
    o = d["overhead_vs_base"] if d else {}
    out += ["", f"(a) with the one-hot einsum: {o.get('one_hot', float('nan')):+.1%}; "
            f"with ragged_dot: {o.get('ragged_dot', float('nan')):+.1%}", ""]  # fmt: skip
    if "kernel_vs" in r:
        keys = sorted({k[: -len("_us_per_call")] for c in r["kernel_vs"] for k in c if k.endswith("_us_per_call")})
        out += ["| (c) fused-qkv delta, us per call | " + " | ".join(keys) + " | kernel weight GB/s |",
                "|---" * (len(keys) + 2) + "|"]  # fmt: skip
        for c in r["kernel_vs"]:
            cells = " | ".join(f"{c.get(k + '_us_per_call', float('nan')):.1f}" for k in keys)
            out.append(f"| {c['case']} | {cells} | {c.get('kernel_weight_GBps', float('nan')):.0f} |")
    if "check" in r:
        ok = all(c["ok"] for c in r["check"])
        out += ["", f"check: {'all ok' if ok else 'FAILED'} {[round(c['rel_err'], 5) for c in r['check']]}"]
    return out


def render() -> str:
    parts = []
    sections = [
        ("### Engine throughput", throughput, ("throughput.json",)),
        ("### Ragged paged attention", attention, ("attention.json",)),
        ("### Prefill chunks through cuDNN (split prefill)", split_prefill,
         ("attention_split_h100.json", "pipeline_bench_granite-8b_warmupbug_h100.json",
          "pipeline_bench_granite-8b_split_h100.json")),
        ("### The engine's decode step: async scheduling", step_profiles,
         ("profile_step_b1.json", "profile_step_b64_a8.json", "profile_step_b1_baseline.json",
          "profile_step_b64_a8_baseline.json")),
        ("### Host output work per token over a long stream", host_stream, ("host_stream.json",)),
        ("### Admitting a judge after a long context: the host's lookup", admission, ("admission.json",)),
        ("### Masked multi-LoRA", lora, ("lora.json", "lora_step.json")),
        ("### Decode attention: kv splits at the engine's step shapes", attention_splits,
         ("attention_splits.json",)),
        ("### The default model on a CPU: start-up and decode", default_model_cpu,
         ("startup_cpu.json", "cpu_decode.json")),
        ("### Base -> aLoRA judges on the CPU (tiny model)", pipeline, ("pipeline_tiny.json",)),
        ("### Tensor parallelism on paper", tp_cost, ("tp_cost.json",)),
        ("### Tensor parallelism at tp=1: the same step as before", tp_one_vs_before,
         ("profile_step_b1.json", "profile_step_b1_before_tp.json", "profile_step_b64_a8.json",
          "profile_step_b64_a8_before_tp.json", "profile_step_b64_a8_rerun.json",
          "profile_step_b64_a8_before_tp_rerun.json")),
        ("### Streaming through gRPC and HTTP", http_bench, ("http_bench.json",)),
        ("### Training throughput", train_throughput, ("train_throughput.json",)),
        ("### Trained judges: held-out accuracy", judge_accuracy, ("judge_accuracy.json",)),
        ("### More adapters than device slots", adapter_swap, ("adapter_swap.json",)),
        ("### The host-memory KV tier: what its copies cost a decode step", host_tier_cost,
         ("host_tier_cost.json", "host_tier_cost_before.json")),
        ("### Start-up on the GPU: cold and warm compilation cache", startup_gpu,
         ("startup_gpu.json", "startup_gpu_fused.json", "startup_gpu_b463092.json", "startup_gpu_executables.json")),
        ("### Layer groups against the fused step", layer_groups, LAYER_GROUP_RUNS),
        ("### Decode step changes, pair by pair", decode_pairs, tuple(n for pair in DECODE_PAIRS for n in pair)),
        ("### Serving goals: where each stands", serving_goals, serving_goal_files()),
        ("### Serving goals on an H100", serving_goals_h100,
         serving_goal_files(SERVING_GOAL_RUNS_H100, SERVING_GOAL_PREVIOUS_H100)),
        ("### Where a batch-1 decode step's time goes", decode_time,
         (SERVING_GOAL_RUNS["decode_1k"], SERVING_GOAL_RUNS["decode_64k"])),
        ("### Long chunks after a long context, prefill chunks through cuDNN: off and on (H100)", long_chunk_and_cudnn,
         ("attention_small_chunks_h100.json", "pipeline_bench_granite-8b_h100.json",
          "pipeline_bench_granite-8b_optin_h100.json", "startup_gpu_h100.json", "startup_gpu_cudnn_h100.json")),
        ("### The aLoRA serving paper's pipelines on the H200", pipeline_bench_section,
         ("pipeline_bench_granite-8b.json",)),
    ]
    for title, fn, names in sections:
        data = [load(n) for n in names]
        if any(d is not None for d in data):
            parts += [title, "", *fn(*data), ""]
    parts += ["### What the numbers say", "",
              *summary(load("throughput.json"), load("attention.json"), load("lora_step.json"),
                      load("attention_split_h100.json")),
              *pipeline_summary(load("pipeline_bench_granite-8b.json") or {}), ""]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="README", help="replace the block between the bench markers")
    args = ap.parse_args(argv)
    text = render()
    if not args.write:
        print(text)
        return
    readme = open(args.write).read()
    note = "<!-- generated by `python -m bench.report --write README.md`; edit bench/report.py -->"
    block = f"{BEGIN}\n{note}\n\n{text}\n{END}"
    new, n = re.subn(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)
    if n != 1:
        raise SystemExit(f"{args.write} needs exactly one {BEGIN} ... {END} block")
    open(args.write, "w").write(new)


if __name__ == "__main__":
    main()
