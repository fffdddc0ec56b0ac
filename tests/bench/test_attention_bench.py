"""bench/attention.py as the serving-goals runner calls it (`--no-chunks`): the two prefill rows the table
reads, then nothing more (interpret mode on the CPU: the rows' shapes, not their speed)."""

import json

from bench.attention import main


def test_no_chunks_stops_after_the_prefill_rows(tmp_path):
    out = tmp_path / "attention_prefill.json"
    main(["--smoke", "--prefill-only", "--skip-variants", "--no-chunks", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [p["tokens"] for p in saved["prefill"]] == [128, 256]  # (the smoke run's 8k and 32k)
    assert "chunks" not in saved and "small_chunks" not in saved and saved["decode"] == []


def test_combine_sweep_checks_every_tiling_against_the_reference(tmp_path):
    """bench/attention_splits.py --combine: its smoke shape splits the context (so every tiling's merge runs),
    each tiling's output is compared with the jnp reference, and the fastest is one of them."""
    from bench.attention_splits import COMBINE_VARIANTS
    from bench.attention_splits import main as splits_main

    out = tmp_path / "attention_combine.json"
    splits_main(["--smoke", "--combine", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["grid_splits"] > 1
    assert set(row["max_err"]) == set(COMBINE_VARIANTS) and row["best"] in COMBINE_VARIANTS
    assert all(err < 2e-2 for err in row["max_err"].values()), row["max_err"]
