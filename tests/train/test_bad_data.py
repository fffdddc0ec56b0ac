"""`jalora train` with a bad data file stops before any weight is loaded, with one line naming the file,
the line and the field."""

import json
import shutil

import pytest

from jalora.errors import InvalidRequestError
from jalora.train import TrainConfig, train_adapter
from server import cli
from tests.train.conftest import JUDGE

GOOD = {"prompt": "w5 w6 w7", "response": "w8"}


@pytest.mark.parametrize("bad, flags, field, message", [
    ({"prompt": "w5 w6"}, [], "response", "is missing"),
    ({"prompt": "w5 w6", "response": " "}, [], "response", "is empty: there is nothing to learn"),
    ({"prompt": " ".join(["w9"] * 600), "response": "w8"}, [], "prompt",
     "is 601 tokens; with a response it must fit in max_seq_len=512"),
    ({"prompt": " ".join(["w9"] * 509), "response": "w8 w8 w8"}, [], "response",
     "makes the example 514 tokens, more than max_seq_len=512"),
    ({"prompt": "w5 w6", "response": "w8"}, ["--no-append-invocation"], "prompt",
     "the invocation [94] never occurs in its tokens"),
    ({"messages": [{"role": "user"}], "response": "w8"}, [], "messages[0]",
     "must be {'role': str, 'content': str}, got {'role': 'user'}"),
    ({"prompt": "w5", "messages": [], "response": "w8"}, [], "prompt",
     "give exactly one of 'prompt' (text) and 'messages' (a conversation)"),
])  # fmt: skip
def test_bad_line_is_one_error_before_training(text_llama, tmp_path, capsys, bad, flags, field, message):
    data = tmp_path / "data.jsonl"
    good = {**GOOD, "prompt": GOOD["prompt"] + " " + JUDGE} if "--no-append-invocation" in flags else GOOD
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--model", text_llama, "--data", str(data), "--output-dir", str(out),
                     "--invocation", JUDGE, "--no-progress", *flags])  # fmt: skip
    assert code == 2
    assert capsys.readouterr() == ("", f"jalora train: {data} line 3: {field}: {message}\n")
    assert not out.exists()  # nothing was trained or written


def test_not_json_and_bad_settings(text_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    base = ["train", "--model", text_llama, "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert cli.main(base) == 2
    assert capsys.readouterr().err == f"jalora train: {data} line 2: json: not valid JSON (Expecting property name " \
                                      "enclosed in double quotes at column 2)\n"  # fmt: skip
    assert cli.main([*base, "--r", "0"]) == 2
    assert capsys.readouterr().err == "jalora train: r: must be an integer >= 1, got 0\n"
    assert cli.main([*base, "--invocation-tokens", "7", "--invocation-tokens", "500"]) == 2
    want = "jalora train: invocation: alora_invocation_tokens must be token ids in [0, 97) (the base vocabulary)\n"
    assert capsys.readouterr().err == want


@pytest.mark.parametrize("flags, field", [
    (["--learning-rate", "inf"], "learning_rate"),  # (trained to a NaN loss and wrote "lora_alpha": Infinity)
    (["--lora-alpha", "inf"], "lora_alpha"),
    (["--lora-alpha", "nan"], "lora_alpha"),
    (["--max-grad-norm", "-1"], "max_grad_norm"),
    (["--epochs", "inf"], "epochs"),
    (["--lora-dropout", "nan"], "lora_dropout"),
    (["--output-dir", "FILE"], "output_dir"),  # an existing file
    (["--output-dir", "FILE/out"], "output_dir"),  # under a file: cannot be created (was a NotADirectoryError)
    (["--seed", "-1"], "seed"),  # (was numpy's ValueError, after the model was read)
    (["--seed", str(2**70)], "seed"),
    (["--attention", "cudnn"], "attention"),  # no GPU here (was cuDNN's RuntimeError while compiling)
    (["--dtype", "float16"], "dtype"),  # on a CPU (was XLA's refusal of F16_F16_F32 dots while compiling)
])  # fmt: skip
def test_bad_settings_are_one_error_before_training(text_llama, tmp_path, capsys, flags, field):
    data, existing = tmp_path / "data.jsonl", tmp_path / "a-file"
    data.write_text(json.dumps(GOOD) + "\n")
    existing.write_text("not a directory")
    flags = [f.replace("FILE", str(existing)) for f in flags]
    argv = ["train", "--model", text_llama, "--data", str(data), "--output-dir", str(tmp_path / "o"), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jalora train: {field}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value", [("save_dtype", "float16"), ("attention", "flash"), ("dtype", "float64"),
                                          ("seed", 2**32), ("seed", True), ("use_rslora", "false"),
                                          ("append_eos", 0), ("resume", None)])  # fmt: skip
def test_every_setting_is_checked_on_construction(field, value):
    """TrainConfig checks the choices too, not only the command line's parser (save_dtype="float16" used to write
    float32 silently, attention="flash" to fail inside JAX after the model was read, use_rslora="false" to train
    with alpha / sqrt(r) and write an adapter_config.json that jalora refuses to load)."""
    with pytest.raises(InvalidRequestError, match=f"^{field}: "):
        TrainConfig(model="m", data="d", output_dir="o", **{field: value})


def test_a_bad_init_adapter_is_named_before_the_model_is_read(text_llama, tmp_path, capsys):
    """The adapter to start from is read before the base weights (which here cannot be read at all), and its
    errors name init_adapter, not the engine's own fields (path, max_lora_rank)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    r4 = tmp_path / "r4"
    train_adapter(model=text_llama, data=str(data), output_dir=str(r4), invocation=JUDGE, r=4, max_steps=1,
                  save_every=0, eval_fraction=0.0, progress=False)  # fmt: skip
    broken = tmp_path / "broken"
    shutil.copytree(text_llama, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "empty").mkdir()
    for flags, message in ((["--init-adapter", str(tmp_path / "empty")], "adapter_config.json"),
                           (["--r", "2", "--init-adapter", str(r4)], "has r=4, the run trains r=2")):  # fmt: skip
        for model in (text_llama, str(broken)):
            argv = ["train", "--model", model, "--data", str(data), "--invocation", JUDGE, "--no-progress",
                    "--output-dir", str(tmp_path / "o"), *flags]  # fmt: skip
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("jalora train: init_adapter: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [[], ["--invocation", JUDGE]])
def test_a_prompt_without_tokens_is_refused(text_llama, tmp_path, capsys, flags):
    """A prompt that tokenizes to nothing is refused as the engine refuses it: a plain LoRA's first response token
    had no position to be predicted from and was learned from a padding position (label position -1)."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": " ", "response": "w8"}) + "\n")
    out = tmp_path / "out"
    code = cli.main(["train", "--model", text_llama, "--data", str(data), "--output-dir", str(out), "--no-progress",
                     "--max-steps", "1", "--eval-fraction", "0", *flags])  # fmt: skip
    assert code == 2
    want = f"jalora train: {data} line 2: prompt: has no tokens; the engine refuses an empty prompt too\n"
    assert capsys.readouterr().err == want
    assert not out.exists()
