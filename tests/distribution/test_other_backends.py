"""Data parallelism on TensorFlow and PyTorch, the routes their Keras guides
document (keras.distribution is JAX's): the same losses as one device."""

import keras
import pytest
from launch import finish
from launch import free_port
from launch import start


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's route; runs in the TensorFlow pass")
def test_mirrored_strategy_fit_equals_one_device():
    result = finish(start("mirrored_worker.py", {"KERAS_BACKEND": "tensorflow"}))
    assert result["replicas"] == 2
    assert len(result["mirrored"]) == 2
    for loss, ref in zip(result["mirrored"], result["one_device"]):
        assert abs(loss - ref) <= 1e-4 * abs(ref), result
    assert result["weights_diff"] < 1e-4, result


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's route; runs in the PyTorch pass")
def test_torch_ddp_over_two_gloo_processes_equals_one_process():
    env = {"KERAS_BACKEND": "torch", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    workers = [start("ddp_worker.py", {**env, "RANK": str(rank)}) for rank in range(2)]
    ddp = finish(workers[0])
    assert finish(workers[1]) is None  # process 1 ran, and left the report to 0
    one = finish(start("ddp_worker.py", {"KERAS_BACKEND": "torch"}))
    assert len(ddp) == 2
    for loss, ref in zip(ddp, one):
        assert abs(loss - ref) <= 1e-4 * abs(ref), (ddp, one)
