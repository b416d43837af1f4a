"""The private Keras and keras-hub state keras_gemma relies on, each listed
with its reason in keras_gemma/README.md. Every test here fails, naming the
piece, when an upgrade of Keras or keras-hub changes it."""

import inspect

import keras
import numpy as np
from helpers import to_numpy
from keras import ops


def test_scale_loss_for_distribution_is_what_keras_losses_apply():
    """training.py scales the chunked loss as Keras' own reductions do under a
    `tf.distribute` strategy (identity without one)."""
    from keras.src.losses import loss as keras_loss

    assert "scale_loss_for_distribution(loss)" in inspect.getsource(keras_loss.reduce_values)
    value = keras_loss.scale_loss_for_distribution(ops.convert_to_tensor(3.0))
    assert float(to_numpy(value)) == 3.0


def _lora_layer():
    layer = keras.layers.EinsumDense("btd,df->btf", output_shape=(None, 3))
    layer.build((None, None, 4))
    layer.enable_lora(2, lora_alpha=4.0)
    rng = np.random.default_rng(0)
    for v in (layer.lora_kernel_a, layer.lora_kernel_b):
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return layer


def test_einsum_dense_frozen_kernel_is_underscore_kernel():
    """Projection applies an adapter beside EinsumDense's frozen kernel
    (`_kernel`), and merge_lora_weights writes the merged kernel into it:
    `kernel` must be `_kernel + (alpha / rank) * a @ b`."""
    layer = _lora_layer()
    assert isinstance(layer._kernel, keras.Variable) and not layer._kernel.trainable
    expected = to_numpy(layer._kernel) + 2.0 * to_numpy(layer.lora_kernel_a) @ to_numpy(
        layer.lora_kernel_b
    )
    np.testing.assert_allclose(to_numpy(layer.kernel), expected, rtol=1e-6)


def test_untrack_variable_removes_an_adapter():
    """merge_lora_weights removes the adapter variables with
    `Layer._untrack_variable` (Keras has no public way to drop LoRA) and
    clears `lora_enabled` and the adapter attributes."""
    layer = _lora_layer()
    a, b = layer.lora_kernel_a, layer.lora_kernel_b
    layer.lora_enabled = False
    layer.lora_kernel_a = layer.lora_kernel_b = None
    layer._untrack_variable(a)
    layer._untrack_variable(b)
    assert [v.path.rsplit("/", 1)[-1] for v in layer.weights] == ["kernel"]
    x = np.ones((1, 2, 4), "float32")
    np.testing.assert_allclose(to_numpy(layer(x)), x @ to_numpy(layer._kernel), rtol=1e-6)


def test_keras_hub_tokenizer_special_token_hook(spm_proto):
    """GemmaTokenizer declares its special tokens with keras-hub's
    `_add_special_token(token, attribute)`, as keras-hub's own tokenizers do."""
    from keras_hub.tokenizers import SentencePieceTokenizer

    assert callable(getattr(SentencePieceTokenizer, "_add_special_token", None))
    import keras_gemma

    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_proto)
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert tokenizer.special_token_ids


def test_rematerialized_call_contract():
    """GemmaDecoderBlock overrides `Layer.rematerialized_call`: Keras returns
    `layer_call` itself for a layer no RematScope selected."""
    layer = keras.layers.Dense(2)
    layer.build((None, 2))
    call = layer.call
    assert layer.rematerialized_call(call, np.ones((1, 2), "float32")) is call
