"""Chat prompts: a conversation rendered to token ids with the model's own chat template.

The template comes from the model directory (`chat_template` in tokenizer_config.json, or
chat_template.jinja) and is rendered by transformers, the library whose templates these are (its
sandboxed jinja2 environment and helper functions), so a conversation becomes exactly the text the
model was trained on. The text is then tokenized without adding special tokens: the template writes
them itself.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from jalora.errors import AdapterNotFoundError, InvalidRequestError

if TYPE_CHECKING:
    from jalora.engine.interface import Engine

ROLES_HELP = "a list of {'role': str, 'content': str} messages"


def _token_content(value) -> str | None:
    """A special token of tokenizer_config.json / special_tokens_map.json: a string, or an AddedToken written
    as a dict ({"__type": "AddedToken", "content": "<s>", ...}, as older Llama-2 files hold them)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(model_dir: str) -> tuple[str | None, dict]:
    """(template or None, the special tokens tokenizer_config.json names) of a model directory, as transformers
    reads them: chat_template.jinja before tokenizer_config.json's `chat_template`; special tokens as strings
    or AddedToken dicts, special_tokens_map.json's over tokenizer_config.json's where the latter has no
    `added_tokens_decoder` (transformers' legacy merge)."""
    config = read_model_json(model_dir, "tokenizer_config.json")
    template = None
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):  # (transformers: "they take priority over template entries in the tokenizer config")
        with open(jinja) as f:
            template = f.read()
    if template is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    entries = dict(config)
    if "added_tokens_decoder" not in config:
        entries.update(read_model_json(model_dir, "special_tokens_map.json"))
    special = {k: t for k, v in entries.items() if k.endswith("_token") and (t := _token_content(v)) is not None}
    return template, special


def read_model_json(model_dir: str, name: str) -> dict:
    """A JSON object file of a model directory ({} if absent); InvalidRequestError naming the file otherwise."""
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(name, f"cannot read it in {model_dir}: {e}") from e
    if not isinstance(value, dict):
        raise InvalidRequestError(name, f"must hold a JSON object (in {model_dir})")
    return value


def validate_messages(messages) -> list[dict[str, str]]:
    """The conversation as plain dicts; InvalidRequestError naming `messages` if it is not one."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages", f"must be a non-empty list: {ROLES_HELP}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]", f"must be {{'role': str, 'content': str}}, got {m!r:.80}")
        if not m["role"]:
            raise InvalidRequestError(f"messages[{i}].role", "must not be empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ChatTemplate:
    """Renders conversations for one model (built once per engine; transformers loads on first use).
    Thread-safe: a server renders on several threads at once."""

    def __init__(self, template: str, special_tokens: dict, tokenizer: Tokenizer):
        self.template = template
        self.special_tokens = special_tokens
        self.tokenizer = tokenizer
        self._renderer = None
        self._lock = threading.Lock()  # the renderer is built once, by the first thread to need it

    def _render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        with self._lock:
            if self._renderer is None:
                from transformers import PreTrainedTokenizerFast

                self._renderer = PreTrainedTokenizerFast(
                    tokenizer_object=self.tokenizer, chat_template=self.template, **self.special_tokens
                )
        try:
            return self._renderer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as e:  # the template raised (e.g. "roles must alternate"): the request's fault
            raise InvalidRequestError("messages", f"the model's chat template refused them: {e}") from e

    def render(self, messages, add_generation_prompt: bool = True) -> list[int]:
        text = self._render_text(validate_messages(messages), add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def turn_end(engine: Engine, messages) -> tuple[list[int], int | None]:
    """How the chat template closes an assistant turn: (the tokens it puts after the turn's end token,
    that token). Read from `messages` rendered without a generation prompt: the last end-of-sequence
    token there closes the last turn. ([], None) where the template ends turns with no such token."""
    closed = engine.apply_chat_template(messages, add_generation_prompt=False)
    eos = set(engine.info().eos_token_ids)
    ends = [i for i, t in enumerate(closed) if t in eos]
    if not ends:
        return [], None
    return closed[ends[-1] + 1 :], closed[ends[-1]]


def close_turn(answer: Sequence[int], turn: tuple[list[int], int | None]) -> list[int]:
    """The tokens that close an answer's turn as the template does (`turn` from `turn_end`): its end token
    unless the answer ends with it already (one cut by max_tokens does not), then what follows it."""
    after, end = turn
    return ([end] if end is not None and (not answer or answer[-1] != end) else []) + after


def invocation_tokens(engine: Engine, adapter: str | None) -> list[int] | None:
    """The invocation tokens of aLoRA adapter `adapter`; None for the base model and a plain LoRA."""
    if adapter is None:
        return None
    for info in engine.list_adapters():
        if info.name == adapter:
            return list(info.invocation_tokens) if info.kind == "alora" else None
    raise AdapterNotFoundError(adapter)


def prompt_with_invocation(
    engine: Engine, prompt: str | Sequence[int] | None, messages, adapter: str | None, truncate: int | None = None
) -> list[int]:
    """Token ids of a prompt (text or ids) or of a conversation, ending with the aLoRA adapter's
    invocation when `adapter` is one: for a conversation in place of the template's generation prompt
    (the invocation is the turn the adapter answers in; PEFT advises a role prefix of the chat template
    as an aLoRA's invocation). For the base model and a plain LoRA: the prompt, or the conversation
    with its generation prompt. Used only where a caller asks for the invocation to be appended. `truncate`: the
    request's truncate_prompt_tokens (a text longer than the model takes is then cut, not refused: the prompt
    with the invocation is cut to its last tokens when it is encoded)."""
    invocation = invocation_tokens(engine, adapter)
    if messages is not None:
        ids = engine.apply_chat_template(messages, add_generation_prompt=invocation is None)
    elif isinstance(prompt, str):
        ids = engine.encode_prompt(prompt, truncate).token_ids  # an oversized text is refused before tokenizing
    else:
        ids = list(prompt)
    return ids + (invocation or [])
