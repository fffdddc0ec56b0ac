"""jalora/engine/executables.py on a small function: variants are saved and read back (neither traced nor
lowered), a file that cannot be read back is compiled again and replaced, and the fingerprint and the
arguments' shapes, dtypes and static values each pick their own file."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalora.engine.executables import Executables, fingerprint

TRACES: list[tuple] = []


def fn(x, w, *, power):
    TRACES.append((x.shape, power))  # runs only while tracing
    return (x @ w) ** power, x.sum()


def make(directory, fp="fp"):
    return Executables(fn, "f", directory, fp, static_argnames=("power",))


def reference(x, w, power):
    return (np.asarray(x) @ np.asarray(w)) ** power, np.asarray(x).sum()


def check(outs, x, w, power):
    for got, want in zip(outs, reference(x, w, power), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_a_second_cache_over_the_same_directory_reads_every_variant(tmp_path):
    x, w = jnp.arange(12.0).reshape(3, 4), jnp.ones((4, 2))
    first = make(tmp_path)
    check(first(x, w, power=2), x, w, 2)
    first.get_all([((x[:2], w), {"power": 2}), ((x, w), {"power": 3}), ((x, w), {"power": 2})], workers=2)
    assert (len(first), first.compiled, first.loaded) == (3, 3, 0)
    assert len(list(tmp_path.iterdir())) == 3
    TRACES.clear()
    second = make(tmp_path)
    second.get_all([((x, w), {"power": 2}), ((x[:2], w), {"power": 2})], workers=2)
    check(second(x, w, power=3), x, w, 3)
    check(second(x[:2], w, power=2), x[:2], w, 2)
    assert (len(second), second.compiled, second.loaded) == (3, 0, 3) and TRACES == []
    # another dtype, another fingerprint: compiled, not read
    check(second(x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16), power=2), x, w, 2)
    assert second.compiled == 1
    other = make(tmp_path, fp="other")
    check(other(x, w, power=2), x, w, 2)
    assert (other.compiled, other.loaded) == (1, 0)


def test_a_file_that_cannot_be_read_back_is_compiled_again_and_replaced(tmp_path, caplog):
    x, w = jnp.ones((2, 3)), jnp.ones((3, 3))
    make(tmp_path)(x, w, power=1)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # torn
    again = make(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jalora.engine.executables"):
        check(again(x, w, power=1), x, w, 1)
    assert (again.compiled, again.loaded) == (1, 0)
    assert [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()], caplog.text
    third = make(tmp_path)  # the replacement reads back
    check(third(x, w, power=1), x, w, 1)
    assert (third.compiled, third.loaded) == (0, 1)


def test_no_directory_keeps_variants_in_memory_only(tmp_path):
    ex = Executables(fn, "f", None, "fp", static_argnames=("power",))
    x, w = jnp.ones((2, 3)), jnp.ones((3, 3))
    ex(x, w, power=1)
    ex(x, w, power=1)
    assert (len(ex), ex.compiled, ex.loaded) == (1, 1, 0) and list(tmp_path.iterdir()) == []


def test_the_fingerprint_names_what_decides_a_module(monkeypatch):
    before = fingerprint("a", 1)
    assert fingerprint("a", 1) == before != fingerprint("a", 2)
    with jax.numpy_rank_promotion("raise"):  # a JAX setting changes what a function traces to
        assert fingerprint("a", 1) != before
    assert fingerprint("a", 1) == before
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")  # flags change what XLA emits
    assert fingerprint("a", 1) != before


def test_several_functions_share_one_get_all_and_a_spec_keys_as_its_array(tmp_path):
    """`executables.get_all` over two functions at once reads or compiles each one's variants; a
    ShapeDtypeStruct with the array's sharding picks the same variant (and file) as the array, so the
    warm-up can compile a function of a large array it no longer holds."""
    from jalora.engine.executables import get_all

    x, w = jnp.arange(12.0).reshape(3, 4), jnp.ones((4, 2))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type)
    f, g = make(tmp_path), Executables(lambda x: x * 2, "g", tmp_path, "fp")
    get_all([(f, [((spec, w), {"power": 2}), ((x[:2], w), {"power": 2})]), (g, [((spec,), {})])], workers=3)
    assert (len(f), f.compiled, len(g), g.compiled) == (2, 2, 1, 1)
    TRACES.clear()
    check(f(x, w, power=2), x, w, 2)  # the spec's variant, run on the array: nothing traced again
    np.testing.assert_allclose(np.asarray(g(x)), np.asarray(x) * 2)
    assert (len(f), f.compiled, len(g), g.compiled) == (2, 2, 1, 1) and TRACES == []
    again = make(tmp_path)
    get_all([(again, [((x, w), {"power": 2})])], workers=1)  # the spec's file, read for the array
    assert (again.compiled, again.loaded) == (0, 1)


def test_a_failed_compilation_is_raised_without_waiting_for_the_queued_ones(tmp_path):
    """One worker: the first compilation is held running, two more are queued, then another function
    fails to trace. The error comes out at once, and the queued compilations never start (without the
    cancellation each held one would wait out its guard and all three would start)."""
    import threading

    from jalora.engine.executables import get_all

    x = jnp.ones((2, 2))

    def bad(x):
        raise ValueError("cannot trace this")

    release, started = threading.Event(), []
    good = Executables(lambda x: x + 1, "good", tmp_path, "fp")
    compile_one = good._compile

    def held(lowered, path, label):
        started.append(path)
        release.wait(60)  # (set below: a guard against a hang, never a margin)
        return compile_one(lowered, path, label)

    good._compile = held
    try:
        try:
            get_all([(good, [((x[:1],), {}), ((x,), {}), ((x[:, :1],), {})]),
                     (Executables(bad, "bad", tmp_path, "fp"), [((x,), {})])], workers=1)  # fmt: skip
        except ValueError as e:
            assert "cannot trace this" in str(e)
        else:
            raise AssertionError("the tracing error was not raised")
        assert len(started) <= 1 and len(good) == 0  # (the first may have been dropped before it started)
    finally:
        release.set()


_WORKER = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from jalora.engine.executables import Executables
f = Executables(lambda x: jnp.cumsum(x * jnp.arange(x.shape[0], dtype=x.dtype)) + jnp.sin(x), "f",
                Path(sys.argv[2]), "fp")
print(float(f(jnp.ones(1000)).sum()), f.loaded, f.compiled)
"""


