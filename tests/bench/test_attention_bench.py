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
