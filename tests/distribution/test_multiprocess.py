"""Two JAX processes over the loopback address, one mesh across both (Keras'
`keras.distribution.initialize`, JAX's distributed runtime): `fit` gives the
one-process losses."""

import keras
import pytest
from launch import finish
from launch import free_port
from launch import start
from launch import xla_flags

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution is implemented for JAX only (Keras 3.15); the JAX pass of the "
    "suite runs this in JAX subprocesses",
)


def test_two_processes_one_mesh_fit_equals_one_process():
    env = {
        "KERAS_BACKEND": "jax",
        "COORDINATOR": f"127.0.0.1:{free_port()}",
        "XLA_FLAGS": xla_flags(4),
    }
    processes = [start("multiprocess_worker.py", {**env, "PROCESS_ID": str(i)}) for i in range(2)]
    results = [finish(p) for p in processes]
    one = finish(start("multiprocess_worker.py", {"KERAS_BACKEND": "jax", "XLA_FLAGS": xla_flags(1)}))
    assert results[1] is None and len(results[0]) == 2
    for loss, ref in zip(results[0], one):
        assert abs(loss - ref) <= 1e-4 * abs(ref), (results[0], one)
