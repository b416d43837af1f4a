import gc
import os
import subprocess
import sys
import weakref

import keras
import keras_hub
import numpy as np
import pytest

import keras_gemma
from helpers import CORPUS, TINY, to_numpy

# A ragged batch: prompts of 5, 2 and 4 tokens, right-padded to 12.
PROMPTS = [[2, 17, 42, 9, 100], [2, 30], [2, 8, 77, 5]]
LENGTH = 12


def ragged_inputs():
    token_ids = np.zeros((len(PROMPTS), LENGTH), "int32")
    padding_mask = np.zeros((len(PROMPTS), LENGTH), "bool")
    for i, prompt in enumerate(PROMPTS):
        token_ids[i, : len(prompt)] = prompt
        padding_mask[i, : len(prompt)] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def make_lm(preprocessor=None, seed=0, **config):
    backbone = keras_gemma.GemmaBackbone(**{**TINY, **config})
    rng = np.random.RandomState(seed)
    for w in backbone.weights:  # every weight random, norm scales included
        w.assign((rng.randn(*w.shape) * 0.3).astype("float32"))
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=preprocessor)


def full_forward_greedy(lm, prompt, length):
    """Argmax of a full (uncached) forward pass, one token at a time."""
    ids = list(prompt)
    while len(ids) < length:
        token_ids = np.zeros((1, length), "int32")
        token_ids[0, : len(ids)] = ids
        mask = (np.arange(length) < len(ids))[None]
        logits = to_numpy(lm({"token_ids": token_ids, "padding_mask": mask}))
        ids.append(int(logits[0, len(ids) - 1].argmax()))
    return ids


def test_cached_greedy_equals_full_forward_argmax_on_ragged_batch():
    lm = make_lm(num_key_value_heads=2)
    out = lm.generate(ragged_inputs(), stop_token_ids=None)
    for row, prompt in zip(out["token_ids"], PROMPTS):
        assert list(row) == full_forward_greedy(lm, prompt, LENGTH)
    assert out["padding_mask"].all()


