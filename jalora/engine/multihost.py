"""One engine over several hosts: process 0 schedules and serves, every process runs the same steps.

JAX runs one controller process per host (`jax.distributed`), and a computation over devices of several
hosts must be called by every process, in the same order, with the same host inputs. jalora keeps all
its decisions on process 0 (the scheduler, the prefix cache, the adapters' names and slots, the gRPC
server) and sends the others, before each device call, what that call needs:

- `launch`: a prepared step (numpy arrays of a few kilobytes) and which earlier step's sampled tokens it
  reads (async scheduling feeds them from the device);
- `load_adapter` / `unload_adapter`: the adapter as process 0 read and validated it (its host arrays, a
  few megabytes at most), which a follower installs into the same slot (or none) without reading any file:
  every process runs exactly the weights process 0 checked, whatever the followers' disks hold;
- `place_adapter`: an adapter swapped into a slot (more adapters loaded than slots); the follower writes
  its own host copy into the same slot, before the step that reads it;
- `warmup_adapters`, `reset_kv_cache`, `stop` (with why, when process 0 stops because it failed).

The channel is a `multiprocessing.connection` socket from each follower to process 0, on the
coordinator's host at its port + 1, authenticated with a key (HMAC) derived from `--multihost-key-file` or
a fixed default: run it on the hosts' private network, as the coordinator itself. Followers never send
anything; process 0 watches each connection, and a follower that exits or whose host goes away closes
it: process 0 then refuses every further step with `FollowerLostError` (a server reports NOT_SERVING)
instead of entering a collective that would wait for it forever. Process 0 sends each call before making
it: if it fails in between (an error in its half of a step, an interrupt), the followers are a call ahead
of it, so the group is lost the same way (`Leader.lockstep`), never retried as one process would.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

import jax

from jalora.config import is_int
from jalora.errors import EngineLostError, InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_KEY = b"jalora-multihost"
FIELD = "coordinator_address"
MAX_TIMEOUT = 24 * 3600  # seconds the processes may take to find each other, at most


class FollowerLostError(EngineLostError):
    """A follower process is gone: no step can run until the group is restarted."""


_coordinator: dict[str, object] = {}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    key: bytes | None = None,
    timeout: int = 300,
) -> None:
    """jax.distributed.initialize (all None: what a Cloud TPU VM slice or a cluster manager tells JAX),
    with cross-process collectives on CPU devices too. Call it first, before anything touches a device.
    Raises InvalidRequestError naming coordinator_address if the group does not form within `timeout`
    seconds (no coordinator at that address, or processes missing)."""
    check_group(coordinator_address, num_processes, process_id, timeout)
    if coordinator_address is not None and process_id != 0:
        # JAX's client aborts the process (a fatal log and a stack trace) when it cannot register with
        # the coordinator: find it first, and fail with one error if it never answers.
        _wait_for(coordinator_address, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout)
    except Exception as e:  # no coordinator found or reachable: one error, not a traceback
        raise InvalidRequestError(FIELD, f"cannot start the process group: {e}") from e
    if coordinator_address is None:  # inferred by JAX (TPU VM, SLURM, ...): process 0's address
        coordinator_address = jax._src.distributed.global_state.coordinator_address  # noqa: SLF001
    _coordinator.update(address=coordinator_address, key=key or DEFAULT_KEY)


def check_group(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                timeout: int) -> None:
    """The arguments of `initialize`, checked before anything is started (the CLI calls it before the model is
    read). Raises InvalidRequestError naming the one at fault."""
    if not (is_int(timeout) and 1 <= timeout <= MAX_TIMEOUT):
        raise InvalidRequestError("multihost_timeout", f"must be a whole number of seconds in [1, {MAX_TIMEOUT}], "
                                  f"got {timeout!r}")  # fmt: skip
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequestError(FIELD, f"must be HOST:PORT, got {coordinator_address!r}")
    if (coordinator_address is None) != (num_processes is None) or (num_processes is None) != (process_id is None):
        raise InvalidRequestError(
            FIELD, "the coordinator address, the number of processes and the process id go together (or none)"
        )
    if num_processes is not None and not (is_int(num_processes) and num_processes >= 1):
        raise InvalidRequestError("num_processes", f"must be an integer >= 1, got {num_processes!r}")
    if process_id is not None and not (is_int(process_id) and 0 <= process_id < num_processes):
        raise InvalidRequestError("process_id", f"must be an integer in [0, {num_processes - 1}] (the processes' "
                                  f"indices), got {process_id!r}")  # fmt: skip


def _wait_for(address: str, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise InvalidRequestError(
                    FIELD, f"no coordinator answered at {address} within {timeout:g} s ({e.strerror or e}); "
                    "start process 0 first, or check the address"
                ) from None
            time.sleep(0.5)


def is_multihost() -> bool:
    return jax.process_count() > 1


def channel_address() -> tuple[str, int]:
    address = _coordinator.get("address")
    if address is None:
        raise InvalidRequestError(FIELD, "several processes but no jalora.engine.multihost.initialize() call")
    host, _, port = str(address).rpartition(":")
    return host, int(port) + 1


class Leader:
    """Process 0's end: accepts every follower, then sends each device call before making it."""

    def __init__(self, followers: int):
        host, port = channel_address()
        self._listener = Listener((host, port), authkey=_coordinator["key"])
        logger.info("waiting for %d follower(s) on %s:%d", followers, host, port)
        _barrier()  # the followers connect only once this listens
        self._conns: list[Connection] = [self._listener.accept() for _ in range(followers)]
        self.lost: str | None = None
        self.lost_event = threading.Event()
        self._closed = False
        self._on_lost: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        for i, conn in enumerate(self._conns):
            name = f"jalora-follower-{i + 1}"
            threading.Thread(target=self._watch, args=(i + 1, conn), name=name, daemon=True).start()

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` runs (on a watcher thread) when a follower is lost; at once if one is."""
        self._on_lost.append(callback)
        if self.lost is not None:
            callback(self.lost)

    def _watch(self, index: int, conn: Connection) -> None:
        try:
            conn.recv()  # followers send nothing: this returns only when the connection ends
        except (EOFError, OSError):
            pass
        if not self._closed:  # (closing ends the followers: not a loss)
            self._lose(f"follower process {index} disconnected")

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
        logger.error("multi-host engine stopped: %s", reason)
        self.lost_event.set()
        for callback in self._on_lost:
            callback(reason)

    def send(self, op: str, *args) -> None:
        """Every follower gets (op, args), or FollowerLostError if one is gone (nothing is run then)."""
        if self.lost is not None:
            raise FollowerLostError(self.lost)
        for i, conn in enumerate(self._conns):
            try:
                conn.send((op, args))
            except OSError as e:
                self._lose(f"follower process {i + 1} unreachable: {e}")
                raise FollowerLostError(self.lost) from e

    @contextlib.contextmanager
    def lockstep(self, op: str, *args):
        """Sends (op, args), then runs the block: process 0's half of what the followers now run. Once the
        send has begun, the followers may be inside (or about to enter) a collective that waits for this
        process: anything failing before the block ends (an error, an interrupt) leaves them out of step,
        so the group is lost (`fail`), not recovered; an Exception becomes FollowerLostError."""
        try:
            self.send(op, *args)
            yield
        except BaseException as e:
            if self.lost is not None and isinstance(e, FollowerLostError):
                raise
            reason = f"process 0 failed while its followers ran {op!r} ({type(e).__name__}: {e})"
            self.fail(reason)
            if isinstance(e, Exception):
                raise FollowerLostError(reason) from e
            raise

    def fail(self, reason: str) -> None:
        """Process 0 itself broke the lockstep: the group is lost, as if a follower were (every step is refused,
        a server turns NOT_SERVING), and the channel closes (a follower waiting for its next call ends)."""
        self._lose(reason)
        self.close()

    def close(self, error: str | None = None) -> None:
        """Stops the followers (`follow` returns `error`: why process 0 stops, None for a plain stop) and
        closes the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.lost is None:
            for conn in self._conns:
                try:
                    conn.send(("stop", (error,)))
                except OSError:
                    pass
        for conn in self._conns:
            conn.close()
        self._listener.close()


def connect() -> Connection:
    """A follower's end of the channel (process 0 listens once its engine starts)."""
    host, port = channel_address()
    _barrier()
    conn = Client((host, port), authkey=_coordinator["key"])
    _coordinator["conn"] = conn
    return conn


def run_follower(make_engine: Callable[[], object]) -> str | None:
    """A follower process's whole life: builds its engine and follows process 0; returns what `follow`
    does (why process 0 stopped, if it failed). If anything fails here, the channel is closed first, so
    process 0 sees the follower gone (and stops serving) at once, and the process exits without JAX's
    distributed shutdown, which would wait for the others."""
    try:
        return follow(make_engine())
    except BaseException:
        logger.exception("follower process %d failed", jax.process_index())
        conn = _coordinator.get("conn")
        if conn is not None:
            conn.close()
        os._exit(1)


def _barrier() -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jalora multi-host channel")


class Recent:
    """The sampled-token arrays of the last few steps, by step number (what `launch` names as its input)."""

    def __init__(self, keep: int = 4):
        self._items: collections.deque = collections.deque(maxlen=keep)

    def add(self, seq: int, tokens) -> None:
        self._items.append((seq, tokens))

    def seq_of(self, tokens) -> int | None:
        return next((s for s, t in self._items if t is tokens), None) if tokens is not None else None

    def tokens_of(self, seq: int | None):
        if seq is None:
            return None
        return next(t for s, t in self._items if s == seq)


def follow(engine) -> str | None:
    """A follower's loop: runs what process 0 sends on `engine` (built from the same EngineConfig) until
    `stop` or until the channel closes. Returns None, or why process 0 stopped when it stopped because it
    failed (a start-up adapter it refused, say): the follower's process should exit non-zero then."""
    conn = engine.multihost_conn
    runner = engine.runner
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            logger.info("process 0 closed the channel; stopping")
            return None
        if op == "launch":
            seq, step, prev_seq = args  # (the outputs stay in runner.recent for the steps that read them)
            runner.launch(step, engine.adapters.stacks, runner.recent.tokens_of(prev_seq), seq=seq)
        elif op == "load_adapter":  # what process 0 read and checked: nothing is read here
            name, prepared, slot = args
            engine.adapters.install(name, prepared, slot)
        elif op == "place_adapter":
            engine.adapters.place(*args)
        elif op == "unload_adapter":
            engine.adapters.unload(*args)
        elif op == "warmup_adapters":
            runner.warmup(False, adapters=engine.adapters.stacks)
        elif op == "reset_kv_cache":
            runner.reset_kv_cache()
        elif op == "stop":
            return args[0] if args else None
        else:
            raise RuntimeError(f"unknown multi-host operation {op!r}")
