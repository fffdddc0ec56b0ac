"""Concurrent streaming chat throughput: in-process vs gRPC vs the OpenAI-compatible HTTP front, one run.

    python -m bench.http_bench                         # H200: Granite-3.2-8B shapes, dummy bf16 weights
    python -m bench.http_bench --preset tiny --smoke   # CPU smoke run: tiny shapes, few tokens (under /tmp)

One engine serves every mode. `--streams` chat requests (each its own conversation of about
`--prompt-tokens` tokens, `--max-tokens` new tokens, ignore_eos) start at once:

- in-process: `LLM.chat` over all of them (the same work as the fronts': the chat template rendered, the
  prompts tokenized and generated; the engine alone: the ceiling);
- grpc: `jalora.client.AsyncClient.chat_stream`, one stream per request;
- http: the official `openai.AsyncOpenAI` client, `chat.completions.create(stream=True)`.

The gRPC and HTTP load comes from `--clients` client processes (this module with `--drive`), each with
its share of the streams and started together once all are connected, so the server's process does
only the server's work, as in a deployment, and no single Python client's parsing is the limit (each
round records every client's CPU time over the wall time: near 1, that client was). Throughput is
completion tokens over the wall time from the first request sent to the last stream's end; each mode
runs `--rounds` times,
interleaved, after a warm-up round of each (the compilations), with fresh conversations every round (no
prefix-cache hits across rounds). The result records each round and the median, and each front's loss
against in-process. A gRPC round also records its streams' median TTFT and queue time on the server's clock
(from its receipt of the request, the final message's timings): the client's TTFT less the server's is the
way there and back, and the server's queue is the wait before the engine's first step for it. Every round
records, on the clients' clock (`time.time()`, one clock on one machine), when the engine took its first and
last request and how many steps it ran (`engine_clock`): a front's requests that reach the engine later than
in-process ones, or its extra steps, are where its loss goes. (The in-process TTFT runs from the engine's
receipt, after `LLM.chat` rendered every conversation; the gRPC server's from the call's receipt, before its
rendering: the two TTFT medians are not the same span.)
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("inproc", "grpc", "http")
# Turns as words of the word-level tokenizer below: t1 opens a turn, t2 closes it, t3 opens the answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}{% if add_generation_prompt %}t3{% endif %}"
)


def write_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary ("t0".."t{V-2}", then "</s>") with a chat
    template, so dummy-weight shapes can serve chat requests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["</s>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["</s>"])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, f)


def conversations(n: int, words: int, vocab: int, seed: int) -> list[list[dict]]:
    """`n` one-turn conversations of `words` random words (a word is a token), different for every seed."""
    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": " ".join(f"t{t}" for t in rng.integers(4, vocab - 1, size=words))}]
            for _ in range(n)]  # fmt: skip


# ---- the client process ---------------------------------------------------------------------------


async def _drive_grpc(target: str, convs, max_tokens: int) -> tuple[float, list[dict]]:
    from jalora.client import AsyncClient

    async with AsyncClient(target, timeout=3600) as client:
        await client.server_info()  # the channel is connected before the clock starts
        await _ready()

        async def one(messages):
            t0, first, tokens, timings = time.perf_counter(), None, 0, None
            async for chunk in client.chat_stream(messages, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - t0
                tokens += len(chunk.token_ids)
                timings = chunk.timings or timings  # (the last chunk's: the server's clock from its receipt)
            server = {"server_ttft": timings.time_to_first_token_seconds, "server_queue": timings.queue_seconds}
            return {"tokens": tokens, "ttft": first, **(server if timings else {})}

        t0, cpu = time.time(), time.process_time()
        rows = await asyncio.gather(*(one(m) for m in convs))
        t1 = time.time()
        return (t0, t1), rows, (time.process_time() - cpu) / (t1 - t0)


async def _drive_http(url: str, model: str, convs, max_tokens: int) -> tuple[float, list[dict]]:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600) as client:
        await client.models.list()  # a first connection before the clock starts
        await _ready()

        async def one(messages):
            t0, first, tokens = time.perf_counter(), None, 0
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                ids = chunk.choices[0].token_ids if chunk.choices else []
                if ids and first is None:
                    first = time.perf_counter() - t0
                tokens += len(ids)
            return {"tokens": tokens, "ttft": first}

        t0, cpu = time.time(), time.process_time()
        rows = await asyncio.gather(*(one(m) for m in convs))
        t1 = time.time()
        return (t0, t1), rows, (time.process_time() - cpu) / (t1 - t0)


async def _ready() -> None:
    """Connected: says so, then waits for the parent's go (every client process starts at once)."""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def drive(spec: dict) -> dict:
    """Runs one round of one front from a client process (the clock runs from the first request to the
    last stream's end); returns tokens, seconds and TTFTs."""
    if spec["mode"] == "grpc":
        span, rows, busy = asyncio.run(_drive_grpc(spec["target"], spec["conversations"], spec["max_tokens"]))
    else:
        drive_http = _drive_http(spec["url"], spec["model"], spec["conversations"], spec["max_tokens"])
        span, rows, busy = asyncio.run(drive_http)
    # client_busy: the client's CPU time over the round's wall time; near 1 (one event loop), the client
    # process was the limit, not the server.
    return {"span": span, "tokens": sum(r["tokens"] for r in rows), "ttft": [r["ttft"] for r in rows],
            "server_ttft": [r.get("server_ttft") for r in rows], "server_queue": [r.get("server_queue") for r in rows],
            "client_busy": busy}  # fmt: skip


