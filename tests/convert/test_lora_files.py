"""LoRA adapters across libraries: keras-hub's `.lora.h5` and PEFT, with the
other library computing the reference logits."""

import json
import os

import numpy as np
import pytest

import keras_gemma
from helpers import TINY, save_transformers_model, to_numpy, transformers_config, transformers_logits

TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61], [2, 30, 31, 0, 0, 0, 0]])
PADDING_MASK = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
ALL_TARGETS = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]
# keras-hub layouts with every kind of layer its block numbering counts.
KERAS_HUB_LAYOUTS = {
    "gemma": dict(keras_hub_cls="GemmaBackbone", options={}),
    "gemma2": dict(
        keras_hub_cls="GemmaBackbone",
        options=dict(use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0),
    ),
    "gemma3": dict(
        keras_hub_cls="Gemma3Backbone",
        options=dict(use_post_ffw_norm=True, use_post_attention_norm=True, use_query_key_norm=True, rope_max_wavelength=1e6),
    ),
}


def logits(backbone):
    hidden = backbone({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK})
    return to_numpy(backbone.logits(hidden))


def lora_ranks(backbone):
    """`{target name: rank}` of the adapted projections (Keras' public layer
    state), `{}` without adapters."""
    from keras_gemma.convert.lora_files import PEFT_MODULES, projection

    ranks = {}
    for block in backbone.transformer_layers:
        for name in PEFT_MODULES:
            layer = projection(block, name)
            if layer.lora_enabled:
                ranks[name] = layer.lora_rank
    return ranks


def keras_hub_logits(theirs):
    hidden = theirs({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK})
    return to_numpy(theirs.token_embedding(hidden, reverse=True))


def randomize_adapters(backbone, seed):
    rng = np.random.default_rng(seed)
    for v in backbone.trainable_weights:
        v.assign(rng.normal(0, 0.15, v.shape).astype("float32"))


def pair(layout):
    """A keras-hub backbone and ours with the same random weights."""
    from keras_gemma.convert import keras_hub_format

    spec = KERAS_HUB_LAYOUTS[layout]
    ours = keras_gemma.GemmaBackbone(**TINY, **spec["options"])
    rng = np.random.default_rng(3)
    for v in ours.weights:
        v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    theirs = keras_hub_format.to_keras_hub(ours)
    assert type(theirs).__name__ == spec["keras_hub_cls"]
    return ours, theirs


@pytest.mark.parametrize("layout", list(KERAS_HUB_LAYOUTS))
def test_keras_hub_lora_files_both_ways(tmp_path, layout):
    from keras_gemma.convert.lora_files import keras_hub_layer_indices

    # Our `keras_hub_layer_indices` against keras-hub's own numbering (Keras'
    # private traversal, used here only as the oracle).
    ours, theirs = pair(layout)
    layers = [layer for layer in theirs._flatten_layers(include_self=False) if layer.weights]
    theirs_indices, block = {}, -1
    for index, layer in enumerate(layers):
        if layer.name.startswith("decoder_block_"):
            block = int(layer.name.rsplit("_", 1)[1])
        elif layer.name in ALL_TARGETS:
            theirs_indices[(block, layer.name)] = index
    assert keras_hub_layer_indices(ours) == theirs_indices

    # We write (alpha != rank: folded into the factors), keras-hub reads.
    ours.enable_lora(2, alpha=8.0, target_layer_names=["query", "value", "ffw_linear"])
    randomize_adapters(ours, seed=2)
    ours.save_lora_weights(tmp_path / "ours.lora.h5")
    theirs.enable_lora(2, target_layer_names=["query", "value", "ffw_linear"])
    theirs.load_lora_weights(str(tmp_path / "ours.lora.h5"))
    np.testing.assert_allclose(keras_hub_logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)

    # keras-hub writes, we read: its logits with its adapter.
    ours, theirs = pair(layout)
    theirs.enable_lora(2, target_layer_names=ALL_TARGETS)
    randomize_adapters(theirs, seed=1)
    expected = keras_hub_logits(theirs)
    theirs.save_lora_weights(str(tmp_path / "theirs.lora.h5"))
    assert np.abs(expected - logits(ours)).max() > 1e-2  # the adapter changes the logits
    ours.load_lora_weights(tmp_path / "theirs.lora.h5")
    assert lora_ranks(ours) == {name: 2 for name in ALL_TARGETS}
    np.testing.assert_allclose(logits(ours), expected, atol=1e-5, rtol=1e-5)


