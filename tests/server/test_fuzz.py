"""A bounded fuzz of every jalora.v1 RPC against a real server (the embedded tiny model, real PEFT files,
127.0.0.1): requests with hostile field values, and raw bytes sent through generic calls. From a fixed
seed, so a failure replays. Whatever was sent, no call may end UNKNOWN or INTERNAL or carry an unbounded
message, and afterwards the server is idle with every KV block back in the pool, healthy, and gives the
same greedy tokens as before.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jalora.api import CHANNEL_OPTIONS
from jalora.api.limits import MAX_CHAT_MESSAGES, MAX_ERROR_MESSAGE_CHARS, MAX_PROMPT_BYTES, MAX_STOP_TOKEN_IDS
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import TINY_ENGINE_ARGS, TINY_VOCAB, tiny_engine, write_adapter
from tests.waiting import HANG

SEED = 14
NUM_REQUESTS = 2000
MAX_MODEL_LEN = TINY_ENGINE_ARGS["max_model_len"]
INVOCATION = (5, 6)  # the adapters' (support.write_adapter)
SERVICE = pb.DESCRIPTOR.services_by_name["Jalora"]
# What a hostile request may get: never UNKNOWN, INTERNAL, DEADLINE_EXCEEDED, UNAVAILABLE, ...
EXPECTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}


def _hostile_dirs(root) -> list[str]:
    """Adapter directories under `root` (relative paths): good ones and every kind of bad one."""
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('{"r": "SECRET"}')
    write_adapter(root / "good")
    write_adapter(root / "other", seed=2, invocation=(7,))
    write_adapter(root / "nan", edit_tensors=lambda t: t.update({k: v * float("nan") for k, v in t.items()}))
    write_adapter(root / "bools", config={"alora_invocation_tokens": [True, False]})
    write_adapter(root / "long-invocation", invocation=range(3, 3 + MAX_MODEL_LEN))
    write_adapter(root / "alpha-word", config={"lora_alpha": "sixteen"})
    deep = write_adapter(root / "deep")
    with open(os.path.join(deep, "adapter_config.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    linked = write_adapter(root / "linked")
    os.remove(os.path.join(linked, "adapter_config.json"))
    os.symlink(outside / "secret.json", os.path.join(linked, "adapter_config.json"))
    return ["good", "other", "nan", "bools", "long-invocation", "alpha-word", "deep", "linked"]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    root.mkdir()
    dirs = _hostile_dirs(root)
    engine = tiny_engine()
    engine.load_adapter("judge", str(root / "good"))
    with ServerThread(engine, ServerConfig(port=0, adapter_roots=[str(root)])) as server:
        with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
            yield server, channel, dirs


class Fuzzer:
    """Hostile requests from one seeded generator."""

    def __init__(self, seed: int, dirs: list[str]):
        self.rng = random.Random(seed)
        self.dirs = dirs
        self.loaded: list[str] = []  # names this fuzz loaded: Unload may name them ("judge" stays)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def text(self) -> str:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            return ""
        if kind == 1:  # any code point but surrogates (not UTF-8), NUL and control characters included
            return "".join(
                chr(r.choice([r.randrange(0, 0xD800), r.randrange(0xE000, 0x110000)]))
                for _ in range(r.randrange(1, 40))
            )
        if kind == 2:  # repeated: past a name's bound, a path's, up to tens of KB
            return r.choice(
                ["x", "é", "\0", "\u202e", "../../etc/passwd", "%s%n", "{{ 7*7 }}", "<|im_start|>"]
            ) * r.choice([1, 129, 300, 5000])
        if kind == 3 and self.chance(0.05):  # past the prompt's bound: refused before it is tokenized
            return "y" * (MAX_PROMPT_BYTES + 1)
        if kind == 3:
            return " ".join(r.choice(["hello", "world", "t1", "<s>", "</s>"]) for _ in range(r.randrange(1, 30)))
        return "".join(r.choice("abcdefghij ._-0123456789") for _ in range(r.randrange(1, 20)))

    def name(self) -> str:
        r = self.rng
        return r.choice(["judge", "judge", "absent", "x", *self.loaded, self.text(), "-bad", "a" * 128, "a" * 129])

    def int32(self) -> int:
        r = self.rng
        return r.choice(
            [
                0,
                1,
                -1,
                2,
                TINY_VOCAB - 1,
                TINY_VOCAB,
                2**31 - 1,
                -(2**31),
                r.randrange(-(2**31), 2**31),
                r.randrange(TINY_VOCAB),
            ]
        )

    def real(self) -> float:
        r = self.rng
        return r.choice(
            [0.0, -0.0, 1.0, 0.5, -1.0, 2.0, 1e-45, 3.4e38, float("inf"), float("-inf"), float("nan"), r.uniform(-2, 2)]
        )

    def ids(self) -> list[int]:
        r = self.rng
        n = r.choice([0, 1, 3, 10, MAX_MODEL_LEN - 2, MAX_MODEL_LEN - 1, MAX_MODEL_LEN, 5000])
        if self.chance(0.7):  # mostly in the vocabulary, sometimes with the invocation at the end
            ids = [r.randrange(TINY_VOCAB) for _ in range(n)]
            return ids[: max(0, n - 2)] + list(INVOCATION) if self.chance(0.3) and n >= 2 else ids
        return [self.int32() for _ in range(n)]

    def messages(self) -> pb.ChatMessages:
        r = self.rng
        n = r.choice([0, 1, 2, 3, MAX_CHAT_MESSAGES + 1])
        if n > MAX_CHAT_MESSAGES:
            return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * n)
        roles = ["user", "assistant", "system", "", "tool", self.text()]
        return pb.ChatMessages(messages=[pb.ChatMessage(role=r.choice(roles), content=self.text()) for _ in range(n)])

    def sampling(self) -> pb.SamplingParams:
        r, s = self.rng, pb.SamplingParams()
        # Mostly few tokens: a request that passes validation then costs a few steps.
        s.max_tokens = r.choice([1, 2, 3, 4, 1, 2, 0, -1, 2**31 - 1, MAX_MODEL_LEN])
        if self.chance(0.4):
            s.temperature = self.real()
        if self.chance(0.3):
            s.top_p = self.real()
        if self.chance(0.3):
            s.top_k = self.int32()
        if self.chance(0.3):
            s.seed = r.choice([0, 1, -1, 2**32, 2**63 - 1, -(2**63)])
        if self.chance(0.2):
            s.stop_token_ids.extend(self.int32() for _ in range(r.choice([1, 3, MAX_STOP_TOKEN_IDS + 1])))
        if self.chance(0.2):
            s.logprobs = r.choice([0, 1, 5, 20, 21, -1, 2**31 - 1])
        if self.chance(0.15):  # (the penalties, vLLM's allowed ids and truncation: rows of the draw, a cut prompt)
            s.presence_penalty, s.repetition_penalty = self.real(), self.real()
        if self.chance(0.1):
            s.allowed_token_ids.extend(self.int32() for _ in range(r.choice([1, 3])))
        if self.chance(0.1):
            s.truncate_prompt_tokens = r.choice([-2, -1, 0, 1, 5, MAX_MODEL_LEN - 1, MAX_MODEL_LEN, 2**31 - 1])
        s.ignore_eos = self.chance(0.3)
        s.prompt_logprobs = self.chance(0.2)
        return s

    def generate(self) -> pb.GenerateRequest:
        r, req = self.rng, pb.GenerateRequest()
        kind = r.choice(["text", "token_ids", "token_ids", "messages", "none"])
        if kind == "text":
            req.text = self.text()
        elif kind == "token_ids":
            req.token_ids.ids.extend(self.ids())
        elif kind == "messages":
            req.messages.CopyFrom(self.messages())
        if self.chance(0.5):
            req.adapter = self.name()
        if self.chance(0.5):
            req.sampling.CopyFrom(self.sampling())
        if self.chance(0.3):
            req.request_id = r.choice(["id-1", "", self.text(), "r" * 257])
        req.append_invocation = self.chance(0.3)
        if self.chance(0.2):  # a pipeline session, ended by the request itself (nothing stays retained)
            req.session = r.choice(["s1", "s2", "", self.text(), "s" * 257])
            req.end_session = self.chance(0.8)
            if self.chance(0.5):
                req.session_ttl = self.real()
        return req

    def pipeline(self) -> pb.PipelineRequest:
        r, req = self.rng, pb.PipelineRequest()
        base = self.generate()
        if base.HasField("text"):
            req.text = base.text
        for field in ("token_ids", "messages"):
            if base.HasField(field):
                getattr(req, field).CopyFrom(getattr(base, field))
        if base.HasField("sampling"):
            req.sampling.CopyFrom(base.sampling)
        for _ in range(r.choice([0, 1, 2, 3, 17])):
            judge = req.judges.add(adapter=r.choice(["judge", "judge", "", self.name()]))
            if self.chance(0.4):
                judge.invocation_text = self.text()
            if self.chance(0.5):
                judge.sampling.CopyFrom(self.sampling())
        if self.chance(0.3):
            req.session_ttl = self.real()
        return req

    def tokenize(self) -> pb.TokenizeRequest:
        req = pb.TokenizeRequest()
        if self.chance(0.5):
            req.text = self.text()
        else:
            req.messages.CopyFrom(self.messages())
        if self.chance(0.5):
            req.add_generation_prompt = self.chance(0.5)
        return req

    def load(self) -> pb.LoadAdapterRequest:
        r = self.rng
        path = r.choice(
            [*self.dirs, *self.dirs, "", ".", "..", "/", "/etc", "missing", "good/..", self.text(), "p" * 5000]
        )
        name = r.choice(["fz1", "fz2", "judge", self.name()])
        return pb.LoadAdapterRequest(name=name, path=path)

    def garbage(self, method) -> bytes:
        """Random bytes, or a valid request of `method` with a few bytes flipped or cut."""
        r = self.rng
        if self.chance(0.5):
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 64)))
        make = {"Generate": self.generate, "Tokenize": self.tokenize, "LoadAdapter": self.load,
                "Pipeline": self.pipeline}.get(method.name)  # fmt: skip
        data = bytearray(make().SerializeToString() if make else b"\x0a\x03abc")
        for _ in range(r.randrange(1, 4)):
            if data:
                data[r.randrange(len(data))] = r.randrange(256)
        return bytes(data[: r.randrange(len(data) + 1)] if self.chance(0.3) else data)


def _run(channel, method_name: str, request, raw: bool) -> tuple[str, str]:
    """(status code name, details) of one call, its stream read to the end."""
    method = SERVICE.methods_by_name[method_name]
    path = f"/{SERVICE.full_name}/{method_name}"
    serialize = None if raw else type(request).SerializeToString
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    call = kind(path, request_serializer=serialize, response_deserializer=None)
    try:
        response = call(request, timeout=HANG)
        if method.server_streaming:
            for _ in response:
                pass
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def _greedy(channel) -> list[list[int]]:
    """Greedy tokens of the base model and of the judge adapter on fixed prompts."""
    stub = pb_grpc.JaloraStub(channel)
    out = []
    for adapter in ("", "judge"):
        prompt = [11, 12, 13, 14, 15, 16, 17, *INVOCATION]
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt),
            adapter=adapter,
            sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True),
        )
        out.append([t for r in stub.Generate(request, timeout=HANG) for t in r.token_ids])
    return out


def test_fuzz_every_rpc(fuzzed):
    server, channel, dirs = fuzzed
    before = _greedy(channel)
    fuzz = Fuzzer(SEED, dirs)
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    bad = []
    for i in range(NUM_REQUESTS):
        weights = {"Generate": 45, "ListAdapters": 5, "LoadAdapter": 12, "UnloadAdapter": 8, "Tokenize": 15,
                   "GetServerInfo": 5, "EndSession": 4, "Pipeline": 10}  # fmt: skip
        method = fuzz.rng.choices(SERVICE.methods, weights=[weights[m.name] for m in SERVICE.methods])[0]
        raw = fuzz.chance(0.15)
        if raw:
            request = fuzz.garbage(method)
        elif method.name == "Generate":
            request = fuzz.generate()
        elif method.name == "Tokenize":
            request = fuzz.tokenize()
        elif method.name == "Pipeline":
            request = fuzz.pipeline()
        elif method.name == "EndSession":
            request = pb.EndSessionRequest(session=fuzz.rng.choice(["s1", "s2", "", fuzz.text()]))
        elif method.name == "LoadAdapter":
            request = fuzz.load()
        elif method.name == "UnloadAdapter":
            request = pb.UnloadAdapterRequest(name=fuzz.rng.choice([*fuzz.loaded, *fuzz.loaded, fuzz.name()]))
            if request.name == "judge":  # the fixed adapter the greedy check compares stays loaded
                request.name = "absent"
        else:
            request = getattr(pb, method.input_type.name)()
        code, details = _run(channel, method.name, request, raw)
        seen[(method.name, code)] += 1
        if code not in EXPECTED or len(details) > MAX_ERROR_MESSAGE_CHARS:
            bad.append((i, method.name, raw, code, details[:200]))
        if code == "OK" and not raw and method.name == "LoadAdapter":
            fuzz.loaded.append(request.name)
        if code == "OK" and not raw and method.name == "UnloadAdapter" and request.name in fuzz.loaded:
            fuzz.loaded.remove(request.name)
    print("\nfuzz statuses:", json.dumps({f"{m} {c}": n for (m, c), n in sorted(seen.items())}, indent=1))
    assert not bad, bad
    assert {m.name for m in SERVICE.methods} == {m for m, _ in seen}
    # Each call ended before the next began: nothing may still hold a request or a KV block once the
    # engine has taken what ended them (a Pipeline whose judge was refused aborts its other judges,
    # whose slots are released by the engine's next turn, after the call has returned).
    deadline = time.monotonic() + HANG
    while True:
        info = pb_grpc.JaloraStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=HANG)
        if info.num_running_requests == 0 and info.num_free_blocks == info.num_total_blocks:
            break
        assert time.monotonic() < deadline, info
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert _greedy(channel) == before
    listed = pb_grpc.JaloraStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=HANG)
    assert "judge" in {a.name for a in listed.adapters}
