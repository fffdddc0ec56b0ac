"""The host's output work per token over a long stream, without the device.

    python -m bench.host_stream                   # 4000 tokens -> bench/results/host_stream.json
    python -m bench.host_stream --tokens 1000 --out /tmp/host_stream.json

After the engine reads a step back, each sampled token goes through its OutputProcessor
(jalora/engine/output_processor.py): appended to the request, checked for a stop, turned into text by
the incremental detokenizer, and handed out as a delta holding only the new token and text. This
drives that OutputProcessor for one request over a stream of `--tokens` real token ids (the embedded
default model's tokenizer over a text with multi-byte characters, repeated), one token at a time, and
reports the median cost per token over the first and over the last `--window` tokens.

Baseline, in the same run and on the same ids: cumulative outputs, where every token costs appending
it, decoding the whole output again (`tokenizer.decode(all output ids, skip_special_tokens=True)`)
and copying the token list. Its cost per token grows with the length of the output; the
OutputProcessor's should not.
"""

import argparse
import os
import platform
import time

import tokenizers
from tokenizers import Tokenizer

from bench.harness import result_path, run_metadata, save
from bench.report import host_stream_stdout
from checkpoints import DEFAULT_MODEL_DIR
from jalora.engine.output_processor import OutputProcessor
from jalora.engine.request import Request
from jalora.sampling_params import SamplingParams

# Plain text with accented letters, CJK, symbols and emoji, so that many characters span several
# byte-level tokens and the detokenizer holds text back until a character is complete.
TEXT = (
    "The base model answers, then each judge reads the prompt, the answer and its invocation. "
    "Grüße aus Zürich: naïve café, crème brûlée, smørrebrød, jalapeño, Ærø. "
    "日本語のテキストも少し入れておく。中文也有一点。한국어 문장도 있습니다. "
    "Math: ∑ x² ≤ ∞, π ≈ 3.14159, λ → μ; arrows ⇒ ⇔ and quotes «like this» — “curly” ‘ones’. "
    "Emoji: 🙂 🚀 🧪 👩‍💻 🇨🇭. Numbers 0123456789 and code `f(x) = x * 2` end the paragraph.\n"
)


def load_tokenizer() -> Tokenizer:
    """The embedded default model's tokenizer (what `jalora demo` serves)."""
    return Tokenizer.from_file(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"))


def stream_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    """`n` token ids of TEXT, repeated as often as needed."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def run_output_processor(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[float], str]:
    """Feeds `ids` through an OutputProcessor as one request's sampled tokens, one at a time.
    Returns the seconds each token took (append; the last one also the final delta) and the text of
    the deltas joined."""
    prompt = ids[:1]
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
    req = Request("stream", prompt, params, seed=0)
    processor = OutputProcessor(tokenizer, max_model_len=len(prompt) + len(ids) + 1)
    processor.add(req)
    times, pieces = [], []
    clock = time.perf_counter
    for token in ids:
        t0 = clock()
        delta, reason = processor.append(req, token, None, t0)
        if reason is not None:
            req.finish_reason = reason
            delta = processor.finish(req, delta)
        times.append(clock() - t0)
        pieces.append(delta.text)
    assert req.finish_reason == "length" and delta.is_final
    return times, "".join(pieces)


def run_decode_whole_output(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[float], str]:
    """The cumulative baseline over the same ids: per token, append it, decode every output id again
    and copy the token list. Returns the seconds each token took and the last text."""
    out: list[int] = []
    times, text, token_ids = [], "", []
    clock = time.perf_counter
    for token in ids:
        t0 = clock()
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        token_ids = list(out)
        times.append(clock() - t0)
    assert token_ids == ids
    return times, text


def per_token_us(times: list[float], window: int) -> dict:
    """Median microseconds per token over the first and the last `window` tokens, and their ratio."""

    def median_us(xs):
        xs = sorted(xs)
        mid = len(xs) // 2
        return (xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2) * 1e6

    first, last = median_us(times[:window]), median_us(times[-window:])
    return {"first_us": first, "last_us": last, "last_over_first": last / first}


def measure(tokenizer: Tokenizer, n: int, window: int) -> dict:
    """Both ways over one stream of `n` ids; each must give the text a whole-sequence decode gives."""
    ids = stream_ids(tokenizer, n)
    want = tokenizer.decode(ids, skip_special_tokens=True)
    new_t, new_text = run_output_processor(tokenizer, ids)
    old_t, old_text = run_decode_whole_output(tokenizer, ids)
    if new_text != want or old_text != want:
        raise AssertionError("a stream's text differs from tokenizer.decode(ids)")
    new, old = per_token_us(new_t, window), per_token_us(old_t, window)
    return {
        "tokens": n,
        "window": window,
        "text_chars": len(want),
        "non_ascii_chars": sum(ord(c) > 127 for c in want),
        "output_processor": new,
        "decode_whole_output": old,
        "decode_whole_over_output_processor": {
            "first": old["first_us"] / new["first_us"],
            "last": old["last_us"] / new["last_us"],
        },
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4000, help="output tokens of the stream")
    ap.add_argument("--window", type=int, default=500, help="tokens at each end whose median is reported")
    ap.add_argument("--out", default=None, help="result file (default bench/results/host_stream.json)")
    args = ap.parse_args(argv)
    if args.tokens < 2 * args.window:
        ap.error("--tokens must be at least twice --window")
    meta = run_metadata(__spec__.name, argv)
    result = {**meta, "host_cpu": cpu_name(), "python": platform.python_version(),
              "tokenizers_version": tokenizers.__version__, "tokenizer": "checkpoints/default/tokenizer.json",
              **measure(load_tokenizer(), args.tokens, args.window)}  # fmt: skip
    path = save(result_path(args.out, "host_stream.json"), result)
    print("\n".join(host_stream_stdout(result)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
