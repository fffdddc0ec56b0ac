"""Engine errors. The server maps each class to one gRPC status code (server/errors.py).

A message quotes what a caller sent through `quoted`, which keeps a short prefix: an error about a
1 MB name must not be 1 MB long (over gRPC it travels in metadata of bounded size).
"""

from jalora.api.limits import ADAPTER_NAME_RULE

QUOTE_CHARS = 64  # of a caller's value, at most this many characters appear in an error


def quoted(value) -> str:
    """`value` for an error message: its repr, cut after QUOTE_CHARS characters of a string (or of the
    repr of anything else), with the full length said where it was cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= QUOTE_CHARS:
        return repr(value) if isinstance(value, str) else text
    head = repr(text[:QUOTE_CHARS]) if isinstance(value, str) else text[:QUOTE_CHARS]
    return f"{head}... ({len(text)} characters)"


class InvalidRequestError(ValueError):
    """A request or configuration field has a bad value. `field` names it.

    The text is `"{field}: {message}"`, so `message` must not name the field again: "must be >= 1",
    not "block_size must be >= 1".
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelFetchError(InvalidRequestError):
    """A model file jalora fetches itself (the default model) is missing and cannot be downloaded, or
    what was downloaded is not what was pinned. The message names the command that fetches it."""

    def __init__(self, message: str):
        super().__init__("model", message)


class AdapterNotFoundError(InvalidRequestError):
    """The named adapter is not loaded (gRPC NOT_FOUND)."""

    def __init__(self, name: str, field: str = "adapter"):
        super().__init__(field, f"{quoted(name)} is not loaded")
        self.name = name


class SessionNotFoundError(InvalidRequestError):
    """Ending a pipeline session that is not live (never opened, ended, expired or evicted; gRPC NOT_FOUND)."""

    def __init__(self, session):
        super().__init__("session", f"{quoted(session)} is not a live session (never opened, or ended already)")
        self.session = session


class PreconditionError(InvalidRequestError):
    """A well-formed request that the engine's current state cannot serve (gRPC FAILED_PRECONDITION)."""


class AdapterInUseError(PreconditionError):
    """Unloading an adapter that requests still use."""

    def __init__(self, name: str, in_flight: int):
        super().__init__("name", f"adapter {quoted(name)} has {in_flight} requests in flight; unload it when they end")
        self.name = name


class InvocationNotFoundError(PreconditionError):
    """An aLoRA request whose prompt lacks the adapter's invocation sequence."""

    def __init__(self, name: str, invocation: list[int]):
        super().__init__(
            "prompt",
            f"does not contain the invocation sequence {quoted(invocation)} of aLoRA adapter {quoted(name)}; "
            "append it (jalora.client.with_invocation) before calling the adapter",
        )
        self.name = name
        self.invocation = invocation


class AdapterNameError(InvalidRequestError):
    """A name no adapter can have (the pattern of jalora.api.limits.ADAPTER_NAME)."""

    def __init__(self, name, field: str = "name"):
        super().__init__(field, f"{quoted(name)} is not an adapter name ({ADAPTER_NAME_RULE})")


class AdapterPathError(InvalidRequestError):
    """An adapter path, or a file in an adapter directory, that resolves outside the adapter roots a
    server allows (gRPC PERMISSION_DENIED)."""

    def __init__(self, message: str, field: str = "path"):
        super().__init__(field, message)


class CapacityError(RuntimeError):
    """The engine cannot admit more work right now (gRPC RESOURCE_EXHAUSTED)."""


class EngineLostError(RuntimeError):
    """The engine can run no step any more: a process of a multi-host engine is gone (restart the group)."""
