"""Client-side behaviour that needs no engine: the invocation helper, request building, error typing."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from jalora import SamplingParams
from jalora.client import (
    TLS,
    AdapterInfo,
    AsyncClient,
    Client,
    PipelineJudge,
    ServerError,
    generate_request,
    pipeline_request,
    read_token_file,
    with_invocation,
)

ALORA = AdapterInfo("judge", "alora", [3, 356, 4], "<|start_of_role|>judge<|end_of_role|>", 8, ["q_proj"], "ab")
ALORA_NO_STRING = AdapterInfo("judge2", "alora", [7, 8], None, 8, ["q_proj"], "cd")
PLAIN = AdapterInfo("plain", "lora", None, None, 8, ["q_proj"], "ef")


def test_with_invocation_appends_tokens_or_string():
    assert with_invocation([1, 2], ALORA) == [1, 2, 3, 356, 4]
    assert with_invocation((1, 2), ALORA_NO_STRING) == [1, 2, 7, 8]
    assert with_invocation("Answer: yes.", ALORA) == "Answer: yes.<|start_of_role|>judge<|end_of_role|>"
    with pytest.raises(ValueError, match="no invocation string"):
        with_invocation("text", ALORA_NO_STRING)
    with pytest.raises(ValueError, match="without invocation tokens"):
        with_invocation([1, 2], PLAIN)


def test_request_takes_sampling_params_and_keyword_overrides():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=9, stop_token_ids=[5], logprobs=1)
    msg = generate_request([1, 2, 3], "judge", params=params, request_id="rid", max_tokens=4)
    assert list(msg.token_ids.ids) == [1, 2, 3] and msg.adapter == "judge" and msg.request_id == "rid"
    s = msg.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, list(s.stop_token_ids), s.logprobs) == (4, 0.5, 3, 9, [5], 1)
    assert not s.HasField("top_p") or s.top_p == 1.0
    assert generate_request("hi").text == "hi"
    assert not generate_request("hi").sampling.HasField("max_tokens")  # server default
    assert generate_request("hi", params=params, seed=None).sampling.seed == 9  # None keeps params' seed
    with pytest.raises(TypeError, match="^sampling: unknown sampling fields"):
        generate_request("hi", max_token=4)
    with pytest.raises(TypeError, match=r"^judges\[1\]\.sampling: unknown sampling fields"):  # (named which judge)
        pipeline_request("hi", [PipelineJudge("a"), PipelineJudge("b", sampling={"max_token": 3})])


# A value of each jalora.SamplingParams field that Generate's message has no place for
NOT_CARRIED = {"n": 2}


def test_sampling_params_that_grpc_cannot_carry_are_refused_not_dropped():
    """SamplingParams(n=2) would go out as one request (stop strings went out dropped, before the proto carried
    them); every such field is listed here, so a new SamplingParams field without a place in the proto fails this
    test."""
    import dataclasses

    from jalora.api.v1 import jalora_pb2 as pb

    fields = {f.name for f in dataclasses.fields(SamplingParams)} - set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
    assert fields == set(NOT_CARRIED)
    for name, value in NOT_CARRIED.items():
        with pytest.raises(ValueError, match=f"^sampling\\.{name}: .* is not carried over gRPC"):
            generate_request("hi", params=SamplingParams(**{name: value}))
        with pytest.raises(ValueError, match=rf"^judges\[0\]\.sampling\.{name}: "):
            pipeline_request("hi", [PipelineJudge("a", params=SamplingParams(**{name: value}))])
    assert generate_request("hi", params=SamplingParams(n=1, stop=[])).sampling.max_tokens == 16  # defaults pass
    # prompt_logprobs as a count reads as SamplingParams reads it: 0 or 1 turns them on (it went out as false)
    for count in (0, 1):
        assert generate_request("hi", prompt_logprobs=count).sampling.prompt_logprobs is True
    assert generate_request("hi", prompt_logprobs=False).sampling.prompt_logprobs is False


@pytest.mark.parametrize("prompt, sampling, field", [
    ([3, 1.7], {}, "prompt"),  # (would be sent as 1)
    ([3, True], {}, "prompt"),
    ([3, 2**40], {}, "prompt"),
    ([3, -1], {}, "prompt"),
    ([3], {"max_tokens": 2**31}, "sampling.max_tokens"),
    ([3], {"seed": 2**64}, "sampling.seed"),
    ([3], {"stop_token_ids": [2**40]}, "sampling.stop_token_ids"),
    ([3], {"top_k": "3"}, "sampling.top_k"),
    ([3], {"prompt_logprobs": 2}, "sampling.prompt_logprobs"),  # (vLLM's count: only 0 or 1, as SamplingParams)
    ([3, None], {}, "prompt"),
    (b"hi", {}, "prompt"),  # (bytes used to be sent as the ids 104, 105)
    ([{"role": "user"}], {}, "prompt[0]"),  # (was a KeyError)
    ([{"role": "user", "content": None}], {}, "prompt[0]"),  # (was sent as an empty message)
    ([{"role": "user", "content": "hi"}, "oops"], {}, "prompt[1]"),
])  # fmt: skip
def test_a_request_the_protocol_cannot_carry_is_refused_naming_the_field(prompt, sampling, field):
    """Before anything is sent: one ValueError naming the field, not the protocol buffer's bare range error."""
    with pytest.raises(ValueError) as err:
        generate_request(prompt, **sampling)
    assert str(err.value).startswith(f"{field}: ") and str(err.value).count(field) == 1, err.value
    assert list(generate_request(np.array([3, 4])).token_ids.ids) == [3, 4]  # numpy ints are token ids
    if field.startswith("sampling."):  # a judge's own sampling is named as the server names it
        judges = [PipelineJudge("a"), PipelineJudge("b", sampling=sampling)]
        with pytest.raises(ValueError) as err:
            pipeline_request(prompt, judges)
        assert str(err.value).startswith(f"judges[1].{field}: "), err.value


