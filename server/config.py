"""ServerConfig: every knob of the gRPC server in one validated dataclass.

`JaloraServer(engine, config)` and `ServerThread(engine, config)` take one; `jalora serve` derives its
server flags, types, defaults and help from the fields below (server/cli.py), as it derives its engine
flags from `EngineConfig`, so each default is written once, here. Validation runs on construction,
before any model is loaded: a bad value raises `InvalidRequestError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jalora.api import DEFAULT_HOST, DEFAULT_PORT
from jalora.config import config_field, is_int, require


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = config_field(DEFAULT_HOST, "address to listen on (loopback unless the operator says otherwise)")
    port: int = config_field(DEFAULT_PORT, "TCP port; 0 picks a free one")
    adapter_roots: tuple[str, ...] = config_field(
        (), "LoadAdapter accepts only adapter directories under these (repeatable)", metavar="DIR"
    )
    max_pending_requests: int = config_field(256, "requests in flight before new ones get RESOURCE_EXHAUSTED")
    max_pending_calls: int = config_field(
        64, "unary calls (Tokenize, adapters, info) in flight before new ones get RESOURCE_EXHAUSTED"
    )
    tokenizer_threads: int = config_field(
        4, "threads that tokenize prompts and Tokenize calls beside the engine thread (at most this many at once)"
    )
    grace: float = config_field(5.0, "seconds running calls get to finish at shutdown")
    model_name: str = config_field("", "model name GetServerInfo reports (default: the engine's model directory)")

    def __post_init__(self):
        require(isinstance(self.host, str) and bool(self.host), "host", f"must name an address, got {self.host!r}")
        require(is_int(self.port) and 0 <= self.port <= 65535, "port",
                f"must be an integer in [0, 65535], got {self.port!r}")  # fmt: skip
        roots = self.adapter_roots
        require(not isinstance(roots, str | bytes | os.PathLike), "adapter_roots",
                f"must be a sequence of directories, not one path ({roots!r})")  # fmt: skip
        try:
            roots = tuple(os.fspath(r) for r in roots)
        except TypeError:
            require(False, "adapter_roots", f"must be a sequence of directory paths, got {self.adapter_roots!r}")
        require(all(isinstance(r, str) and r for r in roots), "adapter_roots",
                f"must be non-empty directory paths, got {list(roots)!r}")  # fmt: skip
        object.__setattr__(self, "adapter_roots", roots)
        for name in ("max_pending_requests", "max_pending_calls", "tokenizer_threads"):
            n = getattr(self, name)
            require(is_int(n) and n >= 1, name, f"must be an integer >= 1, got {n!r}")
        g = self.grace
        require(isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g) and g >= 0, "grace",
                f"must be a number of seconds >= 0, got {g!r}")  # fmt: skip
        require(isinstance(self.model_name, str), "model_name", f"must be a string, got {self.model_name!r}")

    def replace(self, **changes) -> ServerConfig:
        return dataclasses.replace(self, **changes)
