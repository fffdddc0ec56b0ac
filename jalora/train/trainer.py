"""`train_adapter`: a LoRA / aLoRA adapter trained on the jalora decoder with optax, exported for PEFT.

Order of work: the config is validated, every data line is read and checked (a bad file fails here,
before any weight is loaded), then the frozen base model loads, the LoRA weights are initialised (or
restored from the latest orbax checkpoint in `output_dir/checkpoints`), and each optimizer step runs
`grad_accum` micro-batches: the gradients of the *sum* of the response tokens' losses add up, and one
division by the step's token count gives the gradient of the mean over all of them, whatever the
micro-batches' sizes. AdamW (decoupled weight decay) with linear warm-up and cosine decay, after
clipping the gradient's global norm.

Everything random is a function of the seed and the step (the initialisation, each epoch's data order,
each micro-batch's dropout key), and a checkpoint holds the LoRA weights, the optimizer state and the
history, so a run resumed from a checkpoint ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jalora.errors import InvalidRequestError
from jalora.train import batches as B
from jalora.train.config import TrainConfig
from jalora.train.data import Tokenization, load_examples
from jalora.train.export import read_lora, write_peft_adapter
from jalora.train.forward import init_lora, loss_fn
from jalora.train.plot import write_curve

LOG_FILE = "training_log.json"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss: float  # mean response-token loss of the last optimizer step
    eval_loss: float | None
    eval_accuracy: float | None  # share of held-out examples whose every response token is the argmax
    tokens_per_second: float  # training tokens (prompt + response, no padding) per second of stepping
    seconds: float


@dataclasses.dataclass
class _Setup:
    """What the data and the model give the loop."""

    model_dir: str
    model_config: object
    tokenization: Tokenization
    invocation: list[int] | None
    max_seq_len: int
    train: list
    eval: list


def _prepare(config: TrainConfig) -> _Setup:
    """Resolves the model's files, tokenizer and invocation, and reads every example (no weights yet)."""
    from jalora.adapters.peft import invocation_of
    from jalora.engine.chat import ChatTemplate, read_chat_template
    from jalora.engine.llm_engine import _ids, _load_tokenizer, _read_generation_config
    from jalora.model.config import ModelConfig
    from jalora.model.gguf import resolve_model_dir

    for name in ("data", "eval_data"):
        path = getattr(config, name)
        if path is not None and not os.path.isfile(path):
            raise InvalidRequestError(name, f"{path} does not exist")
    if config.init_adapter is not None and not os.path.isdir(config.init_adapter):
        raise InvalidRequestError("init_adapter", f"{config.init_adapter} is not a directory")
    model_dir = resolve_model_dir(config.model)
    cfg = ModelConfig.from_dir(model_dir)
    max_len = config.max_seq_len or cfg.max_position_embeddings
    if max_len > cfg.max_position_embeddings:
        raise InvalidRequestError("max_seq_len", f"{max_len} is more than the model's {cfg.max_position_embeddings}")
    tokenizer = _load_tokenizer(model_dir)

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        if tokenizer is None:
            raise InvalidRequestError("model", f"{config.model} has no tokenizer.json")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    template, special = read_chat_template(model_dir)
    chat = ChatTemplate(template, special, tokenizer) if template is not None and tokenizer is not None else None
    eos = cfg.eos_token_ids + _ids(_read_generation_config(model_dir).get("eos_token_id"))
    if config.append_eos and not eos:
        raise InvalidRequestError("append_eos", "the model names no end-of-sequence token")
    invocation = None
    if config.is_alora:  # validated as the engine validates a loaded adapter's
        acfg = {
            "alora_invocation_tokens": list(config.invocation_tokens) or None,
            "invocation_string": config.invocation,
        }
        try:
            invocation, _ = invocation_of(acfg, encode, cfg.vocab_size, max_len)
        except InvalidRequestError as e:
            raise InvalidRequestError("invocation", e.message) from None
    tok = Tokenization(encode, chat, eos[0] if config.append_eos else None)
    train = load_examples(config.data, tok, invocation, config.append_invocation, max_len)
    if config.eval_data is not None:
        evals = load_examples(config.eval_data, tok, invocation, config.append_invocation, max_len)
    else:
        order = np.random.default_rng([config.seed, 7]).permutation(len(train))
        n_eval = int(round(len(train) * config.eval_fraction))
        evals = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    if not train:
        raise InvalidRequestError("data", f"{config.data}: no training examples are left after the eval split")
    return _Setup(model_dir, cfg, tok, invocation, max_len, train, evals)


