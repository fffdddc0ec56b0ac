"""Text prompts through the model's tokenizer.json, and streamed text: every delta holds only what is
new, and the pieces add up to the whole-sequence decode (the oracle), multi-byte characters included; after a
prompt, to what the decode of prompt and output adds to the prompt's."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, SamplingParams
from jalora.engine.detokenizer import IncrementalDetokenizer, prompt_context

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


def _after(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> str | None:
    """What the whole decode of `prompt + ids` adds to the prompt's decode (None where it rewrites it)."""
    before, whole = (tokenizer.decode(x, skip_special_tokens=True) for x in (prompt, prompt + ids))
    return whole[len(before):] if whole.startswith(before) else None


def test_text_after_a_prompt_keeps_the_space_a_sentencepiece_decode_drops_at_the_start():
    """The decoder strips the leading space of a sequence's first piece: alone, "▁hello" reads "hello", but after a
    prompt it reads " hello", and a request's text is what it adds to its prompt (as vLLM's is)."""
    a, hello = BYTE_FALLBACK.token_to_id("▁a"), BYTE_FALLBACK.token_to_id("▁hello")
    assert BYTE_FALLBACK.decode([hello]) == "hello" and _after(BYTE_FALLBACK, [a], [hello]) == " hello"
    detok = IncrementalDetokenizer(BYTE_FALLBACK, [1, a])
    assert [detok.push(hello), detok.push(a), detok.flush()] == [" hello", " a", ""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, BYTE_FALLBACK.get_vocab_size() - 1), min_size=1, max_size=30),
       st.lists(st.integers(0, BYTE_FALLBACK.get_vocab_size() - 1), max_size=16))  # fmt: skip
def test_pieces_after_a_prompt_add_up_to_what_the_whole_decode_adds(prompt, ids):
    """After any prompt whose text is whole, the pieces add up to what decoding prompt + output adds to the
    prompt's own decode, wherever that decode is valid text; after a prompt whose text is not whole (it ends inside
    a character, or in a literal U+FFFD), they are the output's own pieces, never prompt text again."""
    detok = IncrementalDetokenizer(BYTE_FALLBACK, prompt)
    text = "".join([detok.push(t) for t in ids] + [detok.flush()])
    context = prompt_context(BYTE_FALLBACK, prompt)
    if not context:
        assert "\ufffd" in BYTE_FALLBACK.decode(prompt[-4:], skip_special_tokens=True)
        assert text == "".join(_stream_of(BYTE_FALLBACK, ids))
        return
    assert prompt[-len(context):] == context and len(context) <= 23
    expected = _after(BYTE_FALLBACK, prompt, ids)
    if expected is not None and "\ufffd" not in BYTE_FALLBACK.decode(prompt + ids, skip_special_tokens=True):
        assert text == expected


def _stream_of(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(t) for t in ids] + [detok.flush()]


def test_a_prompt_cut_inside_a_character_is_not_handed_out_again():
    """Token ids that end inside a character (日's first byte): the output's text holds none of the prompt's."""
    byte = {b: 3 + b for b in range(256)}
    a, b = BYTE_FALLBACK.token_to_id("▁a"), BYTE_FALLBACK.token_to_id("▁b")
    prompt = [a, b, a, byte["日".encode()[0]]]
    detok = IncrementalDetokenizer(BYTE_FALLBACK, prompt)
    text = "".join([detok.push(t) for t in (b, a)] + [detok.flush()])
    assert text == "".join(_stream_of(BYTE_FALLBACK, [b, a])) == "b a"
    ids = TOKENIZER.encode("ab 日本 ok", add_special_tokens=False).ids
    cut = next(i for i in range(1, len(ids)) if TOKENIZER.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(TOKENIZER, ids[:cut])
    pieces = [detok.push(t) for t in ids[cut:]] + [detok.flush()]
    assert "ab" not in "".join(pieces)


def test_a_stop_tokens_text_is_left_out(llm):
    """A stop token ends the request with the token in its ids but not its text (vLLM's default, as for a stop
    string)."""
    params = dict(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    (free,) = llm.generate(["The capital of France is"], SamplingParams(**params))
    k = next(i for i in range(1, 8) if TOKENIZER.decode([free.token_ids[i]]).strip())  # a token with text
    stop = free.token_ids[k]
    first = free.token_ids.index(stop)
    (out,) = llm.generate(["The capital of France is"], SamplingParams(**params, stop_token_ids=[stop]))
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.text == TOKENIZER.decode(free.token_ids[:first], skip_special_tokens=True)
    assert free.text.startswith(out.text) and len(free.text) > len(out.text)


@pytest.mark.parametrize("tokenizer", [TOKENIZER, BYTE_FALLBACK], ids=["byte-level", "byte-fallback"])
@pytest.mark.parametrize("text", ["héllo wörld €5 日本 🙂", " a b hello", "ab\u00e9\u00e9lo"])
def test_token_bytes_add_up_to_the_texts_utf8(tokenizer, text):
    """OpenAI's chat logprobs `bytes`: each token's own bytes, so that the tokens of a character split over several
    add up to its UTF-8 (each alone decodes to U+FFFD, whose bytes they gave before); against the text's own UTF-8
    (a byte-fallback tokenizer's decode drops the first piece's leading space, as `decode` does)."""
    from jalora.engine.detokenizer import TokenBytes

    ids = tokenizer.encode(text, add_special_tokens=False).ids
    joined = b"".join(TokenBytes(tokenizer)(ids))
    assert joined.decode() == tokenizer.decode(ids) or joined.decode() == " " + tokenizer.decode(ids)
    assert joined.decode().strip() == text.strip()
    if any(ord(c) > 127 for c in text):
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # (a token inside a character: the case at stake)
    special = tokenizer.token_to_id("</s>") if tokenizer is BYTE_FALLBACK else 0
    assert TokenBytes(tokenizer)([special]) == [tokenizer.decode([special], skip_special_tokens=False).encode()]
