"""bench/autotune_check.py: the comparison of two levels' results, and a run end to end on the tests' CPU (no
autotuning there: both engines compile alike, so they agree exactly)."""

import json

from bench.autotune_check import compare, main
from jalora.engine.llm_engine import autotune_options


def test_compare_reads_logprobs_up_to_where_the_greedy_tokens_part():
    base = {"level": 4, "prompt_logprobs": [[-1.0, -2.0]], "tokens": [[5, 6, 7, 8]],
            "logprobs": [[-0.5, -0.6, -0.7, -0.8]]}
    other = {"level": 2, "prompt_logprobs": [[-1.0, -2.25]], "tokens": [[5, 6, 9, 9]],
             "logprobs": [[-0.5, -0.5, -0.2, -9.0]]}  # parts at position 2; position 3 is not compared
    c = compare(base, other)
    assert c["tokens_agree"] == [2] and not c["all_tokens_equal"]
    assert c["prompt_logprob_max_diff"] == 0.25
    assert abs(c["decode_logprob_max_diff"] - 0.5) < 1e-12  # (position 2: -0.7 against -0.2)
    assert compare(base, {**base, "level": 2})["all_tokens_equal"]


def test_a_cpu_run_compares_two_engines(tmp_path):
    out = tmp_path / "autotune_check.json"
    main(["--preset", "tiny", "--prompts", "2", "--prompt-len", "12", "--max-tokens", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [lv["level"] for lv in saved["levels"]] == [4, 2]
    # (each engine's own options: none off a GPU)
    assert all(lv["compiler_options"] == autotune_options(lv["level"]) for lv in saved["levels"])
    (c,) = saved["comparisons"]
    assert c["all_tokens_equal"] and c["prompt_logprob_max_diff"] == 0.0 and c["tokens_agree"] == [4, 4]
