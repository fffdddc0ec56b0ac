"""Training data: JSON lines -> token ids, the aLoRA activation index and the response to learn.

Each line is `{"prompt": str, "response": str}` (the prompt tokenized as the engine tokenizes a text
prompt) or `{"messages": [{"role", "content"}, ...], "response": str}` (rendered with the model's
chat template by the engine's chat code). For an aLoRA the invocation follows the prompt: for a
conversation in place of the template's generation prompt, as `prompt_with_invocation` places it at
serving time. The activation index comes from `find_activation`, the function the engine resolves
requests with; tokens before it run the base model, and the loss covers the response tokens only.

Every line is checked before training starts; the first bad one raises one DataError naming the file,
the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

from jalora.adapters.peft import find_activation
from jalora.engine.chat import ChatTemplate
from jalora.errors import InvalidRequestError, quoted


class DataError(InvalidRequestError):
    """A line of a training data file is unusable; the field is `<file> line <n>: <field>`."""

    def __init__(self, path: str, line: int, field: str, message: str):
        super().__init__(f"{path} line {line}: {field}", message)
        self.path, self.line, self.data_field = path, line, field


@dataclasses.dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt (+ invocation) + response
    activation: int  # first adapted position (0 for a plain LoRA)
    response_start: int  # first response token
    content_end: int  # end of the response's own tokens (before an appended end-of-sequence token)
    line: int


@dataclasses.dataclass(frozen=True)
class Tokenization:
    """How text becomes ids: the engine's tokenizer and chat template for the model being trained."""

    encode: Callable[..., list[int]]  # (text, add_special_tokens) -> ids
    chat: ChatTemplate | None
    eos_token_id: int | None


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; DataError on a line that is not a JSON object."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(path, n, "json", f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, n, "json", "must be an object with 'prompt' or 'messages' and 'response'")
                rows.append((n, obj))
    except OSError as e:
        raise InvalidRequestError("data", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("data", f"{path} is not UTF-8 text") from None
    if not rows:
        raise InvalidRequestError("data", f"{path} holds no examples")
    return rows


def encode_example(
    obj: dict, path: str, line: int, tok: Tokenization, invocation: Sequence[int] | None, append_invocation: bool,
    max_seq_len: int,
) -> Example:  # fmt: skip
    """One data line as an Example; DataError naming the field that is wrong."""

    def bad(field, message):
        return DataError(path, line, field, message)

    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise bad("prompt", "give exactly one of 'prompt' (text) and 'messages' (a conversation)")
    if "response" not in obj:
        raise bad("response", "is missing")
    response = obj["response"]
    if not isinstance(response, str):
        raise bad("response", f"must be a string, got {quoted(response)}")
    if not response.strip():
        raise bad("response", "is empty: there is nothing to learn")
    appended = list(invocation) if invocation is not None and append_invocation else []
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise bad("prompt", f"must be a non-empty string, got {quoted(prompt)}")
        ids = tok.encode(prompt, add_special_tokens=True) + appended
        field = "prompt"
    else:
        if tok.chat is None:
            raise bad("messages", "the model has no chat template; give a 'prompt' instead")
        try:  # an appended invocation takes the place of the generation prompt
            ids = tok.chat.render(obj["messages"], add_generation_prompt=not appended) + appended
        except InvalidRequestError as e:
            raise bad(e.field, e.message) from None
        field = "messages"
    if len(ids) == len(appended):  # (a response with nothing before it has no position to be predicted from)
        raise bad(field, "has no tokens; the engine refuses an empty prompt too")
    activation = 0
    if invocation is not None:
        found = find_activation(ids, list(invocation))
        if found is None:
            raise bad(field, f"the invocation {list(invocation)} never occurs in its tokens")
        activation = found
    if len(ids) >= max_seq_len:
        raise bad(field, f"is {len(ids)} tokens; with a response it must fit in max_seq_len={max_seq_len}")
    answer = tok.encode(response, add_special_tokens=False)
    content_end = len(ids) + len(answer)
    if tok.eos_token_id is not None and (not answer or answer[-1] != tok.eos_token_id):
        answer = answer + [tok.eos_token_id]
    if len(ids) + len(answer) > max_seq_len:
        raise bad("response", f"makes the example {len(ids) + len(answer)} tokens, more than max_seq_len={max_seq_len}")
    if activation > len(ids):
        raise AssertionError("the activation index lies inside the response")
    return Example(ids + answer, activation, len(ids), content_end, line)


def load_examples(
    path: str, tok: Tokenization, invocation: Sequence[int] | None, append_invocation: bool, max_seq_len: int
) -> list[Example]:
    """Every line of `path` encoded; the first bad line raises DataError (nothing has been trained)."""
    return [
        encode_example(obj, path, n, tok, invocation, append_invocation, max_seq_len) for n, obj in read_jsonl(path)
    ]
