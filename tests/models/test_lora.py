"""LoRA: targets, alpha, training, saving and loading (across backends),
merging, and QLoRA on an int8 base."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import TINY
from helpers import to_numpy

import keras_gemma
from keras_gemma.models.lora import LORA_TARGETS

INPUTS = {
    "token_ids": np.array([[2, 15, 37, 99, 5, 61, 7, 0], [2, 8, 44, 3, 120, 0, 0, 0]], "int32"),
    "padding_mask": np.array([[1] * 7 + [0], [1] * 5 + [0] * 3], bool),
}


def _backbone(seed=0, **config):
    """A tiny backbone whose weights depend only on `seed` and the config."""
    backbone = keras_gemma.GemmaBackbone(**{**TINY, **config})
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        v.assign(rng.normal(scale=0.2, size=v.shape).astype("float32"))
    return backbone


def _randomize_adapters(backbone, seed=1):
    """Nonzero adapters (B starts at zero, which would hide every bug)."""
    rng = np.random.default_rng(seed)
    for v in backbone.trainable_weights:
        v.assign(rng.normal(scale=0.1, size=v.shape).astype("float32"))


def _adapter_layers(backbone):
    return sorted(
        layer.path for layer in backbone._flatten_layers() if getattr(layer, "lora_enabled", False)
    )


def test_default_targets_are_query_and_value_and_only_adapters_train():
    backbone = _backbone()
    total = backbone.count_params()
    backbone.enable_lora(4)
    names = {path.rsplit("/", 1)[-1] for path in _adapter_layers(backbone)}
    assert names == {"query", "value"}
    assert len(_adapter_layers(backbone)) == 2 * TINY["num_layers"]
    trainable = {v.path.rsplit("/", 1)[-1] for v in backbone.trainable_weights}
    assert trainable == {"lora_kernel_a", "lora_kernel_b"}
    fraction = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights) / total
    assert fraction < 0.2


def test_targets_on_request_and_unknown_names():
    backbone = _backbone()
    backbone.enable_lora(2, target_layer_names=["key", "attention_output", "ffw_gating", "ffw_linear"])
    names = {path.rsplit("/", 1)[-1] for path in _adapter_layers(backbone)}
    assert names == {"key", "attention_output", "ffw_gating", "ffw_linear"}
    before = to_numpy(backbone(INPUTS))
    _randomize_adapters(backbone)
    assert not np.allclose(to_numpy(backbone(INPUTS)), before, atol=1e-4)
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"Unknown LoRA target layer names \['query_dense'\]"):
        _backbone().enable_lora(2, target_layer_names=["query_dense"])


def test_alpha_scales_the_update():
    outputs = {}
    for alpha in (4, 8):
        backbone = _backbone()
        base = to_numpy(backbone(INPUTS))
        backbone.enable_lora(4, alpha=alpha)
        _randomize_adapters(backbone)
        outputs[alpha] = to_numpy(backbone(INPUTS)) - base
    # Twice alpha doubles the update of one projection's output; through the
    # network the effect is not linear, but the larger scale moves further.
    assert np.abs(outputs[8]).mean() > 1.5 * np.abs(outputs[4]).mean()
    backbone = _backbone()
    backbone.enable_lora(4, alpha=8)
    layer = next(
        layer for layer in backbone._flatten_layers() if getattr(layer, "lora_enabled", False)
    )
    _randomize_adapters(backbone)
    delta = to_numpy(layer.kernel) - to_numpy(layer._kernel)
    expected = 2.0 * np.matmul(to_numpy(layer.lora_kernel_a), to_numpy(layer.lora_kernel_b))
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_lora_fit_lowers_the_loss(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
    lm = keras_gemma.GemmaCausalLM(_backbone(), preprocessor=preprocessor)
    lm.backbone.enable_lora(4)
    total = lm.count_params()
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_weights)
    assert trainable / total < 0.2
    frozen = {v.path: to_numpy(v) for v in lm.non_trainable_weights}
    lm.compile(optimizer=keras.optimizers.Adam(3e-2))
    texts = ["The quick brown fox jumps.", "Keras runs on JAX."]
    losses = lm.fit(texts, batch_size=2, epochs=12, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    # The chunked loss (the training forward pass gives hidden states), embedding frozen.
    assert lm(lm.preprocessor(texts)[0], training=True).shape[-1] == lm.backbone.hidden_dim
    for v in lm.non_trainable_weights:
        np.testing.assert_array_equal(to_numpy(v), frozen[v.path])


def test_save_and_load_round_trip(tmp_path):
    backbone = _backbone()
    backbone.enable_lora(3, alpha=6, target_layer_names=["query", "value", "ffw_linear"])
    _randomize_adapters(backbone)
    expected = to_numpy(backbone(INPUTS))
    path = str(tmp_path / "adapter.lora.safetensors")
    backbone.save_lora_weights(path)

    fresh = _backbone()  # same base weights, LoRA not enabled: the file enables it
    fresh.load_lora_weights(path)
    assert (fresh._lora_rank, fresh._lora_alpha) == (3, 6.0)
    assert list(fresh._lora_targets) == ["query", "value", "ffw_linear"]
    np.testing.assert_allclose(to_numpy(fresh(INPUTS)), expected, atol=1e-6)

    enabled = _backbone()
    enabled.enable_lora(3, alpha=6, target_layer_names=["query", "value", "ffw_linear"])
    enabled.load_lora_weights(path)
    np.testing.assert_allclose(to_numpy(enabled(INPUTS)), expected, atol=1e-6)


def test_mismatches_are_clear_errors_and_load_nothing(tmp_path):
    backbone = _backbone()
    with pytest.raises(ValueError, match="no lora-enabled layers in this model"):
        backbone.save_lora_weights(str(tmp_path / "none.safetensors"))
    backbone.enable_lora(4)
    _randomize_adapters(backbone)
    path = str(tmp_path / "adapter.safetensors")
    backbone.save_lora_weights(path)

    def unchanged(model, attempt, match):
        before = [to_numpy(v) for v in model.weights]
        with pytest.raises(ValueError, match=match):
            attempt()
        for a, v in zip(before, model.weights):
            np.testing.assert_array_equal(a, to_numpy(v))

    other_rank = _backbone()
    other_rank.enable_lora(2)
    unchanged(other_rank, lambda: other_rank.load_lora_weights(path), r"rank=4.*rank=2")
    other_alpha = _backbone()
    other_alpha.enable_lora(4, alpha=16)
    unchanged(other_alpha, lambda: other_alpha.load_lora_weights(path), "alpha=16.0")
    other_targets = _backbone()
    other_targets.enable_lora(4, target_layer_names=["query"])
    unchanged(other_targets, lambda: other_targets.load_lora_weights(path), r"targets=\['query'\]")
    wider = _backbone(hidden_dim=48)
    unchanged(wider, lambda: wider.load_lora_weights(path), r"hidden_dim.*\(32, 48\)")
    assert getattr(wider, "_lora_rank", None) is None

    not_lora = tmp_path / "weights.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, "float32")}, str(not_lora))
    unchanged(backbone, lambda: backbone.load_lora_weights(str(not_lora)), "not a keras_gemma LoRA")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a file")
    unchanged(backbone, lambda: backbone.load_lora_weights(str(garbage)), "Cannot read LoRA")


def test_merge_folds_adapters_into_the_kernels():
    backbone = _backbone()
    # Every target: each projection's equation (the adapter is applied
    # beside the kernel in the forward pass, then merged into it).
    backbone.enable_lora(4, alpha=8, target_layer_names=LORA_TARGETS)
    _randomize_adapters(backbone)
    expected = to_numpy(backbone(INPUTS))
    count = len(backbone.weights)
    backbone.merge_lora_weights()
    assert _adapter_layers(backbone) == []
    assert not any("lora" in v.path for v in backbone.weights)
    assert len(backbone.weights) == count - 2 * len(LORA_TARGETS) * TINY["num_layers"]
    assert len(backbone.trainable_weights) == len(backbone.weights)
    np.testing.assert_allclose(to_numpy(backbone(INPUTS)), expected, rtol=1e-5, atol=1e-5)
    # A merged backbone is a plain one: a fresh backbone with its weights agrees.
    plain = _backbone(seed=5)
    plain.set_weights(backbone.get_weights())
    np.testing.assert_allclose(to_numpy(plain(INPUTS)), expected, rtol=1e-5, atol=1e-5)


def test_qlora_trains_adapters_over_an_int8_base(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=12)
    lm = keras_gemma.GemmaCausalLM(_backbone(), preprocessor=preprocessor)
    lm.quantize("int8")
    lm.backbone.enable_lora(4)
    kernels = {
        layer.path: to_numpy(layer._kernel)
        for layer in lm.backbone._flatten_layers()
        if isinstance(layer, keras.layers.EinsumDense)
    }
    assert all(k.dtype == np.int8 for k in kernels.values())
    lm.compile(optimizer=keras.optimizers.Adam(3e-2))
    texts = ["The quick brown fox jumps.", "Keras runs on JAX."]
    losses = lm.fit(texts, batch_size=2, epochs=12, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    for layer in lm.backbone._flatten_layers():
        if isinstance(layer, keras.layers.EinsumDense):
            assert layer._kernel.dtype == "int8"
            np.testing.assert_array_equal(to_numpy(layer._kernel), kernels[layer.path])
    with pytest.raises(ValueError, match="quantized"):
        lm.backbone.merge_lora_weights()


def test_qlora_on_the_linear_projection_is_a_clear_error():
    """Keras' int8 adapter path cannot apply an adapter to `ffw_linear`, whose kernel's
    last axis is contracted (it fails with an einsum shape error when called): refused
    at enable_lora, before anything is enabled or frozen."""
    backbone = _backbone()
    backbone.quantize("int8")
    trainable = [v.path for v in backbone.trainable_weights]
    with pytest.raises(ValueError, match=r"int8-quantized 'ffw_linear' projection \(btf,df->btd\)"):
        backbone.enable_lora(4, target_layer_names=["query", "ffw_linear"])
    assert _adapter_layers(backbone) == []
    assert [v.path for v in backbone.trainable_weights] == trainable
    backbone.enable_lora(4, target_layer_names=["query", "ffw_gating"])  # the others work
    assert len(_adapter_layers(backbone)) == 2 * TINY["num_layers"]


_OTHER_BACKEND = """
import json, sys
import numpy as np
import keras
import keras_gemma
config, weights, adapter, inputs, out = sys.argv[1:]
backbone = keras_gemma.GemmaBackbone.from_config(json.load(open(config)))
backbone.load_weights(weights)
backbone.load_lora_weights(adapter)
data = np.load(inputs)
logits = backbone({"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]})
np.save(out, keras.ops.convert_to_numpy(logits))
"""


def test_adapters_load_under_the_other_backends(tmp_path):
    backbone = _backbone()
    base = str(tmp_path / "base.weights.h5")
    backbone.save_weights(base)
    (tmp_path / "config.json").write_text(json.dumps(backbone.get_config()))
    backbone.enable_lora(4, alpha=8, target_layer_names=["query", "value", "ffw_linear"])
    _randomize_adapters(backbone)
    adapter = str(tmp_path / "adapter.lora.safetensors")
    backbone.save_lora_weights(adapter)
    expected = to_numpy(backbone(INPUTS))
    np.savez(tmp_path / "inputs.npz", **INPUTS)
    script = tmp_path / "load.py"
    script.write_text(_OTHER_BACKEND)
    for other in {"jax", "tensorflow", "torch"} - {keras.backend.backend()}:
        out = str(tmp_path / f"{other}.npy")
        env = {**os.environ, "KERAS_BACKEND": other}
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "config.json"), base, adapter,
             str(tmp_path / "inputs.npz"), out],
            env=env, capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        np.testing.assert_allclose(np.load(out), expected, atol=1e-4, err_msg=other)
