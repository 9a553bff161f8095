"""Test set-up: float64 in JAX, and hypothesis profiles (bounded and seeded on CI)."""

import os

# Compile fast: hypothesis draws a new shape almost every example, and on 2 cores XLA's LLVM
# back end dominates the suite's time. These flags cut it by ~40% and change no HLO-level
# semantics; the benchmarks and the CLI run with XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# Under pytest-xdist the workers share the cores: each gets its share of threads, or torch's
# and XLA's pools oversubscribe them and spin-wait (20x slower tiny-model tests, measured).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
if _WORKERS > 1:
    os.environ["XLA_FLAGS"] += f" --xla_cpu_multi_thread_eigen={'true' if _THREADS > 1 else 'false'}"
    import torch

    torch.set_num_threads(_THREADS)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Must run before any JAX array exists: float64 parity is the semantic check.
jax.config.update("jax_enable_x64", True)

# CI: 6 examples per property, for the suite's 10-minute budget on 2 cores. From fresh clones:
# 10m25s in one process; 8m26s on two xdist workers at 8 examples; then 10m02s-10m13s at 8 once
# the suite had grown to 732 tests (about 20 CPU-minutes: it is CPU-bound, and the property tests
# are its longest). Every @example pin still runs first; dev and thorough draw more.
settings.register_profile(
    "ci", max_examples=6, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """One torch thread for tests of tiny models: a second thread only adds spin-waits, which on
    a loaded 2-core machine made them 20x slower (measured on the serving tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_gpu_reason() -> str | None:
    """Why the `gpu` tests cannot run here, or None when torch and JAX both see a GPU."""
    import torch

    if not torch.cuda.is_available():
        return f"no GPU: torch {torch.__version__} sees no CUDA device"
    try:
        jax.devices("gpu")
    except RuntimeError:
        return "no GPU: JAX has no gpu backend (install jax[cuda12])"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying why, on a machine without a GPU for both twins."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _no_gpu_reason() if gpu_items else None
    for item in gpu_items if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))
