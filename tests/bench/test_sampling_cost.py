"""bench/sampling_cost.py on tiny shapes: every option is timed from the one engine, and none compiles while it is
timed (the warm-up compiled the adjusted draw and the rows' write)."""


def test_every_option_runs_after_the_warm_up_without_compiling(tmp_path):
    from bench.sampling_cost import main

    out = tmp_path / "sampling_cost.json"
    result = main(["--preset", "tiny", "--batch", "2", "--context", "16", "--steps", "3", "--options", "greedy",
                   "penalties", "allowed", "--out", str(out)])  # fmt: skip
    assert out.exists() and set(result["by_option"]) == {"greedy", "penalties", "allowed"}
    assert result["compiled_while_serving"] == 0
    assert result["by_option"]["penalties"]["vs_greedy"] > 0
