"""Orbax checkpoints laid out for a tensor-parallel size (jalora/model/orbax_checkpoint.py): exported by
`jalora export-orbax`, restored straight onto the mesh (each parameter with its shard sharding), serving
the tokens of the HF directory they came from; another size or dtype is refused by name."""

import numpy as np
import pytest
from jax.sharding import NamedSharding

from jalora import LLM, SamplingParams
from jalora.errors import InvalidRequestError
from server import cli
from tests import hf_models

ENGINE = dict(block_size=4, num_kv_blocks=16, max_num_seqs=2, max_num_batched_tokens=16, warmup=False)
SP = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1)
PROMPT = [[20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    hf = hf_models.make_model(str(root / "granite"), "granite", num_attention_heads=8, num_key_value_heads=2)
    out = str(root / "granite-tp4")
    assert cli.main(["export-orbax", hf, out, "--tensor-parallel-size", "4", "--dtype", "float32"]) == 0
    return hf, out


def test_restored_onto_the_mesh_it_serves_the_same_tokens(model):
    hf, orbax_dir = model
    (want,) = LLM(hf, **ENGINE).generate(PROMPT, SP)
    llm = LLM(orbax_dir, tensor_parallel_size=4, **ENGINE)
    (got,) = llm.generate(PROMPT, SP)
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose([got.logprobs[i][t] for i, t in enumerate(got.token_ids)],
                               [want.logprobs[i][t] for i, t in enumerate(want.token_ids)], atol=1e-4)  # fmt: skip
    # q/k/v of one device: 2 query heads and the copy of its KV head (8 dims each); gate/up: 2 x 96 / 4
    widths = {p.shape[1]: p for p in llm.engine.runner.params if p.ndim == 2 and p.shape[0] == 64}
    for width, shard in ((4 * 32, 32), (2 * 96, 48)):
        assert isinstance(widths[width].sharding, NamedSharding)
        assert {s.data.shape[1] for s in widths[width].addressable_shards} == {shard}


def test_another_size_or_dtype_is_refused_by_name(model):
    _, orbax_dir = model
    with pytest.raises(InvalidRequestError, match="laid out for 4 devices, got 2") as e:
        LLM(orbax_dir, tensor_parallel_size=2, **ENGINE)
    assert e.value.field == "tensor_parallel_size"
    with pytest.raises(InvalidRequestError) as e:
        LLM(orbax_dir, tensor_parallel_size=4, dtype="bfloat16", **ENGINE)
    assert e.value.field == "dtype"


@pytest.mark.parametrize("argv, field", [
    (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
    (["--tensor-parallel-size", "-1"], "tensor_parallel_size"),
    (["--tensor-parallel-size", "3"], "tensor_parallel_size"),  # (does not divide 8 heads)
])  # fmt: skip
def test_bad_export_arguments_are_one_error_and_write_nothing(model, tmp_path, capsys, argv, field):
    hf, _ = model
    out = tmp_path / "out"
    assert cli.main(["export-orbax", hf, str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jalora export-orbax: {field}: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_an_existing_output_directory_is_refused_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert cli.main(["export-orbax", str(tmp_path / "no-model"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"jalora export-orbax: output_dir: {tmp_path / 'out'} exists; choose a new " \
                                      "directory\n"
