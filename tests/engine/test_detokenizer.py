"""Text prompts through the model's tokenizer.json, and streamed text: every delta holds only what is
new, and the pieces add up to the whole-sequence decode (the oracle), multi-byte characters included."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, SamplingParams
from jalora.engine.detokenizer import IncrementalDetokenizer

TOKENIZER = Tokenizer.from_file(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"))


def _stream(ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(TOKENIZER)
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_multibyte_characters_are_held_until_complete():
    ids = TOKENIZER.encode("héllo wörld 日本 ok", add_special_tokens=False).ids
    pieces = _stream(ids)
    assert "".join(pieces) == "héllo wörld 日本 ok"
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended inside a character: its text waited for the next


def test_an_incomplete_character_at_the_end_is_flushed_as_the_whole_decode_shows_it():
    ids = TOKENIZER.encode("ok 日", add_special_tokens=False).ids
    cut = ids[:-1]  # the last byte of 日 is missing
    pieces = _stream(cut)
    assert pieces[-1] != "" and "\ufffd" in pieces[-1]
    assert "".join(pieces) == TOKENIZER.decode(cut, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, TOKENIZER.get_vocab_size() - 1), max_size=40))
def test_pieces_add_up_to_the_whole_decode(ids):
    """Any id sequence, special tokens and broken byte sequences included."""
    assert "".join(_stream(ids)) == TOKENIZER.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL_DIR, num_kv_blocks=32, max_num_seqs=2, max_model_len=256, warmup=False)


def test_text_prompt_streams_deltas_of_new_tokens(llm):
    prompt = "The capital of France is"
    engine = llm.engine
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    assert all(len(d.token_ids) == 1 for d in deltas)  # one new token per step, never the whole output
    assert [d.is_final for d in deltas] == [False] * 11 + [True]
    final = deltas[-1].finished
    assert final.prompt_token_ids == TOKENIZER.encode(prompt).ids
    assert final.prompt_token_ids[0] == TOKENIZER.token_to_id("<|bos|>")
    assert final.num_output_tokens == 12 and final.finish_reason == "length"
    token_ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == TOKENIZER.decode(token_ids, skip_special_tokens=True)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))
    assert out.token_ids == token_ids and out.text == TOKENIZER.decode(token_ids, skip_special_tokens=True)


def _byte_fallback_tokenizer() -> Tokenizer:
    """A Llama-2-style tokenizer: SentencePiece-like pieces ("▁" marks a space) and <0xNN> byte tokens
    for everything else, decoded with ByteFallback (a run of byte tokens that is not valid UTF-8 reads
    as U+FFFD as a whole)."""
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ("▁", "▁a", "▁b", "a", "b", "▁hello", "lo"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


BYTE_FALLBACK = _byte_fallback_tokenizer()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, BYTE_FALLBACK.get_vocab_size() - 1), max_size=24))
def test_byte_fallback_streams_never_fail(ids):
    """Byte tokens that form no valid UTF-8 make tokenizers' DecodeStream refuse its window; the stream
    goes on, and wherever the whole decode is valid text the pieces add up to it."""
    detok = IncrementalDetokenizer(BYTE_FALLBACK)
    text = "".join([detok.push(t) for t in ids] + [detok.flush()])
    whole = BYTE_FALLBACK.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in whole:
        assert text == whole


def test_byte_fallback_stream_goes_on_after_an_invalid_byte_run():
    byte = {b: 3 + b for b in range(256)}
    hello = BYTE_FALLBACK.token_to_id("▁hello")
    ids = [byte[0x41], byte[0xE6], BYTE_FALLBACK.token_to_id("▁b"), hello, *[byte[b] for b in "日".encode()]]
    detok = IncrementalDetokenizer(BYTE_FALLBACK)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces).endswith(" hello日")
