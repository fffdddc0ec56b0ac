"""The bounds of jalora.v1 requests, in one place.

The server checks each field against these before any slow work (tokenization, an engine call), so a
hostile request costs a few comparisons; a field out of bounds is INVALID_ARGUMENT naming the field.
A prompt given as token ids must also be shorter than the server's max_model_len (GetServerInfo).
Error messages quote at most a short prefix of what a client sent and never exceed
MAX_ERROR_MESSAGE_CHARS, so an error always fits in gRPC's trailing metadata. README's Serving section
lists these values.
"""

import re

# Adapter names, like many registries' names: what LoadAdapter accepts, and what Generate's `adapter`
# and UnloadAdapter's `name` must look like. Matched against the whole name (re.fullmatch).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ADAPTER_NAME_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ -, starting with a letter or a digit"
MAX_REQUEST_ID_CHARS = 256
# The protocol's int32 fields (token ids, max_tokens, top_k), which the engine's steps take as int32 too.
MAX_INT32 = 2**31 - 1
MAX_SESSION_ID_CHARS = 256  # a pipeline session's id (Generate's `session`, EndSession)
MAX_PIPELINE_JUDGES = 16  # judges of one Pipeline call
# A text prompt, or a conversation's roles and contents together (UTF-8 bytes).
MAX_PROMPT_BYTES = 4 * 1024 * 1024
MAX_CHAT_MESSAGES = 4096
MAX_STOP_TOKEN_IDS = 128
# Stop strings (SamplingParams.stop): matching holds back at most MAX_STOP_STRING_CHARS - 1 characters
# of a stream's text, and checks each piece of text against every string.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_ADAPTER_PATH_BYTES = 4096  # Linux's PATH_MAX
# A request body of the HTTP front: room for the largest prompt or conversation, JSON-escaped.
MAX_HTTP_BODY_BYTES = 8 * MAX_PROMPT_BYTES
# An error's message travels in trailing metadata: gRPC's default (soft) limit for all of it is 8 KB,
# and a non-ASCII character takes up to 12 bytes there once percent-encoded.
MAX_ERROR_MESSAGE_CHARS = 512


def is_adapter_name(name: object) -> bool:
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None
