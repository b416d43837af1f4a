"""Fine-tuning with `fit`: input kinds, and the chunked loss against the plain
full-logits loss on the same weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY
from helpers import to_numpy

import keras_gemma

TEXTS = ["The quick brown fox jumps.", "Keras runs on JAX.", "Gemma is open.", "Knock knock."]


def _lm(tokenizer, seed=0, **config):
    """A tiny model whose weights depend only on `seed` and the config."""
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
    lm = keras_gemma.GemmaCausalLM(
        keras_gemma.GemmaBackbone(**{**TINY, **config}), preprocessor=preprocessor
    )
    rng = np.random.default_rng(seed)
    for v in lm.weights:
        v.assign(rng.normal(scale=0.2, size=v.shape).astype("float32"))
    return lm


def full_logits_loss(y_true, logits):
    """Keras' plain sparse cross-entropy as a function: `compile` keeps it,
    and fit trains from full logits (the reference)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)


FULL_LOGITS = lambda: dict(  # noqa: E731
    loss=full_logits_loss, weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()]
)


def uses_chunked_loss(lm):
    """Whether fit trains from hidden states (the chunked loss): the
    training forward pass returns them instead of logits."""
    x, _, _ = lm.preprocessor(TEXTS[:2])
    return lm(x, training=True).shape[-1] == lm.backbone.hidden_dim


def _train(lm, chunked, texts=TEXTS, epochs=2, **compile_kwargs):
    if not chunked:
        compile_kwargs = {**FULL_LOGITS(), **compile_kwargs}
    lm.compile(optimizer=keras.optimizers.SGD(0.5), **compile_kwargs)
    history = lm.fit(texts, batch_size=2, epochs=epochs, shuffle=False, verbose=0)
    return history.history, [to_numpy(w) for w in lm.trainable_weights], uses_chunked_loss(lm)


