"""bench/profile_step.py: what it prints of the device's ceilings."""


def test_the_printed_ceilings_are_the_rates_and_not_the_widths_they_were_measured_over():
    """The ceilings dict holds the measured rates and the widths and rows the matmul rate was taken over (a list:
    formatting it as a rate raised after the result was saved, so the part's exit status was 1)."""
    from bench.harness import GEMV_ROWS, GEMV_WIDTHS
    from bench.profile_step import ceiling_lines

    ceilings = {"hbm_gemv_GBps": 2761.9, "gemv_widths": list(GEMV_WIDTHS), "gemv_rows": GEMV_ROWS,
                "hbm_copy_GBps": 2666.2}  # fmt: skip
    assert ceiling_lines(ceilings) == ["ceiling hbm_gemv_GBps 2762 GB/s", "ceiling hbm_copy_GBps 2666 GB/s"]
    assert ceiling_lines({}) == []  # (a CPU run measures none)
