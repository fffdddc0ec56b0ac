export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | grep -v Warn | tee $OUT/gpu_check.txt
import jax, jax.numpy as jnp
from bench.attention_splits import engine_shaped
import bench.attention as att
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
for b, c in [(1, 1024), (4, 8192), (16, 4096), (64, 1024), (1, 65536)]:
    args = engine_shaped(jax.random.key(b), b, c, 16, 64)
    out = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=att.SM_SCALE, impl="gpu"))(*args)
    ref = jax.jit(lambda *a: ragged_paged_attention_reference(*a, sm_scale=att.SM_SCALE))(*args)
    d = jnp.abs(out[:b].astype(jnp.float32) - ref[:b].astype(jnp.float32))
    print("attention check B=%d ctx=%d max abs err %.2e, max |ref| %.2f" % (b, c, float(d.max()), float(jnp.abs(ref[:b]).max())))
PY
python3 bench/lora_step.py 2>&1 | grep -v Warn | tail -8 | tee $OUT/lora_step.txt
python3 bench/profile_step.py --batch 1 --context 65536 --steps 10 --top 8 2>&1 | grep -v Warn | head -12