# ---- the server process ---------------------------------------------------------------------------


def _summary(mode: str, round_: int, tokens: int, seconds: float, ttft: list) -> dict:
    ttft = [t for t in ttft if t is not None]
    return {"mode": mode, "round": round_, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ttft_median_s": statistics.median(ttft) if ttft else None}  # fmt: skip


@contextlib.contextmanager
def engine_clock(engine):
    """Yields a dict that, once the block ends, holds the wall-clock times (`time.time()`) at which `engine`
    took each request (`adds`) and ended each step (`steps`) within the block: the two methods are shadowed
    on the instance for its length (the server's engine thread and `LLM.chat` call them there)."""
    seen = {"adds": [], "steps": []}
    add_request, step = engine.add_request, engine.step

    def timed_add_request(*args, **kwargs):
        out = add_request(*args, **kwargs)
        seen["adds"].append(time.time())
        return out

    def timed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen["steps"].append(time.time())
        return out

    before = {name: engine.__dict__[name] for name in ("add_request", "step") if name in engine.__dict__}
    engine.add_request, engine.step = timed_add_request, timed_step
    try:
        yield seen
    finally:
        del engine.add_request, engine.step  # (the class's methods again, or what the instance held before)
        engine.__dict__.update(before)


def _engine_summary(seen: dict, start: float) -> dict:
    """When the engine took its first and last request and ended its first step, from the round's start, and
    how many steps it ran."""
    adds, steps = seen["adds"], seen["steps"]
    return {"engine_first_add_s": adds[0] - start if adds else None,
            "engine_last_add_s": adds[-1] - start if adds else None,
            "engine_first_step_end_s": steps[0] - start if steps else None, "engine_steps": len(steps)}  # fmt: skip


def run_inproc(llm, convs, max_tokens: int, round_: int) -> dict:
    from jalora import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with engine_clock(llm.engine) as seen:
        start, t0 = time.time(), time.perf_counter()
        outs = llm.chat(convs, params)
        seconds = time.perf_counter() - t0
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    summary = _summary("inproc", round_, sum(len(o.token_ids) for o in outs), seconds, ttft)
    return {**summary, **_engine_summary(seen, start)}


def run_front(llm, mode: str, convs, max_tokens: int, round_: int, clients: int) -> dict:
    from server.app import ServerThread
    from server.config import ServerConfig

    config = ServerConfig(port=0, http_port=0 if mode == "http" else None, model_name="bench",
                          max_pending_requests=max(256, 2 * len(convs)))  # fmt: skip
    with ServerThread(llm.engine, config) as server:
        spec = {"mode": mode, "target": server.target, "conversations": convs, "max_tokens": max_tokens,
                "url": server.http_url if mode == "http" else None, "model": "bench"}  # fmt: skip
        # The repository first, then whatever the caller's path holds (packages installed beside it).
        path = os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
        # Several client processes, each with its share of the streams, started together once all are
        # connected: one Python client (an event loop, a JSON or protobuf parse per chunk) can be the
        # limit before the server is.
        procs = []
        for i in range(clients):
            part = {**spec, "conversations": convs[i::clients]}
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.http_bench", "--drive"], env=env, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            procs[-1].stdin.write(json.dumps(part) + "\n")
            procs[-1].stdin.flush()
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {mode} client process failed:\n{p.communicate()[1][-3000:]}")
        got = []
        with engine_clock(llm.engine) as clock:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            for p in procs:
                out, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"a {mode} client process failed:\n{err[-3000:]}")
                got.append(json.loads(out.strip().splitlines()[-1]))
    seconds = max(g["span"][1] for g in got) - min(g["span"][0] for g in got)
    summary = _summary(mode, round_, sum(g["tokens"] for g in got), seconds, [t for g in got for t in g["ttft"]])
    # Where a stream's first token waited (gRPC: the server's clock, from its receipt of the request): the
    # client's TTFT less the server's is the way there and back; the server's queue, before its first step.
    for key in ("server_ttft", "server_queue"):
        seen = [t for g in got for t in g.get(key, []) if t is not None]
        if seen:
            summary[f"{key}_median_s"] = statistics.median(seen)
    engine = _engine_summary(clock, min(g["span"][0] for g in got))
    return {**summary, **engine, "clients": clients, "client_busy": [round(g["client_busy"], 3) for g in got]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="words (tokens) of each conversation's turn")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds of each mode, after a warm-up round")
    ap.add_argument("--clients", type=int, default=4, help="client processes sharing the streams (gRPC and HTTP)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="fronts to measure (in-process always runs: the others' losses are against it; "
                         "http needs the server's HTTP extras)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 8 streams of 24 tokens, 1 round (CPU)")
    ap.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)  # the client process
    ap.add_argument("--out", default=None, help="result file (default bench/results/http_bench.json)")
    args = ap.parse_args(argv)
    if args.drive:
        print(json.dumps(drive(json.loads(sys.stdin.readline()))))
        return {}
    modes = [m for m in MODES if m == "inproc" or m in args.modes]
    if args.smoke:
        args.preset, args.streams, args.prompt_tokens, args.max_tokens, args.rounds = "tiny", 8, 24, 8, 1

    from bench.harness import GRANITE_8B, TINY, result_path, run_metadata, save, write_model_dir
    from jalora import LLM

    meta = run_metadata(__spec__.name, argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    model_dir = write_model_dir(tempfile.mkdtemp(prefix="jalora-bench-"), cfg)
    write_tokenizer(model_dir, cfg["vocab_size"])
    prompt_len = args.prompt_tokens + 4  # the template's t1 .. t2 t3
    llm = LLM(model_dir, dtype="bfloat16", load_format="dummy", max_num_seqs=args.streams,
              max_num_batched_tokens=max(2048, prompt_len), max_model_len=prompt_len + args.max_tokens + 16,
              warmup=True)  # fmt: skip

    def run(mode: str, round_: int) -> dict:
        convs = conversations(args.streams, args.prompt_tokens, cfg["vocab_size"], 1000 * round_ + MODES.index(mode))
        if mode == "inproc":
            return run_inproc(llm, convs, args.max_tokens, round_)
        return run_front(llm, mode, convs, args.max_tokens, round_, args.clients)

    warmup = [run(mode, 0) for mode in modes]
    rounds = [run(mode, r) for r in range(1, args.rounds + 1) for mode in modes]
    median = {m: statistics.median(r["tokens_per_s"] for r in rounds if r["mode"] == m) for m in modes}
    result = {
        **meta, "preset": args.preset, "streams": args.streams, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "clients": args.clients, "rounds": rounds, "warmup_rounds": warmup,
        "median_tokens_per_s": median,
        "loss_vs_inproc": {m: 1 - median[m] / median["inproc"] for m in modes if m != "inproc"},
    }  # fmt: skip
    path = save(result_path(args.out, "http_bench.json", smoke=args.preset == "tiny"), result)
    for m in modes:
        loss = "" if m == "inproc" else f"  ({-100 * result['loss_vs_inproc'][m]:+.1f}% vs in-process)"
        print(f"{m:>7}: {median[m]:10.1f} completion tokens/s{loss}")
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
