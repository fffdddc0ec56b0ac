export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jc
P="python3 bench/profile_step.py --top 16"
$P --batch 1 2>&1 | grep -v Warn | head -14 | tee $OUT/log_b1.txt
$P --batch 64 2>&1 | head -8 | tee $OUT/log_b64.txt
$P --batch 64 --adapters 8 2>&1 | head -26 | tee $OUT/log_b64a8.txt
XLA_FLAGS=--xla_gpu_enable_command_buffer= $P --batch 1 --out nocb.json 2>&1 | head -8 | tee $OUT/log_b1_nocb.txt
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" $P --batch 1 --out cb.json 2>&1 | head -8 | tee $OUT/log_b1_cb.txt
python3 bench/attention_splits.py 2>&1 | tail -14