def test_cached_and_uncached_logits_agree():
    lm = make_lm()
    token_ids = np.array([[2, 17, 42, 9, 100, 5, 61, 7]])
    full = to_numpy(lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    cache = lm.backbone.init_cache(1, 10)
    logits, _, cache = lm.call_with_cache(token_ids[:, :5], cache, 0)
    steps = [to_numpy(logits)]
    for i in range(5, 8):
        logits, _, cache = lm.call_with_cache(token_ids[:, i : i + 1], cache, i)
        steps.append(to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


def test_stop_token_ids_end_each_row_at_its_first_new_stop_token():
    lm = make_lm()
    free = lm.generate(ragged_inputs(), stop_token_ids=None)["token_ids"]
    stop = int(free[0, len(PROMPTS[0]) + 1])  # row 0's second new token
    out = lm.generate(ragged_inputs(), stop_token_ids=[stop])
    for row, mask, free_row, prompt in zip(out["token_ids"], out["padding_mask"], free, PROMPTS):
        new = list(free_row[len(prompt):])
        keep = len(prompt) + (new.index(stop) + 1 if stop in new else len(new))
        assert list(mask) == [True] * keep + [False] * (LENGTH - keep)
        assert list(row[:keep]) == list(free_row[:keep])


def test_strip_prompt_returns_only_new_tokens():
    lm = make_lm()
    full = lm.generate(ragged_inputs(), stop_token_ids=None)
    stripped = lm.generate(ragged_inputs(), stop_token_ids=None, strip_prompt=True)
    for i, prompt in enumerate(PROMPTS):
        n_new = LENGTH - len(prompt)
        mask = stripped["padding_mask"][i]
        assert mask.sum() == n_new
        assert list(stripped["token_ids"][i][mask]) == list(full["token_ids"][i][len(prompt):])


@pytest.mark.parametrize(
    "sampler",
    [
        keras_hub.samplers.TopKSampler(k=5, seed=1),
        keras_hub.samplers.TopPSampler(p=0.9, seed=1),
        keras_hub.samplers.RandomSampler(seed=1, temperature=0.7),
        keras_hub.samplers.BeamSampler(num_beams=2),
    ],
    ids=["top_k", "top_p", "random", "beam"],
)
def test_keras_hub_samplers(sampler):
    lm = make_lm()
    lm.compile(sampler=sampler)
    inputs = ragged_inputs()
    out = lm.generate(inputs, stop_token_ids=None)
    ids = out["token_ids"]
    assert ids.shape == (3, LENGTH)
    assert ((ids >= 0) & (ids < TINY["vocabulary_size"])).all()
    np.testing.assert_array_equal(ids[inputs["padding_mask"]], inputs["token_ids"][inputs["padding_mask"]])


def test_strings_in_and_out(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=32)
    lm = make_lm(preprocessor)
    text = lm.generate("The quick brown", max_length=20)
    assert isinstance(text, str) and text.startswith("The quick brown")
    batch = lm.generate(["The quick brown", "Keras runs"], max_length=20)
    assert len(batch) == 2 and batch[1].startswith("Keras runs")
    assert batch[0] == text  # batching does not change a row's greedy output
    new = lm.generate("The quick brown", max_length=20, strip_prompt=True)
    assert isinstance(new, str) and not new.startswith("The quick brown")
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate("The quick brown fox jumps over the lazy dog.", max_length=6)


def test_default_stop_token_is_eos(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    lm = make_lm(preprocessor)
    # Point <eos>'s (tied) embedding along the prompt's last hidden state, so
    # <eos> is by far the most likely first new token.
    x = preprocessor.generate_preprocess(["Hi"], sequence_length=16)
    n = int(np.asarray(x["padding_mask"]).sum())
    hidden = to_numpy(lm.backbone(x))[0, n - 1]
    embeddings = to_numpy(lm.backbone.token_embedding.embeddings)
    embeddings[tokenizer.end_token_id] = 1000.0 * hidden / np.dot(hidden, hidden)
    lm.backbone.token_embedding.embeddings.assign(embeddings)
    raw = []
    postprocess = preprocessor.generate_postprocess
    preprocessor.generate_postprocess = lambda x: raw.append(x) or postprocess(x)
    assert lm.generate("Hi", max_length=16) == "Hi"
    assert lm.generate("Hi", max_length=16, stop_token_ids=None) == "Hi"
    stopped, free = (to_numpy(r["padding_mask"])[0] for r in raw)
    assert stopped.sum() == n + 1  # the prompt and <eos>, nothing after
    assert free.all()
    assert to_numpy(raw[0]["token_ids"])[0, n] == tokenizer.end_token_id


def test_score_logits_and_loss():
    lm = make_lm()
    inputs = ragged_inputs()
    logits = to_numpy(lm.score(inputs["token_ids"], inputs["padding_mask"]))
    np.testing.assert_allclose(logits, to_numpy(lm(inputs)), atol=1e-5)
    targets = np.roll(inputs["token_ids"], -1, axis=1)
    losses = to_numpy(
        lm.score(inputs["token_ids"], inputs["padding_mask"], scoring_mode="loss", target_ids=targets)
    )
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(losses, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="target_ids"):
        lm.score(inputs["token_ids"], scoring_mode="loss")


def test_fit_on_strings_lowers_the_loss(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor=preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    texts = ["The quick brown fox jumps.", "Keras runs on JAX."] * 2
    history = lm.fit(texts, batch_size=2, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_keras_file_round_trip(tmp_path, tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    lm = make_lm(preprocessor)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3))
    path = str(tmp_path / "model.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, keras_gemma.GemmaCausalLM)
    assert isinstance(restored.optimizer, keras.optimizers.AdamW)
    assert np.isclose(float(restored.optimizer.learning_rate), 1e-3)
    inputs = ragged_inputs()
    np.testing.assert_array_equal(to_numpy(restored(inputs)), to_numpy(lm(inputs)))
    assert restored.generate("The quick", max_length=12) == lm.generate("The quick", max_length=12)


def test_config_round_trip(tokenizer):
    lm = make_lm(keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16))
    clone = keras_gemma.GemmaCausalLM.from_config(lm.get_config())
    clone.set_weights(lm.get_weights())
    inputs = ragged_inputs()
    np.testing.assert_array_equal(to_numpy(clone(inputs)), to_numpy(lm(inputs)))
    assert clone.preprocessor.sequence_length == 16


def test_preset_round_trip(tmp_path, tokenizer):
    lm = make_lm(keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16))
    lm.save_to_preset(str(tmp_path))
    restored = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path))
    inputs = ragged_inputs()
    np.testing.assert_array_equal(to_numpy(restored(inputs)), to_numpy(lm(inputs)))
    assert restored.generate("The quick", max_length=12) == lm.generate("The quick", max_length=12)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    np.testing.assert_array_equal(to_numpy(backbone(inputs)), to_numpy(lm.backbone(inputs)))
    assert keras_gemma.GemmaTokenizer.from_preset(str(tmp_path)).get_vocabulary() == tokenizer.get_vocabulary()


_SAVE_UNDER_OTHER_BACKEND = """
import sys, numpy as np
sys.path[:0] = [{tests!r}, {tests!r} + "/models"]
import keras, keras_gemma, helpers
from test_gemma_causal_lm import make_lm, ragged_inputs
tokenizer = keras_gemma.GemmaTokenizer(proto=helpers.train_sentencepiece())
lm = make_lm(keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16), seed=3)
lm.save_to_preset({preset!r})
lm.save({keras_file!r})
np.save({logits!r}, keras.ops.convert_to_numpy(lm(ragged_inputs())))
"""


def test_saved_under_another_backend_loads_here(tmp_path):
    here = keras.backend.backend()
    other = {"jax": "tensorflow", "tensorflow": "torch", "torch": "jax"}[here]
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = dict(preset=str(tmp_path / "preset"), keras_file=str(tmp_path / "m.keras"), logits=str(tmp_path / "logits.npy"))
    script = _SAVE_UNDER_OTHER_BACKEND.format(tests=tests, **files)
    env = {**os.environ, "KERAS_BACKEND": other}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tests)
    expected = np.load(files["logits"])
    for model in (
        keras_gemma.GemmaCausalLM.from_preset(files["preset"]),
        keras.saving.load_model(files["keras_file"]),
    ):
        np.testing.assert_allclose(to_numpy(model(ragged_inputs())), expected, atol=1e-5)


