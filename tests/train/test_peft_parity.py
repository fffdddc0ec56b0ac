"""The training forward against transformers + PEFT on the tiny Llama (float32, CPU): the loss of one
batch and the gradient of every LoRA weight, then a short training run whose exported adapter gives
the same greedy tokens and logprobs in PEFT and in jalora."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jalora import LLM, SamplingParams
from jalora.config import EngineConfig
from jalora.model.checkpoint import load_model
from jalora.model.config import ModelConfig
from jalora.model.kernel_plan import KernelPlan
from jalora.train import train_adapter
from jalora.train.batches import make_batch
from jalora.train.data import Example
from jalora.train.export import read_lora
from jalora.train.forward import loss_fn
from tests import hf_models
from tests.train.conftest import JUDGE

INV = [7, 8, 9]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _examples(rng) -> list[Example]:
    """Three rows of different lengths: prompt, invocation, a response of 2-4 tokens (the last an eos)."""
    out = []
    for n_prompt, n_resp in ((11, 3), (20, 2), (5, 4)):
        prompt = rng.integers(13, 90, size=n_prompt).tolist() + INV
        response = rng.integers(13, 90, size=n_resp - 1).tolist() + [hf_models.VOCAB - 1]
        out.append(Example(prompt + response, n_prompt, len(prompt), len(prompt) + n_resp - 1, 0))
    return out


def _peft_loss_and_grads(base, adapter, examples, t):
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_models.load_oracle(base), adapter, is_trainable=True)
    ids = torch.zeros((len(examples), t), dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    logits = model(input_ids=ids, attention_mask=mask, alora_offsets=[t - e.activation for e in examples]).logits
    logp = torch.log_softmax(logits.float(), -1)
    total, count = 0.0, 0
    for i, e in enumerate(examples):
        for p in range(e.response_start, len(e.ids)):
            total = total - logp[i, p - 1, e.ids[p]]
            count += 1
    loss = total / count
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}
    return loss.item(), grads


def test_first_step_loss_and_lora_gradients_equal_peft(tiny_models, tmp_path):
    base = tiny_models["llama"]
    adapter = hf_models.make_adapter(base, str(tmp_path / "init"), TARGETS, r=4, alpha=8, invocation=INV, seed=5)
    cfg = ModelConfig.from_dir(base)
    examples = _examples(np.random.default_rng(0))
    t = 32
    batch = make_batch(examples, [0, 1, 2], t, 4, 8)  # one padding row, padded loss slots
    model = load_model(base, cfg, KernelPlan.from_config(EngineConfig(model=base)), np.float32, "auto")
    graphdef, state = nnx.split(model)
    lora = read_lora(adapter, cfg, 4, TARGETS)

    def mean_loss(p):
        loss_sum, (count, _, _) = loss_fn(p, graphdef, state, batch, 8 / 4, 0.0, None, "xla", False)
        return loss_sum / count

    loss, grads = jax.value_and_grad(mean_loss)(lora)
    want_loss, want_grads = _peft_loss_and_grads(base, adapter, examples, t)
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    checked = 0
    for name, want in want_grads.items():
        layer, module, ab = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-4], name.split(".")[-3][-1]
        got = np.asarray(grads[module][ab][layer])
        scale = np.max(np.abs(want))
        assert scale > 0, name
        assert np.max(np.abs(got - want)) <= 1e-5 * scale, f"{name}: {np.max(np.abs(got - want)) / scale:.2e}"
        checked += 1
    assert checked == 2 * cfg.num_layers * len(TARGETS)


def _write_data(path, rng, n):
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{x}" for x in rng.integers(10, 90, size=rng.integers(4, 14)))
            f.write(json.dumps({"prompt": words, "response": "w5 w6" if i % 2 else "w7"}) + "\n")


@pytest.mark.parametrize("save_dtype", ["float32"])
def test_trained_adapter_gives_the_same_outputs_in_peft_and_jalora(text_llama, tmp_path, save_dtype):
    data = tmp_path / "data.jsonl"
    _write_data(data, np.random.default_rng(1), 24)
    out = tmp_path / "judge"
    result = train_adapter(model=text_llama, data=str(data), output_dir=str(out), invocation=JUDGE, r=4,
                           target_modules=("q_proj", "v_proj", "down_proj"), max_steps=6, batch_size=4, grad_accum=2,
                           learning_rate=5e-3, warmup_steps=2, save_every=0, eval_fraction=0.25, progress=False,
                           save_dtype=save_dtype)  # fmt: skip
    log = json.loads((out / "training_log.json").read_text())
    assert result.steps == 6 and len(log["history"]) == 6 and log["eval_examples"] == 6
    assert log["history"][-1]["loss"] < log["history"][0]["loss"]
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["task_type"] == "CAUSAL_LM" and acfg["alora_invocation_tokens"] == [94]
    oracle = hf_models.load_peft_oracle(text_llama, str(out))
    llm = LLM(text_llama, num_kv_blocks=32, max_num_seqs=2, max_lora_rank=8, warmup=False)
    llm.load_adapter("judge", str(out))
    prompt = np.random.default_rng(9).integers(10, 90, size=19).tolist() + [94]
    (got,) = llm.generate([prompt], SamplingParams(max_tokens=8, prompt_logprobs=True, logprobs=0, ignore_eos=True),
                          "judge")  # fmt: skip
    prompt_lps, tokens, token_lps = hf_models.oracle_run(oracle, prompt, 8, activation=19)
    assert got.activation_start == 19 and got.token_ids == tokens
    assert np.max(np.abs(np.asarray(got.prompt_logprobs[1:]) - np.asarray(prompt_lps))) <= 1e-4
    assert np.max(np.abs(np.asarray([lp[t] for lp, t in zip(got.logprobs, got.token_ids)]) - token_lps)) <= 1e-4