@pytest.mark.parametrize("config", [{}, {"final_logit_soft_cap": 3.0}], ids=["plain", "soft_cap"])
def test_chunked_loss_trains_exactly_like_full_logits(tokenizer, config):
    chunked, chunked_weights, used = _train(_lm(tokenizer, **config), chunked=True)
    plain, plain_weights, plain_used = _train(_lm(tokenizer, **config), chunked=False)
    assert used and not plain_used
    assert set(chunked) == {"loss", "sparse_categorical_accuracy"}
    for name in chunked:
        np.testing.assert_allclose(chunked[name], plain[name], rtol=1e-5, atol=1e-6)
    assert chunked["loss"][-1] < chunked["loss"][0]
    for a, b in zip(chunked_weights, plain_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_other_losses_and_metrics_train_from_full_logits(tokenizer):
    lm = _lm(tokenizer)
    _, _, used = _train(lm, chunked=False, epochs=1)
    assert not used
    lm = _lm(tokenizer)
    _, _, used = _train(
        lm, chunked=True, epochs=1,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    )
    assert not used
    lm = _lm(tokenizer)
    _, _, used = _train(lm, chunked=True, epochs=1, weighted_metrics=["sparse_top_k_categorical_accuracy"])
    assert not used
    lm = _lm(tokenizer)
    _, _, used = _train(lm, chunked=True, epochs=1, weighted_metrics=[])
    assert used
    # keras-hub's usual spelling of the default is the default.
    lm = _lm(tokenizer)
    _, _, used = _train(
        lm, chunked=True, epochs=1,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    assert used


@pytest.mark.parametrize("setting", ["float32", "mixed_bfloat16", "int8_lora"])
def test_fit_reports_the_loss_evaluate_reports(tokenizer, setting):
    """At learning rate 0, the loss and accuracy `fit` reports (the chunked
    loss from hidden states) are `evaluate`'s on the same batch, which
    computes them from full logits: the chunked loss is the full-logits loss,
    quantized or not."""
    if setting == "mixed_bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")

    texts = TEXTS[:2]
    lm = _lm(tokenizer)
    if setting == "int8_lora":
        lm.quantize("int8")
        lm.backbone.enable_lora(2)
    lm.compile(optimizer=keras.optimizers.SGD(0.0))
    fitted = lm.fit(texts, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    assert uses_chunked_loss(lm)
    evaluated = lm.evaluate(texts, batch_size=2, verbose=0, return_dict=True)
    for name in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(fitted[name][0], evaluated[name], rtol=1e-4)
    assert 1.0 < fitted["loss"][0] < 20.0  # a cross-entropy over 384 tokens


def test_the_default_compile_trains_with_the_chunked_loss(tokenizer):
    """keras-hub's constructor compiles the model: fit without a compile()
    call trains with the chunked loss and reports its accuracy."""
    lm = _lm(tokenizer)
    assert uses_chunked_loss(lm)
    history = lm.fit(TEXTS, batch_size=2, epochs=1, verbose=0).history
    assert set(history) == {"loss", "sparse_categorical_accuracy"}


def test_fit_takes_strings_lists_datasets_and_tensors(tokenizer):
    lm = _lm(tokenizer)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    # A list of strings, a numpy array of strings, a tf.data dataset of strings.
    lm.fit(TEXTS, batch_size=2, epochs=1, verbose=0)
    lm.fit(np.array(TEXTS), batch_size=2, epochs=1, verbose=0)
    lm.fit(tf.data.Dataset.from_tensor_slices(TEXTS).batch(2), epochs=1, verbose=0)
    # Preprocessed tensors (x, y, sample_weight), without a preprocessor.
    x, y, sample_weight = lm.preprocessor(TEXTS)
    x = {k: to_numpy(v) for k, v in x.items()}
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    bare = keras_gemma.GemmaCausalLM(lm.backbone, preprocessor=None)
    bare.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = bare.fit(x, y, sample_weight=sample_weight, batch_size=2, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_fit_under_mixed_bfloat16(tokenizer):
    keras.config.set_dtype_policy("mixed_bfloat16")
    lm = _lm(tokenizer)
    assert lm.backbone.compute_dtype == "bfloat16"
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    losses = lm.fit(TEXTS, batch_size=2, epochs=6, verbose=0).history["loss"]
    assert uses_chunked_loss(lm)
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses


def test_chunked_loss_under_bfloat16_equals_full_logits(tokenizer):
    # (Keras' optimizers leave bfloat16 variables unchanged at these small
    # updates, with full logits too: compare the loss, not training.)
    keras.config.set_dtype_policy("bfloat16")
    chunked, _, used = _train(_lm(tokenizer), chunked=True, epochs=1)
    plain, _, _ = _train(_lm(tokenizer), chunked=False, epochs=1)
    assert used
    np.testing.assert_allclose(chunked["loss"], plain["loss"], rtol=2e-2)


def test_gradient_accumulation_steps_apply_the_mean_update(tokenizer):
    # Accumulating 2 batches of 2 applies the mean gradient once: with SGD
    # that equals one step on the 4 texts at once.
    accumulated = _lm(tokenizer)
    accumulated.compile(optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=2))
    accumulated.fit(TEXTS, batch_size=2, epochs=1, shuffle=False, verbose=0)
    whole = _lm(tokenizer)
    whole.compile(optimizer=keras.optimizers.SGD(0.5))
    whole.fit(TEXTS, batch_size=4, epochs=1, shuffle=False, verbose=0)
    untouched = _lm(tokenizer)
    for a, b, c in zip(accumulated.trainable_weights, whole.trainable_weights, untouched.trainable_weights):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-5)
    assert any(
        not np.allclose(to_numpy(a), to_numpy(c)) for a, c in zip(accumulated.trainable_weights, untouched.trainable_weights)
    )


def test_rematerialized_blocks_train_exactly_alike(tokenizer):
    names = [f"decoder_block_{i}" for i in range(TINY["num_layers"])]
    with keras.RematScope(mode="list_of_layers", layer_names=names):
        remat = _lm(tokenizer)
    assert all(block._remat_mode is not None for block in remat.backbone.transformer_layers)
    remat_history, remat_weights, _ = _train(remat, chunked=True)
    history, weights, _ = _train(_lm(tokenizer), chunked=True)
    np.testing.assert_allclose(remat_history["loss"], history["loss"], rtol=1e-5)
    for a, b in zip(remat_weights, weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_long_sequence_chunks_train_exactly_like_whole_sequences(tokenizer, monkeypatch):
    """`fit` (compiled, as users run it) with the feed-forward networks and
    attention in rematerialized chunks of positions: the same losses and
    weights as whole sequences."""
    from keras_gemma.layers import attention
    from keras_gemma.layers import feed_forward

    whole, whole_weights, _ = _train(_lm(tokenizer), chunked=True)
    # 4-position chunks for the tiny model's 48-wide branches and 4 heads x 12 keys.
    monkeypatch.setattr(feed_forward, "_TRAINING_CHUNK_ELEMENTS", 200)
    lengths = []
    position_chunks = feed_forward.position_chunks

    def counting(fn, inputs, chunk, shared=()):
        lengths.append((inputs[0].shape[1], chunk))
        return position_chunks(fn, inputs, chunk, shared)

    monkeypatch.setattr(feed_forward, "position_chunks", counting)
    monkeypatch.setattr(attention, "position_chunks", counting)
    chunked, chunked_weights, _ = _train(_lm(tokenizer), chunked=True)
    assert len(lengths) >= 2 * TINY["num_layers"] and all(c < n for n, c in lengths)
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_weights, whole_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