@pytest.mark.parametrize("bad", [None, "x", 2.5j])
def test_generate_refuses_bad_token_ids_before_any_call(bad):
    """generate folds the stream's chunks with the prompt's ids: a bad id is the prompt's error, not int()'s, for the
    sync and the async client alike (the port has no server: nothing may be sent)."""
    with Client("127.0.0.1:1", timeout=1.0) as client:
        with pytest.raises(ValueError, match="^prompt: "):
            client.generate([3, bad], max_tokens=1)

    async def run():
        async with AsyncClient("127.0.0.1:1", timeout=1.0) as client:
            with pytest.raises(ValueError, match="^prompt: "):
                await client.generate([3, bad], max_tokens=1)

    asyncio.run(run())


def test_unreachable_server_raises_typed_error():
    with Client("127.0.0.1:1", timeout=1.0) as client:
        with pytest.raises(ServerError) as err:
            client.generate([1, 2], max_tokens=1)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    async def run():
        async with AsyncClient("127.0.0.1:1", timeout=1.0) as client:
            with pytest.raises(ServerError):
                await client.list_adapters()

    asyncio.run(run())


def test_client_import_does_not_load_jax():
    import os
    import subprocess
    import sys

    code = "import sys, jalora.client; print('jax' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_tls_and_token_arguments_are_checked(tmp_path):
    """What can be checked without a server (tests/server/test_security.py connects with them)."""
    with pytest.raises(ValueError, match="needs its key"):
        TLS(cert=b"pem")
    with pytest.raises(ValueError, match="needs its key"):
        TLS(key=b"pem")
    for token in ("", "two words", "caf\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Client("127.0.0.1:1", token=token)
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", tls=True, channel=grpc.insecure_channel("127.0.0.1:1"))
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", tls=TLS(ca=tmp_path / "missing.pem"))
    assert TLS(server_name="jalora.internal").options() == [("grpc.ssl_target_name_override", "jalora.internal")]
    path = tmp_path / "token"
    path.write_text("  s3cret-token\n")
    assert read_token_file(path) == "s3cret-token"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_token_file(path)