def test_an_executable_from_jax_cache_is_not_written(tmp_path):
    """A start whose executables directory is new but whose JAX cache holds the module (another build of
    jalora compiled it) gets the executable from JAX's cache. Serialized again, such an executable loads
    and then fails when run on a CPU ("Function ... not found"), so it is not written: the next start
    reads JAX's cache again, and gives the same result."""
    import os
    import subprocess
    import sys

    def start(executables_dir):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path / "jax-cache"), str(executables_dir)],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        value, loaded, compiled = proc.stdout.split()
        return float(value), int(loaded), int(compiled)

    first = start(tmp_path / "a")  # compiled: written to both caches
    assert first[1:] == (0, 1) and len(list((tmp_path / "a").iterdir())) == 1
    assert start(tmp_path / "b") == first  # from JAX's cache: not written
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
    assert start(tmp_path / "b") == first
    assert start(tmp_path / "a") == (first[0], 1, 0)  # the compiled one is read back and runs


def test_a_compilation_short_of_device_memory_is_compiled_again_alone(tmp_path, caplog):
    """A compilation that fails with XLA's RESOURCE_EXHAUSTED beside others (the GPU autotuner's
    allocations) is compiled again once the others are done, alone, and kept; any other compile error,
    running out again alone, or running out as the only compilation is raised (no retry)."""
    import threading

    import pytest

    from jalora.engine.executables import get_all

    x = jnp.ones((2, 2))
    f = Executables(lambda x: x * 2, "f", tmp_path, "fp", describe=lambda args, static: f"f{args[0].shape}")
    compile_one, calls, running = f._compile, [], [0]  # calls: (label, compilations running with it)
    lock = threading.Lock()

    def short_once(lowered, path, label):
        with lock:
            running[0] += 1
            calls.append((label, running[0]))
            first = len(calls) == 1
        try:
            if first:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.52GiB")
            return compile_one(lowered, path, label)
        finally:
            with lock:
                running[0] -= 1

    f._compile = short_once
    with caplog.at_level(logging.WARNING, logger="jalora.engine.executables"):
        get_all([(f, [((x[:1],), {}), ((x,), {}), ((x[:, :1],), {})])], workers=3)
    assert len(f) == 3 and f.compiled == 3 and f.compiled_alone == 1 and len(calls) == 4
    assert len({label for label, _ in calls[:3]}) == 3  # (three variants, told apart by their labels)
    assert calls[-1] == (calls[0][0], 1)  # the failed one again, last, with nothing else compiling
    assert sum("ran out of device memory" in r.getMessage() for r in caplog.records) == 1
    for arr in (x[:1], x, x[:, :1]):
        np.testing.assert_array_equal(np.asarray(f(arr)), np.asarray(arr) * 2)

    tries: list[str] = []

    def always(message):
        def fail(lowered, path, label):
            tries.append(label)
            raise jax.errors.JaxRuntimeError(message)

        return fail

    for message, calls_of in (("RESOURCE_EXHAUSTED: Out of memory", [x[:1], x]), ("INTERNAL: something else", [x]),
                              ("RESOURCE_EXHAUSTED: Out of memory", [x])):  # fmt: skip
        g = Executables(lambda x: x - 1, "g", tmp_path, "fp-" + message[:3])
        g._compile, tries[:] = always(message), []
        with pytest.raises(jax.errors.JaxRuntimeError, match=message.split(":")[0]):
            get_all([(g, [((arr,), {}) for arr in calls_of])], workers=2)
        assert len(g) == 0 and g.compiled_alone == 0
        assert len(tries) == (3 if len(calls_of) == 2 else 1)  # (two, then the first again alone; one, no retry)
    # With a device budget below both claims each compiled alone already: running out of memory is the error,
    # with no second try (the first one's error stops the wave; the second may have started by then, or not).
    g = Executables(lambda x: x - 1, "g", tmp_path, "fp-budget", describe=lambda args, static: f"g{args[0].shape}")
    g._compile, tries[:] = always("RESOURCE_EXHAUSTED: Out of memory"), []
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        get_all([(g, [((x[:1],), {}), ((x,), {})])], workers=2, device_bytes=1)
    assert 1 <= len(tries) <= 2 and len(set(tries)) == len(tries) and g.compiled_alone == 0


