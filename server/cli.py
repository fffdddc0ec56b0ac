"""`jalora` command line: serve a model over gRPC, generate from it, run the base + aLoRA judge pipeline.

    jalora serve                              # the embedded default model and its aLoRA judges
    jalora serve --model DIR --adapter judge=DIR --port 50051
    jalora generate "Why is the sky blue?" --max-tokens 32
    jalora pipeline                           # base answers, then every aLoRA judge scores the answer

`serve` and `demo` derive their engine and server flags from the fields of `EngineConfig`
(jalora/config.py) and `ServerConfig` (server/config.py): `--field-name`, with the field's type,
default, help and choices, and `--flag/--no-flag` for a bool field. The configs are built (and so
validated) before any slow work: a bad value ends the command with `jalora <command>: <field>:
<message>` and exit status 2 before the model is read.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoints import DEFAULT_MODEL_DIR
from jalora.api import DEFAULT_TARGET, DEFAULT_TIMEOUT
from jalora.config import EngineConfig
from jalora.errors import InvalidRequestError
from server.config import ServerConfig

if TYPE_CHECKING:
    from jalora.engine.llm_engine import LLMEngine

DEFAULT_QUESTION = "Question: what does a prefix cache save when several adapters judge one answer?\nAnswer:"


# ---- flags derived from the configs --------------------------------------------------------------


def _flag_type(hint: Any) -> Any:
    """The type a flag parses: `int | None` -> int (None stays the field's default)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no flag type for {hint}")
        return args[0]
    return hint


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (), notes: dict[str, str] | None = None
) -> None:
    """Adds one flag per field of the config dataclass `cls` (but `exclude`) to a group of `parser`.

    `--field-name` stores to `field_name`, with the field's default, its metadata's help (plus
    `notes[field]`), choices and metavar; the type comes from the annotation (`int | None` parses as
    int); a bool field is a `--name/--no-name` pair; a `tuple[str, ...]` field is a repeatable flag.
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} ({cls.__module__})")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = _flag_type(hints[f.name])
        help_text = (f.metadata["help"] + (notes or {}).get(f.name, "")).replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=f.name, default=f.default, help=help_text)
        for key in ("choices", "metavar"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs.update(action="append", type=typing.get_args(kind)[0], default=list(f.default))
        else:
            kwargs["type"] = kind
        action = group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        if f.default not in (None, "", ()) and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"


def config_from_args(cls: type, args: argparse.Namespace, **changes: Any) -> Any:
    """`cls` built from the flags `add_config_flags` added (plus `changes`); validates on construction."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **changes})


# ---- serve ---------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """What `serve` / `demo` will run, validated before any slow work."""

    engine_config: EngineConfig
    server_config: ServerConfig
    adapters: tuple[tuple[str, str], ...]  # (name, directory) loaded at start


def serve_plan(args: argparse.Namespace) -> ServePlan:
    """The configs and start-up adapters from the flags. Raises InvalidRequestError naming the field.

    Without --model: the embedded default (checkpoints.DEFAULT_MODEL_DIR), its adapters unless
    --adapter names others, and its adapters folder as root unless --adapter-roots names others.
    --max-loras is raised to the number of start-up adapters.
    """
    embedded = not args.model
    model_dir = DEFAULT_MODEL_DIR if embedded else Path(args.model)
    engine_config = config_from_args(EngineConfig, args, model=str(model_dir))
    server_config = config_from_args(ServerConfig, args)
    adapters = list(args.adapter)
    if embedded:
        adapters = adapters or _default_adapters(model_dir)
        if not server_config.adapter_roots:
            server_config = server_config.replace(adapter_roots=(str(model_dir / "adapters"),))
    engine_config = engine_config.replace(max_loras=max(engine_config.max_loras, len(adapters)))
    if model_dir.suffix.lower() == ".gguf":  # the engine converts it (jalora/model/gguf.py, is_gguf)
        if not model_dir.is_file():
            raise InvalidRequestError("model", f"{model_dir} does not exist")
    elif not (model_dir / "config.json").is_file():
        raise InvalidRequestError("model", f"{model_dir} has no config.json")
    return ServePlan(engine_config, server_config, tuple(adapters))


def build_engine(plan: ServePlan) -> LLMEngine:
    """The slow part: loads the model and the start-up adapters, and compiles the adapted steps."""
    from jalora.engine.llm_engine import LLMEngine

    print(f"jalora: loading {plan.engine_config.model}", file=sys.stderr, flush=True)
    engine = LLMEngine(plan.engine_config)
    for name, path in plan.adapters:
        info = engine.load_adapter(name, path)
        inv = f" invocation={info.invocation_tokens}" if info.invocation_tokens else ""
        print(f"jalora: adapter {name} ({info.kind}, r={info.rank}){inv}", file=sys.stderr, flush=True)
    engine.warmup_adapters()
    return engine


def _serve(args: argparse.Namespace) -> int:
    from server.app import JaloraServer

    plan = serve_plan(args)
    engine = build_engine(plan)

    async def run() -> None:
        server = JaloraServer(engine, plan.server_config)
        await server.start()
        # Tests and scripts read this line to learn the port (--port 0 picks a free one).
        print(f"jalora serving on {server.address}", flush=True)
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

    plan = serve_plan(args)
    engine = build_engine(plan)
    with ServerThread(engine, plan.server_config) as server:
        print(f"jalora serving on {server.target}", flush=True)
        args.target = server.target
        return _pipeline(args)


# ---- entry point ---------------------------------------------------------------------------------


def _call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline of each call, seconds")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the server to be SERVING")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("JALORA_TARGET", DEFAULT_TARGET), help="host:port")
    _call_args(p)


def _serve_args(p: argparse.ArgumentParser, *, exclude_server: tuple[str, ...] = ()) -> None:
    """Engine and server flags (derived from EngineConfig and ServerConfig) plus the start-up adapters."""
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="load a PEFT (a)LoRA adapter at start (repeatable)")  # fmt: skip
    notes = {"model": f" (default: the embedded {DEFAULT_MODEL_DIR}, its adapters and its adapters folder as root)"}
    add_config_flags(p, EngineConfig, notes=notes)
    add_config_flags(p, ServerConfig, exclude=exclude_server)


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
    _serve_args(s)
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="stream one generation from a running server")
    g.add_argument("prompt")
    g.add_argument("--adapter")
    g.add_argument("--with-invocation", action="store_true", help="append the adapter's invocation sequence")
    g.add_argument("--token-ids", action="store_true", help="PROMPT is a list of token ids")
    g.add_argument("--show-ids", action="store_true", help="print token ids instead of text")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=None, help="default: the server's (greedy)")
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
    _serve_args(d, exclude_server=("port",))
    _pipeline_args(d)
    _call_args(d)
    d.set_defaults(func=_demo, rounds=2, port=0)  # a free port: the pipeline runs in this process
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from jalora.client import ServerError

    try:
        return args.func(args)
    except InvalidRequestError as err:  # a bad flag value (the field is in the message) or model
        print(f"jalora {args.command}: {err}", file=sys.stderr)
        return 2
    except ServerError as err:
        print(f"jalora {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
