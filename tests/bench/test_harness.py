"""bench/harness.py: the measured ceilings' arithmetic (the device's timings replaced by the test's)."""


def test_the_batch1_matmul_ceiling_is_the_best_width_over_the_bytes_each_reads(monkeypatch):
    """`gemv_bandwidth` times launches per width of as many distinct [k, n] matrices as the bytes hold, and
    reports the best rate: bytes read (k * n * count * 2 per launch) over the launches' time. The activations
    have a batch-1 step's padded rows (GEMV_ROWS). The timer here is the test's (so each width's time is
    known), and the last launch's outputs are checked against numpy."""
    import jax
    import numpy as np

    from bench import harness

    seen = []

    def fake_timeit(fn, warmup, iters):
        outs = jax.block_until_ready(fn())
        seen.append([np.asarray(o, np.float32) for o in outs])
        return {8: 2.0, 16: 1.0, 32: 4.0}[outs[0].shape[1]]  # seconds, by width

    monkeypatch.setattr(harness, "timeit", fake_timeit)
    k, nbytes = 4, 2 * 4 * 32 * 3  # three [4, 32] bf16 matrices: 768 bytes
    # width 16's second, for GEMV_LAUNCHES launches of 768 bytes each
    assert harness.gemv_bandwidth(nbytes, k=k, widths=(8, 16, 32)) == harness.GEMV_LAUNCHES * 768 / 1.0 / 1e9
    m = harness.GEMV_ROWS
    assert [[o.shape for o in outs] for outs in seen] == [[(m, 8)] * 12, [(m, 16)] * 6, [(m, 32)] * 3]
    x = np.asarray(jax.random.normal(jax.random.key(4), (m, k), "bfloat16"), np.float32)
    for outs in seen:
        for i, out in enumerate(outs):
            w = np.asarray(jax.random.normal(jax.random.key(3 + i), (k, out.shape[1]), "bfloat16"), np.float32)
            np.testing.assert_allclose(out, x @ w, rtol=2e-2, atol=2e-2)  # (bf16 outputs)
