"""Test session setup: 8 fake CPU devices, strict rank promotion.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""

import os

# The tests compile many small programs and run each a few times: XLA's cheaper
# compile (no expensive LLVM passes, backend -O0) roughly halves the suite's time.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same small programs (a fresh closure each run); the
# persistent cache lets them share the compiled code within a session.
import tempfile  # noqa: E402

import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "mmjax_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def scratch_registry():
    """Families a test registers are gone after it: the one registry (zoo.FAMILIES) is
    restored to what it held."""
    from mmjax.models import zoo

    saved = dict(zoo.FAMILIES)
    yield zoo.FAMILIES
    zoo.FAMILIES.clear()
    zoo.FAMILIES.update(saved)
