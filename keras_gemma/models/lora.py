"""LoRA adapters for a Gemma backbone: enable, save, load, merge.

Adapters use Keras' own `EinsumDense.enable_lora`: each target projection
keeps its kernel frozen and learns `lora_kernel_a @ lora_kernel_b`, scaled by
`alpha / rank`. A saved adapter is a safetensors file of those kernels, keyed
by variable path, with rank, alpha, targets and the backbone's shape in its
metadata: it loads under any backend.
"""

import json

import numpy as np
from keras import ops

# The projections LoRA can target, by layer name (as in keras-hub's Gemma).
LORA_TARGETS = (
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
)
DEFAULT_LORA_TARGETS = ("query", "value")
_FORMAT = "keras_gemma.lora"
# Backbone settings an adapter's shapes depend on.
_SHAPE_KEYS = (
    "vocabulary_size",
    "num_layers",
    "num_query_heads",
    "num_key_value_heads",
    "hidden_dim",
    "intermediate_dim",
    "head_dim",
)


def projections(backbone):
    """Every projection LoRA can target, block by block (named as in
    `LORA_TARGETS`)."""
    for block in backbone.transformer_layers:
        attention, ffw = block.attention, block.feed_forward
        yield from (attention.query_dense, attention.key_dense, attention.value_dense)
        yield from (attention.output_dense, ffw.gate, ffw.up, ffw.down)


def target_layers(backbone, names):
    """The backbone's projection layers named in `names`, in layer order."""
    unknown = sorted(set(names) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(
            f"Unknown LoRA target layer names {unknown}; choose from {list(LORA_TARGETS)}."
        )
    return [layer for layer in projections(backbone) if layer.name in names]


def enable_lora(backbone, rank, alpha=None, target_layer_names=None):
    if getattr(backbone, "_lora_rank", None) is not None:
        raise ValueError(
            f"LoRA is already enabled (rank={backbone._lora_rank}, "
            f"alpha={backbone._lora_alpha}, targets={list(backbone._lora_targets)})."
        )
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer; got {rank!r}.")
    names = tuple(DEFAULT_LORA_TARGETS if target_layer_names is None else target_layer_names)
    if isinstance(target_layer_names, str):
        raise TypeError("target_layer_names is a list of layer names, not a string.")
    layers = target_layers(backbone, names)
    for layer in layers:
        plan = getattr(layer, "_lora_plan", None)
        if layer.quantization_mode is not None and (plan is None or plan[2]):
            raise ValueError(
                f"LoRA on the {layer.quantization_mode}-quantized {layer.name!r} projection "
                f"({layer.equation}) is not supported: Keras' quantized adapter path "
                "needs the kernel's last axis to be an output axis, and here it is "
                "contracted. Leave it out of target_layer_names, or add the adapters "
                "before quantizing."
            )
    alpha = float(rank if alpha is None else alpha)
    # Freeze everything, then train only the adapters (Keras' enable_lora
    # also freezes each target's own kernel).
    for layer in (backbone.token_embedding, *backbone.transformer_layers, backbone.layer_norm):
        layer.trainable = False
    for layer in layers:
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
    backbone._lora_rank = rank
    backbone._lora_alpha = alpha
    backbone._lora_targets = names


def _lora_variables(backbone):
    """{variable path: variable} of every adapter kernel."""
    _require_lora(backbone)
    return {
        v.path: v
        for v in backbone.weights
        if v.path.rsplit("/", 1)[-1] in ("lora_kernel_a", "lora_kernel_b")
    }


def _require_lora(backbone):
    if getattr(backbone, "_lora_rank", None) is None:
        raise ValueError("LoRA is not enabled: call `backbone.enable_lora(rank)` first.")


def _metadata(backbone):
    config = backbone.get_config()
    return {
        "format": _FORMAT,
        "rank": str(backbone._lora_rank),
        "alpha": repr(backbone._lora_alpha),
        "target_layer_names": json.dumps(list(backbone._lora_targets)),
        "backbone": json.dumps({k: config[k] for k in _SHAPE_KEYS}),
    }


def save_lora_weights(backbone, path):
    from safetensors.numpy import save_file

    tensors = {
        name: np.ascontiguousarray(ops.convert_to_numpy(v))
        for name, v in _lora_variables(backbone).items()
    }
    save_file(tensors, str(path), metadata=_metadata(backbone))


def load_lora_weights(backbone, path):
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # not a safetensors file, truncated, missing
        raise ValueError(f"Cannot read LoRA weights from '{path}': {error}") from error
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"'{path}' is not a keras_gemma LoRA file (written by save_lora_weights)."
        )
    rank = int(metadata["rank"])
    alpha = float(metadata["alpha"])
    targets = tuple(json.loads(metadata["target_layer_names"]))
    saved_shape = json.loads(metadata["backbone"])
    config = backbone.get_config()
    differences = {
        k: (saved_shape[k], config[k]) for k in _SHAPE_KEYS if saved_shape[k] != config[k]
    }
    if differences:
        raise ValueError(
            f"'{path}' was saved from a different architecture; (file, model): {differences}."
        )
    if getattr(backbone, "_lora_rank", None) is None:
        enable_lora(backbone, rank, alpha=alpha, target_layer_names=targets)
    else:
        mine = (backbone._lora_rank, backbone._lora_alpha, tuple(backbone._lora_targets))
        if mine != (rank, alpha, targets):
            raise ValueError(
                f"'{path}' holds LoRA rank={rank}, alpha={alpha}, targets={list(targets)}, "
                f"but this backbone has rank={mine[0]}, alpha={mine[1]}, "
                f"targets={list(mine[2])}."
            )
    variables = _lora_variables(backbone)
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    if missing or unexpected:
        raise ValueError(
            f"'{path}' does not match this backbone's adapters: missing {missing}, "
            f"unexpected {unexpected}."
        )
    for name, v in variables.items():
        if tuple(tensors[name].shape) != tuple(v.shape):
            raise ValueError(
                f"'{path}': tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                f"the model expects {tuple(v.shape)}."
            )
    # Every check passed: now assign (never half-loaded).
    for name, v in variables.items():
        v.assign(tensors[name])


def merge_lora_weights(backbone):
    """Folds each adapter into its kernel and removes the adapters."""
    _require_lora(backbone)
    layers = [layer for layer in projections(backbone) if layer.lora_enabled]
    quantized = [layer.path for layer in layers if layer.quantization_mode is not None]
    if quantized:
        raise ValueError(
            f"Cannot merge adapters into quantized kernels ({quantized[0]}, ...): "
            "merge into a float copy of the base weights instead."
        )
    for layer in layers:
        # Keras has no public way to remove an adapter: its kernel variable
        # (`_kernel`) takes the merged value, and the adapter variables are
        # untracked (keras_gemma/README.md lists this private state).
        merged = layer.kernel  # Keras adds (alpha / rank) * a @ b here
        layer._kernel.assign(merged)
        layer._kernel.trainable = True  # enable_lora froze it
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        layer.lora_enabled = False
        layer.lora_kernel_a = layer.lora_kernel_b = None
        layer._untrack_variable(a)
        layer._untrack_variable(b)
        layer.lora_rank = None
    # Unfreeze what enable_lora froze. (Setting `backbone.trainable = True` on
    # a backbone that is already trainable does nothing on TensorFlow.)
    for layer in (backbone.token_embedding, *backbone.transformer_layers, backbone.layer_norm):
        layer.trainable = True
    backbone._lora_rank = backbone._lora_alpha = backbone._lora_targets = None
