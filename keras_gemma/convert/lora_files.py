"""LoRA adapter files of other libraries: keras-hub's `.lora.h5` and PEFT directories.

Both are read into, and written from, one form: for each adapted projection (block
`i`, keras-hub layer name such as `"query"`), the factors `(a, b)` in keras_gemma's
layout (Keras' `EinsumDense` LoRA: the kernel's change is `a @ b`, `a` shaped like
the kernel but its last axis the rank) with the scale folded into `a`. `models/lora.py`
puts that form onto a backbone, all checked before anything is assigned.

keras-hub (`Backbone.save_lora_weights`): an HDF5 file, `lora/vars/rank`, then for
each adapted layer `lora/{index}/vars/lora_kernel_a|b`, where `index` counts the layers
that hold weights in the order Keras' layer traversal visits keras-hub's backbone
(`keras_hub_layer_indices`); the scale is Keras' default, `rank / rank = 1`. Its
query / key / value kernels are `(heads, hidden, head_dim)` (ours `(hidden, heads,
head_dim)`) and its `ffw_linear` kernel `(intermediate, hidden)` (ours transposed).

PEFT (`adapter_config.json`, `adapter_model.safetensors`): `lora_A` `(r, in)` and
`lora_B` `(out, r)` of each transformers projection, the change `B @ A` scaled by
`lora_alpha / r` (`/ sqrt(r)` with rsLoRA). Keras' adapter of a `(hidden, heads,
head_dim)` kernel has one `a` per head and one `b` shared by the heads: a PEFT rank-r
adapter of `q_proj` is exactly a rank `heads * r` one here (zero outside each head's
block), and ours is a PEFT adapter of rank `heads * r` (PEFT's `rank_pattern`).
"""

import json
import os

import numpy as np

