"""`jalora` command line: serve a model over gRPC, generate from it, run the base + aLoRA judge pipeline.

    jalora serve                              # SmolLM2-135M-Instruct and its aLoRA judges
    jalora serve --model DIR --adapter judge=DIR --port 50051
    jalora generate "Why is the sky blue?" --chat --max-tokens 32
    jalora pipeline                           # base answers, then every aLoRA judge scores the answer
    jalora demo                               # serve + pipeline in one process, on a free port
    jalora train --data d.jsonl --output-dir judge --invocation $'<|im_start|>judge\\n'   # train an aLoRA

--model takes a model directory, a llama .gguf file, or a bundled model's name (checkpoints/bundled.py):
`smollm2` (the default; fetched and converted the first time) or `tiny` (random weights, instant).

`serve` and `demo` derive their engine and server flags from the fields of `EngineConfig`
(jalora/config.py) and `ServerConfig` (server/config.py): `--field-name`, with the field's type,
default, help and choices, and `--flag/--no-flag` for a bool field. The configs are built (and so
validated) before any slow work: a bad value ends the command with `jalora <command>: <field>:
<message>` and exit status 2 before the model is read. So does what `serve` / `demo` need from the
machine (`preflight`): every `--adapter` directory holds a PEFT adapter's two files, every adapter root
exists, the TLS files hold a certificate and its key, the address can be bound; each problem is one line
`jalora <command>: <what>: <problem>`. A --host that is not loopback needs TLS and client authentication
(or --insecure): ServerConfig refuses it.

`generate` and `pipeline` talk to the server at --target: one health check, and no SERVING server
there ends the command (one line, exit 1), unless --wait SECONDS gives a starting server that long.
--tls / --tls-ca / --tls-cert / --tls-key and --token-file take them to a server with TLS and a token.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import time
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jalora.api import DEFAULT_TARGET, DEFAULT_TIMEOUT, read_token_file
from jalora.api.limits import ADAPTER_NAME_RULE, MAX_INT32, is_adapter_name
from jalora.config import EngineConfig
from jalora.errors import InvalidRequestError
from server import logs
from server.config import ServerConfig

if TYPE_CHECKING:
    from jalora.engine.llm_engine import LLMEngine

MULTIHOST_TIMEOUT = 300  # seconds the processes of a group may take to find each other

DEFAULT_QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Why is the sky blue? Answer in one sentence.",
)


# ---- flags derived from the configs --------------------------------------------------------------


def _flag_type(hint: Any) -> Any:
    """The type a flag parses: `int | None` -> int (None stays the field's default)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"no flag type for {hint}")
        return args[0]
    return hint


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, `(default: VALUE)`, unless the help already says what
    the default is, `default: ...` (a default of None usually means something: "default: the model's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if help_text and action.option_strings and action.default is not argparse.SUPPRESS:
            if not re.search(r"default( here)?:", help_text):
                help_text += " (default: %(default)s)"
        return help_text


def _override_defaults(parser: argparse.ArgumentParser, **values) -> None:
    """`parser.set_defaults(**values)`, and a help that states its field's own default (`default: ...`) states
    this subcommand's instead."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values and action.option_strings and "default:" in (action.help or ""):
            action.help = re.sub(r"\(default: [^)]*\)", "(default here: %(default)s)", action.help)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (), notes: dict[str, str] | None = None
) -> None:
    """Adds one flag per field of the config dataclass `cls` (but `exclude`) to a group of `parser`.

    `--field-name` stores to `field_name`, with the field's default, its metadata's help (plus
    `notes[field]`), choices and metavar; the type comes from the annotation (`int | None` parses as
    int); a bool field is a `--name/--no-name` pair; a `tuple[str, ...]` field is a repeatable flag.
    The parser's HelpFormatter shows each default.
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
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


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


def _adapters_in(root: Path) -> list[tuple[str, str]]:
    """(name, directory) of every PEFT adapter directly under `root`."""
    if not root.is_dir():
        return []
    return sorted((d.name, str(d)) for d in root.iterdir() if (d / "adapter_config.json").is_file())


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """What `serve` / `demo` will run, validated before any slow work."""

    engine_config: EngineConfig
    server_config: ServerConfig
    adapters: tuple[tuple[str, str], ...]  # (name, directory) loaded at start
    bundled: str | None = None  # a bundled model's name (checkpoints/bundled.py), until resolve_bundled


def serve_plan(args: argparse.Namespace) -> ServePlan:
    """The configs and start-up adapters from the flags, without reading a file. Raises
    InvalidRequestError naming the field.

    --model defaults to the bundled SmolLM2 (checkpoints.bundled.DEFAULT); a bundled name is resolved
    later (resolve_bundled: it may download and convert). --max-loras is raised to the number of
    start-up adapters (--max-cpu-loras instead where it is set: those beyond the slots wait in host memory).
    """
    from checkpoints import bundled

    model = args.model or bundled.DEFAULT
    engine_config = config_from_args(EngineConfig, args, model=model)
    server_config = config_from_args(ServerConfig, args)
    adapters = tuple(args.adapter)
    engine_config = _room_for(engine_config, len(adapters))
    if model in bundled.names() and not os.path.exists(model):
        return ServePlan(engine_config, server_config, adapters, bundled=model)
    path = Path(model)
    if path.suffix.lower() == ".gguf":  # the engine converts it (jalora/model/gguf.py, is_gguf)
        if not path.is_file():
            raise InvalidRequestError("model", f"{path} does not exist")
    elif not (path / "config.json").is_file():
        raise InvalidRequestError("model", f"{path} has no config.json")
    return ServePlan(engine_config, server_config, adapters)


def _room_for(config: EngineConfig, adapters: int) -> EngineConfig:
    """`config` able to load `adapters` adapters at start: max_loras raised to that many, or max_cpu_loras
    where it is set."""
    if config.max_cpu_loras is None:
        return config.replace(max_loras=max(config.max_loras, adapters))
    return config.replace(max_cpu_loras=max(config.max_cpu_loras, adapters))


def resolve_bundled(plan: ServePlan) -> ServePlan:
    """For a bundled model: its files (fetched and converted the first time), its judges as the start-up
    adapters unless --adapter named others, and their folder as adapter root unless --adapter-roots
    named others."""
    if plan.bundled is None:
        return plan
    from checkpoints import bundled

    found = bundled.resolve(plan.bundled)
    assert found is not None, plan.bundled
    adapters = plan.adapters or tuple(_adapters_in(found.adapters_root))
    server_config = plan.server_config
    if not server_config.adapter_roots:
        server_config = server_config.replace(adapter_roots=(str(found.adapters_root),))
    engine_config = _room_for(plan.engine_config.replace(model=found.model), len(adapters))
    return ServePlan(engine_config, server_config, adapters)


def prepare(args: argparse.Namespace, follower: bool | None = None) -> ServePlan:
    """serve_plan, preflight, resolve_bundled: every check that takes a moment before any that takes
    longer (a busy port fails before a download). A follower of a process group (--process-id above 0)
    serves nothing and reads no adapter (process 0 sends them): its ports and adapter directories are not
    checked, only the names (they size its engine as process 0's). `follower` None: from --process-id."""
    plan = serve_plan(args)
    preflight(plan, follower=bool(getattr(args, "process_id", None)) if follower is None else follower)
    return resolve_bundled(plan)


class StartupError(Exception):
    """What stops `serve` / `demo` before the model loads (a missing adapter directory, a busy port):
    one line per problem, each naming what it is about."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _adapter_dir_problem(path: str) -> str | None:
    """Why `path` is not a PEFT adapter directory, by its files only (loading validates the contents)."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        return f"{path} has no {' and no '.join(missing)} (a PEFT adapter directory holds both)"
    return None


def _bind_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, found by binding it once now (and letting go).

    Like gRPC: SO_REUSEADDR (a port in TIME_WAIT is free), and any one resolved address will do. The
    gRPC server itself binds after the warm-up: a socket bound earlier would accept connections it
    does not serve, and a client would hang instead of being refused.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"host {host}: {e.strerror}"
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                return None
            except OSError as e:
                error = error or e
    assert error is not None
    reason = error.strerror or str(error)
    reason = reason[:1].lower() + reason[1:]
    return f"port {port}: {reason}" if error.errno in (errno.EADDRINUSE, errno.EACCES) else f"host {host}: {reason}"


def _tls_problems(config: ServerConfig) -> list[str]:
    """Why the config's PEM files would not make a TLS server (ServerConfig checked they are readable)."""
    return _pem_problems(("tls_cert", config.tls_cert), ("tls_key", config.tls_key),
                         ("tls_client_ca", config.tls_client_ca))  # fmt: skip


def _pem_problems(cert: tuple[str, str | None], key: tuple[str, str | None], ca: tuple[str, str | None]) -> list[str]:
    """Why PEM files, each (field or flag, path or None), would not make a TLS end: a certificate chain and its
    private key, and root certificates. Python's ssl module parses them as OpenSSL will when gRPC loads them;
    an encrypted key counts as unreadable (gRPC takes no password)."""
    problems = []

    def certificates(field: str, path: str) -> bool:
        try:
            ssl.create_default_context(cafile=path)
            return True
        except ssl.SSLError:
            problems.append(f"{field}: {path} holds no PEM certificate")
            return False

    (cert_field, cert_path), (key_field, key_path) = cert, key
    if cert_path is not None and certificates(cert_field, cert_path):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=b"")
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                problems.append(f"{key_field}: {key_path} is not the private key of {cert_path}")
            else:
                problems.append(f"{key_field}: {key_path} holds no unencrypted PEM private key")
    if ca[1] is not None:
        certificates(*ca)
    return problems


def preflight(plan: ServePlan, follower: bool = False) -> None:
    """Checks what `build_engine` and the server will need from the file system and the network, so
    that a typo fails in a moment instead of after the model load and the compilation (`follower`: the
    adapters' names only, see `prepare`).

    Raises StartupError listing every problem found."""
    problems = []
    seen = set()
    for name, path in plan.adapters:
        if name in seen:
            problems.append(f"adapter {name}: given twice")
        seen.add(name)
        if not is_adapter_name(name):
            problems.append(f"adapter {name}: not an adapter name ({ADAPTER_NAME_RULE})")
        problem = None if follower else _adapter_dir_problem(path)
        if problem:
            problems.append(f"adapter {name}: {problem}")
    if follower:
        if problems:
            raise StartupError(problems)
        return
    for root in plan.server_config.adapter_roots:
        if not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "does not exist"
            problems.append(f"adapter_roots: {root} {what}")
    problems += _tls_problems(plan.server_config)
    config = plan.server_config
    problem = _bind_problem(config.host, config.port)
    if problem:
        problems.append(problem)
    if not (problem or "").startswith("host"):
        for field in ("metrics_port", "http_port"):
            port = getattr(config, field)
            problem = None if port is None else _bind_problem(config.host, port)  # "port N: ..." (the host did bind)
            if problem:
                problems.append(f"{field.removesuffix('port')}{problem}")
    if problems:
        raise StartupError(problems)


def build_engine(plan: ServePlan) -> LLMEngine:
    """The slow part: loads the model and the start-up adapters, and compiles every step variant (the
    base-only and adapted ones together, when there are start-up adapters)."""
    from jalora.engine import multihost
    from jalora.engine.llm_engine import LLMEngine

    logs.say(f"jalora: loading {plan.engine_config.model}")
    config = plan.engine_config
    # With start-up adapters on one process, the base steps compile together with the adapted ones
    # after the adapters are loaded (the warm-up then waits for its longest compilation once).
    together = config.warmup and bool(plan.adapters) and not multihost.is_multihost()
    engine = LLMEngine(config.replace(warmup=False) if together else config)
    try:
        for name, path in plan.adapters:
            try:
                info = engine.load_adapter(name, path)
            except InvalidRequestError as e:  # which of the start-up adapters, then what is wrong with it
                raise StartupError([f"adapter {name}: {e}"]) from None
            inv = f" invocation={info.invocation_tokens}" if info.invocation_tokens else ""
            logs.say(f"jalora: adapter {name} ({info.kind}, r={info.rank}){inv}")
        if config.warmup:  # --no-warmup compiles nothing before serving, adapted steps included
            engine.warmup_adapters(with_base=together)
    except BaseException as e:
        # A multi-host process 0 lets its followers go (they would wait for its next call until JAX's
        # shutdown barrier gave up on them), telling them why.
        engine.close(_failure(e))
        raise
    return engine


def _failure(e: BaseException) -> str:
    """Why process 0 stops, in a line for its followers to print."""
    if isinstance(e, StartupError):
        return "; ".join(e.problems)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{type(e).__name__}: {e}" if isinstance(e, Exception) else type(e).__name__


def _asks_for_group(args: argparse.Namespace) -> bool:
    return args.multihost or any(
        value is not None for value in (args.coordinator_address, args.num_processes, args.process_id)
    )


def _check_group(args: argparse.Namespace) -> None:
    """The multi-host flags, checked before the model is read. A flag that only applies to a group is refused
    without one, rather than ignored."""
    from jalora.engine import multihost

    if _asks_for_group(args):
        timeout = MULTIHOST_TIMEOUT if args.multihost_timeout is None else args.multihost_timeout
        multihost.check_group(args.coordinator_address, args.num_processes, args.process_id, timeout)
        return
    for flag in ("--multihost-key-file", "--multihost-timeout"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise InvalidRequestError(flag, "applies to a group of processes: give it with --coordinator-address, "
                                      "--num-processes and --process-id, or with --multihost")  # fmt: skip


def _start_multihost(args: argparse.Namespace) -> bool:
    """Joins the process group of a multi-host engine if the flags ask for one; True if this process
    follows (it runs process 0's steps and serves nothing)."""
    if not _asks_for_group(args):
        return False
    from jalora.engine import multihost

    key = _flag_file("--multihost-key-file", args.multihost_key_file) if args.multihost_key_file else None
    timeout = MULTIHOST_TIMEOUT if args.multihost_timeout is None else args.multihost_timeout
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id, key, timeout)
    import jax

    logs.say(f"jalora: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices in all")
    return jax.process_index() != 0


def _serve(args: argparse.Namespace) -> int:
    from server.app import JaloraServer, format_address

    _check_group(args)
    # With --multihost each process learns its index from JAX once the group forms: until then every one is
    # checked as a follower is (the adapter names), and process 0 checks the rest after joining.
    deferred = bool(args.multihost)
    plan = prepare(args, follower=True if deferred else None)
    if _start_multihost(args):
        from jalora.engine import multihost
        from jalora.engine.llm_engine import LLMEngine

        # Process 0 sends adapters and warm-up; the follower ends when process 0 stops.
        failure = multihost.run_follower(lambda: LLMEngine(plan.engine_config))
        if failure is not None:
            print(f"jalora serve: process 0 stopped: {failure}", file=sys.stderr, flush=True)
            return 1
        return 0
    if deferred:
        preflight(plan)
    engine = build_engine(plan)
    lost: list[str] = []  # why a multi-host group was lost, once it is
    engine.on_failure(lost.append)

    async def run() -> None:
        server = JaloraServer(engine, plan.server_config)
        loop = asyncio.get_running_loop()  # a lost host: NOT_SERVING (the engine refuses every step)
        engine.on_failure(
            lambda reason: loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.not_serving(reason)))
        )
        try:
            await server.start()
        except OSError as e:  # preflight could bind them: someone took a port during the warm-up
            config = plan.server_config
            if server.port is not None:  # the gRPC port was bound: the metrics or the HTTP port was not
                field = "http_port" if "HTTP" in str(e) else "metrics_port"
                raise StartupError([f"{field} {getattr(config, field)}: {e}"]) from None
            raise StartupError([f"port {config.port}: cannot listen on {server.address}"]) from None
        # Tests and scripts read this line to learn the port (--port 0 picks a free one).
        print(f"jalora serving on {server.address}", flush=True)
        if server.metrics_port is not None:
            metrics = format_address(plan.server_config.host, server.metrics_port)
            logs.say(f"jalora: Prometheus metrics on http://{metrics}/metrics")
        if server.http_address is not None:
            scheme = "https" if plan.server_config.tls_cert is not None else "http"
            # Tests and scripts read this line to learn the HTTP port too.
            print(f"jalora OpenAI-compatible HTTP on {scheme}://{server.http_address}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second signal: the running calls end now
                print("jalora: ending the running calls now", file=sys.stderr, flush=True)
                asyncio.ensure_future(server.stop(0))
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        await stop.wait()
        # Health turns NOT_SERVING and new calls get UNAVAILABLE at once; running streams get the grace.
        grace = plan.server_config.grace
        logs.say(f"jalora: shutting down; running calls get up to {grace:g} s (a second signal ends them now)")
        await server.stop()

    try:
        asyncio.run(run())
    except BaseException as e:
        engine.close(_failure(e))  # a multi-host engine's followers stop too, told why
        raise
    engine.close()
    if lost:  # JAX's shutdown at exit would wait for the lost process until its coordination service aborted this
        print(f"jalora serve: stopped after the process group was lost ({lost[0]})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0


# ---- generate ------------------------------------------------------------------------------------


HEALTH_CHECK_TIMEOUT = 5.0  # seconds one health check may take (a host that drops packets)
# While waiting (--wait), the channel retries a refused connection at least this often (gRPC's own
# back-off grows to 2 minutes, longer than `jalora serve` takes to start).
WAIT_RETRY_MS = 1000


class ServerUnreachable(Exception):
    """No SERVING jalora server at the target (exit status 1)."""


def _tls_mismatch(details: str) -> bool:
    """Whether a failed connection's details say the TLS handshake failed: TLS on one side only (a
    plaintext client sees the TLS server close the socket), an untrusted certificate, or no client
    certificate where the server requires one. Under TLS 1.3 the client's side of the handshake ends
    first; a server that then refuses its certificate closes the socket, which the client may read as
    a reset when its next bytes were still unread there."""
    details = details.lower()
    return any(s in details for s in ("handshake failed", "socket closed", "connection reset"))


def _await_server(client, target: str, command: str, wait: float | None) -> None:
    """Returns once the server at `target` answers SERVING.

    Without `wait` (None), one health check decides: a refused connection fails at once, since nothing
    would come of waiting unless a server is on its way, which only the caller knows (--wait). With
    `wait` seconds, says once on stderr that it waits, then checks again until SERVING or time is up.
    """
    from jalora.client import ServerError

    deadline = None if wait is None else time.monotonic() + wait
    said = False
    while True:
        left = HEALTH_CHECK_TIMEOUT if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            status = client.health(timeout=min(HEALTH_CHECK_TIMEOUT, left))
            if status == "SERVING":
                return
            why = f"it is {status}"
        except ServerError as e:
            details = " ".join(e.details.split())
            why = "connection refused" if "connection refused" in details.lower() else details
            if _tls_mismatch(details):  # a server is there, and waiting will not change how it speaks
                raise ServerUnreachable(
                    f"cannot connect to {target} ({why}); a server that serves TLS needs --tls-ca (and "
                    "--tls-cert/--tls-key if it asks for a client certificate), a plaintext one none of them"
                ) from None
        if deadline is None:
            raise ServerUnreachable(
                f"no server at {target} ({why}); start one with `jalora serve`, or pass --wait SECONDS to wait for one"
            )
        if time.monotonic() >= deadline:
            raise ServerUnreachable(
                f"no SERVING server at {target} after {wait:g}s ({why}); start one with `jalora serve`"
            )
        if not said:
            print(f"jalora {command}: waiting up to {wait:g}s for the server at {target}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)


def _cannot_read(flag: str, path: str, error: OSError) -> InvalidRequestError:
    reason = error.strerror or str(error)
    return InvalidRequestError(flag, f"cannot read {path}: {reason[:1].lower() + reason[1:]}")


def _flag_file(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _cannot_read(flag, path, e) from None


def _client_credentials(args: argparse.Namespace):
    """(TLS settings or None, token or None) from the client flags (`demo` has none: its own server is
    plaintext on loopback). Raises InvalidRequestError naming the flag."""
    from jalora.client import TLS

    tls = None
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if getattr(args, "tls", False) or ca or cert or key:
        if cert is None and key is not None:
            raise InvalidRequestError("--tls-key", "needs --tls-cert, the client certificate it belongs to")
        if key is None and cert is not None:
            raise InvalidRequestError("--tls-cert", "needs --tls-key, its private key")
        files = {flag: _flag_file(flag, path) for flag, path in (("--tls-ca", ca), ("--tls-cert", cert),
                                                                 ("--tls-key", key)) if path}  # fmt: skip
        problems = _pem_problems(("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))
        if problems:  # (gRPC would log its own errors and report the server unreachable)
            flag, message = problems[0].split(": ", 1)
            raise InvalidRequestError(flag, message)
        tls = TLS(ca=files.get("--tls-ca"), cert=files.get("--tls-cert"), key=files.get("--tls-key"))
    token = None
    if getattr(args, "token_file", None):
        try:
            token = read_token_file(args.token_file)
        except OSError as e:
            raise _cannot_read("--token-file", args.token_file, e) from None
        except ValueError as e:
            raise InvalidRequestError("--token-file", str(e)) from None
    return tls, token


def _check_call_flags(args: argparse.Namespace, *sampling: str) -> None:
    """The flags of a command that calls a server, checked before it connects (or, for `demo`, starts one):
    --timeout, --wait, and the sampling flags named in `sampling` (dests whose SamplingParams field is the dest
    without `judge_`) that are set. Raises InvalidRequestError naming the flag."""
    from jalora.config import is_number
    from jalora.sampling_params import SamplingParams

    if not (is_number(args.timeout) and args.timeout > 0):
        raise InvalidRequestError("--timeout", f"must be a number of seconds > 0, got {args.timeout!r}")
    wait = getattr(args, "wait", None)
    if wait is not None and not (is_number(wait) and wait >= 0):
        raise InvalidRequestError("--wait", f"must be a number of seconds >= 0, got {wait!r}")
    for dest in sampling:
        value = getattr(args, dest)
        if value is None:
            continue
        try:
            SamplingParams(**{dest.removeprefix("judge_"): value})
        except InvalidRequestError as e:
            raise InvalidRequestError("--" + dest.replace("_", "-"), e.message) from None


def _connect(args: argparse.Namespace):
    """A Client of the server at --target, once it is SERVING (see _await_server; `demo` has no --wait)."""
    from jalora.client import Client

    wait = getattr(args, "wait", None)
    tls, token = _client_credentials(args)
    options = [("grpc.max_reconnect_backoff_ms", WAIT_RETRY_MS)]
    client = Client(args.target, timeout=args.timeout, tls=tls, token=token, options=options)
    try:
        _await_server(client, args.target, args.command, wait)
    except BaseException:
        client.close()
        raise
    return client


def _generate(args: argparse.Namespace) -> int:
    if args.with_invocation and not args.adapter:  # it would be ignored: the base model has no invocation
        print("jalora generate: --with-invocation needs --adapter NAME (whose invocation to append)", file=sys.stderr)
        return 2
    if args.chat and args.token_ids:
        print("jalora generate: --chat takes PROMPT as text (a user message), not --token-ids", file=sys.stderr)
        return 2
    _check_call_flags(args, "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                      "frequency_penalty", "repetition_penalty")
    prompt: str | list[int] | list[dict[str, str]] = args.prompt
    if args.token_ids:
        words = args.prompt.replace(",", " ").split()
        if not words or not all(re.fullmatch(r"\d+", w) and int(w) <= MAX_INT32 for w in words):
            raise InvalidRequestError("PROMPT", f"with --token-ids must be token ids (integers >= 0 separated by "
                                      f"spaces or commas), got {args.prompt!r:.60}")
        prompt = [int(w) for w in words]
    with _connect(args) as client:
        if args.chat:  # the server renders the conversation (and appends the invocation if asked)
            prompt = [{"role": "user", "content": args.prompt}]
        elif args.with_invocation:
            try:
                prompt = client.with_invocation(prompt, args.adapter)
            except ValueError as e:  # a plain LoRA has no invocation to append
                print(f"jalora generate: --with-invocation: {e}", file=sys.stderr)
                return 2
        last = None
        for chunk in client.generate_stream(
            prompt,
            args.adapter,
            append_invocation=args.chat and args.with_invocation,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            repetition_penalty=args.repetition_penalty,
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


def _as_chat(client: Any, question: str) -> str | list[dict[str, str]]:
    """The question as a user turn where the model has a chat template, else as plain text."""
    from jalora.client import ServerError

    conversation = [{"role": "user", "content": question}]
    try:
        client.tokenize(conversation)
    except ServerError as e:
        if e.field != "messages":
            raise
        return question
    return conversation


def _pipeline(args: argparse.Namespace) -> int:
    """Base answers the question, then each aLoRA judge reads question + answer + its invocation: one
    Pipeline call per question (the server runs the judges in parallel and holds the base's KV blocks for
    them in a session of the call).

    With a chat model the question is a user turn of its template, and the server closes the answer's
    turn before each judge's invocation. The judges' prompts start with the base request's tokens
    (prompt and generated answer), so their KV comes from the prefix cache (the `cached` column): that
    reuse across base and adapters is what jalora is for.
    """
    _check_pipeline_flags(args)
    with _connect(args) as client:
        adapters = {a.name: a for a in client.list_adapters()}
        names = args.judge or sorted(n for n, a in adapters.items() if a.kind == "alora")
        missing = [n for n in names if n not in adapters]
        if missing:
            print(f"jalora {args.command}: --judge: adapters not loaded: {missing}", file=sys.stderr)
            return 2
        if not names:
            print(f"jalora {args.command}: the server has no aLoRA adapters to judge with", file=sys.stderr)
            return 2
        rows = []
        for question in args.question or DEFAULT_QUESTIONS:
            rows += _judge_one(client, question, names, args)
        judge_rows = [r for n, r in rows if n != "base"]
        prompt = sum(r.usage.prompt_tokens for r in judge_rows)
        cached = sum(r.usage.cached_tokens for r in judge_rows)
        print(f"judges reused {cached}/{prompt} prompt tokens from the prefix cache ({cached / prompt:.0%})")
    return 0


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    """`pipeline`'s and `demo`'s own flags (see _check_call_flags)."""
    _check_call_flags(args, "max_tokens", "judge_max_tokens")
    if not (isinstance(args.rounds, int) and args.rounds >= 1):
        raise InvalidRequestError("--rounds", f"must be an integer >= 1, got {args.rounds!r}")


def _judge_one(client, question: str, names: list[str], args: argparse.Namespace) -> list[tuple]:
    """One question through the pipeline, `args.rounds` times; prints its table and returns its rows."""
    from jalora.client import PipelineJudge

    prompt = _as_chat(client, question)
    # (greedy, as the base: a verdict that a generation_config's do_sample drew would differ run to run)
    judges = [PipelineJudge(name, sampling=dict(max_tokens=args.judge_max_tokens, logprobs=0, temperature=0.0))
              for name in names]
    rows = []
    for _ in range(args.rounds):
        stages = sorted(client.pipeline(prompt, judges, max_tokens=args.max_tokens, temperature=0.0),
                        key=lambda st: -1 if st.judge is None else st.judge)  # fmt: skip
        rows += [("base" if st.judge is None else names[st.judge], st) for st in stages]
    print(f"question: {question!r}")
    print(f"answer:   {rows[0][1].text!r}")
    for name, r in rows[1 : 1 + len(names)]:
        print(f"verdict:  {name} {_verdict(r)}, reused {r.usage.cached_tokens} of {r.usage.prompt_tokens} prompt "
              "tokens from the cache")
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
    print()
    return rows


def _verdict(r) -> str:
    """A judge's answer: its first token's text and the probability the judge gave it."""
    if not r.token_ids or not r.logprobs:
        return repr(r.text)
    first = r.token_ids[0]
    text = r.text.split("\n")[0].strip() or r.text
    return f"{text!r} (p={math.exp(r.logprobs[0][first]):.2f})"


def _demo(args: argparse.Namespace) -> int:
    """`jalora serve` on a free loopback port, in this process, and the pipeline against it over gRPC."""
    from server.app import ServerThread

    _check_pipeline_flags(args)
    plan = prepare(args)
    engine = build_engine(plan)
    with ServerThread(engine, plan.server_config) as server:
        print(f"jalora serving on {server.target}", flush=True)
        args.target = server.target
        return _pipeline(args)


# ---- train ---------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace):
    """The TrainConfig the flags make; `--target-modules` may repeat (each adds its projections, once)."""
    from jalora.train import TrainConfig

    modules = tuple(dict.fromkeys(args.target_modules or TrainConfig.target_modules))
    return config_from_args(TrainConfig, args, model=args.model or "smollm2", target_modules=modules)


def _train(args: argparse.Namespace) -> int:
    """`jalora train`: the flags make a TrainConfig (validated before any file is read); a bundled
    model's name is resolved to its files; jalora.train does the rest."""
    from jalora.train import train_adapter

    config = _train_config(args)
    if config.model in _bundled_names() and not os.path.exists(config.model):
        from checkpoints import bundled

        config = config.replace(model=bundled.resolve(config.model).model)
    result = train_adapter(config)
    accuracy = "-" if result.eval_accuracy is None else f"{result.eval_accuracy:.1%}"
    eval_loss = "-" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    print(f"jalora train: {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); "
          f"train loss {result.train_loss:.4f}, eval loss {eval_loss}, eval accuracy {accuracy}")
    print(f"PEFT adapter written to {result.adapter_dir}")
    return 0


def _bundled_names() -> tuple[str, ...]:
    from checkpoints import bundled

    return bundled.names()


def _train_args(p: argparse.ArgumentParser) -> None:
    from jalora.adapters.peft import MODULE_GROUP
    from jalora.train.config import TrainConfig

    add_config_flags(p, TrainConfig, exclude=("target_modules",),
                     notes={"model": ", or a bundled model's name (default: smollm2)"})  # fmt: skip
    p.add_argument("--target-modules", nargs="+", action="extend", metavar="MODULE", choices=list(MODULE_GROUP),
                   help=f"projections to adapt, of {' '.join(MODULE_GROUP)}; the flag may repeat (default: "
                   f"{' '.join(TrainConfig.target_modules)})")  # fmt: skip


# ---- entry point ---------------------------------------------------------------------------------


def _call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help="deadline of each call")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("JALORA_TARGET", DEFAULT_TARGET),
                   help=f"host:port of a `jalora serve` (default: $JALORA_TARGET, else {DEFAULT_TARGET})")  # fmt: skip
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="wait up to SECONDS for the server to be SERVING, e.g. while `jalora serve` starts "
                   "(default: no wait; fail at once when nothing answers)")  # fmt: skip
    p.add_argument("--tls", action="store_true",
                   help="connect over TLS, trusting gRPC's bundled root certificates (default: plaintext unless "
                   "a --tls-* flag is given)")  # fmt: skip
    p.add_argument("--tls-ca", metavar="FILE",
                   help="PEM root certificates that signed the server's certificate; implies --tls (default: "
                   "gRPC's bundled roots)")  # fmt: skip
    p.add_argument("--tls-cert", metavar="FILE",
                   help="PEM client certificate for a server that requires one (mutual TLS); implies --tls "
                   "(default: none)")  # fmt: skip
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (default: none)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the bearer token to send with every call (default: no token)")  # fmt: skip
    _call_args(p)


def _multihost_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("several hosts (one process per host; process 0 serves, the others follow)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address for jax.distributed (the engine also uses PORT + 1); with "
                       "--num-processes and --process-id (default: one process)")  # fmt: skip
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the group (default: 1)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N - 1 (default: 0)")
    group.add_argument("--multihost", action="store_true",
                       help="join the group JAX finds by itself, as on a Cloud TPU VM slice (default: off)")
    group.add_argument("--multihost-timeout", type=int, metavar="SECONDS",
                       help="how long the processes may take to find each other before the start fails (default: "
                       f"{MULTIHOST_TIMEOUT})")  # fmt: skip
    group.add_argument("--multihost-key-file", metavar="FILE",
                       help="secret that authenticates the processes' channel (default: a fixed key: keep the "
                       "ports on a private network)")  # fmt: skip


def _serve_args(p: argparse.ArgumentParser, *, exclude_server: tuple[str, ...] = (), multihost: bool = True) -> None:
    """Engine and server flags (derived from EngineConfig and ServerConfig) plus the start-up adapters."""
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR",
                   help="load a PEFT (a)LoRA adapter at start (repeatable; default: none, or a bundled model's "
                   "judges)")  # fmt: skip
    notes = {"model": ", or a bundled model: smollm2 (SmolLM2-135M-Instruct, fetched and converted once) or tiny "
             "(random weights); a bundled model brings its aLoRA judges, loaded unless --adapter names others "
             "(default: smollm2)"}  # fmt: skip
    add_config_flags(p, EngineConfig, notes=notes)
    roots = {"adapter_roots": " (default: none, so LoadAdapter is refused; for a bundled model, its judges' "
             "folder)"}  # fmt: skip
    add_config_flags(p, ServerConfig, exclude=exclude_server, notes=roots)
    if multihost:
        _multihost_args(p)
    p.add_argument("--log-format", choices=logs.LOG_FORMATS, default="text",
                   help="log lines as text, or as one JSON object each (with the request id of a call's lines)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log one line per Generate call (logger jalora.access): request id, adapter, tokens, "
                   "finish reason, status, duration")  # fmt: skip


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", action="append", default=[], help="what the base model answers (repeatable; "
                   f"default: {' and '.join(map(repr, DEFAULT_QUESTIONS))})")  # fmt: skip
    p.add_argument("--judge", action="append", default=[], metavar="ADAPTER",
                   help="an aLoRA adapter that judges the answer (repeatable; default: every aLoRA the server "
                   "has)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=48, help="tokens of the base answer")
    p.add_argument("--judge-max-tokens", type=int, default=4, help="tokens of each judge's verdict")
    p.add_argument("--rounds", type=int, default=1, help="repeat the pipeline (later rounds hit the cache)")


# `demo` serves on a free port to its own client in this process, which brings no certificate or token.
DEMO_EXCLUDED = ("port", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jalora", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a model and its adapters over gRPC (and OpenAI's HTTP API with "
                       "--http-port)", formatter_class=HelpFormatter)  # fmt: skip
    _serve_args(s)
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="stream one generation from a running server", formatter_class=HelpFormatter)
    g.add_argument("prompt", help="text, or token ids with --token-ids")
    g.add_argument("--adapter", metavar="NAME", help="a loaded adapter to generate with (default: the base model)")
    g.add_argument("--with-invocation", action="store_true",
                   help="append the --adapter's invocation sequence to PROMPT (an aLoRA needs it)")  # fmt: skip
    g.add_argument("--token-ids", action="store_true", help="PROMPT is token ids, separated by spaces or commas")
    g.add_argument("--chat", action="store_true",
                   help="PROMPT is a user message, sent in the model's chat template (with --with-invocation an "
                        "aLoRA adapter's invocation replaces the template's generation prompt)")  # fmt: skip
    g.add_argument("--show-ids", action="store_true", help="print token ids instead of text")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the server's)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, 1 = off (default: the server's)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest, 0 = off (default: the "
                   "server's)")  # fmt: skip
    g.add_argument("--min-p", type=float, default=None, help="keep tokens at least this fraction as likely as the "
                   "likeliest, 0 = off (default: the server's)")  # fmt: skip
    g.add_argument("--seed", type=int, default=None, help="seed of this request's sampling (default: the server "
                   "draws one)")  # fmt: skip
    g.add_argument("--presence-penalty", type=float, default=None, help="subtracted once from the logit of each "
                   "token already generated, in [-2, 2] (default: the server's)")  # fmt: skip
    g.add_argument("--frequency-penalty", type=float, default=None, help="subtracted from a generated token's logit "
                   "per time it was generated, in [-2, 2] (default: the server's)")  # fmt: skip
    g.add_argument("--repetition-penalty", type=float, default=None, help="divides the positive logits (and "
                   "multiplies the others) of prompt and generated tokens, 1 = off (default: the server's)")
    _client_args(g)
    g.set_defaults(func=_generate)

    p = sub.add_parser("pipeline", help="base answers, then aLoRA judges score the answer over gRPC",
                       formatter_class=HelpFormatter)  # fmt: skip
    _pipeline_args(p)
    _client_args(p)
    p.set_defaults(func=_pipeline)

    d = sub.add_parser("demo", help="serve (default: SmolLM2 and its judges) on a free port and run the pipeline",
                       formatter_class=HelpFormatter)  # fmt: skip
    _serve_args(d, exclude_server=DEMO_EXCLUDED, multihost=False)
    _pipeline_args(d)
    _call_args(d)
    # A free port: the pipeline runs in this process. A demo's prompts are short: smaller steps and
    # sequences compile fewer step sizes and decode faster on a CPU (bench/results/cpu_decode.json).
    _override_defaults(d, func=_demo, port=0, max_num_batched_tokens=256, max_model_len=2048, access_log=False)

    t = sub.add_parser("train", help="train a LoRA / aLoRA adapter on JSON-lines data and write it as a PEFT "
                       "directory", formatter_class=HelpFormatter)  # fmt: skip
    _train_args(t)
    t.set_defaults(func=_train)

    o = sub.add_parser("export-orbax", help="write a model as an Orbax checkpoint laid out for a tensor-parallel "
                       "size, which serve restores straight onto the devices",
                       formatter_class=HelpFormatter)  # fmt: skip
    o.add_argument("model", help="HF model directory or llama .gguf file")
    o.add_argument("output_dir", help="new directory for the checkpoint (with the model's config and tokenizer)")
    o.add_argument("--tensor-parallel-size", type=int, default=1, help="devices it will be served on (default: 1)")
    o.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the saved weights; serve it with the same --dtype (default: bfloat16)")
    o.set_defaults(func=_export_orbax)
    return parser


def _export_orbax(args: argparse.Namespace) -> int:
    from jalora.model.orbax_checkpoint import export_orbax

    out = export_orbax(args.model, args.output_dir, args.tensor_parallel_size, args.dtype)
    logs.say(f"jalora: wrote {out} (serve it with --tensor-parallel-size {args.tensor_parallel_size} "
             f"--dtype {args.dtype})")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.INFO if args.verbose else logging.WARNING, getattr(args, "log_format", "text"),
                   access_log=getattr(args, "access_log", False))  # fmt: skip
    try:
        return args.func(args)
    except InvalidRequestError as err:  # a bad flag value (the field is in the message) or model
        print(f"jalora {args.command}: {err}", file=sys.stderr)
        return 2
    except StartupError as err:
        for problem in err.problems:
            print(f"jalora {args.command}: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # A ServerError comes only from the client module, which only the commands that talk to a server
        # import: `jalora train` or `export-orbax` need no grpc at all.
        client = sys.modules.get("jalora.client.client")
        if isinstance(err, ServerUnreachable) or (client is not None and isinstance(err, client.ServerError)):
            print(f"jalora {args.command}: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
