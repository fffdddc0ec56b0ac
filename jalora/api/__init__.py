"""The gRPC contract between jalora's server and its clients.

`v1/jalora.proto` (proto package `jalora.v1`) and the code generated from it (`generate.sh`), plus the
constants both sides must agree on. Imports nothing but protobuf and grpc, so the server (which
imports the engine) and the client (which must not) both build on it without a cycle.
"""

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator says otherwise
DEFAULT_PORT = 50051
DEFAULT_TARGET = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_TIMEOUT = 600.0  # seconds: the deadline a client gives each call unless told otherwise
# Trailing-metadata key that names the offending request field of an INVALID_ARGUMENT.
FIELD_METADATA_KEY = "jalora-field"
# Token streams are small, but Tokenize / GetServerInfo answers and long prompts as token ids are not.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# Call credentials: `authorization: Bearer <token>` metadata on every call (gRPC metadata keys are
# lower case). Server and clients read a token file the same way (read_token_file), so one file serves both.
AUTHORIZATION_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "


def read_token_file(path) -> str:
    """The bearer token a file holds: its text without surrounding whitespace (a trailing newline).

    Raises OSError if it cannot be read, ValueError if it holds no token or one that cannot travel in
    gRPC metadata (printable ASCII without spaces)."""
    with open(path, encoding="utf-8", errors="strict") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} holds no token")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{path} must hold one token of printable ASCII without spaces")
    return token
