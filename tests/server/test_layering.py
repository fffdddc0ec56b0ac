"""The seams the package layout promises, checked on the sources: jalora never imports server, the
server drives an engine only through the Engine protocol, and the server's RPC side loads no JAX."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from jalora.engine.interface import Engine
from tests.server.support import REPO


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_jalora_never_imports_server():
    offenders = []
    for path in _sources("jalora"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "server"]
    assert not offenders, offenders


def test_server_and_the_offline_api_use_only_the_engine_protocol():
    """`engine.<name>` and `self.engine.<name>` in server/ and in `LLM` are Engine methods (plus warmup_adapters,
    which the CLI calls on the engine it builds): no scheduler, adapter manager, session table or runner."""
    allowed = {name for name in vars(Engine) if not name.startswith("_")} | {"warmup_adapters"}
    assert {"add_request", "step", "abort_request", "info"} <= allowed
    offenders = []
    for path in [*_sources("server"), REPO / "jalora" / "llm.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            is_engine = (isinstance(owner, ast.Name) and owner.id == "engine") or (
                isinstance(owner, ast.Attribute) and owner.attr == "engine"
            )
            if is_engine and node.attr not in allowed:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} engine.{node.attr}")
    assert not offenders, offenders


def test_server_rpc_side_imports_neither_jax_nor_numpy():
    code = (
        "import sys, server.app, server.cli, server.servicer, server.convert; "
        "print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