def _fingerprint(config: TrainConfig, init: dict | None = None) -> str:
    """What a checkpoint must agree with to be resumed: the settings that change the weights, and the data and the
    weights of `init_adapter` (`init`) by content: the same lines or adapter under another path resume."""
    ignore = {"output_dir", "eval_every", "save_every", "resume", "progress", "data", "eval_data", "init_adapter"}
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in ignore}
    fields["eval_data"] = config.eval_data is not None
    fields["init_adapter"] = config.init_adapter is not None
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for path in (config.data, config.eval_data):
        if path is not None:
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    for module in sorted(init or {}):
        for name in ("A", "B"):
            h.update(np.ascontiguousarray(init[module][name], np.float32).tobytes())
    return h.hexdigest()


def _check_platform(config: TrainConfig) -> None:
    """Settings this backend cannot train with, refused before any file is read: cuDNN's attention needs a GPU, and
    XLA's CPU matmuls take no float16 inputs with float32 accumulation."""
    backend = jax.default_backend()
    if config.attention == "cudnn" and backend != "gpu":
        raise InvalidRequestError("attention", f"cudnn needs a GPU (this backend is {backend}); use auto or xla")
    if config.dtype == "float16" and backend == "cpu":
        raise InvalidRequestError("dtype", "float16 does not train on a CPU (XLA's CPU matmuls refuse it); use "
                                  "bfloat16 or float32")  # fmt: skip


def _attention_impl(config: TrainConfig) -> str:
    if config.attention != "auto":
        return config.attention
    return "cudnn" if jax.default_backend() == "gpu" and config.dtype in ("bfloat16", "float16") else "xla"


def make_optimizer(config: TrainConfig, total_steps: int):
    """(optax transformation, learning-rate schedule) of a run of `total_steps` optimizer steps."""
    return _optimizer(config.learning_rate, config.warmup_steps, config.weight_decay, config.max_grad_norm,
                      total_steps)  # fmt: skip


def _optimizer(learning_rate, warmup_steps, weight_decay, max_grad_norm, total_steps):
    import optax

    warmup = min(warmup_steps, total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1))
    chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.chain(*chain), schedule


