"""keras_gemma.backend: the speed routes are the only backend-specific code,
and turning them off changes no result."""

import pathlib
import re

import keras
import keras_hub
import numpy as np
import pytest
from helpers import TINY
from helpers import to_numpy

import keras_gemma
from keras_gemma import backend

PACKAGE = pathlib.Path(keras_gemma.__file__).parent
TEXTS = ["The quick brown fox jumps.", "Keras runs on JAX."]


def test_layers_and_models_name_no_backend():
    """Backend-specific code lives in keras_gemma/backend.py only."""
    pattern = re.compile(r"backend\(\)|import torch|import tensorflow")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for folder in ("layers", "models")
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found


def _lm(tokenizer, routes):
    """A tiny model with random weights and random LoRA adapters (so the
    unmerged-adapter route is exercised), built with the routes on or off."""
    with backend.speed_routes(routes):
        preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
        lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor=preprocessor)
        lm.backbone.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
        rng = np.random.default_rng(0)
        for v in lm.weights:
            v.assign(rng.normal(scale=0.2, size=v.shape).astype("float32"))
        lm.compile(optimizer=keras.optimizers.SGD(0.5), sampler="greedy")
    return lm


def _results(lm, routes):
    with backend.speed_routes(routes):
        x, _, _ = lm.preprocessor(TEXTS)
        logits = to_numpy(lm(x))
        generated = lm.generate(TEXTS, max_length=32, stop_token_ids=None)
        streamed = "".join(lm.generate_stream(TEXTS[0], max_length=32, stop_token_ids=None))
        history = lm.fit(TEXTS, batch_size=2, epochs=2, shuffle=False, verbose=0).history
        weights = [to_numpy(w) for w in lm.trainable_weights]
    return logits, generated, streamed, history, weights


def test_speed_routes_off_give_the_same_results(tokenizer):
    """Logits, generation, streaming and two LoRA training steps (loss,
    accuracy, updated adapters) with every speed route off equal those with
    them on."""
    on = _results(_lm(tokenizer, True), True)
    off = _results(_lm(tokenizer, False), False)
    np.testing.assert_allclose(on[0], off[0], rtol=1e-5, atol=1e-5)
    assert on[1] == off[1] and on[2] == off[2] == on[1][0]
    for name in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(on[3][name], off[3][name], rtol=1e-5)
    for a, b in zip(on[4], off[4]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _FailingSampler(keras_hub.samplers.GreedySampler):
    def get_next_token(self, probabilities):
        raise RuntimeError("sampler failed")


def test_generation_restores_the_torch_thread_count(tokenizer):
    """On PyTorch, generation runs with one torch thread and gives the count
    back afterwards, on an error too; nothing else changes it."""
    if keras.config.backend() != "torch":
        pytest.skip("the thread count is PyTorch's (JAX and TensorFlow are not touched)")
    import torch

    lm = _lm(tokenizer, True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lm.generate(TEXTS[0], max_length=32)
        assert torch.get_num_threads() == 2
        lm.fit(TEXTS, batch_size=2, epochs=1, verbose=0)
        assert torch.get_num_threads() == 2
        lm.compile(sampler=_FailingSampler())
        with pytest.raises(RuntimeError, match="sampler failed"):
            lm.generate(TEXTS[0], max_length=32)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
