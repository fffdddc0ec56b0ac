"""Hostile input against a real server (the embedded tiny model, adapters written by the tests, a real
gRPC server on 127.0.0.1): every bad request ends in one status that names what is wrong, in a bounded
message, before any slow work, and leaves the server serving. No mocks.

HANG is a guard against a hang, never a margin that an event has to beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jalora.api import CHANNEL_OPTIONS
from jalora.api.limits import (
    MAX_CHAT_MESSAGES,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_PROMPT_BYTES,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_TOKEN_IDS,
)
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import TINY_ENGINE_ARGS, TINY_VOCAB, tiny_engine, write_adapter
from tests.waiting import HANG

MAX_MODEL_LEN = TINY_ENGINE_ARGS["max_model_len"]
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SECRET = "SECRET-7f3a"  # written outside the adapter root; no error may ever show it


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(adapter root, a directory beside it that the server must never read)."""
    top = tmp_path_factory.mktemp("hostile")
    root, outside = top / "adapters", top / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps({"peft_type": SECRET, "r": SECRET}))
    write_adapter(outside / "elsewhere")
    return root, outside


@pytest.fixture(scope="module")
def server(dirs):
    root, _ = dirs
    write_adapter(root / "good")
    with ServerThread(tiny_engine(), ServerConfig(port=0, adapter_roots=[str(root)])) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        yield pb_grpc.JaloraStub(channel)


