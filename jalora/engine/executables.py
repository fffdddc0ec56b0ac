"""Compiled variants of the engine's jitted functions, kept on disk so that a restarted engine neither
traces nor lowers them again.

JAX's persistent compilation cache (jalora/cache.py) is keyed by the lowered module: a warm start still
traces every variant's Python to a jaxpr and lowers it to MLIR before it can look the executable up. On a
CPU at 40 layers that was 10.8 s of a 20.5 s warm start (bench/startup_gpu.py records the split). This
cache is keyed instead by what decides the module:

- the engine's fingerprint (`fingerprint`): the source of the `jalora` and `pallas_kernels` packages,
  the model's config and kernel plan, the runner's fixed sizes and mesh, the JAX, jaxlib, flax and numpy
  versions, the devices, every JAX setting and the XLA flags;
- the variant: its static arguments and every other argument's shape, dtype, weak type and sharding.

A hit deserializes the executable (`jax.experimental.serialize_executable`), which costs what JAX's own
cache hit costs after lowering; a miss traces, lowers and compiles as `jax.jit` would (through JAX's
cache) and writes the executable for the next start. A file that cannot be read back (corrupt, another
jaxlib build) is replaced, never trusted. Serving picks a variant from a key that is cheap to compute on
every call (`variant_key`); the full key is computed once per variant, on its first use.

vLLM keys its compiled-graph cache the same way (a hash of the config and of the model's source files).
"""

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import math
import os
import pickle
import re
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import jax

logger = logging.getLogger(__name__)

SUBDIR = "jalora-executables"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread = threading.local()  # .hits: JAX cache hits of this thread's compilations (JAX records them there)


def _count_hit(event: str, *_args: Any, **_kwargs: Any) -> None:
    if event == _HIT_EVENT:
        _thread.hits = getattr(_thread, "hits", 0) + 1


def _cache_hits() -> int:
    return getattr(_thread, "hits", 0)


jax.monitoring.register_event_listener(_count_hit)
_PACKAGES = ("jalora", "pallas_kernels")
_FORMAT = 1  # of the files written here: (format, serialized executable, in_tree, out_tree, device ids)


