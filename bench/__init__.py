"""jalora's benchmarks: run each from the repository root as `python -m bench.<name>`.

Every script measures through `bench.harness` (run metadata, hardware ceilings, timing, result
files) and writes JSON under bench/results/; `python -m bench.report` renders the README's tables
from those files.
"""
