"""bench/attention.py as the serving-goals runner calls it (`--no-chunks`): the two prefill rows the table
reads, then nothing more (interpret mode on the CPU: the rows' shapes, not their speed)."""

import json

import pytest

from bench.attention import main


def test_no_chunks_stops_after_the_prefill_rows(tmp_path):
    out = tmp_path / "attention_prefill.json"
    main(["--smoke", "--prefill-only", "--skip-variants", "--no-chunks", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [p["tokens"] for p in saved["prefill"]] == [128, 256]  # (the smoke run's 8k and 32k)
    assert "chunks" not in saved and "small_chunks" not in saved and saved["decode"] == []


@pytest.mark.parametrize("mode", ["--combine", "--tiles"])
def test_variant_sweeps_check_every_variant_against_the_reference(tmp_path, mode):
    """bench/attention_splits.py --combine / --tiles: the smoke shape splits the context (so the merge runs),
    each variant's output is compared with the jnp reference, and the fastest is one of them."""
    from bench.attention_splits import COMBINE_VARIANTS, TILE_VARIANTS
    from bench.attention_splits import main as splits_main

    variants = COMBINE_VARIANTS if mode == "--combine" else TILE_VARIANTS
    out = tmp_path / "attention_variants.json"
    splits_main(["--smoke", mode, "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["grid_splits"] > 1
    assert all(isinstance(us, float) for us in row["us"].values()), row["us"]  # (a failed variant: its error)
    assert set(row["max_err"]) == set(variants) and row["best"] in variants
    assert all(err < 2e-2 for err in row["max_err"].values()), row["max_err"]
