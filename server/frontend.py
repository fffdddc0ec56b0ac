"""What every front of the server does with a call, whichever protocol brought it: the gRPC servicer
(server/servicer.py) and the OpenAI-compatible HTTP front (server/http.py) both go through here, so
each rule lives in one place.

- Bounds (jalora/api/limits.py) are checked before any slow work, naming the field in the caller's
  own vocabulary (each front passes its field names).
- A generation starts through `Frontend.start`: a conversation is rendered, an aLoRA's invocation
  appended where the caller asked for it (on the host pool), and the request submitted to the engine
  worker, whose admission bound applies to every front together.
- Adapter management confines LoadAdapter's directory to the server's adapter roots.
- One CallGate admits the calls of every front: a drain refuses them all, and the unary bound counts
  them together.

Imports neither JAX nor numpy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jalora.api.limits import (
    MAX_ADAPTER_PATH_BYTES,
    MAX_CHAT_MESSAGES,
    MAX_PROMPT_BYTES,
    MAX_SESSION_ID_CHARS,
    MAX_STOP_TOKEN_IDS,
    is_adapter_name,
)
from jalora.engine.chat import prompt_with_invocation
from jalora.errors import AdapterNameError, AdapterPathError, InvalidRequestError, quoted
from jalora.sampling_params import SamplingParams
from server.call_gate import CallGate
from server.config import ServerConfig
from server.engine_worker import EngineWorker, RequestStream

if TYPE_CHECKING:
    from jalora.adapters.peft import AdapterInfo


def resolve_adapter_path(path: str, roots: Sequence[str], field: str = "path") -> str:
    """The real path of `path` if it lies under one of `roots`; relative paths are tried under each root."""
    if not path:
        raise InvalidRequestError(field, "must name a PEFT adapter directory")
    if len(path.encode()) > MAX_ADAPTER_PATH_BYTES:
        raise InvalidRequestError(field, f"is {len(path.encode())} bytes long; at most {MAX_ADAPTER_PATH_BYTES}")
    if "\0" in path:
        raise InvalidRequestError(field, f"{quoted(path)} holds a NUL character")
    if not roots:
        raise AdapterPathError("this server has no adapter roots (start it with --adapter-roots DIR)", field)
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    for candidate in candidates:
        real = os.path.realpath(candidate)  # resolves symlinks and "..": no escaping a root through them
        if not any(os.path.commonpath([real, root]) == root for root in real_roots):
            continue
        if not os.path.isdir(real):
            raise FileNotFoundError(f"adapter directory {quoted(path)} does not exist under the adapter roots")
        return real
    raise AdapterPathError(f"{quoted(path)} is outside the server's adapter roots", field)


def check_adapter_name(name: str, field: str) -> None:
    if not is_adapter_name(name):
        raise AdapterNameError(name, field)


def check_session_id(session: str, field: str) -> None:
    if not session:
        raise InvalidRequestError(field, "must not be empty")
    if len(session) > MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(field, f"must be at most {MAX_SESSION_ID_CHARS} characters")


def check_text(text: str, field: str) -> None:
    if len(text) > MAX_PROMPT_BYTES or len(text.encode()) > MAX_PROMPT_BYTES:  # a character is >= 1 byte
        raise InvalidRequestError(field, f"is {len(text.encode())} bytes of UTF-8; at most {MAX_PROMPT_BYTES}")


def check_messages(messages: Sequence[tuple[str, str]], field: str) -> None:
    """A conversation as (role, content) pairs: not empty, and within the message and byte bounds."""
    if not messages:
        raise InvalidRequestError(field, "must not be empty")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(field, f"has {len(messages)} messages; at most {MAX_CHAT_MESSAGES}")
    size = 0
    for role, content in messages:
        size += len(role.encode()) + len(content.encode())
        if size > MAX_PROMPT_BYTES:
            raise InvalidRequestError(field, f"roles and contents exceed {MAX_PROMPT_BYTES} bytes of UTF-8")


def check_stop_token_ids(ids: Sequence[int], field: str) -> None:
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(field, f"must hold at most {MAX_STOP_TOKEN_IDS} ids")


class Frontend:
    """The engine worker and the server's config, as every front sees them."""

    def __init__(self, worker: EngineWorker, config: ServerConfig):
        self.worker = worker
        self.config = config
        self.calls = CallGate(config.max_pending_calls)
        self.broken: str | None = None  # why the engine can serve nothing any more (a lost host), if so
        self._defaults: SamplingParams | None = None
        self._chat_defaults: SamplingParams | None = None
        self._max_model_len: int | None = None
        self._max_session_ttl: float | None = None

    async def sampling_defaults(self) -> SamplingParams:
        """The engine's sampling defaults (the model's generation_config), asked once."""
        if self._defaults is None:
            self._defaults = await self.worker.call(lambda engine: engine.default_sampling_params())
        return self._defaults

    async def chat_sampling_defaults(self) -> SamplingParams:
        """The defaults of an OpenAI chat request: the engine's, except that a request without max_tokens runs to
        max_model_len unless the model's generation_config sets max_new_tokens (OpenAI's and vLLM's chat
        default; a completion keeps the engine's, 16 as in OpenAI's legacy API, and so does a chat in a pipeline
        session, whose share would reserve a whole context's blocks for each such request)."""
        if self._chat_defaults is None:
            defaults = await self.sampling_defaults()
            info = await self.worker.call(lambda engine: engine.info())
            self._chat_defaults = defaults if info.max_new_tokens is not None else \
                dataclasses.replace(defaults, max_tokens=None)  # fmt: skip
        return self._chat_defaults

    async def model_len(self) -> int:
        """The engine's max_model_len, asked once: a prompt of token ids is checked against it up front."""
        if self._max_model_len is None:
            self._max_model_len = (await self.worker.call(lambda engine: engine.info())).max_model_len
        return self._max_model_len

    async def check_token_ids(
        self, ids: Sequence[int], field: str, length_field: str = "prompt", truncate: int | None = None
    ) -> None:
        """A prompt of token ids: not empty, and shorter than max_model_len (before its values are read) unless
        the request truncates it (`truncate`: its truncate_prompt_tokens)."""
        n, limit = len(ids), await self.model_len()
        if n == 0:
            raise InvalidRequestError(field, "must not be empty")
        if n >= limit and truncate is None:
            raise InvalidRequestError(length_field, f"has {n} tokens; max_model_len is {limit} (room for 1 new token)")

    async def session_fields(
        self, session: str | None, ttl: float | None, end: bool,
        fields: tuple[str, str, str] = ("session", "session_ttl", "end_session"),
    ) -> dict | None:  # fmt: skip
        """A request's pipeline-session fields, checked before any slow work (`fields` name them as the
        caller did); the keywords of `Engine.add_request`, or None without a session."""
        if session is None:
            if ttl is not None:
                raise InvalidRequestError(fields[1], f"needs a session (set {fields[0]} too)")
            if end:
                raise InvalidRequestError(fields[2], f"needs a session (set {fields[0]} too)")
            return None
        check_session_id(session, fields[0])
        if ttl is not None:
            if self._max_session_ttl is None:
                self._max_session_ttl = (await self.worker.call(lambda engine: engine.info())).max_session_ttl
            limit = self._max_session_ttl
            if not (math.isfinite(ttl) and 0 < ttl <= limit):
                message = f"must be a number of seconds in (0, {limit:g}] (the server's max_session_ttl), got {ttl!r}"
                raise InvalidRequestError(fields[1], message)
        return {"session": session, "session_ttl": ttl, "end_session": end}

    async def start(
        self,
        prompt: str | Sequence[int] | None,
        messages: list[dict[str, str]] | None,
        params: SamplingParams,
        adapter: str | None,
        append_invocation: bool = False,
        session: dict | None = None,
        max_tokens_field: str | None = None,
    ) -> RequestStream:
        """Submits a generation whose fields were checked: a text or token-id `prompt`, or `messages` (a
        conversation in the model's chat template, with its generation prompt). With `append_invocation`
        the aLoRA `adapter`'s invocation is appended (to a conversation: in place of the generation
        prompt); otherwise the prompt must hold it already, as the engine checks. `session`: what
        `session_fields` returned. With `max_tokens_field` (the caller's name of an explicit max_tokens), a
        prompt that fits but leaves less room than max_tokens is refused naming it, as OpenAI's API does; without,
        the request ends at max_model_len ("length")."""
        if messages is not None or append_invocation:
            invoke = adapter if append_invocation else None
            truncate = params.truncate_prompt_tokens
            prompt = await self.worker.run_host(lambda e: prompt_with_invocation(e, prompt, messages, invoke, truncate))
        check = None if max_tokens_field is None else (max_tokens_field, await self.model_len())
        return self.worker.submit(uuid.uuid4().hex, prompt, params, adapter, session, check)

    async def end_session(self, session: str, field: str = "session") -> None:
        """Ends a live pipeline session (NOT_FOUND if it is not live)."""
        check_session_id(session, field)
        await self.worker.call(lambda engine: engine.end_session(session))

    async def list_adapters(self) -> list[AdapterInfo]:
        return await self.worker.call(lambda engine: engine.list_adapters())

    async def load_adapter(self, name: str, path: str, fields: tuple[str, str] = ("name", "path")) -> AdapterInfo:
        """Loads the adapter directory `path` (confined to the adapter roots, every file read included)
        under `name`; `fields` name the two in the caller's request."""
        check_adapter_name(name, fields[0])
        roots = self.config.adapter_roots
        real = resolve_adapter_path(path, roots, fields[1])
        # Read beside the engine thread; every file read must resolve inside the roots too, not only
        # the directory.
        prepared = await self.worker.prepare_adapter(real, roots)
        return await self.worker.call(lambda engine: engine.load_adapter(name, prepared))

    async def unload_adapter(self, name: str, field: str = "name") -> None:
        check_adapter_name(name, field)
        await self.worker.call(lambda engine: engine.unload_adapter(name))