def test_a_compilation_claims_its_largest_matrix_products_buffers():
    """`autotune_bytes` from the lowered text: the largest product's operands and its result twice (the
    candidate's and the reference's), a product inside a scanned layer body included, plus the red zones and
    workspace; a function without a product claims only those."""
    from jalora.engine.executables import AUTOTUNE_EXTRA_BYTES, autotune_bytes

    def layers(x, ws, head):
        def body(c, w):
            return jnp.tanh(c @ w), None

        return jax.lax.scan(body, x, ws)[0] @ head

    spec = jax.ShapeDtypeStruct
    for rows, width in ((8, 64), (512, 64), (8, 4096)):
        lowered = jax.jit(layers).lower(
            spec((rows, 64), jnp.bfloat16), spec((3, 64, 64), jnp.bfloat16), spec((64, width), jnp.bfloat16)
        )
        body = rows * 64 * 2 + 64 * 64 * 2 + 2 * rows * 64 * 2  # (bf16: 2 bytes)
        head = rows * 64 * 2 + 64 * width * 2 + 2 * rows * width * 2
        assert autotune_bytes(lowered) == max(body, head) + AUTOTUNE_EXTRA_BYTES
    f32 = jax.jit(lambda a, b: a @ b).lower(spec((4, 3), jnp.float32), spec((3, 5), jnp.float32))
    assert autotune_bytes(f32) == (12 + 15 + 2 * 20) * 4 + AUTOTUNE_EXTRA_BYTES
    assert autotune_bytes(jax.jit(lambda a: a * 2).lower(spec((4096, 4096), jnp.float32))) == AUTOTUNE_EXTRA_BYTES
    c64 = jax.jit(lambda a, b: a @ b).lower(spec((4, 3), jnp.complex64), spec((3, 5), jnp.complex64))
    assert autotune_bytes(c64) == (12 + 15 + 2 * 20) * 8 + AUTOTUNE_EXTRA_BYTES  # (complex<f32>: 8 bytes)
    # the types as the text writes them: a byte per i1, a scalar, an encoding after the type, an unknown size
    from jalora.engine.executables import _TENSOR, _tensor_bytes

    for text, want in (("tensor<2x3xi1>", 6), ("tensor<f32>", 4), ("tensor<8x64xbf16, #enc>", 1024),
                       ("tensor<4xf8E4M3FN>", 4), ("tensor<?x64xf32>", None)):  # fmt: skip
        assert _tensor_bytes(*_TENSOR.findall(text)[0]) == want, text


