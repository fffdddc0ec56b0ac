"""One process of the two-process test (tests/engine/test_multihost.py): process 0 runs the workload and
prints its outputs as JSON; process 1 follows. `python -m tests.engine.multihost_worker PID PORT MODEL
ADAPTERS [--lose-follower | --private-adapters | --fail-launch]` (ADAPTERS: the judges' directories,
comma-separated). With --private-adapters process 0 loads each judge from a copy it deletes once read,
before the load that sends it to process 1 (as a directory on process 0's host only would be). With
--lose-follower process 0 runs once, prints `ready`, waits for a line on stdin (sent once the test has
killed process 1), then tries again and prints what the engine said. With --fail-launch process 0 runs
once, then its own half of the next step raises (a fault put into process 0 only, after the step was sent
to process 1), and it prints what that call and the one after it raised."""

import json
import os
import shutil
import sys
import tempfile

from jalora import LLM, SamplingParams
from jalora.engine import multihost

# Three judges over two slots: the third request of the last round waits for a slot and swaps its judge in.
ENGINE = dict(block_size=4, num_kv_blocks=14, max_num_seqs=4, max_num_batched_tokens=16, max_loras=2,
              max_cpu_loras=3, max_lora_rank=8, warmup=False)  # fmt: skip
JUDGES = ("judge", "judge_b", "judge_c")
SP = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1)
INV = [7, 8, 9]
PROMPTS = [[20, 21, 22, 23, 24, 25, 26], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


def load_judges(llm: LLM, adapters: str, private: bool = False) -> None:
    for name, path in zip(JUDGES, adapters.split(",")):
        if not private:
            llm.load_adapter(name, path)
            continue
        with tempfile.TemporaryDirectory() as tmp:  # gone before the load (no other process can read it)
            prepared = llm.engine.prepare_adapter(shutil.copytree(path, os.path.join(tmp, name)))
        llm.engine.load_adapter(name, prepared)


def workload(llm: LLM) -> list[dict]:
    """Two base requests, then an aLoRA judge of the first answer (its prefix reused) and a sampled one,
    then the three judges of the second prompt at once (one swapped into a slot another one left)."""
    first = llm.generate(PROMPTS, SP)
    judge = PROMPTS[0] + first[0].token_ids + INV
    sampled = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=5)
    second = llm.generate([judge, PROMPTS[1]], [SP, sampled], adapter=["judge", None])
    third = llm.generate([PROMPTS[1] + INV] * 3, SP, adapter=list(JUDGES))
    swaps = llm.engine.stats().adapter_swaps
    assert swaps >= 1, swaps
    return [
        {"tokens": o.token_ids, "cached": o.num_cached_tokens,
         "logprobs": [o.logprobs[i][t] for i, t in enumerate(o.token_ids)] if o.logprobs else None}
        for o in first + second + third
    ]  # fmt: skip


def main() -> None:
    # Read when JAX first starts a backend (nothing above does): one CPU device per process. Set here,
    # not at import, because the test imports this module into a process with 8 devices.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    pid, port, model, adapter = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    lose = "--lose-follower" in sys.argv
    multihost.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    if pid != 0:
        multihost.follow(llm.engine)
        return
    load_judges(llm, adapter, private="--private-adapters" in sys.argv)
    if "--fail-launch" in sys.argv:
        llm.generate(PROMPTS[:1], SP)

        def broken(*args):
            raise RuntimeError("injected fault")

        llm.engine.runner._launch_step = broken
        errors = []
        for _ in range(2):
            try:
                llm.generate(PROMPTS[:1], SP)
                errors.append(None)
            except Exception as e:
                errors.append([type(e).__name__, str(e)])
        print("errors", json.dumps(errors), flush=True)
        os._exit(0)  # process 1 waits in the step's collective: no shutdown together
    if not lose:
        print(json.dumps(workload(llm)), flush=True)
        llm.engine.close()
        return
    llm.generate(PROMPTS[:1], SP)
    print("ready", flush=True)
    sys.stdin.readline()  # process 1 is dead now
    llm.engine.multihost_leader.lost_event.wait()  # its connection's end, certain once it died
    try:
        llm.generate(PROMPTS[:1], SP)
        print(json.dumps({"error": None}), flush=True)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
    os._exit(0)  # the distributed runtime's shutdown would wait for the dead process


if __name__ == "__main__":
    main()
