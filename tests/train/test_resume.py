"""An interrupted run resumed from its orbax checkpoint ends with the weights, optimizer trajectory and
losses of an uninterrupted run with the same seed (dropout, accumulation and two buckets included)."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jalora.errors import InvalidRequestError
from jalora.train import train_adapter
from tests.train.conftest import JUDGE


class Interrupted(Exception):
    pass


def _data(path):
    rng = np.random.default_rng(3)
    with open(path, "w") as f:
        for i in range(20):  # prompts of 3..24 words: two buckets (16 and 32 tokens)
            words = " ".join(f"w{x}" for x in rng.integers(10, 90, size=rng.integers(3, 25)))
            f.write(json.dumps({"prompt": words, "response": "w5" if i % 3 else "w6 w7"}) + "\n")
    return str(path)


def test_resumed_run_equals_uninterrupted_run(text_llama, tmp_path):
    data = _data(tmp_path / "data.jsonl")
    settings = dict(model=text_llama, data=data, invocation=JUDGE, r=4, lora_dropout=0.1, max_steps=6, batch_size=3,
                    grad_accum=2, learning_rate=3e-3, warmup_steps=2, save_every=2, eval_fraction=0.2,
                    progress=False)  # fmt: skip
    whole = train_adapter(output_dir=str(tmp_path / "whole"), **settings)

    def stop_after_3(step, _):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_adapter(output_dir=str(tmp_path / "cut"), callback=stop_after_3, **settings)
    steps_run = []
    resumed = train_adapter(output_dir=str(tmp_path / "cut"), callback=lambda s, _: steps_run.append(s), **settings)
    assert steps_run == [3, 4, 5, 6]  # from the checkpoint of step 2: step 3 runs again
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a[next(k for k in a if "lora_B" in k)], 0)  # it trained
    logs = [json.loads((tmp_path / d / "training_log.json").read_text()) for d in ("whole", "cut")]
    assert [h["loss"] for h in logs[0]["history"]] == [h["loss"] for h in logs[1]["history"]]
    assert (whole.train_loss, whole.eval_loss, whole.eval_accuracy) == (
        resumed.train_loss, resumed.eval_loss, resumed.eval_accuracy)  # fmt: skip

    with pytest.raises(InvalidRequestError, match="^resume: the checkpoint in .* was made with other settings"):
        train_adapter(output_dir=str(tmp_path / "cut"), **{**settings, "learning_rate": 1e-3})


def test_a_batch_larger_than_the_data_trains_as_one_of_the_data(text_llama, tmp_path):
    """A batch size past the examples there are pads no rows beyond them (10**8 rows would not fit in memory):
    the run equals one whose batch holds exactly the training examples (16 of 20, 4 held out), without dropout."""
    data = _data(tmp_path / "data.jsonl")
    settings = dict(model=text_llama, data=data, invocation=JUDGE, r=4, max_steps=2, learning_rate=3e-3,
                    warmup_steps=0, save_every=0, eval_fraction=0.2, progress=False)  # fmt: skip
    exact = train_adapter(output_dir=str(tmp_path / "exact"), batch_size=16, **settings)
    huge = train_adapter(output_dir=str(tmp_path / "huge"), batch_size=10**8, **settings)
    a = load_file(str(tmp_path / "exact" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "huge" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (exact.train_loss, exact.eval_loss) == (huge.train_loss, huge.eval_loss)


def test_no_resume_starts_over_and_can_itself_be_resumed(text_llama, tmp_path):
    """--no-resume replaces an earlier run's checkpoints (orbax saves no step at or below the latest one there, so
    they used to stay, and the new run could never be resumed), and the same data under another path resumes."""
    data = _data(tmp_path / "data.jsonl")
    settings = dict(model=text_llama, invocation=JUDGE, r=4, max_steps=4, batch_size=4, warmup_steps=0,
                    save_every=2, eval_fraction=0.0, progress=False, output_dir=str(tmp_path / "out"))  # fmt: skip
    train_adapter(data=data, learning_rate=1e-3, **settings)
    first = train_adapter(data=data, learning_rate=3e-3, resume=False, **settings)
    moved = str(tmp_path / "moved.jsonl")
    shutil.copy(data, moved)
    steps = []
    again = train_adapter(data=moved, learning_rate=3e-3, callback=lambda step, _: steps.append(step), **settings)
    assert steps == [] and again.train_loss == first.train_loss  # resumed at the new run's last step
    with pytest.raises(InvalidRequestError, match="^resume: "):
        train_adapter(data=data, learning_rate=1e-3, **settings)  # the first run's settings: its checkpoints went
    # only orbax's steps go: anything else under checkpoints/ stays
    keep = tmp_path / "out" / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    train_adapter(data=data, learning_rate=1e-3, resume=False, **settings)
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("changes", [{"r": 8}, {"target_modules": ("q_proj",)}, {"max_grad_norm": 0.0}])
def test_a_checkpoint_of_other_shapes_is_refused_by_its_settings(text_llama, tmp_path, changes):
    """Another rank, other projections or no clipping (another optimizer state) are the resume error too: the
    state used to be restored before the settings were compared, and orbax failed on the shapes (ValueError)."""
    data = _data(tmp_path / "data.jsonl")
    settings = dict(model=text_llama, data=data, invocation=JUDGE, r=4, max_steps=1, batch_size=4, save_every=1,
                    eval_fraction=0.0, progress=False, output_dir=str(tmp_path / "out"))  # fmt: skip
    train_adapter(**settings)
    with pytest.raises(InvalidRequestError, match="^resume: the checkpoint in .* was made with other settings"):
        train_adapter(**{**settings, **changes})


def test_the_init_adapter_counts_by_content(text_llama, tmp_path):
    """The adapter a run starts from counts as its data does, by content: other weights under the same path are
    refused (they used to resume the checkpoint made from the old weights), the same weights under another path
    resume."""
    data = _data(tmp_path / "data.jsonl")
    settings = dict(model=text_llama, data=data, invocation=JUDGE, r=4, max_steps=1, batch_size=4, save_every=1,
                    eval_fraction=0.0, progress=False)  # fmt: skip
    init = tmp_path / "init"
    train_adapter(output_dir=str(init), seed=1, **settings)
    train_adapter(output_dir=str(tmp_path / "out"), init_adapter=str(init), **settings)
    shutil.copytree(init, tmp_path / "moved", ignore=shutil.ignore_patterns("checkpoints"))
    steps = []
    train_adapter(output_dir=str(tmp_path / "out"), init_adapter=str(tmp_path / "moved"),
                  callback=lambda step, _: steps.append(step), **settings)  # fmt: skip
    assert steps == []  # resumed at its last step
    train_adapter(output_dir=str(init), seed=2, resume=False, **settings)  # other weights under the same path
    with pytest.raises(InvalidRequestError, match="^resume: the checkpoint in .* was made with other settings"):
        train_adapter(output_dir=str(tmp_path / "out"), init_adapter=str(init), **settings)
