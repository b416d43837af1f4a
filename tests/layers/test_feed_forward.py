import numpy as np
import pytest

from helpers import to_numpy
from keras_gemma.layers import GemmaFeedForward


def test_matches_transformers_gemma_mlp():
    import torch
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    x = np.random.RandomState(0).randn(2, 3, 16).astype("float32")
    ffw = GemmaFeedForward(hidden_dim=16, intermediate_dim=64)
    ffw.build(x.shape)
    mlp = GemmaMLP(GemmaConfig(hidden_size=16, intermediate_size=32, hidden_activation="gelu_pytorch_tanh"))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.tensor(to_numpy(ffw.gate.kernel).T))
        mlp.up_proj.weight.copy_(torch.tensor(to_numpy(ffw.up.kernel).T))
        mlp.down_proj.weight.copy_(torch.tensor(to_numpy(ffw.down.kernel)))
        expected = mlp(torch.tensor(x)).numpy()
    np.testing.assert_allclose(to_numpy(ffw(x)), expected, atol=1e-5, rtol=1e-5)


def test_branch_widths_are_half_of_intermediate_dim():
    ffw = GemmaFeedForward(hidden_dim=16, intermediate_dim=64)
    ffw.build((None, None, 16))
    assert tuple(ffw.gate.kernel.shape) == (16, 32)
    assert tuple(ffw.up.kernel.shape) == (16, 32)
    assert tuple(ffw.down.kernel.shape) == (16, 32)
    with pytest.raises(ValueError, match="must be even"):
        GemmaFeedForward(hidden_dim=16, intermediate_dim=63)


def _chunked_training_matches_whole(layer, x, monkeypatch, module, *call_args):
    """In training, a long sequence runs in rematerialized chunks of
    positions: outputs and gradients (inputs and every kernel) equal the
    whole-sequence computation."""
    import keras
    from keras import ops

    monkeypatch.setattr(module, "_TRAINING_CHUNK_ELEMENTS", 64)
    chunk_lengths = []  # the sequence length each rematerialized call sees
    remat = keras.remat

    def counting_remat(fn):
        def counted(*args):
            chunk_lengths.append(args[0].shape[1])
            return fn(*args)

        return remat(counted)

    monkeypatch.setattr(keras, "remat", counting_remat)
    target = np.random.RandomState(1).randn(*x.shape).astype("float32")
    variables = layer.trainable_variables

    def value_and_grads(training):
        """The loss and its gradients with respect to `x` and the layer's
        variables (real variables, as in `fit`, where the backend allows)."""
        loss = lambda x: ops.sum(ops.multiply(layer(x, *call_args, training=training), target))  # noqa: E731
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            def fn(x, values):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    return loss(x)

            value, grads = jax.value_and_grad(fn, argnums=(0, 1))(x, [v.value for v in variables])
            grads = [grads[0], *grads[1]]
        elif backend == "tensorflow":
            import tensorflow as tf

            x_tensor = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(x_tensor)
                value = loss(x_tensor)
            grads = tape.gradient(value, [x_tensor, *[v.value for v in variables]])
        else:
            import torch

            x_tensor = torch.tensor(x, requires_grad=True)
            value = loss(x_tensor)
            grads = torch.autograd.grad(value, [x_tensor, *[v.value for v in variables]])
        return to_numpy(value), [to_numpy(g) for g in grads]

    whole, whole_grads = value_and_grads(False)
    assert not chunk_lengths
    chunked, chunked_grads = value_and_grads(True)
    assert chunk_lengths and max(chunk_lengths) < x.shape[1]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    assert len(chunked_grads) == len(variables) + 1
    assert all(g.dtype == np.float32 and np.abs(g).max() > 0 for g in whole_grads + chunked_grads)
    for a, b in zip(chunked_grads, whole_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_long_sequences_train_in_rematerialized_chunks(monkeypatch):
    from keras_gemma.layers import feed_forward

    x = np.random.RandomState(0).randn(2, 7, 16).astype("float32")
    ffw = GemmaFeedForward(hidden_dim=16, intermediate_dim=32)  # 16-wide branches: 4 positions a chunk
    ffw.build(x.shape)
    _chunked_training_matches_whole(ffw, x, monkeypatch, feed_forward)
