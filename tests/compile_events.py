"""Backend compilations of this test process, counted from JAX's monitoring events (one listener for every
test module: a test compares the count before and after the requests it makes)."""

from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILES: list[str] = []


def _count(name: str, *_args, **_kwargs) -> None:
    if name == _BACKEND_COMPILE:
        COMPILES.append(name)


monitoring.register_event_duration_secs_listener(_count)
