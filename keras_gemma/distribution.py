"""Gemma over many devices with `keras.distribution`: layout maps and recipes.

A layout map says, for each weight, which of its dimensions is split over
which axis of a `keras.distribution.DeviceMesh`. Ours follow the Gemma paper
(Megatron-style model sharding inside a data-parallel mesh):

| weight | shape | model axis | data axis (fully sharded) |
|---|---|---|---|
| `token_embedding/embeddings` | (vocabulary, hidden) | vocabulary | hidden |
| `query` kernel | (hidden, heads, head_dim) | heads, else hidden | hidden, else the next |
| `key`, `value` kernels | (hidden, kv_heads, head_dim) | kv_heads, else hidden | hidden, else the next |
| `attention_output` kernel | (heads, head_dim, hidden) | heads, else hidden | hidden, else the next |
| `ffw_gating`, `ffw_gating_2`, `ffw_linear` kernels | (hidden, intermediate / 2) | intermediate | hidden |
| LoRA `lora_kernel_a` / `lora_kernel_b` | kernel dims but the last, rank / rank, last | as its kernel's dims | as its kernel's dims |
| norm scales | (hidden,) or (head_dim,) | replicated | replicated |

A dimension is split only where the axis size divides it. A multi-query
model (one key/value head, the 2B) cannot split its single head (keras-hub's
map tries, and fails), so its key and value kernels split their input
(`hidden`) over the model axis instead: each device computes a partial key
and value, summed over the axis, and attention runs on whole keys beside
head-split queries with nothing to reshard (splitting `head_dim` instead
makes XLA replicate the keys at each rotary embedding and attention product).
Where no dimension divides, the weight stays whole on that axis. Optimizer
slots take their variable's layout (Keras' `add_variable_from_reference`).
The patterns are full matches of the variable paths, so they match nothing
else. int8 kernels keep their shape, and so their layout; their scales are
replicated. Keras packs an int4 kernel into two dimensions under the float
kernel's path, which no path pattern can tell apart: `ModelParallel` here
(what `recipe` returns) lays those out from the float layout.

Runs on JAX, where Keras implements `keras.distribution` (see the README for
TensorFlow and PyTorch).
"""

import functools
import math
import re

import keras

from keras_gemma import backend
from keras_gemma import presets