class _Checkpoints:
    """orbax-checkpoint: {lora, opt} as a pytree and the history as JSON, per optimizer step."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def delete_all(self) -> None:
        """Deletes every step orbax saved here (and only those)."""
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def save(self, step: int, state, meta: dict) -> None:
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        """The JSON of step `step` alone (its state is not read)."""
        return self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state):
        args = self.ocp.args
        out = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract_state),
                                                             meta=args.JsonRestore()))  # fmt: skip
        return out.state, out.meta

    def close(self) -> None:
        self.manager.close()


# The step functions are jitted once per process for each static setting (the model's graph, the LoRA
# scaling, ...), so runs that share them (a resumed run, a second adapter of the same model) share the
# compiled executables.
_STATIC = ("graphdef", "scaling", "dropout", "attention", "remat")


@partial(jax.jit, static_argnames=_STATIC)
def _grad_step(lora, state, batch, key, *, graphdef, scaling, dropout, attention, remat):
    """((sum of response-token losses, (tokens, exact matches, rows)), gradient of the sum)."""
    return jax.value_and_grad(loss_fn, has_aux=True)(
        lora, graphdef, state, batch, scaling, dropout, key, attention, remat
    )


@partial(jax.jit, static_argnames=("graphdef", "scaling", "attention", "remat"))
def _eval_step(lora, state, batch, *, graphdef, scaling, attention, remat):
    return loss_fn(lora, graphdef, state, batch, scaling, 0.0, None, attention, remat)


def _apply_fn(config: TrainConfig, total_steps: int):
    """The jitted optimizer update: mean gradient (sum / tokens), clipping, AdamW."""
    hyper = (config.learning_rate, config.warmup_steps, config.weight_decay, config.max_grad_norm)
    return _apply_for(hyper, total_steps)


@functools.lru_cache(maxsize=8)
def _apply_for(hyper: tuple, total_steps: int):
    import optax

    learning_rate, warmup_steps, weight_decay, max_grad_norm = hyper
    optimizer, _ = _optimizer(learning_rate, warmup_steps, weight_decay, max_grad_norm, total_steps)

    @jax.jit
    def apply(params, opt_state, grads, count):
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    return apply


def _say(progress, evaluation: dict) -> None:
    accuracy = "" if evaluation["accuracy"] is None else f", accuracy {evaluation['accuracy']:.1%}"
    line = f"step {evaluation['step']}: eval loss {evaluation['loss']:.4f}{accuracy}"
    if progress is not None:
        progress.write(line)


def train_adapter(
    config: TrainConfig | None = None, *, callback: Callable[[int, dict], None] | None = None, **fields
) -> TrainResult:
    """Trains an adapter as `config` (or `TrainConfig(**fields)`) says and writes it to `output_dir` as a
    PEFT directory, with `training_log.json`, `loss.csv` and `loss.svg` beside it. `callback(step,
    metrics)` runs after each optimizer step (and its checkpoint). Raises InvalidRequestError (a bad
    setting, or a bad data line naming its line and field) before any training."""
    try:
        import optax  # noqa: F401
        import orbax.checkpoint  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError("train", f"needs the {e.name} package: pip install 'jalora[train]'") from None

    from jalora.config import EngineConfig
    from jalora.model.checkpoint import load_model, resolve_dtype
    from jalora.model.kernel_plan import KernelPlan

    config = TrainConfig(**fields) if config is None else config.replace(**fields)
    _check_platform(config)
    setup = _prepare(config)
    cfg, train, evals = setup.model_config, setup.train, setup.eval
    # Before the model is read: the adapter to start from, and the output directory.
    init = None if config.init_adapter is None else read_lora(config.init_adapter, cfg, config.r,
                                                             config.target_modules)  # fmt: skip
    try:
        os.makedirs(config.output_dir, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError("output_dir", f"cannot be created: {e.strerror or e}") from None

    buckets = B.bucket_lengths(setup.max_seq_len)
    r_slots = B.response_slots(train + evals)
    per_epoch = len(B.epoch_batches(train, buckets, config.batch_size, config.seed, 0))
    # Rows of a micro-batch: batch_size, but no more than the examples there are (the rest would be padding).
    train_rows, eval_rows = min(config.batch_size, len(train)), min(config.batch_size, max(1, len(evals)))
    total_steps = config.max_steps or max(1, math.ceil(math.ceil(per_epoch * config.epochs) / config.grad_accum))
    epochs_cache: dict[int, list] = {}

    def micro_batch(j: int):
        epoch = j // per_epoch
        if epoch not in epochs_cache:
            epochs_cache.clear()
            epochs_cache[epoch] = B.epoch_batches(train, buckets, config.batch_size, config.seed, epoch)
        return epochs_cache[epoch][j % per_epoch]

    # The frozen base model (weights as in serving) and the trainable LoRA weights.
    from flax import nnx

    plan = KernelPlan.from_config(EngineConfig(model=config.model))
    model = load_model(setup.model_dir, cfg, plan, resolve_dtype(config.dtype), "auto")
    graphdef, base_state = nnx.split(model)
    if init is not None:
        lora = jax.tree.map(jnp.asarray, init)
    else:
        lora = init_lora(cfg, config.target_modules, config.r, jax.random.key(config.seed))
    optimizer, schedule = make_optimizer(config, total_steps)
    opt_state = optimizer.init(lora)

    static = dict(graphdef=graphdef, scaling=config.scaling, attention=_attention_impl(config), remat=config.remat)
    apply = _apply_fn(config, total_steps)
    fingerprint = _fingerprint(config, init)
    history: list[dict] = []
    eval_history: list[dict] = []
    start = 0
    ckpt = _Checkpoints(os.path.join(config.output_dir, "checkpoints")) if config.save_every else None
    if ckpt is not None and not config.resume:
        ckpt.delete_all()  # starting over: an earlier run's later steps would keep this run's saves out
    if ckpt is not None and config.resume and ckpt.latest() is not None:
        # The settings first: another rank, other projections or clipping give a state orbax cannot restore into
        if ckpt.meta(ckpt.latest())["fingerprint"] != fingerprint:
            raise InvalidRequestError(
                "resume", f"the checkpoint in {config.output_dir} was made with other settings or data; "
                "train into another output_dir, or pass --no-resume to start over"
            )  # fmt: skip
        state, meta = ckpt.restore(ckpt.latest(), {"lora": lora, "opt": opt_state})
        lora, opt_state = state["lora"], state["opt"]
        start, history, eval_history = meta["step"], meta["history"], meta["evals"]

    def evaluate(params) -> dict:
        loss_sum = count = exact = rows = 0.0
        for t, idx in B.eval_batches(evals, buckets, config.batch_size):
            batch = B.make_batch(evals, idx, t, eval_rows, r_slots)
            ls, (c, e, n) = _eval_step(params, base_state, batch, **static)
            loss_sum, count, exact, rows = loss_sum + float(ls), count + float(c), exact + float(e), rows + float(n)
        return {"loss": loss_sum / max(count, 1.0), "accuracy": exact / rows if rows else None}

    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start, desc="jalora train", unit="step", dynamic_ncols=True)
    dropout_key = jax.random.key(config.seed + 1)
    stepping_seconds = sum(h["seconds"] for h in history)
    stepping_tokens = sum(h["tokens"] for h in history)
    t_run = time.perf_counter()
    try:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            grads_sum, loss_sum, count, tokens = None, 0.0, 0.0, 0
            for j in range(step * config.grad_accum, (step + 1) * config.grad_accum):
                t, idx = micro_batch(j)
                batch = B.make_batch(train, idx, t, train_rows, r_slots)
                key = jax.random.fold_in(dropout_key, j)
                (ls, (c, _, _)), g = _grad_step(lora, base_state, batch, key, dropout=config.lora_dropout, **static)
                grads_sum = g if grads_sum is None else jax.tree.map(jnp.add, grads_sum, g)
                loss_sum, count, tokens = loss_sum + ls, count + c, tokens + B.num_tokens(train, idx)
            lora, opt_state, grad_norm = apply(lora, opt_state, grads_sum, count)
            step_loss = float(loss_sum / count)
            seconds = time.perf_counter() - t0
            stepping_seconds += seconds
            stepping_tokens += tokens
            record = {"step": step + 1, "loss": step_loss, "lr": float(schedule(step)), "grad_norm": float(grad_norm),
                      "tokens": tokens, "seconds": seconds}  # fmt: skip
            history.append(record)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps and evals:
                eval_history.append({"step": step + 1, **evaluate(lora)})
                _say(progress, eval_history[-1])
            if progress is not None:
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                progress.update(1)
            if ckpt is not None and ((step + 1) % config.save_every == 0 or step + 1 == total_steps):
                meta = {"step": step + 1, "fingerprint": fingerprint, "history": history, "evals": eval_history}
                ckpt.save(step + 1, {"lora": lora, "opt": opt_state}, meta)
            if callback is not None:
                callback(step + 1, record)
    finally:
        if progress is not None:
            progress.close()
        if ckpt is not None:
            ckpt.close()

    final_eval = evaluate(lora) if evals else {"loss": None, "accuracy": None}
    if evals:
        eval_history.append({"step": total_steps, **final_eval})
    base_name = os.path.basename(os.path.normpath(config.model))
    write_peft_adapter(config.output_dir, lora, config, setup.invocation, base_name)
    result = TrainResult(
        adapter_dir=config.output_dir,
        steps=total_steps,
        train_loss=history[-1]["loss"],
        eval_loss=final_eval["loss"],
        eval_accuracy=final_eval["accuracy"],
        tokens_per_second=stepping_tokens / stepping_seconds if stepping_seconds else 0.0,
        seconds=time.perf_counter() - t_run,
    )
    log = {"config": dataclasses.asdict(config), "invocation_tokens": setup.invocation,
           "train_examples": len(train), "eval_examples": len(evals), "result": dataclasses.asdict(result),
           "history": history, "evals": eval_history}  # fmt: skip
    with open(os.path.join(config.output_dir, LOG_FILE), "w") as f:
        json.dump(log, f, indent=1)
    write_curve(config.output_dir, [(h["step"], h["loss"]) for h in history],
                [(e["step"], e["loss"]) for e in eval_history], f"jalora train: {base_name}")  # fmt: skip
    return result
