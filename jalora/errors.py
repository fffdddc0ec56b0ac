"""Engine errors. The server maps each class to one gRPC status code (server/errors.py)."""


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

    def __init__(self, name: str):
        super().__init__("adapter", f"{name!r} is not loaded")
        self.name = name


class PreconditionError(InvalidRequestError):
    """A well-formed request that the engine's current state cannot serve (gRPC FAILED_PRECONDITION)."""


class AdapterInUseError(PreconditionError):
    """Unloading an adapter that requests still use."""

    def __init__(self, name: str, in_flight: int):
        super().__init__("name", f"adapter {name!r} has {in_flight} requests in flight; unload it when they end")
        self.name = name


class InvocationNotFoundError(PreconditionError):
    """An aLoRA request whose prompt lacks the adapter's invocation sequence."""

    def __init__(self, name: str, invocation: list[int]):
        super().__init__(
            "prompt",
            f"does not contain the invocation sequence {invocation} of aLoRA adapter {name!r}; "
            "append it (jalora.client.with_invocation) before calling the adapter",
        )
        self.name = name
        self.invocation = invocation


class CapacityError(RuntimeError):
    """The engine cannot admit more work right now (gRPC RESOURCE_EXHAUSTED)."""