def test_keras_hub_default_adapter_and_errors(tmp_path):
    ours, theirs = pair("gemma")
    theirs.enable_lora(4)  # keras-hub's defaults: query and value
    randomize_adapters(theirs, seed=5)
    theirs.save_lora_weights(str(tmp_path / "a.lora.h5"))
    for layers, message in (
        (1, r"a\.lora\.h5.*layer '\d+' is not a projection of keras-hub's model for this architecture \(1 blocks\)"),
        (3, r"a\.lora\.h5' adapts \['query', 'value'\] but not block 2's query"),
    ):
        other = keras_gemma.GemmaBackbone(**{**TINY, "num_layers": layers})
        with pytest.raises(ValueError, match=message):
            other.load_lora_weights(tmp_path / "a.lora.h5")
        assert lora_ranks(other) == {}  # unchanged
    ours.enable_lora(2)
    with pytest.raises(ValueError, match=r"holds LoRA rank=4.*this backbone has rank=2"):
        ours.load_lora_weights(tmp_path / "a.lora.h5")
    with pytest.raises(ValueError, match=r"end in `\.lora\.h5`"):
        ours.save_lora_weights(tmp_path / "a.h5")
    (tmp_path / "junk.lora.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"Cannot read keras-hub LoRA weights from .*junk\.lora\.h5"):
        ours.load_lora_weights(tmp_path / "junk.lora.h5")


# === PEFT ===

PEFT_LAYOUTS = {
    "multi_query": {**TINY, "num_key_value_heads": 1},
    "multi_head": {**TINY, "num_key_value_heads": 4},
}


def hf_gemma(path, config, seed):
    return save_transformers_model(path, transformers_config(config), seed=seed)


@pytest.mark.parametrize("layout", list(PEFT_LAYOUTS))
def test_peft_adapter_loads_here(tmp_path, layout):
    """An adapter made by PEFT (rank 2, alpha 6, rsLoRA off; one module with
    its own rank) loads here with PEFT's logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = hf_gemma(tmp_path / "base", PEFT_LAYOUTS[layout], seed=4)
    config = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 3},
        init_lora_weights=False,  # random B: the adapter changes the output
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(base, config).eval()
    expected = transformers_logits(peft_model, TOKEN_IDS, PADDING_MASK)
    peft_model.save_pretrained(tmp_path / "adapter")

    backbone = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "base"))
    valid = PADDING_MASK.astype(bool)
    assert np.abs(logits(backbone) - expected)[valid].max() > 1e-2
    backbone.load_lora_weights(tmp_path / "adapter")
    np.testing.assert_allclose(logits(backbone)[valid], expected[valid], atol=1e-4, rtol=0)
    # A rank-2 PEFT q_proj adapter is a rank 2 x heads one here.
    assert set(lora_ranks(backbone).values()) == {2 * TINY["num_query_heads"]}


@pytest.mark.parametrize("layout", list(PEFT_LAYOUTS))
def test_our_adapter_serves_in_peft(tmp_path, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backbone = keras_gemma.GemmaBackbone(**PEFT_LAYOUTS[layout])
    backbone.export_to_transformers(tmp_path / "base")
    backbone.enable_lora(2, alpha=3.0, target_layer_names=ALL_TARGETS)
    randomize_adapters(backbone, seed=7)
    ours = logits(backbone)
    backbone.save_lora_weights(tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 3.0
    assert config["rank_pattern"]["q_proj"] == 2 * TINY["num_query_heads"]

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    served = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    theirs = transformers_logits(served, TOKEN_IDS, PADDING_MASK)
    valid = PADDING_MASK.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)

    # And back: the same logits again.
    again = keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "base"))
    again.load_lora_weights(tmp_path / "adapter")
    np.testing.assert_allclose(logits(again), ours, atol=1e-5)


def test_peft_errors_name_the_file_and_leave_the_model_unchanged(tmp_path):
    backbone = keras_gemma.GemmaBackbone(**TINY)
    backbone.enable_lora(2)
    randomize_adapters(backbone, seed=1)
    backbone.save_lora_weights(tmp_path / "adapter", format="peft")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def load_into_fresh(edit_config=None, layers=TINY["num_layers"]):
        if edit_config:
            config_path.write_text(json.dumps({**config, **edit_config}))
        fresh = keras_gemma.GemmaBackbone(**{**TINY, "num_layers": layers})
        before = [to_numpy(v) for v in fresh.weights]
        try:
            fresh.load_lora_weights(tmp_path / "adapter")
        finally:
            assert lora_ranks(fresh) == {}
            assert all(np.array_equal(b, to_numpy(v)) for b, v in zip(before, fresh.weights))
            config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError, match=r"adapter_config\.json: use_dora=True is not supported"):
        load_into_fresh({"use_dora": True})
    with pytest.raises(ValueError, match=r"peft_type='IA3'"):
        load_into_fresh({"peft_type": "IA3"})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*is for block 1; this model has 1"):
        load_into_fresh(layers=1)
    bigger = keras_gemma.GemmaBackbone(**{**TINY, "hidden_dim": 48})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: block 0 q_proj has lora_A \(8, 32\).*needs \(8, 48\)"):
        bigger.load_lora_weights(tmp_path / "adapter")
    assert lora_ranks(bigger) == {}
    os.remove(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        keras_gemma.GemmaBackbone(**TINY).load_lora_weights(tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory without adapter_config.json"):
        keras_gemma.GemmaBackbone(**TINY).load_lora_weights(tmp_path / "empty")