def _status(call, request) -> tuple[str, str, str | None]:
    """(code name, details, jalora-field) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        response = call(request, timeout=HANG)
        if hasattr(response, "__next__"):  # a stream (Generate) fails while it is read
            list(response)
    e = err.value
    return e.code().name, e.details() or "", dict(e.trailing_metadata() or ()).get("jalora-field")


def _health(server) -> str:
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="jalora.v1.Jalora"))
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _load(stub, name: str, path) -> tuple[str, str, str | None]:
    return _status(stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=str(path)))


def _names(stub) -> set[str]:
    return {a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=HANG).adapters}


# ---- 1. an adapter that loads must be listable ------------------------------------------------------------


@pytest.mark.parametrize("tokens", [[True, False], [5, 2**31], [2**40]], ids=["bools", "int32+1", "2**40"])
def test_invocation_tokens_that_are_not_token_ids_are_refused(server, stub, dirs, tokens):
    """They used to load (bools pass an int check), fail the answer with UNKNOWN, stay in their slot and
    break ListAdapters for everyone."""
    root, _ = dirs
    path = write_adapter(root / f"inv-{len(tokens)}-{tokens[0]}", config={"alora_invocation_tokens": tokens})
    assert _load(stub, "inv", path)[::2] == ("INVALID_ARGUMENT", "adapter_config.json")
    assert "inv" not in _names(stub)  # ListAdapters answers, and the adapter holds no slot
    assert stub.LoadAdapter(pb.LoadAdapterRequest(name="ok", path="good"), timeout=HANG).name == "ok"
    stub.UnloadAdapter(pb.UnloadAdapterRequest(name="ok"), timeout=HANG)


# ---- 2. hostile adapter files and paths are INVALID_ARGUMENT, not INTERNAL/UNKNOWN -------------------------

BAD_CONFIG_FILES = {
    "array": b"[]",
    "null": b"null",
    "not utf-8": b'{"r": 8, "peft_type": "\xff\xfe"}',
    "100k deep": b"[" * 100_000 + b"]" * 100_000,
    "alpha a word": json.dumps({"r": 8, "lora_alpha": "sixteen"}).encode(),
    "invocation an int": json.dumps({"r": 8, "alora_invocation_tokens": 5}).encode(),
    "2 MB": b'{"r": 8, "pad": "' + b"x" * 2_000_000 + b'"}',
}


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_bad_adapter_config_file_is_invalid_argument(server, stub, dirs, case):
    root, _ = dirs
    path = write_adapter(root / f"cfg-{case.replace(' ', '-')}")
    with open(os.path.join(path, "adapter_config.json"), "wb") as f:
        f.write(BAD_CONFIG_FILES[case])
    code, details, field = _load(stub, "bad", path)
    assert (code, field) == ("INVALID_ARGUMENT", "adapter_config.json"), details
    assert details.startswith("adapter_config.json: ") and len(details) <= 200, details
    assert _health(server) == "SERVING"


def test_nul_byte_in_path_is_invalid_argument(stub):
    assert _load(stub, "bad", "good\0/x")[::2] == ("INVALID_ARGUMENT", "path")


def _garbage_cases():
    """(method, streaming, bytes) for every RPC: a truncated varint, and for a request whose field 1 is a
    string, that field holding bytes that are not UTF-8."""
    for m in pb.DESCRIPTOR.services_by_name["Jalora"].methods:
        yield pytest.param(m.name, m.server_streaming, b"\xff\xff\xff", id=f"{m.name}-truncated")
        first = m.input_type.fields_by_number.get(1)
        if first is not None and first.type == first.TYPE_STRING:
            yield pytest.param(m.name, m.server_streaming, b"\x0a\x02\xff\xfe", id=f"{m.name}-not-utf8")


@pytest.mark.parametrize("method, streaming, garbage", list(_garbage_cases()))
def test_malformed_request_bytes_are_invalid_argument_without_a_traceback(server, method, streaming, garbage, caplog):
    """Bytes that do not parse as the request message: a short INVALID_ARGUMENT, nothing logged with a
    traceback (the server used to answer UNKNOWN and log one per call)."""
    with grpc.insecure_channel(server.target) as channel, caplog.at_level(logging.INFO):
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(f"/jalora.v1.Jalora/{method}", request_serializer=None, response_deserializer=None)
        code, details, _ = _status(call, garbage)
    assert code == "INVALID_ARGUMENT" and "not a valid jalora.v1." in details and len(details) < 100, details
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert _health(server) == "SERVING"


# ---- 3. error messages are bounded ----------------------------------------------------------------------


def test_errors_quote_a_short_prefix_of_what_was_sent(server, stub, dirs):
    """A 1 MB name came back RESOURCE_EXHAUSTED ('metadata size exceeds hard limit'): the message and its
    trailer carried the whole name. Names are refused by their pattern; every message is bounded."""
    huge = "n" * (1 << 20)
    for call, request, field in [
        (stub.UnloadAdapter, pb.UnloadAdapterRequest(name=huge), "name"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name=huge, path="good"), "name"),
        (stub.Generate, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), adapter=huge), "adapter"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="x", path="p" * (1 << 20)), "path"),
    ]:
        code, details, got = _status(call, request)
        assert (code, got) == ("INVALID_ARGUMENT", field) and len(details) <= 200, details
    # Under the bounds on each field, a message still stays short.
    code, details, _ = _load(stub, "x", "d" * 4000)  # no such directory
    assert code == "NOT_FOUND" and len(details) <= MAX_ERROR_MESSAGE_CHARS, len(details)
    code, details, _ = _load(stub, "x", "/" + "d" * 4000)  # outside the roots
    assert code == "PERMISSION_DENIED" and len(details) <= MAX_ERROR_MESSAGE_CHARS, len(details)
    # A well-formed name that is not loaded is NOT_FOUND.
    assert _status(stub.UnloadAdapter, pb.UnloadAdapterRequest(name="absent"))[0] == "NOT_FOUND"
    generate = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), adapter="absent")
    assert _status(stub.Generate, generate)[::2] == ("NOT_FOUND", "adapter")
    assert _health(server) == "SERVING"


# ---- 4. every file read lies inside the roots -------------------------------------------------------------


def _linked(root, name: str, file: str, target) -> str:
    """The good adapter, with `file` replaced by a symlink to `target`."""
    path = write_adapter(root / name)
    os.remove(os.path.join(path, file))
    os.symlink(target, os.path.join(path, file))
    return path


def test_files_linked_outside_the_roots_are_refused_unread(server, stub, dirs):
    root, outside = dirs
    config_out = _linked(root, "link-config", "adapter_config.json", outside / "secret.json")
    code, details, field = _load(stub, "linked", config_out)
    assert (code, field) == ("PERMISSION_DENIED", "path") and SECRET not in details, details
    assert "adapter_config.json" in details
    elsewhere = outside / "elsewhere" / "adapter_model.safetensors"
    weights_out = _linked(root, "link-weights", "adapter_model.safetensors", elsewhere)
    assert _load(stub, "linked", weights_out)[0] == "PERMISSION_DENIED"
    dangling = _linked(root, "link-dangling", "adapter_config.json", outside / "absent.json")
    assert _load(stub, "linked", dangling)[0] == "PERMISSION_DENIED"  # says nothing of what exists outside
    assert "linked" not in _names(stub)
    # A link that stays inside the roots is fine.
    inside = _linked(root, "link-inside", "adapter_model.safetensors", root / "good" / "adapter_model.safetensors")
    assert stub.LoadAdapter(pb.LoadAdapterRequest(name="inside", path=inside), timeout=HANG).kind == "alora"
    stub.UnloadAdapter(pb.UnloadAdapterRequest(name="inside"), timeout=HANG)


# ---- 5. nonsense adapters and names -----------------------------------------------------------------------


def _set(name: str, value):
    return lambda t: t.__setitem__(name, value)


def _poke(value):
    def edit(t):
        t[Q_B] = t[Q_B].copy()
        t[Q_B][0, 0] = value

    return edit


NONSENSE = {
    "NaN weight": dict(edit_tensors=_poke(np.nan)),
    "Inf weight": dict(edit_tensors=_poke(np.inf)),
    "3e38 weight (x2 scaling overflows float32)": dict(edit_tensors=_poke(3e38)),
    "1e300 float64 weight": dict(edit_tensors=lambda t: t.__setitem__(Q_B, np.full(t[Q_B].shape, 1e300))),
    "int64 weights": dict(edit_tensors=lambda t: t.__setitem__(Q_B, np.ones(t[Q_B].shape, np.int64))),
    "bool weights": dict(edit_tensors=lambda t: t.__setitem__(Q_B, np.ones(t[Q_B].shape, bool))),
    "lora_alpha NaN": dict(config={"lora_alpha": float("nan")}),
    "lora_alpha true": dict(config={"lora_alpha": True}),
    "r true": dict(config={"r": True}),
    "negative invocation token": dict(invocation=(5, -1)),
    "invocation token = vocab size": dict(invocation=(5, TINY_VOCAB)),
    "invocation as long as max_model_len": dict(invocation=tuple(range(3, 3 + MAX_MODEL_LEN))),
    "invocation_string not a string": dict(config={"alora_invocation_tokens": None, "invocation_string": 7}),
}


@pytest.mark.parametrize("case", list(NONSENSE))
def test_nonsense_adapters_do_not_load(server, stub, dirs, case):
    root, _ = dirs
    path = write_adapter(root / f"nonsense-{list(NONSENSE).index(case)}", **NONSENSE[case])
    code, details, field = _load(stub, "nonsense", path)
    assert code == "INVALID_ARGUMENT" and field in ("adapter_config.json", "adapter_model.safetensors"), details
    assert "nonsense" not in _names(stub)


@pytest.mark.parametrize("name", ["n" * 129, "a\0b", "../../etc/passwd", "-lead", ".hidden", "sp ace", "é"])
def test_adapter_names_follow_the_pattern(server, stub, name):
    assert _load(stub, name, "good")[::2] == ("INVALID_ARGUMENT", "name")
    assert _status(stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name))[::2] == ("INVALID_ARGUMENT", "name")
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), adapter=name)
    assert _status(stub.Generate, request)[::2] == ("INVALID_ARGUMENT", "adapter")


def test_longest_allowed_name_loads(stub):
    name = "A1._-" + "z" * 123
    assert stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path="good"), timeout=HANG).name == name
    stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=HANG)


# ---- size limits come before any slow work ----------------------------------------------------------------


@contextlib.contextmanager
def _engine_thread_held(server):
    """Keeps the engine thread busy inside an engine call until the block ends: a request that needs
    the engine (to tokenize, to run) cannot be answered meanwhile."""
    gate, entered = threading.Event(), threading.Event()

    def hold(engine):
        entered.set()
        gate.wait()

    done = asyncio.run_coroutine_threadsafe(server.server.worker.call(hold), server._loop)
    assert entered.wait(HANG)
    try:
        yield
    finally:
        gate.set()
        done.result(HANG)


def _messages(n: int, content: str = "hi") -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)] * n)


def test_size_limits_answer_without_the_engine(server, stub):
    """Each bound is checked before tokenization or any other engine work: these are answered while the
    engine thread is held (before, they waited for it, then tokenized 4 MB)."""
    ids = pb.TokenIds(ids=[1, 2])
    big_text = "word " * (MAX_PROMPT_BYTES // 5 + 1)
    too_many_stops = pb.SamplingParams(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1))
    assert list(stub.Generate(pb.GenerateRequest(token_ids=ids), timeout=HANG))  # the server knows max_model_len
    cases = [
        (stub.Generate, pb.GenerateRequest(text=big_text), "prompt.text"),
        (stub.Generate, pb.GenerateRequest(messages=_messages(1, big_text)), "prompt.messages"),
        (stub.Generate, pb.GenerateRequest(messages=_messages(MAX_CHAT_MESSAGES + 1)), "prompt.messages"),
        (stub.Generate, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * MAX_MODEL_LEN)), "prompt"),
        (stub.Generate, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 10**6)), "prompt"),
        (stub.Generate, pb.GenerateRequest(token_ids=ids, request_id="r" * (MAX_REQUEST_ID_CHARS + 1)), "request_id"),
        (stub.Generate, pb.GenerateRequest(token_ids=ids, adapter="../x"), "adapter"),
        (stub.Generate, pb.GenerateRequest(token_ids=ids, sampling=too_many_stops), "sampling.stop_token_ids"),
        (stub.Tokenize, pb.TokenizeRequest(text=big_text), "text"),
        (stub.Tokenize, pb.TokenizeRequest(messages=_messages(MAX_CHAT_MESSAGES + 1)), "messages"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="x", path="p" * 4097), "path"),
        (stub.LoadAdapter, pb.LoadAdapterRequest(name="x/y", path="good"), "name"),
        (stub.UnloadAdapter, pb.UnloadAdapterRequest(name="x" * 129), "name"),
    ]
    with _engine_thread_held(server):
        for call, request, field in cases:
            code, details, got = _status(call, request)
            assert (code, got) == ("INVALID_ARGUMENT", field), (field, details)
            assert details.startswith(f"{field}: ") and len(details) <= 200, details
    # At the bounds themselves, requests are served.
    tokens = stub.Tokenize(pb.TokenizeRequest(text="w " * (MAX_PROMPT_BYTES // 2)), timeout=HANG).token_ids
    assert len(tokens) > MAX_MODEL_LEN
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1] * (MAX_MODEL_LEN - 1)),
        sampling=pb.SamplingParams(max_tokens=1, stop_token_ids=[1] * MAX_STOP_TOKEN_IDS),
        request_id="r" * MAX_REQUEST_ID_CHARS,
    )
    assert list(stub.Generate(request, timeout=HANG))[-1].completion.usage.prompt_tokens == MAX_MODEL_LEN - 1
    assert _health(server) == "SERVING"
