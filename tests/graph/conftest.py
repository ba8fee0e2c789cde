"""Graph tests run strict: a NaN or inf from any op, implicit rank broadcasting, or implicit dtype
promotion is an error, so padding that leaks or overflows fails loudly rather than averaging away."""

import jax
import pytest


@pytest.fixture(autouse=True)
def strict_jax():
  with (jax.debug_nans(True), jax.debug_infs(True), jax.numpy_rank_promotion("raise"),
        jax.numpy_dtype_promotion("strict")):
    yield