@pytest.mark.parametrize("mode, fraction", [("int8", 0.55), ("int4", 0.4)])
def test_quantized_weights_are_smaller_and_close(tokenizer, mode, fraction):
    lm = make_lm(keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16))

    def weight_bytes():
        return sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in lm.weights)

    float_bytes, expected = weight_bytes(), to_numpy(lm(ragged_inputs()))
    lm.quantize(mode)  # with a preprocessor attached
    projections = [
        layer for layer in lm.backbone._flatten_layers() if isinstance(layer, keras.layers.EinsumDense)
    ]
    assert projections and all(layer.quantization_mode == mode for layer in projections)
    assert weight_bytes() <= fraction * float_bytes
    logits = to_numpy(lm(ragged_inputs()))
    # int4 of a tiny random network is coarse: it must still track the logits.
    correlation = np.corrcoef(logits.ravel(), expected.ravel())[0, 1]
    assert correlation > (0.995 if mode == "int8" else 0.8), correlation
    assert isinstance(lm.generate("The quick", max_length=10), str)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("target", ["causal_lm", "backbone"])
def test_quantize_frees_each_float_kernel_without_a_collection(monkeypatch, mode, target):
    """`quantize` spares Keras' full garbage collection per kernel (freezing
    the objects that existed before): sound only while each kernel Keras
    replaces is freed by reference counting, as it goes. If a Keras upgrade
    leaves them in reference cycles, this fails: the float kernels would
    then stay in memory until the end of quantizing."""
    lm = make_lm()
    replaced = [weakref.ref(v) for v in lm.weights if v.path.endswith(("/kernel", "/embeddings"))]
    assert len(replaced) == 7 * TINY["num_layers"] + 1
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    gc.disable()
    try:
        (lm if target == "causal_lm" else lm.backbone).quantize(mode)
        alive = [r().path for r in replaced if r() is not None]
    finally:
        gc.enable()
    assert alive == []
    assert gc.get_freeze_count() == 0  # nothing left frozen


