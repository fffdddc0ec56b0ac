"""bench/host_stream.py's core on a short stream: both ways give the text of a whole-sequence decode
(no timing is checked)."""

from bench.host_stream import (
    load_tokenizer,
    per_token_us,
    run_decode_whole_output,
    run_output_processor,
    stream_ids,
)


def test_output_processor_stream_text_matches_decode():
    tokenizer = load_tokenizer()
    ids = stream_ids(tokenizer, 300)
    assert len(ids) == 300
    want = tokenizer.decode(ids, skip_special_tokens=True)
    assert any(ord(c) > 127 for c in want)  # multi-byte characters in the stream
    times, text = run_output_processor(tokenizer, ids)
    assert len(times) == 300 and text == want
    times, text = run_decode_whole_output(tokenizer, ids)
    assert len(times) == 300 and text == want


def test_per_token_us_windows():
    times = [1e-6] * 10 + [3e-6] * 10
    r = per_token_us(times, 10)
    assert round(r["first_us"], 6) == 1.0 and round(r["last_us"], 6) == 3.0 and round(r["last_over_first"], 6) == 3.0
