"""The layout rules on every named architecture, without devices: what each
kernel splits, that every split divides its dimension, and the errors."""

import keras
import pytest

import keras_gemma
from keras_gemma import distribution
from keras_gemma.presets import PRESETS

# A kernel's dimensions, by the names distribution.py's table uses.
DIMS = {
    "token_embedding/embeddings": ("vocabulary", "hidden"),
    "query": ("hidden", "heads", "head_dim"),
    "key": ("hidden", "kv_heads", "head_dim"),
    "value": ("hidden", "kv_heads", "head_dim"),
    "attention_output": ("heads", "head_dim", "hidden"),
    "ffw_gating": ("hidden", "branch"),
    "ffw_gating_2": ("hidden", "branch"),
    "ffw_linear": ("hidden", "branch"),
}
AXES = [(model, data) for model in (1, 2, 4, 8, 16) for data in (1, 2, 4, 8, 16)]


def _kernels(layouts):
    """`{kernel name: axes}` of the kernels (not the adapters)."""
    out = {}
    for pattern, axes in layouts.items():
        if pattern.endswith("/kernel") or pattern.endswith("/embeddings"):
            name = pattern if pattern.startswith("token") else pattern.split("/")[-2]
            out[name] = axes
    return out


def _check_splits(sizes, layouts, model_size, data_size):
    for name, axes in _kernels(layouts).items():
        dims = DIMS[name]
        assert len(axes) == len(dims), name
        for dim, axis in zip(dims, axes):
            split = {"model": model_size, "batch": data_size, None: 1}[axis]
            assert sizes[dim] % split == 0, (name, dim, axis, sizes[dim], split)
        if model_size > 1:
            assert "model" in axes, (name, model_size, axes)


def test_every_preset_splits_every_kernel_over_the_model_axis():
    for preset, (model_size, data_size) in [(p, a) for p in PRESETS for a in AXES]:
        sizes = distribution.architecture(preset)
        layouts = distribution.kernel_layouts(preset, model_size, data_size)
        _check_splits(sizes, layouts, model_size, data_size)
        # Keras' adapters: a = kernel dims but the last + rank, b = rank + last.
        for pattern, axes in layouts.items():
            if pattern.endswith("lora_kernel_a"):
                kernel = layouts[pattern.replace("lora_kernel_a", "kernel")]
                assert axes == kernel[:-1] + (None,)
            if pattern.endswith("lora_kernel_b"):
                kernel = layouts[pattern.replace("lora_kernel_b", "kernel")]
                assert axes == (None, kernel[-1])


def test_heads_split_where_they_divide_else_the_input():
    # 2B: one key/value head, 8 query heads; keras-hub's map splits the head.
    layouts = _kernels(distribution.kernel_layouts("gemma_2b_en", 8, 1))
    assert layouts["query"] == (None, "model", None)
    assert layouts["key"] == layouts["value"] == ("model", None, None)
    assert layouts["attention_output"] == ("model", None, None)
    assert layouts["token_embedding/embeddings"] == ("model", None)
    assert layouts["ffw_linear"] == (None, "model")
    # 16 devices: 8 query heads do not divide either.
    layouts = _kernels(distribution.kernel_layouts("gemma_2b_en", 16, 1))
    assert layouts["query"] == ("model", None, None)
    assert layouts["attention_output"] == (None, None, "model")
    # 7B: 16 heads of each; fully sharded over 4 data replicas.
    layouts = _kernels(distribution.kernel_layouts("gemma_7b_en", 16, 4))
    assert layouts["key"] == ("batch", "model", None)
    assert layouts["token_embedding/embeddings"] == ("model", "batch")


def test_class_level_layout_fits_every_preset():
    """keras-hub's call, on the class before any model: one layout that must
    divide every Gemma's dimensions."""
    for preset, (model_size, data_size) in [(p, a) for p in PRESETS for a in AXES]:
        sizes = distribution.architecture(preset)
        layouts = distribution.kernel_layouts(None, model_size, data_size)
        _check_splits(sizes, layouts, model_size, data_size)


def test_bad_arguments_are_errors():
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), ["cpu:0"])
    with pytest.raises(TypeError, match="DeviceMesh"):
        distribution.layout_map("gemma_2b_en", "not a mesh")
    with pytest.raises(ValueError, match="'tensor' is not an axis"):
        distribution.layout_map("gemma_2b_en", mesh, model_dim="tensor")
    with pytest.raises(ValueError, match="Unknown preset"):
        distribution.layout_map("gemma_3b", mesh)
    with pytest.raises(ValueError, match="Unknown recipe"):
        distribution.recipe("zero3", "gemma_2b_en")
    with pytest.raises(ValueError, match="no effect"):
        distribution.recipe("2b_pod", "gemma_2b_en", model_parallel_size=2)
    if keras.backend.backend() != "jax":
        with pytest.raises(RuntimeError, match="runs on JAX only"):
            distribution.recipe("fully_sharded", "gemma_2b_en")
    with pytest.raises(ValueError, match="lacks"):
        distribution.architecture({"hidden_dim": 8})
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=16, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    with pytest.raises(ValueError, match="class-level"):
        backbone.get_layout_map(mesh, architecture="gemma_2b_en")
    # On a backbone, its own architecture; on the class, keras-hub's signature.
    assert backbone.get_layout_map(mesh)["token_embedding/embeddings"].axes == (None, None)
    assert keras_gemma.GemmaBackbone.get_layout_map(mesh, "model", "batch") is not None