@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_calibration_feeds_each_block_its_real_inputs(tokenizer, monkeypatch, mode):
    """GPTQ and AWQ calibrate block by block, on inputs from
    `get_quantization_layer_structure`: block 0 gets the embeddings times
    sqrt(hidden_dim), each later block the (already quantized) blocks'
    outputs, exactly what the quantized backbone's forward pass gives them.
    (keras-hub's default hook fed the raw embeddings, 1/sqrt(d) of them.)"""
    from keras_gemma.layers.decoder_block import GemmaDecoderBlock

    # Narrow: Keras' GPTQ visits each input column eagerly (a minute on JAX at TINY's width).
    narrow = dict(hidden_dim=8, intermediate_dim=16, num_query_heads=2, head_dim=4)
    lm = make_lm(keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16), **narrow)
    fed, token_ids = {}, []
    block_call, embedding_call = GemmaDecoderBlock.call, type(lm.backbone.token_embedding).call

    def recording_block_call(self, x, *args, **kwargs):
        if kwargs.get("attention_mask") is None:  # a calibration call: the backbone passes masks
            fed.setdefault(self.name, []).append(to_numpy(x))
        return block_call(self, x, *args, **kwargs)

    def recording_embedding_call(self, inputs, *args, **kwargs):
        token_ids.append(to_numpy(inputs))
        return embedding_call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(GemmaDecoderBlock, "call", recording_block_call)
    monkeypatch.setattr(type(lm.backbone.token_embedding), "call", recording_embedding_call)
    options = dict(dataset=CORPUS, tokenizer=tokenizer, num_samples=1, sequence_length=12, group_size=-1)
    if mode == "gptq":
        config = keras.quantizers.GPTQConfig(**options)
    else:
        config = keras.quantizers.AWQConfig(**options, num_grid_points=4)
    lm.quantize(mode, config=config)
    assert lm.backbone.transformer_layers[0].attention.query_dense.quantization_mode == mode
    monkeypatch.undo()

    ids = token_ids[0]  # the calibration sample, (1, 12)
    real = {}

    def capture(x, i):  # the activations after the embedding (-1) and after each block
        real[i] = to_numpy(x)
        return x

    lm.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}, layer_intercept_fn=capture)
    embeddings = to_numpy(lm.backbone.token_embedding(ids)) * np.sqrt(narrow["hidden_dim"])
    np.testing.assert_allclose(real[-1], embeddings, rtol=1e-6)
    for i, block in enumerate(lm.backbone.transformer_layers):
        np.testing.assert_allclose(fed[block.name][0], real[i - 1], atol=1e-5, err_msg=block.name)


def test_keras_hub_cache_layout_steps_like_the_full_pass():
    """Code written against keras-hub (its `_build_cache` and stacked
    `(batch, layers, 2, length, kv_heads, head_dim)` cache, as keras-hub's own
    cache test) steps token by token to the full pass's logits."""
    from keras import ops

    lm = make_lm(seed=3)
    token_ids = np.array([[2, 17, 42, 9, 100, 5], [2, 30, 31, 90, 11, 7]], "int32")
    full = to_numpy(lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    _, cache = lm._build_cache(token_ids)
    assert tuple(cache.shape) == (2, TINY["num_layers"], 2, 6, TINY["num_key_value_heads"], TINY["head_dim"])
    cache = ops.zeros_like(cache)
    steps = []
    for i in range(token_ids.shape[1]):
        logits, _, cache = lm.call_with_cache(token_ids[:, i : i + 1], cache, i)
        steps.append(to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