@functools.cache
def source_hash() -> str:
    """sha256 over the .py files of the packages whose code a step runs (jalora, pallas_kernels)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for pkg in _PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """What, besides a variant's arguments, decides every compiled module of an engine: `parts` (the
    model config, kernel plan, fixed sizes, mesh: each by repr) and the code, versions, devices, every JAX
    setting (some change what a function traces to: the PRNG implementation, dtype promotion) and the
    XLA flags. A setting that changes nothing only costs a miss."""
    import flax
    import jaxlib
    import numpy

    devices = jax.devices()
    env = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
    settings = sorted((k, repr(v)) for k, v in jax.config.values.items())
    text = repr((_FORMAT, source_hash(), jax.__version__, jaxlib.__version__, flax.__version__, numpy.__version__,
                 jax.default_backend(), devices[0].client.platform_version, [(d.id, d.device_kind) for d in devices],
                 env, settings, parts))  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _aval(x: Any) -> Any:
    if isinstance(x, jax.Array) or (isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None):
        return (tuple(x.shape), str(x.dtype), x.weak_type, repr(x.sharding))  # (a spec keys as its array)
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy: placed on the default device
        return (tuple(x.shape), str(x.dtype))
    return repr(x)


class Executables:
    """One jitted function's compiled variants: in memory, else from `directory`, else compiled (and
    written there). Call it as the jitted function (static arguments by keyword).

    `variant_key(args, static)` picks the variant on every call, so it must be cheap and must tell apart
    every pair of calls that `jax.jit` would compile separately; by default it is every argument's shape,
    dtype and sharding (fine for functions of a few arrays)."""

    def __init__(
        self,
        fn: Callable,
        name: str,
        directory: Path | None,
        fingerprint: str,
        *,
        static_argnames: tuple[str, ...] = (),
        donate_argnums: tuple[int, ...] = (),
        variant_key: Callable[[tuple, dict], Hashable] | None = None,
        describe: Callable[[tuple, dict], str] | None = None,
        compiler_options: dict | None = None,
        **jit_kwargs: Any,
    ):
        self.name = name
        self._jit = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums, **jit_kwargs)
        self._directory = directory
        self._fingerprint = fingerprint  # (the caller's: it must cover `compiler_options`)
        self._compiler_options = compiler_options or None  # XLA options of each compilation
        self._variant_key = variant_key or self._full_key
        self._compiled: dict[Hashable, Any] = {}
        self._lock = threading.Lock()  # (the warm-up may get variants from several threads)
        self.loaded = 0  # variants read from the directory
        self.compiled = 0  # variants traced, lowered and compiled (or found in JAX's cache) here
        self.compiled_alone = 0  # of them, compiled again alone after running out of device memory (`get_all`)
        # (what, seconds, started: perf_counter) of each compilation here: `describe(args, static)` names a
        # variant (default: the function's name), so that a start's longest compilations say which variants
        # they were, and when in the wave each began
        self._describe = describe or (lambda args, static: name)
        self.compile_log: list[tuple[str, float, float]] = []

    def __len__(self) -> int:
        return len(self._compiled)

    @staticmethod
    def _full_key(args: tuple, static: dict) -> Hashable:
        leaves, tree = jax.tree.flatten(args)
        return (tuple(sorted(static.items())), tree, tuple(_aval(x) for x in leaves))

    def __call__(self, *args: Any, **static: Any) -> Any:
        exe = self._compiled.get(self._variant_key(args, static))
        if exe is None:
            exe = self.get(*args, **static)
        return exe(*args)

    def get(self, *args: Any, **static: Any) -> Any:
        """The compiled variant for these arguments (not run): from memory, disk or the compiler."""
        key = self._variant_key(args, static)
        if key not in self._compiled:
            self.get_all([(args, static)], workers=1)
        return self._compiled[key]

    def get_all(self, calls: Sequence[tuple[tuple, dict]], workers: int) -> None:
        """Every call's variant (`(args, static)` pairs), read or compiled on `workers` threads
        (`get_all` of several functions at once)."""
        get_all([(self, calls)], workers)

    def _keep(self, key: Hashable, exe: Any, loaded: bool) -> Any:
        with self._lock:
            if loaded:
                self.loaded += 1
            else:
                self.compiled += 1
            return self._compiled.setdefault(key, exe)

    def _compile(self, lowered: Any, path: Path | None, label: str) -> Any:
        hits, start = _cache_hits(), time.perf_counter()
        exe = lowered.compile(compiler_options=self._compiler_options)
        with self._lock:
            self.compile_log.append((label, time.perf_counter() - start, start))
        # An executable JAX read from its own cache is not written: serialized again, it loads but on a
        # CPU fails when run ("Function ... not found"). The next start then reads JAX's cache again
        # (tracing and lowering first), until a compilation writes the file.
        if path is not None and _cache_hits() == hits:
            self._write(path, exe)
        return exe

    def _path(self, args: tuple, static: dict) -> Path | None:
        if self._directory is None:
            return None
        text = repr((self._fingerprint, self.name, self._full_key(args, static)))
        return self._directory / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.bin"

    def _read(self, path: Path) -> Any:
        from jax.experimental import serialize_executable

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("cannot read the compiled %s at %s (%s): compiling it", self.name, path, e)
            return None
        try:
            fmt, serialized, in_tree, out_tree, device_ids = pickle.loads(data)
            if fmt != _FORMAT:
                raise ValueError(f"format {fmt}, expected {_FORMAT}")
            by_id = {d.id: d for d in jax.devices()}
            devices = [by_id[i] for i in device_ids]  # (where it was compiled to run, not every device)
            return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)
        except Exception as e:  # a torn or foreign file: compile, and the write replaces it
            logger.warning("the compiled %s at %s cannot be loaded (%s): compiling it again", self.name, path, e)
            return None

    def _write(self, path: Path, exe: Any) -> None:
        from jax.experimental import serialize_executable

        tmp = None
        try:
            serialized, in_tree, out_tree = serialize_executable.serialize(exe)
            device_ids = [d.id for d in exe.runtime_executable().local_devices()]
            data = pickle.dumps((_FORMAT, serialized, in_tree, out_tree, device_ids))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # (a reader sees the whole file or none)
            tmp = None
        except Exception as e:  # a cache that cannot be written costs the next start time, not this one
            logger.warning("cannot save the compiled %s to %s: %s", self.name, path, e)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def get_all(
    work: Sequence[tuple[Executables, Sequence[tuple[tuple, dict]]]], workers: int, device_bytes: int | None = None
) -> None:
    """The variant of every call of every function in `work` (`(function, [(args, static), ...])`), the
    reads and compilations on `workers` threads shared by all of them: XLA compiles and deserializes
    without holding the GIL, so a cold start's compilations overlap and the start waits for the longest
    one, not for each function's in turn. Tracing and lowering run on this thread, one variant after
    another (they hold the GIL). With `device_bytes` (a GPU's free memory), the compilations running at
    once together claim no more than that for their autotuning (`autotune_bytes` of each; one that claims
    more than all of it runs alone)."""
    todo: dict[tuple[int, Hashable], tuple[Executables, tuple, dict]] = {}
    for fn, calls in work:
        for args, static in calls:
            key = fn._variant_key(args, static)
            if key not in fn._compiled:
                todo.setdefault((id(fn), key), (fn, args, static))
    if not todo:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(todo))))
    budget = None if device_bytes is None else _Budget(device_bytes)
    short: list[Hashable] = []  # keys of compilations that ran out of device memory beside others
    try:
        paths = {k: fn._path(args, static) for k, (fn, args, static) in todo.items()}
        reads = {k: pool.submit(todo[k][0]._read, path) for k, path in paths.items() if path is not None}
        compiles, alone = {}, set()  # (alone: keys whose claim exceeds the budget, so nothing ran beside them)
        for k, (fn, args, static) in todo.items():
            exe = reads[k].result() if k in reads else None
            if exe is not None:
                fn._keep(k[1], exe, loaded=True)
            else:
                label, lowered = fn._describe(args, static), fn._jit.lower(*args, **static)
                job = (fn._compile, lowered, paths[k], label)
                if budget is not None:  # (the claim from the lowered text, on this thread)
                    claim = autotune_bytes(lowered)
                    if claim > budget.total:
                        alone.add(k)
                    job = (budget.run, claim, *job)
                compiles[k] = pool.submit(*job)
        together = len(compiles) > 1 and workers > 1  # (alone already: a retry would run out again)
        for k, future in compiles.items():
            try:
                exe = future.result()
            except Exception as e:
                if not (together and k not in alone and out_of_device_memory(e)):
                    raise
                short.append(k)
                continue
            todo[k][0]._keep(k[1], exe, loaded=False)
    except BaseException:  # the error now: the queued compilations are dropped (running ones end on their own)
        if budget is not None:
            budget.close()  # (and those waiting for device memory)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    # A GPU compilation allocates device memory while XLA's autotuner times its kernels (operands, outputs, red
    # zones): several at once can run out of it where each alone fits. Those are compiled again one at a time,
    # once the others are done (lowered again: the wave's lowered modules are not kept); one that runs out alone
    # raises.
    for k in short:
        fn, args, static = todo[k]
        label = fn._describe(args, static)
        logger.warning("compiling %s ran out of device memory beside other compilations: compiling it alone", label)
        fn._keep(k[1], fn._compile(fn._jit.lower(*args, **static), paths[k], label), loaded=False)
        fn.compiled_alone += 1


class _Budget:
    """Device bytes shared by the compilations running at once, handed out in the order the claims came: each
    waits until every earlier claim has started and its own fits beside the running ones' (or nothing else
    runs: a claim larger than the whole budget runs alone). In order, so a large claim is not passed over by
    later small ones until the wave's end. `close` makes the waiting ones raise instead of starting."""

    def __init__(self, total: int):
        self.total, self._used, self._changed = total, 0, threading.Condition()
        self._tickets = self._next = 0  # (tickets handed out; the next one to start)
        self._closed = False

    def run(self, claim: int, fn: Any, *args: Any) -> Any:
        with self._changed:
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._changed.wait_for(lambda: self._closed or (
                ticket == self._next and (self._used == 0 or self._used + claim <= self.total)))
            if self._closed:
                raise concurrent.futures.CancelledError("the wave stopped: not compiled")
            self._used += claim
            self._next += 1
            self._changed.notify_all()
        try:
            return fn(*args)
        finally:
            with self._changed:
                self._used -= claim
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