def test_compilations_run_at_once_only_while_their_claims_fit():
    """The warm-up's device budget (`get_all(..., device_bytes)`): two claims that fit run together, one that
    does not waits for the running one to end, a claim above the whole budget runs alone, claims start in
    the order they came (a later small one that would fit waits behind an earlier large one), and `close`
    stops the waiting ones. Every compilation is held until the test releases it, and a claim that must wait
    is seen parked in the budget's wait before anything is released: no check rests on a timeout (HANG only
    ends a run whose budget deadlocked)."""
    import concurrent.futures
    import threading

    from jalora.engine.executables import _Budget
    from tests import waiting

    hang = 30.0
    budget, order, lock, threads = _Budget(10), [], threading.Lock(), {}
    seen, release, results = {}, {}, {}

    def until(condition, what):
        waiting.until(condition, what, timeout=hang, poll=0.001)

    def start(name, claim):
        seen[name], release[name] = threading.Event(), threading.Event()

        def job():
            with lock:
                order.append(f"{name} starts")
            seen[name].set()
            assert release[name].wait(hang)
            with lock:
                order.append(f"{name} ends")
            return "done"

        def call():
            try:
                results[name] = budget.run(claim, job)
            except concurrent.futures.CancelledError:
                results[name] = "cancelled"

        threads[name] = threading.Thread(target=call, daemon=True)
        threads[name].start()

    def parked(*names):  # (each has its ticket and waits in the budget, not started)
        until(lambda: len(budget._changed._waiters) >= len(names) or any(seen[n].is_set() for n in names),
              f"{names} parked")
        assert not any(seen[n].is_set() for n in names), (names, order)

    def finish():
        for name, t in threads.items():
            release[name].set()
            t.join(hang)
            assert not t.is_alive()
        threads.clear()

    # 4 + 4 <= 10: both run at once.
    start("a", 4)
    assert seen["a"].wait(hang)
    start("b", 4)
    assert seen["b"].wait(hang)  # (while a is held)
    finish()
    # 6 + 6 > 10: b waits until a ends.
    order.clear()
    start("a", 6)
    assert seen["a"].wait(hang)
    start("b", 6)
    parked("b")
    finish()
    assert order == ["a starts", "a ends", "b starts", "b ends"]
    # 25 > 10 runs, alone; the next one waits for it.
    order.clear()
    start("a", 25)
    assert seen["a"].wait(hang)
    start("b", 1)
    parked("b")
    finish()
    assert order == ["a starts", "a ends", "b starts", "b ends"]
    # c (2) would fit beside a (4), but b (8) came first and does not: c starts after b, then beside it.
    order.clear()
    start("a", 4)
    assert seen["a"].wait(hang)
    start("b", 8)
    until(lambda: budget._tickets == budget._next + 1, "b's ticket")
    start("c", 2)
    parked("b", "c")
    release["a"].set()
    assert seen["b"].wait(hang) and seen["c"].wait(hang)  # (b and c together: 8 + 2 <= 10)
    assert order.index("a ends") < order.index("b starts") < order.index("c starts")
    finish()
    # close: the running one ends as it would, the waiting one is not run.
    order.clear()
    results.clear()
    start("a", 8)
    assert seen["a"].wait(hang)
    start("b", 8)
    parked("b")
    budget.close()
    threads["b"].join(hang)
    assert results["b"] == "cancelled"
    finish()
    assert results == {"a": "done", "b": "cancelled"} and order == ["a starts", "a ends"]
    assert budget._used == 0


def test_the_compile_budget_is_the_gpus_free_memory_less_a_reserve(monkeypatch):
    """`_compile_limits`: a thread per core, and on a GPU the memory its allocator still has less
    `COMPILE_RESERVE_BYTES` (never below 0); no budget where the device reports none (the CPU)."""
    from jalora.engine import model_runner

    class Device:
        platform = "gpu"

        def __init__(self, limit, in_use):
            self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(model_runner, "_usable_cores", lambda: 16)
    reserve = model_runner.COMPILE_RESERVE_BYTES
    for limit, in_use, want in ((80 << 30, 74 << 30, (6 << 30) - reserve), (80 << 30, (80 << 30) - 100, 0)):
        device = Device(limit, in_use)
        monkeypatch.setattr(jax, "local_devices", lambda device=device: [device])
        assert model_runner._compile_limits() == (16, want)
    monkeypatch.undo()
    assert model_runner._compile_limits()[1] is None  # (this process's CPU)


