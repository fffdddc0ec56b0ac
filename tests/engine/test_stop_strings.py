"""Stop strings: the text ends before the first stop string, wherever the pieces of the stream split it,
and a request that meets one ends with finish reason "stop" at the token that completed it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, SamplingParams
from jalora.engine.stop_strings import StopStringMatcher
from jalora.errors import InvalidRequestError

ALPHABET = "abc"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(ALPHABET, max_size=5), max_size=12),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_released_text_is_the_text_before_the_first_stop(pieces, stops):
    matcher = StopStringMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    # Generation ends at the first piece after which the text holds a stop string; the text is cut
    # where the earliest stop string then present starts. A longer stop string that begins earlier
    # but would be completed only by a later piece never is: the stream has ended.
    expected, seen, found = "".join(pieces), "", False
    for piece in pieces:
        seen += piece
        starts = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if starts:
            expected, found = seen[: min(starts)], True
            break
    assert out == expected
    assert matcher.matched == found


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(ALPHABET, max_size=5), max_size=12),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    st.integers(0, 12),
    st.booleans(),
)
def test_a_stop_string_counts_once_matching_is_on(pieces, stops, k, include):
    """min_tokens: the first k pieces pass through unmatched; from piece k on, a stop string counts if it ends in
    the piece that arrived (vLLM looks for one only in the newest text and the few characters before it). With
    `include` (include_stop_str_in_output) the text ends with the stop string that starts first."""
    matcher = StopStringMatcher(stops, include)
    out = "".join(matcher.push(p, match=j >= k) for j, p in enumerate(pieces)) + matcher.flush()
    expected, seen, found = "".join(pieces), "", False
    for j, piece in enumerate(pieces):
        before, seen = len(seen), seen + piece
        ends = [(i, s) for s in stops for i in [seen.find(s, max(0, before - len(s) + 1))] if i >= 0]
        if j >= k and ends:
            start, stop = min(ends, key=lambda x: x[0])
            expected, found = seen[: start + (len(stop) if include else 0)], True
            break
    assert out == expected
    assert matcher.matched == found


def test_sampling_params_check_stop_strings():
    for bad in (["a", ""], "", [3], ["x"] * 17, ["x" * 257]):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(stop=bad)
        assert err.value.field == "stop"
    assert SamplingParams(stop="abc").stop == ["abc"]  # (vLLM's one string)


def test_generation_ends_at_a_stop_string():
    llm = LLM(DEFAULT_MODEL_DIR, num_kv_blocks=32, max_num_seqs=2, max_model_len=128, warmup=False)
    params = dict(max_tokens=24, ignore_eos=True, temperature=1.0, seed=1)
    [ref] = llm.generate(["Hello there"], SamplingParams(**params))
    # Random weights: a stop string taken from the output itself, 8 characters from the middle of it (after
    # text that decodes cleanly), where it first occurs.
    text = ref.text
    clean = text.find("\ufffd") if "\ufffd" in text else len(text)
    assert clean >= 12, text
    stop = text[clean // 2 - 4: clean // 2 + 4]
    first = text.find(stop)
    assert 0 < first and first + len(stop) <= clean, (text, stop)
    [out] = llm.generate(["Hello there"], SamplingParams(stop=[stop, "never in it"], **params))
    assert out.finish_reason == "stop" and out.text == text[:first]
    # The tokens run up to the one whose text completed the stop string.
    decoded = [llm.engine.tokenizer.decode(ref.token_ids[:n], skip_special_tokens=True) for n in range(25)]
    n = next(n for n, d in enumerate(decoded) if stop in d)
    assert out.token_ids == ref.token_ids[:n]
    # vLLM's include_stop_str_in_output: the same tokens, the text through the stop string
    [kept] = llm.generate(["Hello there"], SamplingParams(stop=[stop], include_stop_str_in_output=True, **params))
    assert kept.token_ids == out.token_ids and kept.text == text[: first + len(stop)]
    # and a stop token's text (left out by default) stays
    last = ref.token_ids[5]
    [by_token] = llm.generate(["Hello there"], SamplingParams(stop_token_ids=[last], **params))
    [with_it] = llm.generate(["Hello there"], SamplingParams(stop_token_ids=[last], include_stop_str_in_output=True,
                                                             **params))  # fmt: skip
    n_stop = ref.token_ids.index(last) + 1
    assert by_token.token_ids == with_it.token_ids == ref.token_ids[:n_stop]
    assert with_it.text == decoded[n_stop] and by_token.text == decoded[n_stop - 1]
    # With min_tokens n the stop string completed by the n-th token does not count (vLLM looks for stop strings
    # only past min_tokens): the request goes on past it, through the same tokens.
    [held] = llm.generate(["Hello there"], SamplingParams(stop=[stop], min_tokens=n, **params))
    assert len(held.token_ids) > n and held.token_ids == ref.token_ids[: len(held.token_ids)]
    assert held.text.startswith(text[: first + len(stop)])
