"""`jalora` command line: serve a model over gRPC, generate from it, run the base + aLoRA judge pipeline.

    jalora serve                              # the embedded default model and its aLoRA judges
    jalora serve --model DIR --adapter judge=DIR --port 50051
    jalora generate "Why is the sky blue?" --max-tokens 32
    jalora pipeline                           # base answers, then every aLoRA judge scores the answer
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from checkpoints import DEFAULT_MODEL_DIR
from jalora.api import DEFAULT_TARGET

DEFAULT_QUESTION = "Question: what does a prefix cache save when several adapters judge one answer?\nAnswer:"


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _default_adapters(model_dir: Path) -> list[tuple[str, str]]:
    root = model_dir / "adapters"
    if not root.is_dir():
        return []
    return sorted((d.name, str(d)) for d in root.iterdir() if (d / "adapter_config.json").is_file())


# ---- serve ---------------------------------------------------------------------------------------


def _build_llm(args: argparse.Namespace):
    """The engine `serve` and `demo` run: the model, its adapters and the adapter roots."""
    from jalora import LLM

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        print(f"jalora {args.command}: {model_dir} has no config.json", file=sys.stderr)
        return None, model_dir, []
    adapters = list(args.adapter)
    roots = list(args.adapter_root)
    if args.model is None:  # the embedded default: its judges, and its adapters folder as root
        adapters = adapters or _default_adapters(model_dir)
        roots = roots or [str(model_dir / "adapters")]
    engine_args = dict(
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_loras=max(args.max_loras, len(adapters)),
        max_lora_rank=args.max_lora_rank,
        enable_prefix_caching=not args.no_prefix_caching,
        async_scheduling=not args.no_async_scheduling,
    )
    print(f"jalora: loading {model_dir}", file=sys.stderr, flush=True)
    llm = LLM(str(model_dir), **engine_args)
    for name, path in adapters:
        info = llm.load_adapter(name, path)
        inv = f" invocation={info.invocation_tokens}" if info.invocation_tokens else ""
        print(f"jalora: adapter {name} ({info.kind}, r={info.rank}){inv}", file=sys.stderr, flush=True)
    llm.engine.warmup_adapters()
    return llm, model_dir, roots


def _serve(args: argparse.Namespace) -> int:
    from server.app import JaloraServer
    from server.config import ServerConfig

    llm, model_dir, roots = _build_llm(args)
    if llm is None:
        return 2

    async def run() -> None:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            adapter_roots=roots,
            max_pending_requests=args.max_pending_requests,
            grace=args.grace,
            model_name=str(model_dir),
        )
        server = JaloraServer(llm.engine, config)
        port = await server.start()
        # Tests and scripts read this line to learn the port (--port 0 picks a free one).
        print(f"jalora serving on {args.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        await stop.wait()
        print("jalora: shutting down", file=sys.stderr, flush=True)
        await server.stop()

    asyncio.run(run())
    return 0


# ---- generate ------------------------------------------------------------------------------------


def _connect(args: argparse.Namespace):
    from jalora.client import Client

    client = Client(args.target, timeout=args.timeout)
    client.wait_until_serving(timeout=args.wait)
    return client


def _generate(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        prompt: str | list[int] = args.prompt
        if args.token_ids:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        if args.adapter and args.with_invocation:
            prompt = client.with_invocation(prompt, args.adapter)
        last = None
        for chunk in client.generate_stream(
            prompt,
            args.adapter,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        ):
            if args.show_ids:
                print(" ".join(map(str, chunk.token_ids)), end=" ", flush=True)
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        print()
        u, t = last.usage, last.timings
        print(
            f"[{last.finish_reason}] prompt={u.prompt_tokens} completion={u.completion_tokens} "
            f"cached={u.cached_tokens} activation={last.activation_index} "
            f"queue={t.queue_seconds * 1e3:.1f}ms ttft={t.time_to_first_token_seconds * 1e3:.1f}ms "
            f"total={t.total_seconds * 1e3:.1f}ms",
            file=sys.stderr,
        )
    return 0


# ---- pipeline ------------------------------------------------------------------------------------


def _pipeline(args: argparse.Namespace) -> int:
    """Base answers the question, then each aLoRA judge reads question + answer + its invocation.

    The judges' prompts start with the base request's tokens, so their KV comes from the prefix cache
    (the `cached` column): that reuse across base and adapters is what jalora is for.
    """
    with _connect(args) as client:
        adapters = {a.name: a for a in client.list_adapters()}
        names = args.judge or sorted(n for n, a in adapters.items() if a.kind == "alora")
        missing = [n for n in names if n not in adapters]
        if missing:
            print(f"jalora pipeline: adapters not loaded: {missing}", file=sys.stderr)
            return 2
        if not names:
            print("jalora pipeline: the server has no aLoRA adapters to judge with", file=sys.stderr)
            return 2
        question = client.tokenize(args.question)
        rows = []
        for _ in range(args.rounds):
            base = client.generate(question, max_tokens=args.max_tokens, temperature=0.0)
            rows.append(("base", base))
            context = question + base.token_ids
            for name in names:
                judge = client.generate(
                    context + list(adapters[name].invocation_tokens), name, max_tokens=args.judge_max_tokens
                )
                rows.append((name, judge))
        print(f"question: {args.question!r}")
        print(f"answer:   {rows[0][1].text!r}")
        header = f"{'call':<16}{'prompt':>7}{'cached':>7}{'new':>5}{'activ.':>7}{'queue ms':>10}{'ttft ms':>9}"
        print(header + f"{'total ms':>10}  text")
        for name, r in rows:
            t = r.timings
            act = "-" if r.activation_index is None else str(r.activation_index)
            print(
                f"{name:<16}{r.usage.prompt_tokens:>7}{r.usage.cached_tokens:>7}{r.usage.completion_tokens:>5}"
                f"{act:>7}{t.queue_seconds * 1e3:>10.1f}{t.time_to_first_token_seconds * 1e3:>9.1f}"
                f"{t.total_seconds * 1e3:>10.1f}  {r.text!r}"
            )
        judge_rows = [r for n, r in rows if n != "base"]
        prompt = sum(r.usage.prompt_tokens for r in judge_rows)
        cached = sum(r.usage.cached_tokens for r in judge_rows)
        print(f"judges reused {cached}/{prompt} prompt tokens from the prefix cache ({cached / prompt:.0%})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """`jalora serve` on a free loopback port, in this process, and the pipeline against it over gRPC."""
    from server.app import ServerThread
    from server.config import ServerConfig

    llm, model_dir, roots = _build_llm(args)
    if llm is None:
        return 2
    config = ServerConfig(host=args.host, port=0, adapter_roots=roots, model_name=str(model_dir))
    with ServerThread(llm.engine, config) as server:
        print(f"jalora serving on {server.target}", flush=True)
        args.target = server.target
        return _pipeline(args)


# ---- entry point ---------------------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("JALORA_TARGET", DEFAULT_TARGET), help="host:port")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each call, seconds")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server to be SERVING")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"HF model directory (default: the embedded {DEFAULT_MODEL_DIR})")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="load a PEFT (a)LoRA adapter at start (repeatable)")  # fmt: skip
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="LoadAdapter accepts only paths under these (repeatable)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each step back before enqueuing the next (default: overlap host and device)")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--judge", action="append", default=[], help="adapter name (default: every aLoRA)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens of the base answer")
    p.add_argument("--judge-max-tokens", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="repeat the pipeline (later rounds hit the cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jalora", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model and its adapters over gRPC")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    _engine_args(s)
    s.add_argument("--max-pending-requests", type=int, default=256,
                   help="requests in flight before new ones get RESOURCE_EXHAUSTED")  # fmt: skip
    s.add_argument("--grace", type=float, default=5.0, help="seconds running calls get at shutdown")
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="stream one generation from a running server")
    g.add_argument("prompt")
    g.add_argument("--adapter")
    g.add_argument("--with-invocation", action="store_true", help="append the adapter's invocation sequence")
    g.add_argument("--token-ids", action="store_true", help="PROMPT is a list of token ids")
    g.add_argument("--show-ids", action="store_true", help="print token ids instead of text")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    _client_args(g)
    g.set_defaults(func=_generate)

    p = sub.add_parser("pipeline", help="base answers, then aLoRA judges score the answer over gRPC")
    _pipeline_args(p)
    _client_args(p)
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="serve (default: the embedded model) on a free port and run the pipeline")
    _engine_args(d)
    _pipeline_args(d)
    d.add_argument("--timeout", type=float, default=600.0, help="deadline of each call, seconds")
    d.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server to be SERVING")
    d.set_defaults(func=_demo, rounds=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from jalora.client import ServerError

    try:
        return args.func(args)
    except ServerError as err:
        print(f"jalora {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
