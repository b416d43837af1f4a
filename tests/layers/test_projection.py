"""Projection: its products (the adapter applied beside the frozen kernel,
and on PyTorch the numpy route in training) compute what
Keras' own EinsumDense computes with the merged kernel, for every Gemma
projection's equation."""

import keras
import numpy as np
import pytest
from helpers import to_numpy
from helpers import value_and_grads

from keras_gemma.layers.projection import Projection

# (equation, input shape, output shape) of each projection Gemma has.
EQUATIONS = [
    ("btd,dnh->btnh", (2, 5, 16), (None, 4, 8)),  # query
    ("bsd,dkh->bskh", (2, 5, 16), (None, 1, 8)),  # key, value
    ("btnh,nhd->btd", (2, 5, 4, 8), (None, 16)),  # attention output
    ("btd,df->btf", (2, 5, 16), (None, 24)),  # gating
    ("btf,df->btd", (2, 5, 24), (None, 16)),  # linear: the kernel's last axis is contracted
]

def _inputs_and_layers(rng, equation, input_shape, output_shape, lora):
    """Random inputs, and our Projection beside Keras' EinsumDense, built
    (and given rank-3 adapters when `lora`)."""
    x = rng.normal(size=input_shape).astype("float32")
    ours = Projection(equation, output_shape=output_shape)
    keras_layer = keras.layers.EinsumDense(equation, output_shape=output_shape)
    for layer in (ours, keras_layer):
        layer.build(input_shape)
        if lora:
            layer.enable_lora(3, lora_alpha=5.0)
    return x, ours, keras_layer


@pytest.mark.parametrize("equation,input_shape,output_shape", EQUATIONS)
def test_unmerged_adapter_equals_keras_merged_kernel(equation, input_shape, output_shape):
    rng = np.random.default_rng(0)
    x, ours, keras_layer = _inputs_and_layers(rng, equation, input_shape, output_shape, lora=True)
    for v in ours.weights:  # b starts at zero, which would hide every bug
        v.assign(rng.normal(size=v.shape).astype("float32"))
    keras_layer.set_weights(ours.get_weights())
    target = rng.normal(size=to_numpy(keras_layer(x)).shape).astype("float32")
    kernel = to_numpy(ours._kernel)

    def loss(layer):
        def fn(x, a, b):
            outputs, _ = layer.stateless_call([a, b], [kernel], x)
            return keras.ops.sum(keras.ops.multiply(outputs, target))

        return fn

    weights = [to_numpy(ours.lora_kernel_a), to_numpy(ours.lora_kernel_b)]
    assert [v.path.rsplit("/", 1)[-1] for v in ours.trainable_variables] == [
        "lora_kernel_a",
        "lora_kernel_b",
    ]
    value, grads = value_and_grads(loss(ours), x, *weights)
    expected_value, expected_grads = value_and_grads(loss(keras_layer), x, *weights)
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(keras_layer(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, got, want in zip(("inputs", "lora_kernel_a", "lora_kernel_b"), grads, expected_grads):
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("equation,input_shape,output_shape", EQUATIONS)
def test_trained_kernel_gradients_equal_keras_einsum_dense(equation, input_shape, output_shape):
    """Full fine-tuning: the gradients with respect to the inputs and the
    kernel itself (on PyTorch both come from numpy's products) are Keras'."""
    rng = np.random.default_rng(1)
    x, ours, keras_layer = _inputs_and_layers(rng, equation, input_shape, output_shape, lora=False)
    keras_layer.set_weights(ours.get_weights())
    target = rng.normal(size=to_numpy(keras_layer(x)).shape).astype("float32")

    def loss(layer):
        def fn(x, kernel):
            outputs, _ = layer.stateless_call([kernel], [], x)
            return keras.ops.sum(keras.ops.multiply(outputs, target))

        return fn

    kernel = to_numpy(ours.kernel)
    value, grads = value_and_grads(loss(ours), x, kernel)
    expected_value, expected_grads = value_and_grads(loss(keras_layer), x, kernel)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for name, got, want in zip(("inputs", "kernel"), grads, expected_grads):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