def test_get_all_passes_each_compilations_claim_to_the_budget(tmp_path, monkeypatch):
    """With `device_bytes`, every compilation of the wave goes through the budget with its own claim (the
    larger shapes claim more), and a budget smaller than any claim still compiles all of them, one at a time."""
    import threading

    from jalora.engine.executables import _Budget, autotune_bytes, get_all

    claims, running, most = [], [0], [0]
    run, lock = _Budget.run, threading.Lock()

    def counted(fn):
        def compile_it(*args):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                return fn(*args)
            finally:
                with lock:
                    running[0] -= 1

        return compile_it

    def recorded(self, claim, fn, *args):
        claims.append((args[2], claim))  # (fn._compile's label)
        return run(self, claim, counted(fn), *args)

    monkeypatch.setattr(_Budget, "run", recorded)
    w = jnp.ones((64, 32))
    f = Executables(lambda x, w: x @ w, "f", tmp_path, "fp", describe=lambda args, static: f"rows={args[0].shape[0]}")
    calls = [((jnp.ones((rows, 64)), w), {}) for rows in (1, 16, 256)]
    get_all([(f, calls)], workers=3, device_bytes=1)
    want = {f"rows={a[0].shape[0]}": autotune_bytes(jax.jit(lambda x, w: x @ w).lower(*a)) for a, _ in calls}
    assert dict(claims) == want and len(claims) == 3 and most[0] == 1  # (one at a time: each claim > 1 byte)
    assert want["rows=1"] < want["rows=16"] < want["rows=256"]
    for (x, w_), _ in calls:
        np.testing.assert_allclose(np.asarray(f(x, w_)), np.asarray(x) @ np.asarray(w_), rtol=1e-6)


def test_compiler_options_reach_every_compilation(tmp_path):
    """An Executables' compiler options go into XLA's compilation: an option XLA does not know fails it, the
    autotuning level compiles (on any backend)."""
    x, w = jnp.ones((2, 3)), jnp.ones((3, 3))
    with np.testing.assert_raises_regex(Exception, "xla_no_such_option"):
        Executables(fn, "f", None, "fp", static_argnames=("power",), compiler_options={"xla_no_such_option": 1})(
            x, w, power=2)
    tuned = Executables(fn, "f", tmp_path, "fp", static_argnames=("power",),
                        compiler_options={"xla_gpu_autotune_level": 2})  # fmt: skip
    check(tuned(x, w, power=2), x, w, 2)


def test_autotune_options_default_to_xlas_checked_level_on_a_gpu_unless_xla_flags_set_it(monkeypatch):
    """EngineConfig.autotune_level: None gives GPU_AUTOTUNE_LEVEL on a GPU, nothing where XLA_FLAGS sets the
    level (the user's flag stands) or off a GPU; a level given in the config is passed on a GPU either way."""
    from jalora.engine import llm_engine

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(llm_engine.jax, "default_backend", lambda: "cpu")
    assert llm_engine.autotune_options(None) == llm_engine.autotune_options(2) == {}
    monkeypatch.setattr(llm_engine.jax, "default_backend", lambda: "gpu")
    # (4: the level whose autotuning checks each candidate's result)
    assert llm_engine.autotune_options(None) == {"xla_gpu_autotune_level": llm_engine.GPU_AUTOTUNE_LEVEL} == {
        "xla_gpu_autotune_level": 4}
    assert llm_engine.autotune_options(2) == {"xla_gpu_autotune_level": 2}
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    assert llm_engine.autotune_options(None) == {}
    assert llm_engine.autotune_options(1) == {"xla_gpu_autotune_level": 1}


@pytest.mark.parametrize("layers_per_launch", [0, 2])
def test_an_engine_compiles_every_function_with_its_options(tiny_models, monkeypatch, layers_per_launch):
    """The engine hands autotune_options(config.autotune_level) to every compiled function of its runner (the
    step, or its pre/layer/post launches, and the draw, top-n and prompt-logprob functions), and they are part
    of the fingerprint that names its executables: an option XLA does not know fails the first step."""
    from jalora import LLM, SamplingParams
    from jalora.engine import llm_engine

    levels = []

    def options(level):
        levels.append(level)
        return {"xla_no_such_option": 1}

    plain = LLM(tiny_models["llama"], warmup=False, layers_per_launch=layers_per_launch)
    monkeypatch.setattr(llm_engine, "autotune_options", options)
    llm = LLM(tiny_models["llama"], warmup=False, layers_per_launch=layers_per_launch, autotune_level=3)
    assert levels == [3]
    runner = llm.engine.runner
    assert len(runner._executables()) == (7 if layers_per_launch else 5)
    for exe in runner._executables():
        assert exe._compiler_options == {"xla_no_such_option": 1}, exe.name
        assert exe._fingerprint != plain.engine.runner._step._fingerprint
    with pytest.raises(Exception, match="xla_no_such_option"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1))
