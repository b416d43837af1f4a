"""LoRA adapters for a Gemma backbone: enable, save, load, merge.

Adapters use Keras' own `EinsumDense.enable_lora`: each target projection
keeps its kernel frozen and learns `lora_kernel_a @ lora_kernel_b`, scaled by
`alpha / rank`. A saved adapter is a safetensors file of those kernels, keyed
by variable path, with rank, alpha, targets and the backbone's shape in its
metadata: it loads under any backend.
"""

import json
import os

import numpy as np
from keras import ops

from keras_gemma.convert import lora_files

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
        for name in LORA_TARGETS:
            yield lora_files.projection(block, name)


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
        raise ValueError("There are no lora-enabled layers in this model: call `backbone.enable_lora(rank)` first.")


def _metadata(backbone):
    config = backbone.get_config()
    return {
        "format": _FORMAT,
        "rank": str(backbone._lora_rank),
        "alpha": repr(backbone._lora_alpha),
        "target_layer_names": json.dumps(list(backbone._lora_targets)),
        "backbone": json.dumps({k: config[k] for k in _SHAPE_KEYS}),
    }


def lora_file_format(path, format=None, saving=False):
    """Which adapter format `path` is: `"keras_hub"` (`*.lora.h5`), `"peft"`
    (a directory: with `adapter_config.json` to read; any, or `format`, to
    write) or `"keras_gemma"` (a safetensors file: any other name to read,
    `*.safetensors` to write, as keras-hub demands its suffix)."""
    formats = ("keras_gemma", "keras_hub", "peft")
    if format is not None:
        if format not in formats:
            raise ValueError(f"format={format!r}; LoRA files are one of {formats}.")
        return format
    path = str(path)
    if path.endswith(".lora.h5"):
        return "keras_hub"
    if os.path.isdir(path):
        if saving or os.path.isfile(os.path.join(path, "adapter_config.json")):
            return "peft"
        raise ValueError(f"'{path}' is a directory without adapter_config.json: not a PEFT adapter.")
    if saving and not path.endswith(".safetensors"):
        # keras-hub's rule for its files (its message), and ours for ours.
        raise ValueError(
            "The filename must end in `.lora.h5` (keras-hub's LoRA file) or `.safetensors` "
            "(keras_gemma's); for a PEFT adapter directory pass format='peft'. "
            f"Received: filepath={path}"
        )
    return "keras_gemma"


def _factors(backbone, fold_scale):
    """`{(block, target): (a, b)}` of the backbone's adapters as numpy, the
    scale `alpha / rank` folded into `a` if `fold_scale`."""
    _require_lora(backbone)
    scale = backbone._lora_alpha / backbone._lora_rank if fold_scale else 1.0
    factors = {}
    for i, block in enumerate(backbone.transformer_layers):
        for name in backbone._lora_targets:
            layer = lora_files.projection(block, name)
            a = ops.convert_to_numpy(layer.lora_kernel_a).astype(np.float32) * np.float32(scale)
            factors[(i, name)] = (a, ops.convert_to_numpy(layer.lora_kernel_b).astype(np.float32))
    return factors


def save_lora_weights(backbone, path, format=None):
    format = lora_file_format(path, format, saving=True)
    if format == "keras_hub":
        _require_lora(backbone)
        lora_files.write_keras_hub(str(path), backbone, _factors(backbone, fold_scale=True), backbone._lora_rank)
        return
    if format == "peft":
        lora_files.write_peft(str(path), backbone, _factors(backbone, fold_scale=False), backbone._lora_rank, backbone._lora_alpha)
        return
    from safetensors.numpy import save_file

    tensors = {
        name: np.ascontiguousarray(ops.convert_to_numpy(v))
        for name, v in _lora_variables(backbone).items()
    }
    save_file(tensors, str(path), metadata=_metadata(backbone))


def load_lora_weights(backbone, path, format=None):
    format = lora_file_format(path, format)
    if format == "keras_hub":
        rank, factors = lora_files.read_keras_hub(str(path), backbone)
        _assign_factors(backbone, factors, str(path), rank)
        return
    if format == "peft":
        _assign_factors(backbone, lora_files.read_peft(str(path), backbone), str(path))
        return
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


def _assign_factors(backbone, factors, source, rank=None):
    """Puts another library's adapter (`{(block, target): (a, b)}`, scale
    folded into the product) onto `backbone`: LoRA enabled with the file's
    `rank` (or the smallest that holds every factor) and `alpha = rank` if it
    is not, the factors zero-padded to the backbone's rank and divided by its
    scale; all checked before anything changes."""
    names = {name for _, name in factors}
    targets = tuple(name for name in LORA_TARGETS if name in names)
    blocks = range(len(backbone.transformer_layers))
    partial = [(i, name) for i in blocks for name in targets if (i, name) not in factors]
    if partial:
        raise ValueError(
            f"'{source}' adapts {list(targets)} but not block {partial[0][0]}'s {partial[0][1]}: "
            "keras_gemma's adapters cover every block."
        )
    needed = max(a.shape[-1] for a, _ in factors.values())
    enabled = getattr(backbone, "_lora_rank", None) is not None
    if enabled:
        mine = (backbone._lora_rank, tuple(backbone._lora_targets))
        if tuple(backbone._lora_targets) != targets or (rank or needed) > backbone._lora_rank or (
            rank is not None and rank != backbone._lora_rank
        ):
            raise ValueError(
                f"'{source}' holds LoRA rank={rank or needed}, targets={list(targets)}, but this "
                f"backbone has rank={mine[0]}, targets={list(mine[1])}: both ranks must match "
                "(a PEFT adapter: at most this rank), and the targets."
            )
        own_rank, scale = backbone._lora_rank, backbone._lora_alpha / backbone._lora_rank
    else:
        own_rank, scale = rank or needed, 1.0
    values = {}
    for (i, name), (a, b) in factors.items():
        layer = lora_files.projection(backbone.transformer_layers[i], name)
        kernel = tuple(layer.kernel.shape)
        r = a.shape[-1]
        expected = (kernel[:-1] + (r,), (r, kernel[-1]))
        if (tuple(a.shape), tuple(b.shape)) != expected or r > own_rank:
            raise ValueError(
                f"'{source}': block {i} {name} has factors {tuple(a.shape)} and {tuple(b.shape)}; "
                f"this model's {kernel} kernel takes {expected[0]} and {expected[1]} (rank at most {own_rank})."
            )
        pad = own_rank - r
        a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]) / np.float32(scale)
        values[(i, name)] = (a.astype(np.float32), np.pad(b, [(0, pad), (0, 0)]).astype(np.float32))
    if not enabled:
        enable_lora(backbone, own_rank, alpha=own_rank, target_layer_names=targets)
    for (i, name), (a, b) in values.items():
        layer = lora_files.projection(backbone.transformer_layers[i], name)
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)


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
