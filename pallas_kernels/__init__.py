"""Pallas kernels of jalora, each beside its pure-jnp reference."""