# The sizes a layout depends on, by the names the table above uses.
_SIZES = {
    "vocabulary": "vocabulary_size",
    "hidden": "hidden_dim",
    "heads": "num_query_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}

# Each sharded weight: its path pattern (below a block, `decoder_block_<i>/`),
# its dimensions, and those the model axis may split, in order of preference.
_KERNELS = (
    ("token_embedding/embeddings", ("vocabulary", "hidden"), ("vocabulary", "hidden")),
    ("attention/query", ("hidden", "heads", "head_dim"), ("heads", "hidden")),
    ("attention/key", ("hidden", "kv_heads", "head_dim"), ("kv_heads", "hidden")),
    ("attention/value", ("hidden", "kv_heads", "head_dim"), ("kv_heads", "hidden")),
    ("attention/attention_output", ("heads", "head_dim", "hidden"), ("heads", "hidden")),
    ("feed_forward/ffw_gating", ("hidden", "branch"), ("branch",)),
    ("feed_forward/ffw_gating_2", ("hidden", "branch"), ("branch",)),
    ("feed_forward/ffw_linear", ("hidden", "branch"), ("branch",)),
)

# The dimensions each kernel's product sums over (its inputs): Keras packs an
# int4 kernel as `(those, the others / 2)`.
_INPUTS = {
    "token_embedding/embeddings": ("vocabulary",),
    "attention/query": ("hidden",),
    "attention/key": ("hidden",),
    "attention/value": ("hidden",),
    "attention/attention_output": ("heads", "head_dim"),
    "feed_forward/ffw_gating": ("hidden",),
    "feed_forward/ffw_gating_2": ("hidden",),
    "feed_forward/ffw_linear": ("branch",),
}

RECIPES = ("data_parallel", "model_parallel", "fully_sharded", "2b_pod", "7b_pod")


def architecture(model):
    """The backbone settings a layout depends on, from a `GemmaBackbone`, a
    `GemmaCausalLM`, a backbone config dict or a preset name; `None`: sizes
    every Gemma's dimensions are multiples of (`_ANY_GEMMA`)."""
    if model is None:
        return dict(_ANY_GEMMA)
    config = backbone_config(model)
    missing = [key for key in (*_SIZES.values(), "intermediate_dim") if key not in config]
    if missing:
        raise ValueError(f"The architecture lacks {', '.join(missing)}.")
    sizes = {name: int(config[key]) for name, key in _SIZES.items()}
    sizes["branch"] = int(config["intermediate_dim"]) // 2
    return sizes


def backbone_config(model):
    """The backbone config of a `GemmaBackbone`, a `GemmaCausalLM`, a config
    dict or a preset name."""
    if isinstance(model, str):
        return presets.backbone_config(model)
    if isinstance(model, dict) or hasattr(model, "keys"):
        return dict(model)
    if hasattr(model, "backbone"):
        return model.backbone.get_config()
    if hasattr(model, "get_config"):
        return model.get_config()
    raise TypeError(
        "Expected a GemmaBackbone, a GemmaCausalLM, a backbone config or a "
        f"preset name; got {type(model).__name__}."
    )


def _axis_size(device_mesh, name, role):
    if name is None:
        return 1
    if name not in device_mesh.axis_names:
        raise ValueError(
            f"{role}={name!r} is not an axis of the device mesh "
            f"(axes {tuple(device_mesh.axis_names)})."
        )
    return device_mesh.shape[list(device_mesh.axis_names).index(name)]


def kernel_axes(sizes, dims, model_choices, model_size, data_size, model_dim, data_dim):
    """The mesh axis of each of `dims`: the model axis on the first of
    `model_choices` it divides, the data axis on `hidden` (or, where the model
    axis took `hidden`, on the first other dimension) if it divides that."""
    axes = [None] * len(dims)
    if model_dim is not None and model_size > 1:
        for choice in model_choices:
            if sizes[choice] % model_size == 0:
                axes[dims.index(choice)] = model_dim
                break
    if data_dim is not None and data_size > 1:
        order = ["hidden"] + [d for d in dims if d != "hidden"]
        for choice in order:
            if choice in dims and axes[dims.index(choice)] is None and sizes[choice] % data_size == 0:
                axes[dims.index(choice)] = data_dim
                break
    return tuple(axes)


def kernel_layouts(model, model_size, data_size, model_dim="model", data_dim="batch"):
    """`{variable path pattern: mesh axis of each dimension}` for `model` (see
    `architecture`) on a mesh whose model axis has `model_size` devices and
    data axis `data_size` (1: not split over it): what `layout_map` holds."""
    sizes = architecture(model)
    layouts = {}
    for path, dims, model_choices in _KERNELS:
        axes = kernel_axes(sizes, dims, model_choices, model_size, data_size, model_dim, data_dim)
        if path.startswith("token_embedding"):
            layouts[path] = axes
            continue
        prefix = rf"decoder_block_\d+/{path}/"
        layouts[prefix + "kernel"] = axes
        # LoRA: a is the kernel's dimensions but the last, then the rank;
        # b the rank, then the kernel's last dimension.
        layouts[prefix + "lora_kernel_a"] = axes[:-1] + (None,)
        layouts[prefix + "lora_kernel_b"] = (None, axes[-1])
    return layouts


def layout_map(model, device_mesh, model_dim="model", data_dim="batch", shard_over_data=True):
    """A `keras.distribution.LayoutMap` for `model` (see `architecture`) on
    `device_mesh`: weights split over `model_dim` as the module docstring's
    table says and, with `shard_over_data`, over `data_dim` too (weights,
    gradients and optimizer state fully sharded, ZeRO-3 style). Covers LoRA
    adapters enabled later under the same distribution.

    Example:
    ```python
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_gemma.distribution.layout_map("gemma_2b_en", mesh),
        batch_dim_name="batch",
    )
    with distribution.scope():
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/gemma-2b")
    ```
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            f"device_mesh must be a keras.distribution.DeviceMesh; got {type(device_mesh).__name__}."
        )
    model_size = _axis_size(device_mesh, model_dim, "model_dim")
    if not shard_over_data:
        data_dim = None
    data_size = _axis_size(device_mesh, data_dim, "data_dim")
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in kernel_layouts(model, model_size, data_size, model_dim, data_dim).items():
        layouts[pattern] = axes
    return layouts


# Sizes every Gemma checkpoint's dimensions are multiples of (heads taken as
# one: they are 1 to 32): the layout of a class-level `get_layout_map`, which
# does not know the architecture. Hidden sizes run from 640 to 5376 (multiples
# of 128), head_dim is 128 or 256, the vocabularies 256000, 256128 and 262144.
_ANY_GEMMA = {"vocabulary": 128, "hidden": 128, "heads": 1, "kv_heads": 1, "head_dim": 128, "branch": 256}


class _ClassOrInstanceMethod:
    """A method that receives the class when called on it, the instance when
    called on one."""

    def __init__(self, function):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner):
        return functools.partial(self.function, owner if instance is None else instance)


@_ClassOrInstanceMethod
def get_layout_map(
    backbone, device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch",
    architecture=None,
):
    """keras-hub's `GemmaBackbone.get_layout_map`: a `LayoutMap` sharding the
    weights over both mesh axes (`keras_gemma.distribution.layout_map`).

    On a backbone, or with `architecture=` (a preset name or a backbone
    config), the layout fits that architecture: attention split by heads
    where the model axis divides them. On the class without `architecture`
    (keras-hub's call, before any model exists) the heads are never split
    (their count is unknown): attention kernels split `hidden`, which is
    valid for every Gemma checkpoint but sums more between devices.

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh(
        (1, 8), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, architecture="gemma_2b_en")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/gemma-2b")
    ```
    """
    if not isinstance(backbone, type):
        if architecture is not None:
            raise ValueError(
                "architecture= is for class-level calls: this backbone's own architecture is used."
            )
        architecture = backbone
    return layout_map(architecture, device_mesh, model_parallel_dim_name, data_parallel_dim_name)


def recipe(name, model, devices=None, model_parallel_size=None):
    """A `keras.distribution.Distribution` for `model` (see `architecture`)
    over `devices` (all of `keras.distribution.list_devices()` by default).

    Recipes:
        `"data_parallel"`: every weight on every device, the batch split
            (`keras.distribution.DataParallel`).
        `"model_parallel"`: a `(batch, model)` mesh; weights split over
            `model` only, each data replica holding a whole copy.
        `"fully_sharded"`: the same mesh; weights, gradients and optimizer
            state split over both axes (ZeRO-3 / FSDP style).
        `"2b_pod"`, `"7b_pod"`: the Gemma paper's layouts: the 2B with data
            replicas only (`model_parallel_size=1`), the 7B with 16-way model
            sharding (or fewer when fewer devices), both with the weights and
            optimizer state sharded over the data axis.

    `model_parallel_size`: the model axis of the `model_parallel` and
    `fully_sharded` recipes (default: the largest that divides both the
    device count and the query heads, at most 8).

    Example:
    ```python
    with keras_gemma.distribution.recipe("7b_pod", "gemma_7b_en").scope():
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/gemma-7b")
    ```
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    if model_parallel_size is not None and name in ("data_parallel", "2b_pod", "7b_pod"):
        raise ValueError(f"model_parallel_size has no effect in the {name} recipe.")
    if not backend.keras_distribution_available():
        raise RuntimeError(
            f"keras.distribution (and so the recipes) runs on JAX only; this is the "
            f"{keras.config.backend()} backend. See the README for its data-parallel route."
        )
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    count = len(devices)
    if name == "data_parallel":
        return keras.distribution.DataParallel(devices=devices)
    sizes = architecture(model)
    if name in ("2b_pod", "7b_pod"):
        model_parallel_size = 1 if name == "2b_pod" else _largest_divisor(count, sizes["heads"], 16)
    elif model_parallel_size is None:
        model_parallel_size = _largest_divisor(count, sizes["heads"], 8)
    if count % model_parallel_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} does not divide the {count} devices."
        )
    mesh = keras.distribution.DeviceMesh(
        (count // model_parallel_size, model_parallel_size), ("batch", "model"), devices
    )
    layouts = layout_map(model, mesh, shard_over_data=name != "model_parallel")
    return ModelParallel(layout_map=layouts, batch_dim_name="batch", model=model)


class ModelParallel(keras.distribution.ModelParallel):
    """`keras.distribution.ModelParallel` whose layouts also fit Keras' int4
    kernels (what `recipe` returns; `model` as `architecture` takes it).

    Keras stores an int4 kernel under the float kernel's path but packed, as
    `(inputs, outputs / 2)` int8 (the dimensions the product sums over, then
    the others, two values a byte), so a layout map's float layout does not
    fit it. Such a kernel here takes the float layout's axis of its inputs
    and of its outputs; and any axis that does not divide its dimension
    (an odd packed width) is dropped. Every other variable is laid out as
    Keras' `ModelParallel` lays it out.

    Example:
    ```python
    layouts = keras_gemma.distribution.layout_map("gemma_2b_en", mesh)
    distribution = keras_gemma.distribution.ModelParallel(
        layout_map=layouts, batch_dim_name="batch", model="gemma_2b_en"
    )
    with distribution.scope():
        gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/gemma-2b")
        gemma_lm.quantize("int4")
    ```
    """

    def __init__(self, *, layout_map, model, batch_dim_name=None, **kwargs):
        super().__init__(layout_map=layout_map, batch_dim_name=batch_dim_name, **kwargs)
        self.architecture_sizes = architecture(model)

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        shape = tuple(variable.shape)
        axes = _packed_axes(variable.path, shape, tuple(layout.axes), self.architecture_sizes)
        if axes is None:
            axes = tuple(layout.axes)
        mesh = self.device_mesh
        sizes = dict(zip(mesh.axis_names, mesh.shape))
        fitted = tuple(
            axis if axis is None or dim % sizes[axis] == 0 else None for axis, dim in zip(axes, shape)
        )
        if fitted == tuple(layout.axes):
            return layout
        return keras.distribution.TensorLayout(fitted, mesh)


def check_int4_layouts(model):
    """Raises, before `quantize("int4")` changes anything, where the active
    distribution would give Keras' packed int4 kernels their float
    layouts (a `keras.distribution.ModelParallel` with one of our layout
    maps, not this module's `ModelParallel`)."""
    active = keras.distribution.distribution()
    if not isinstance(active, keras.distribution.ModelParallel) or isinstance(active, ModelParallel):
        return
    for variable in model.weights:
        if variable.path.endswith("/kernel") and len(variable.shape) == 3:
            if any(axis is not None for axis in active.get_variable_layout(variable).axes):
                raise ValueError(
                    f"quantize('int4') under keras.distribution.ModelParallel: Keras packs "
                    f"int4 kernels into two dimensions, which the layout map's layout for "
                    f"{variable.path} does not fit. Use keras_gemma.distribution.ModelParallel"
                    "(layout_map=..., model=...) or keras_gemma.distribution.recipe(...)."
                )


def _packed_axes(path, shape, axes, sizes):
    """For Keras' packed int4 form of one of our kernels (`shape` is its
    packed shape, not the float one): the float layout `axes` carried onto
    `(inputs, outputs / 2)`. None for any other variable."""
    for name, dims, _ in _KERNELS:
        pattern = name if name.startswith("token") else rf"decoder_block_\d+/{name}/kernel"
        if re.fullmatch(pattern, path):
            break
    else:
        return None
    if len(axes) != len(dims) or shape == tuple(sizes[d] for d in dims):
        return None
    inputs = _INPUTS[name]
    rows = math.prod(sizes[d] for d in inputs)
    columns = math.prod(sizes[d] for d in dims if d not in inputs)
    if shape != (rows, (columns + 1) // 2):
        return None
    first = lambda found: next((a for a in found if a is not None), None)  # noqa: E731
    return (
        first(a for d, a in zip(dims, axes) if d in inputs),
        first(a for d, a in zip(dims, axes) if d not in inputs),
    )


def _largest_divisor(count, heads, limit):
    """The largest power of two up to `limit` dividing `count` and `heads`."""
    size = 1
    while size * 2 <= limit and count % (size * 2) == 0 and heads % (size * 2) == 0:
        size *= 2
    return size


def torch_data_parallel(model, **kwargs):
    """PyTorch's data parallelism, the route of Keras' PyTorch
    distributed-training guide: `model` (built, LoRA enabled if wanted) in
    `torch.nn.parallel.DistributedDataParallel(model, **kwargs)`, for a
    PyTorch training loop in each process of `torchrun` (after
    `torch.distributed.init_process_group`). Calling the wrapper gives the
    model's logits; Keras' `fit` does not drive DDP.

    Example (in each of `torchrun --nproc-per-node=2 train.py`'s processes):
    ```python
    torch.distributed.init_process_group("nccl")  # "gloo" on CPUs
    ddp = keras_gemma.distribution.torch_data_parallel(gemma_lm)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    logits = ddp({"token_ids": token_ids, "padding_mask": padding_mask})
    ```
    """
    return backend.torch_distributed_data_parallel(model, **kwargs)