# keras-hub's LoRA target names -> transformers' module names.
PEFT_MODULES = {
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "attention_output": "o_proj",
    "ffw_gating": "gate_proj",
    "ffw_gating_2": "up_proj",
    "ffw_linear": "down_proj",
}
_TARGET_OF_MODULE = {module: target for target, module in PEFT_MODULES.items()}
_PEFT_PREFIX = "base_model.model.model.layers."
_PEFT_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
# PEFT options that change what the adapter computes, with the value that does not.
_PEFT_NEUTRAL = {
    "bias": "none",
    "use_dora": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "lora_bias": False,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


def projection(block, name):
    """Block `block`'s projection layer of keras-hub name `name`."""
    attention, ffw = block.attention, block.feed_forward
    return {
        "query": attention.query_dense,
        "key": attention.key_dense,
        "value": attention.value_dense,
        "attention_output": attention.output_dense,
        "ffw_gating": ffw.gate,
        "ffw_gating_2": ffw.up,
        "ffw_linear": ffw.down,
    }[name]


# === keras-hub .lora.h5 ===


def keras_hub_layer_indices(backbone):
    """`{(block, target name): index}`: where keras-hub's backbone of this
    architecture numbers each projection in its `.lora.h5` files. Keras visits
    the backbone's layers depth first, each layer's sublayers in reverse order
    of assignment; keras-hub counts those that hold weights."""
    indices, index = {}, 1  # 0 is the token embedding
    for i, block in enumerate(backbone.transformer_layers):
        order = ["decoder_block", "ffw_linear", "ffw_gating_2", "ffw_gating"]
        order += ["post_ffw_norm"] * (block.post_ffw_norm is not None)
        order += ["pre_ffw_norm", "attention", "attention_output"]
        order += ["key_norm", "query_norm"] * (block.attention.query_norm is not None)
        order += ["value", "key", "query"]
        order += ["post_attention_norm"] * (block.post_attention_norm is not None)
        order += ["pre_attention_norm"]
        for name in order:
            if name in PEFT_MODULES:
                indices[(i, name)] = index
            index += 1
    return indices


def _keras_hub_layout(name, a, b):
    """Our factors <-> keras-hub's for layer `name` (its own inverse; scale 1
    in both)."""
    if name in ("query", "key", "value"):
        return a.transpose(1, 0, 2), b
    if name == "ffw_linear":  # (a @ b).T = b.T @ a.T
        return b.T, a.T
    return a, b


def write_keras_hub(path, backbone, factors, rank):
    """`factors` (`{(block, name): (a, b)}`, scale folded in) as keras-hub's
    `.lora.h5` of rank `rank`."""
    import h5py

    indices = keras_hub_layer_indices(backbone)
    with h5py.File(path, "w") as f:
        f.create_group("lora/vars").create_dataset("rank", data=np.int64(rank))
        for key in sorted(factors, key=indices.get):
            a, b = _keras_hub_layout(key[1], *factors[key])
            group = f.create_group(f"lora/{indices[key]}/vars")
            group.create_dataset("lora_kernel_a", data=np.asarray(a, np.float32))
            group.create_dataset("lora_kernel_b", data=np.asarray(b, np.float32))


def read_keras_hub(path, backbone):
    """`(rank, factors)` of keras-hub's `.lora.h5` at `path`, for `backbone`'s
    architecture; a `ValueError` naming the file for anything else."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"Cannot read keras-hub LoRA weights from '{path}': {error}") from error
    with f:
        if "lora/vars/rank" not in f:
            raise ValueError(f"'{path}' is not a keras-hub LoRA file (no lora/vars/rank).")
        rank = int(f["lora/vars/rank"][()])
        by_index = {index: key for key, index in keras_hub_layer_indices(backbone).items()}
        factors = {}
        for group in f["lora"]:
            if group == "vars":
                continue
            if not group.isdigit() or int(group) not in by_index:
                raise ValueError(
                    f"'{path}': layer {group!r} is not a projection of keras-hub's model for this "
                    f"architecture ({backbone.num_layers} blocks); was the adapter trained on another model?"
                )
            entry = f[f"lora/{group}/vars"]
            missing = [n for n in ("lora_kernel_a", "lora_kernel_b") if n not in entry]
            if missing:
                raise ValueError(f"'{path}': lora/{group} lacks {missing[0]}.")
            key = by_index[int(group)]
            factors[key] = _keras_hub_layout(key[1], np.asarray(entry["lora_kernel_a"]), np.asarray(entry["lora_kernel_b"]))
    if not factors:
        raise ValueError(f"'{path}' holds no adapter.")
    return rank, factors


# === PEFT ===


def _peft_name(i, module, factor):
    parent = _PEFT_PARENT.get(module, "mlp")
    return f"{_PEFT_PREFIX}{i}.{parent}.{module}.lora_{factor}.weight"


def _to_peft(name, a, b):
    """Our factors `(a, b)` -> PEFT's `(A, B)` with `B @ A` the transformers
    weight's change (scale folded into `a` on both sides)."""
    if name in ("query", "key", "value"):
        d, heads, r = a.shape
        h = b.shape[1]
        big_a = a.transpose(1, 2, 0).reshape(heads * r, d)
        big_b = np.zeros((heads * h, heads * r), a.dtype)
        for n in range(heads):
            big_b[n * h : (n + 1) * h, n * r : (n + 1) * r] = b.T
        return big_a, big_b
    if name == "attention_output":  # kernel (heads, head_dim, hidden); W (hidden, heads*head_dim)
        return a.reshape(-1, a.shape[-1]).T, b.T
    if name == "ffw_linear":  # kernel (hidden, f) = W
        return b, a
    return a.T, b.T  # gate / up: kernel (hidden, f) = W.T


def _from_peft(name, big_a, big_b, layer_shape):
    """PEFT's `(A, B)` (scale folded into `B`) -> our `(a, b)`."""
    if name in ("query", "key", "value"):
        d, heads, h = layer_shape
        r = big_a.shape[0]
        a = np.zeros((d, heads, heads * r), np.float32)
        b = np.zeros((heads * r, h), np.float32)
        for n in range(heads):
            a[:, n, n * r : (n + 1) * r] = big_a.T
            b[n * r : (n + 1) * r] = big_b[n * h : (n + 1) * h].T
        return a, b
    if name == "attention_output":
        heads, h, _ = layer_shape
        return big_a.T.reshape(heads, h, -1), big_b.T
    if name == "ffw_linear":
        return big_b, big_a
    return big_a.T, big_b.T


def write_peft(directory, backbone, factors, rank, alpha):
    """`factors` (scale not folded in) as a PEFT LoRA directory for
    transformers' model of `backbone` (see `transformers_export`), with the
    `rank` and `alpha` they were trained with."""
    from keras_gemma.convert.transformers_export import write_safetensors

    targets = sorted({name for _, name in factors}, key=list(PEFT_MODULES).index)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (i, name), (a, b) in sorted(factors.items()):
        big_a, big_b = _to_peft(name, np.asarray(a, np.float32), np.asarray(b, np.float32))
        module = PEFT_MODULES[name]
        tensors[_peft_name(i, module, "A")] = np.ascontiguousarray(big_a)
        tensors[_peft_name(i, module, "B")] = np.ascontiguousarray(big_b)
        if big_a.shape[0] != rank:
            # One adapter per head here is one of rank heads * r there, at the same scale.
            rank_pattern[module] = big_a.shape[0]
            alpha_pattern[module] = alpha * big_a.shape[0] / rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": [PEFT_MODULES[name] for name in targets],
        "lora_dropout": 0.0,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **_PEFT_NEUTRAL,
    }
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors, "F32")
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def read_peft(directory, backbone):
    """`factors` of the PEFT LoRA adapter in `directory`, for `backbone`;
    a `ValueError` naming the file and field for what it cannot hold."""
    from keras_gemma.convert.safetensors import SafetensorsFile

    config_path = os.path.join(directory, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; keras_gemma reads LoRA adapters.")
    for key, neutral in _PEFT_NEUTRAL.items():
        value = config.get(key, neutral)
        if value != neutral and not (neutral is None and value in ([], {})) and not (neutral is False and value is None):
            raise ValueError(f"{config_path}: {key}={value!r} is not supported (keras_gemma's adapters are plain LoRA).")
    rank = config["r"]

    def scale(module):
        r = config.get("rank_pattern", {}).get(module, rank)
        alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
        return alpha / (np.sqrt(r) if config.get("use_rslora") else r)

    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            if key not in _TARGET_OF_MODULE:
                raise ValueError(f"{config_path}: {name} key {key!r} is not one of {sorted(_TARGET_OF_MODULE)}.")
    weights_path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found (keras_gemma reads safetensors adapters, not .bin).")
    weights = SafetensorsFile(weights_path)
    factors, unknown = {}, []
    blocks = backbone.transformer_layers
    for tensor_name in weights.shapes:
        parts = tensor_name[len(_PEFT_PREFIX):].split(".") if tensor_name.startswith(_PEFT_PREFIX) else []
        if len(parts) != 5 or not parts[0].isdigit() or parts[2] not in _TARGET_OF_MODULE or parts[3] not in ("lora_A", "lora_B"):
            unknown.append(tensor_name)
            continue
        i, module = int(parts[0]), parts[2]
        if i >= len(blocks):
            raise ValueError(f"{weights_path}: {tensor_name!r} is for block {i}; this model has {len(blocks)}.")
        factors.setdefault((i, _TARGET_OF_MODULE[module]), {})[parts[3]] = tensor_name
    if unknown:
        raise ValueError(f"{weights_path}: tensor {unknown[0]!r} is not a LoRA factor of a Gemma projection.")
    result = {}
    for (i, name), pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: block {i} {PEFT_MODULES[name]} has only {sorted(pair)}.")
        big_a = np.asarray(weights.get(pair["lora_A"]), np.float32)
        big_b = np.asarray(weights.get(pair["lora_B"]), np.float32) * np.float32(scale(PEFT_MODULES[name]))
        kernel_shape = tuple(projection(blocks[i], name).kernel.shape)
        expected = _peft_shapes(name, kernel_shape, big_a.shape[0])
        if (big_a.shape, big_b.shape) != expected:
            raise ValueError(
                f"{weights_path}: block {i} {PEFT_MODULES[name]} has lora_A {big_a.shape} and lora_B "
                f"{big_b.shape}; this model needs {expected[0]} and {expected[1]}."
            )
        result[(i, name)] = _from_peft(name, big_a, big_b, kernel_shape)
    if not result:
        raise ValueError(f"{weights_path} holds no adapter.")
    return result


def _peft_shapes(name, kernel_shape, r):
    """PEFT's `(lora_A, lora_B)` shapes of rank `r` for our kernel shape."""
    if name in ("query", "key", "value"):
        d, heads, h = kernel_shape
        return (r, d), (heads * h, r)
    if name == "attention_output":
        heads, h, d = kernel_shape
        return (r, heads * h), (d, r)
    d, f = kernel_shape
    if name == "ffw_linear":
        return (r, f), (d, r)
    return (r, d), (f, r)
