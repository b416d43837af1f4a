"""Official Gemma Flax (orbax) checkpoints, against transformers, random weights.

A tiny transformers model's weights are written as google-deepmind/gemma's Flax
parameter tree, by the inverse of transformers' orbax-to-HF mapping
(`models/gemma3/convert_gemma3_weights_orbax_to_hf.py`, whose names and axes Gemma 1
and 2 share; the nested layout from gemma's `gm/ckpts/_compat.py`), and saved with
orbax. `from_preset` on that directory must give transformers' logits.
"""

import os
import sys

import numpy as np
import pytest

import keras_gemma
from keras_gemma.convert import open_preset
from helpers import TINY, save_transformers_model, to_numpy, transformers_config, transformers_logits

ocp = pytest.importorskip("orbax.checkpoint", reason="the flax extra (orbax-checkpoint) is not installed")

# 12 tokens: longer than the sliding windows of the Gemma 2 and 3 configs below.
TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23, 54, 3], [2, 30, 31, 90, 11, 0, 0, 0, 0, 0, 0, 0]])
PADDING_MASK = (TOKEN_IDS != 0).astype("int32")
VALID = PADDING_MASK.astype(bool)
INPUTS = {"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}
# As the releases: more embedding rows (256128) than tokenizer pieces (256000).
EXTRA_ROWS = 16
COMMON = dict(
    vocab_size=384, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=64, hidden_activation="gelu_pytorch_tanh",
)
GEMMA2_OPTIONS = dict(
    layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window_size=4,
    query_pre_attn_scalar=24, attention_logit_soft_cap=3.0, final_logit_soft_cap=2.0,
)
GEMMA3_OPTIONS = dict(
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    sliding_window_size=3, query_pre_attn_scalar=20, rope_max_wavelength=1_000_000.0,
    local_rope_max_wavelength=10_000.0, rope_scaling_factor=4.0,
)


def gemma2_config():
    from transformers import Gemma2Config

    o = GEMMA2_OPTIONS
    return Gemma2Config(
        **COMMON, num_hidden_layers=3, layer_types=o["layer_types"], sliding_window=o["sliding_window_size"],
        query_pre_attn_scalar=o["query_pre_attn_scalar"], attn_logit_softcapping=o["attention_logit_soft_cap"],
        final_logit_softcapping=o["final_logit_soft_cap"],
    )


def gemma3_config():
    from transformers import Gemma3TextConfig

    o = GEMMA3_OPTIONS
    return Gemma3TextConfig(
        **COMMON, num_hidden_layers=4, layer_types=o["layer_types"], sliding_window=o["sliding_window_size"],
        query_pre_attn_scalar=o["query_pre_attn_scalar"],
        rope_parameters={
            "full_attention": {
                "rope_type": "linear", "rope_theta": o["rope_max_wavelength"], "factor": o["rope_scaling_factor"],
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": o["local_rope_max_wavelength"]},
        },
    )


# === Writing a transformers model as a Flax checkpoint ===


def flax_tree(model, gating_transposed, extra_rows=0):
    """The released (flat) Flax tree `{path: {leaf: array}}` of a transformers
    Gemma, Gemma 2 or Gemma 3 model: every tensor of its state dict used once."""
    c = model.config
    n, k, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    state = {name: t.float().numpy() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    used = set()

    def take(name):
        used.add(name)
        return state[name]

    def heads(name, count):
        # q/k/v_proj (count * head_dim, hidden) -> (count, hidden, head_dim)
        return take(name).reshape(count, h, d).transpose(0, 2, 1)

    embedding = take("model.embed_tokens.weight")
    padding = np.random.default_rng(0).normal(size=(extra_rows, d)).astype(np.float32)
    tree = {
        "transformer/embedder": {"input_embedding": np.concatenate([embedding, padding])},
        "transformer/final_norm": {"scale": take("model.norm.weight")},
    }
    gemma1 = "model.layers.0.pre_feedforward_layernorm.weight" not in state
    for i in range(c.num_hidden_layers):
        hf, fx = f"model.layers.{i}.", f"transformer/layer_{i}/"
        q = heads(hf + "self_attn.q_proj.weight", n)
        key, value = heads(hf + "self_attn.k_proj.weight", k), heads(hf + "self_attn.v_proj.weight", k)
        if n == k:
            tree[fx + "attn/qkv_einsum"] = {"w": np.stack([q, key, value])}  # (3, N, D, H)
        else:
            tree[fx + "attn/q_einsum"] = {"w": q}  # (N, D, H)
            tree[fx + "attn/kv_einsum"] = {"w": np.stack([key, value])}  # (2, K, D, H)
        # o_proj (hidden, heads * head_dim) -> (N, H, D)
        output = take(hf + "self_attn.o_proj.weight")
        tree[fx + "attn/attn_vec_einsum"] = {"w": output.reshape(d, n, h).transpose(1, 2, 0)}
        gate, up = take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")  # (F, D)
        gating = np.stack([gate, up]) if gating_transposed else np.stack([gate.T, up.T])
        tree[fx + "mlp/gating_einsum"] = {"w": gating}
        tree[fx + "mlp/linear"] = {"w": take(hf + "mlp.down_proj.weight").T}  # (F, D)
        tree[fx + "pre_attention_norm"] = {"scale": take(hf + "input_layernorm.weight")}
        if gemma1:  # transformers' Gemma names its pre-feed-forward norm so
            tree[fx + "pre_ffw_norm"] = {"scale": take(hf + "post_attention_layernorm.weight")}
        else:
            tree[fx + "post_attention_norm"] = {"scale": take(hf + "post_attention_layernorm.weight")}
            tree[fx + "pre_ffw_norm"] = {"scale": take(hf + "pre_feedforward_layernorm.weight")}
            tree[fx + "post_ffw_norm"] = {"scale": take(hf + "post_feedforward_layernorm.weight")}
        if hf + "self_attn.q_norm.weight" in state:
            tree[fx + "attn/_query_norm"] = {"scale": take(hf + "self_attn.q_norm.weight")}
            tree[fx + "attn/_key_norm"] = {"scale": take(hf + "self_attn.k_norm.weight")}
    assert used == set(state), sorted(set(state) - used)
    return tree


def nested(tree):
    """Flax's `model.init` layout of a flat tree (gemma's `param_remapper` then
    `nest_params`): no `transformer/`, and the `mlp` leaves bare."""
    out = {}
    for path, leaves in tree.items():
        *parents, last = path.split("/")[1:]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaves["w"] if path.endswith(("/mlp/gating_einsum", "/mlp/linear")) else dict(leaves)
    return out


def save_flat(path, tree):
    ocp.PyTreeCheckpointer().save(os.fspath(path), tree)
    return os.fspath(path)


def make_model(path, hf_config, seed, spm_proto=None, bfloat16=False):
    """A transformers model with random weights (rounded to bfloat16 if asked,
    as the releases store them)."""
    import torch

    model = save_transformers_model(path, hf_config, seed=seed, spm_proto=spm_proto)
    if bfloat16:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def multi_query(tmp_path_factory, spm_proto):
    """Gemma 1 with one key/value head, in Kaggle's layout: `tokenizer.model`
    beside the checkpoint directory, bfloat16 jax arrays, 16 extra rows."""
    import jax.numpy as jnp
    import ml_dtypes

    root = tmp_path_factory.mktemp("flax_mqa")
    model = make_model(root / "hf", transformers_config({**TINY, "num_key_value_heads": 1}), seed=21, bfloat16=True)
    tree = flax_tree(model, gating_transposed=False, extra_rows=EXTRA_ROWS)
    released = {
        path: {leaf: jnp.asarray(w.astype(ml_dtypes.bfloat16)) for leaf, w in leaves.items()}
        for path, leaves in tree.items()
    }
    (root / "kaggle").mkdir()
    (root / "kaggle" / "tokenizer.model").write_bytes(spm_proto)
    directory = save_flat(root / "kaggle" / "2b", released)
    return model, tree, directory


@pytest.fixture(scope="module")
def multi_head(tmp_path_factory, spm_proto):
    """Gemma 1 with as many key/value heads as query heads (`qkv_einsum`),
    float32, `tokenizer.model` inside; flat and nested layouts."""
    root = tmp_path_factory.mktemp("flax_mha")
    model = make_model(root / "hf", transformers_config({**TINY, "num_key_value_heads": 4}), seed=22)
    tree = flax_tree(model, gating_transposed=False)
    flat = save_flat(root / "flat", tree)
    (root / "flat" / "tokenizer.model").write_bytes(spm_proto)
    checkpointer = ocp.StandardCheckpointer()  # as gemma's gm.ckpts.save_params
    checkpointer.save(os.fspath(root / "nested"), nested(tree))
    checkpointer.wait_until_finished()
    return model, flat, os.fspath(root / "nested")


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma2_or_3(request, tmp_path_factory, spm_proto):
    """A tiny Gemma 2 or Gemma 3: of no official variant, so its options are
    the caller's. Feed-forward `(2, F, D)`, as the larger releases."""
    root = tmp_path_factory.mktemp(f"flax_{request.param}")
    make_config, options = {
        "gemma2": (gemma2_config, GEMMA2_OPTIONS), "gemma3": (gemma3_config, GEMMA3_OPTIONS),
    }[request.param]
    model = make_model(root / "hf", make_config(), seed=23)
    directory = save_flat(root / "ckpt", flax_tree(model, gating_transposed=True))
    (root / "ckpt" / "tokenizer.model").write_bytes(spm_proto)
    return model, options, directory


def weights_of(model):
    return [to_numpy(v).copy() for v in model.weights]


def assert_unchanged(model, before):
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)


# === Logits equal transformers' ===


def test_multi_query_released_layout(multi_query):
    model, _, directory = multi_query
    expected = transformers_logits(model, TOKEN_IDS, PADDING_MASK)
    assert np.abs(expected[VALID]).max() > 0.5  # the comparison is not trivial
    lm = keras_gemma.GemmaCausalLM.from_preset(directory)
    assert lm.preprocessor is not None  # tokenizer.model from the parent directory
    backbone = lm.backbone
    assert (backbone.num_key_value_heads, backbone.intermediate_dim, backbone.rope_max_wavelength) == (1, 96, 10000.0)
    # All rows kept: the extra ones give logits of their own, the rest are transformers'.
    assert backbone.vocabulary_size == 384 + EXTRA_ROWS
    got = to_numpy(lm(INPUTS))
    assert got.shape[-1] == 384 + EXTRA_ROWS
    np.testing.assert_allclose(got[..., :384][VALID], expected[VALID], atol=1e-4, rtol=0)


def test_vocabulary_size_trims_the_embedding(multi_query):
    """`vocabulary_size` keeps the first rows; Kaggle's directory (the
    tokenizer beside the one checkpoint) is read as the checkpoint."""
    model, _, directory = multi_query
    backbone = keras_gemma.GemmaBackbone.from_preset(os.path.dirname(directory), vocabulary_size=384)
    lm = keras_gemma.GemmaCausalLM.from_preset(directory, backbone=backbone)
    got = to_numpy(lm(INPUTS))
    assert got.shape[-1] == 384
    expected = transformers_logits(model, TOKEN_IDS, PADDING_MASK)
    np.testing.assert_allclose(got[VALID], expected[VALID], atol=1e-4, rtol=0)


def test_multi_head_flat_and_nested_layouts(multi_head):
    model, flat, nested_dir = multi_head
    expected = transformers_logits(model, TOKEN_IDS, PADDING_MASK)
    lm = keras_gemma.GemmaCausalLM.from_preset(flat)
    assert lm.backbone.num_key_value_heads == lm.backbone.num_query_heads == 4
    got = to_numpy(lm(INPUTS))
    np.testing.assert_allclose(got[VALID], expected[VALID], atol=1e-4, rtol=0)
    # Flax's nested layout, no tokenizer: the same weights.
    backbone = keras_gemma.GemmaBackbone.from_preset(nested_dir)
    np.testing.assert_array_equal(to_numpy(keras_gemma.GemmaCausalLM(backbone)(INPUTS)), got)


def test_gemma2_or_3_with_the_options_given(gemma2_or_3):
    model, options, directory = gemma2_or_3
    expected = transformers_logits(model, TOKEN_IDS, PADDING_MASK)
    backbone = keras_gemma.GemmaBackbone.from_preset(directory, **options)
    assert backbone.use_post_attention_norm and backbone.use_post_ffw_norm
    assert backbone.use_query_key_norm == ("rope_scaling_factor" in options)
    assert backbone.intermediate_dim == 96 and backbone.num_key_value_heads == 2
    got = to_numpy(keras_gemma.GemmaCausalLM(backbone)(INPUTS))
    assert np.abs(expected[VALID]).max() > 0.5
    np.testing.assert_allclose(got[VALID], expected[VALID], atol=1e-4, rtol=0)


# === The official variants, from google-deepmind/gemma's TransformerConfigs ===


def released_shapes(num_layers, rows, hidden, ffw, heads, head_dim, kv_heads, transpose_gating, post_norms, qk_norm):
    """Tensor shapes of a released flat tree (the names and axes of
    gemma's modules.py: Embedder, Attention, FeedForward, Block)."""
    shapes = {"transformer/embedder/input_embedding": (rows, hidden), "transformer/final_norm/scale": (hidden,)}
    for i in range(num_layers):
        p = f"transformer/layer_{i}/"
        if heads == kv_heads:
            shapes[p + "attn/qkv_einsum/w"] = (3, heads, hidden, head_dim)
        else:
            shapes[p + "attn/q_einsum/w"] = (heads, hidden, head_dim)
            shapes[p + "attn/kv_einsum/w"] = (2, kv_heads, hidden, head_dim)
        shapes[p + "attn/attn_vec_einsum/w"] = (heads, head_dim, hidden)
        shapes[p + "mlp/gating_einsum/w"] = (2, ffw, hidden) if transpose_gating else (2, hidden, ffw)
        shapes[p + "mlp/linear/w"] = (ffw, hidden)
        names = ["pre_attention_norm", "pre_ffw_norm"]
        names += ["post_attention_norm", "post_ffw_norm"] if post_norms else []
        shapes.update({p + name + "/scale": (hidden,) for name in names})
        if qk_norm:
            shapes.update({p + "attn/_query_norm/scale": (head_dim,), p + "attn/_key_norm/scale": (head_dim,)})
    return shapes


SLIDING, FULL = "sliding_attention", "full_attention"


# name in google-deepmind/gemma -> (its shapes, what the config must hold).
OFFICIAL = {
    # TransformerConfig.gemma_7b: multi-head, RoPE 10000, queries by head_dim.
    "gemma_7b": (
        dict(num_layers=28, rows=256128, hidden=3072, ffw=24576, heads=16, head_dim=256, kv_heads=16,
             transpose_gating=False, post_norms=False, qk_norm=False),
        dict(vocabulary_size=256128, num_key_value_heads=16, intermediate_dim=49152, rope_max_wavelength=10000.0),
    ),
    # Gemma2_2B: the gating einsum untransposed.
    "Gemma2_2B": (
        dict(num_layers=26, rows=256128, hidden=2304, ffw=9216, heads=8, head_dim=256, kv_heads=4,
             transpose_gating=False, post_norms=True, qk_norm=False),
        dict(vocabulary_size=256128, sliding_window_size=4096, attention_logit_soft_cap=50.0,
             final_logit_soft_cap=30.0, query_pre_attn_scalar=256, layer_types=[SLIDING, FULL] * 13,
             rope_max_wavelength=10000.0),
    ),
    # Gemma2_27B: BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, 4608 // 32 = 144.
    "Gemma2_27B": (
        dict(num_layers=46, rows=256128, hidden=4608, ffw=36864, heads=32, head_dim=128, kv_heads=16,
             transpose_gating=True, post_norms=True, qk_norm=False),
        dict(query_pre_attn_scalar=144, sliding_window_size=4096, final_logit_soft_cap=30.0,
             layer_types=[SLIDING, FULL] * 23),
    ),
    # Gemma3_1B: window 512, RoPE 10k local and 1M global, unscaled.
    "Gemma3_1B": (
        dict(num_layers=26, rows=262144, hidden=1152, ffw=6912, heads=4, head_dim=256, kv_heads=1,
             transpose_gating=True, post_norms=True, qk_norm=True),
        dict(vocabulary_size=262144, sliding_window_size=512, local_rope_max_wavelength=10000.0,
             rope_max_wavelength=1_000_000.0, layer_types=([SLIDING] * 5 + [FULL]) * 4 + [SLIDING] * 2),
    ),
    # Gemma3_27B: window 1024, global positions scaled by 8, 5376 // 32 = 168.
    "Gemma3_27B": (
        dict(num_layers=62, rows=262144, hidden=5376, ffw=21504, heads=32, head_dim=128, kv_heads=16,
             transpose_gating=True, post_norms=True, qk_norm=True),
        dict(sliding_window_size=1024, rope_scaling_factor=8.0, query_pre_attn_scalar=168, use_query_key_norm=True),
    ),
}


def test_official_variants_are_recognised():
    from keras_gemma.convert.flax import backbone_config_from_shapes

    for name, (shape, expected) in OFFICIAL.items():
        config = backbone_config_from_shapes(released_shapes(**shape), "ckpt")
        assert config["num_layers"] == shape["num_layers"] and config["hidden_dim"] == shape["hidden"], name
        assert config["intermediate_dim"] == 2 * shape["ffw"], name
        for key, value in expected.items():
            assert config.get(key) == value, (name, key)


# === Bad checkpoints: clear errors, and the model untouched ===


def rewritten(tmp_path, tree, edit):
    tree = {path: dict(leaves) for path, leaves in tree.items()}
    edit(tree)
    return save_flat(tmp_path / "ckpt", tree)


def test_missing_and_left_over_tensors(tmp_path, multi_query):
    def drop(tree):
        tree.pop("transformer/layer_1/attn/attn_vec_einsum")

    directory = rewritten(tmp_path / "missing", multi_query[1], drop)
    with pytest.raises(ValueError, match=r"ckpt\).*lacks 1 tensor.*'transformer/layer_1/attn/attn_vec_einsum/w'"):
        keras_gemma.GemmaBackbone.from_preset(directory)

    def add(tree):
        tree["transformer/layer_0/attn/extra"] = {"w": np.zeros((4,), np.float32)}

    directory = rewritten(tmp_path / "extra", multi_query[1], add)
    with pytest.raises(ValueError, match=r"ckpt: tensor 'transformer/layer_0/attn/extra/w' has no place"):
        keras_gemma.GemmaBackbone.from_preset(directory)


def test_misshapen_tensor_leaves_the_model_unchanged(tmp_path, multi_query):
    def edit(tree):
        tree["transformer/layer_1/mlp/linear"]["w"] = np.zeros((49, 32), np.float32)

    directory = rewritten(tmp_path, multi_query[1], edit)
    message = r"ckpt: tensor 'transformer/layer_1/mlp/linear/w' has shape \(49, 32\).*needs \(48, 32\)"
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaBackbone.from_preset(directory)
    loader = open_preset(directory)
    backbone = keras_gemma.GemmaBackbone(**loader.backbone_config())
    before = weights_of(backbone)
    with pytest.raises(ValueError, match=message):
        loader.load_weights(backbone)
    assert_unchanged(backbone, before)


def test_more_vocabulary_than_rows_leaves_the_model_unchanged(multi_query):
    directory = multi_query[2]
    message = r"vocabulary_size=401 is more than the 400 rows of tensor 'transformer/embedder/input_embedding'"
    with pytest.raises(ValueError, match=message):
        keras_gemma.GemmaBackbone.from_preset(directory, vocabulary_size=401)
    loader = open_preset(directory)
    backbone = keras_gemma.GemmaBackbone(**{**loader.backbone_config(), "vocabulary_size": 401})
    before = weights_of(backbone)
    with pytest.raises(ValueError, match="is more than the 400 rows"):
        loader.load_weights(backbone)
    assert_unchanged(backbone, before)


def test_gemma2_or_3_of_no_official_variant_needs_its_options(gemma2_or_3):
    directory = gemma2_or_3[2]
    message = (
        r"no official variant.*layer_types, sliding_window_size, query_pre_attn_scalar, attention_logit_soft_cap, "
        r"final_logit_soft_cap, rope_max_wavelength, local_rope_max_wavelength, rope_scaling_factor: pass them"
    )
    with pytest.raises(ValueError, match=message) as error:
        keras_gemma.GemmaCausalLM.from_preset(directory)
    assert directory in str(error.value)
    loader = open_preset(directory)
    backbone = keras_gemma.GemmaBackbone(**loader.backbone_config())
    before = weights_of(backbone)
    with pytest.raises(ValueError, match=message):
        loader.load_weights(backbone)
    assert_unchanged(backbone, before)


def test_not_a_gemma_flax_checkpoint(tmp_path):
    directory = save_flat(tmp_path / "ckpt", {"params": {"dense": {"kernel": np.zeros((2, 2), np.float32)}}})
    with pytest.raises(ValueError, match=r"ckpt is an orbax checkpoint, but not of Gemma parameters"):
        keras_gemma.GemmaBackbone.from_preset(directory)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.config\.json not found.*Flax checkpoint"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "empty"))


def test_without_orbax_a_clear_error_and_the_tokenizer_still_loads(multi_query, monkeypatch, tokenizer):
    directory = multi_query[2]
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install orbax-checkpoint"):
        keras_gemma.GemmaBackbone.from_preset(directory)
    assert keras_gemma.GemmaTokenizer.from_preset(directory).get_vocabulary() == tokenizer.get_vocabulary()


def test_without_a_tokenizer(multi_head):
    """No tokenizer.model inside or beside the checkpoint: a task without a
    preprocessor (as for a keras-hub preset without one), and a clear error
    for the tokenizer itself."""
    nested_dir = multi_head[2]
    with pytest.raises(FileNotFoundError, match=r"No tokenizer\.model for the Flax checkpoint .*nested"):
        keras_gemma.GemmaTokenizer.from_preset(nested_dir)
    assert keras_gemma.GemmaCausalLM.from_preset(nested_dir).preprocessor is None


def test_jax_leaves_the_gpu_to_another_backend(multi_head, monkeypatch):
    """Orbax starts JAX's backends; under TensorFlow or PyTorch, JAX must not
    preallocate the GPU (a user's own setting is kept)."""
    import keras

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    open_preset(multi_head[1]).backbone_config()
    expected = None if keras.backend.backend() == "jax" else "false"
    assert os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") == expected
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    open_preset(multi_head[1]).backbone_config()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