# A matrix product's operands and result in the lowered text: `: (tensor<8x4096xbf16>, ...) -> tensor<...>`, and a
# tensor type's sizes and element type (`8x4096xbf16`, `4x3xcomplex<f32>`, `?x64xf32`; any encoding after it).
_DOT = re.compile(r"stablehlo\.dot(?:_general)?\b.*?:\s*\((.*)\)\s*->\s*(.*)$")
_TENSOR = re.compile(r"tensor<((?:[0-9?]+x)*)(complex<\w+>|\w+)")
# What XLA's GPU autotuner allocates beside a product's buffers: a red zone on each side of each of its four
# buffers (the operands, the result and the reference result it checks candidates against; 8 MiB each by
# default) and the library's workspace.
AUTOTUNE_EXTRA_BYTES = 96 << 20


def autotune_bytes(lowered: Any) -> int:
    """Device bytes a GPU compilation of `lowered` may allocate at once while XLA's autotuner times its
    kernels: its largest matrix product's operands, its result twice (the candidate's and the reference's),
    and `AUTOTUNE_EXTRA_BYTES`. The autotuner times one product at a time, so the largest is the claim. A
    product with a size unknown until it runs claims everything (`UNKNOWN_BYTES`: it compiles alone). Shapes
    are the lowered module's, global ones under tensor parallelism: a sharded product claims more than each
    device's share (safe, fewer at once)."""
    largest = 0
    for line in lowered.as_text().splitlines():
        if "stablehlo.dot" not in line or not (m := _DOT.search(line)):
            continue
        operands, result = _TENSOR.findall(m.group(1)), _TENSOR.findall(m.group(2))[:1]
        sizes = [_tensor_bytes(*t) for t in operands] + [2 * _tensor_bytes(*t) for t in result]
        largest = max(largest, UNKNOWN_BYTES if None in sizes else sum(sizes))
    return largest + AUTOTUNE_EXTRA_BYTES


UNKNOWN_BYTES = 1 << 60


def _tensor_bytes(dims: str, dtype: str) -> int | None:
    """Bytes of a tensor type from its sizes' text (`8x4096x`, empty for a scalar) and element type (`bf16`,
    `i1`: a byte, `complex<f32>`: two f32); None for a size unknown until it runs (`?`)."""
    sizes = dims.split("x")[:-1]
    if "?" in dims:
        return None
    bits = re.search(r"\d+", dtype)
    width = -(-int(bits.group() if bits else 8) // 8) * (2 if dtype.startswith("complex") else 1)
    return math.prod(int(d) for d in sizes) * width


def out_of_device_memory(error: BaseException) -> bool:
    """True if `error` is XLA's report of a device allocation that failed (RESOURCE_EXHAUSTED)."""
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)
