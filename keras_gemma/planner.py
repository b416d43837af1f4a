"""How many bytes a Gemma fine-tuning run needs on each device, before running it.

`plan(...)` adds up, per device, the weights, their gradients, the optimizer
state (each split as `keras_gemma.distribution`'s layouts split it) and the
activations one training step keeps for its backward pass, for keras_gemma's
own step: the loss computed in chunks of tokens (no full-vocabulary logits),
the decoder blocks' activations kept unless rematerialized, and under a fully
sharded layout the weights gathered for each product. It says whether that
fits a named accelerator. `keras-gemma plan` prints the same table.
tests/distribution/test_planner.py holds it to the bytes the devices hold and
to XLA's memory analysis of the compiled step.
"""

import dataclasses
import math
import re

from keras_gemma import distribution
from keras_gemma import training
from keras_gemma.layers.feed_forward import training_chunk_length

GiB = 1024**3
# Accelerator memory per device (GiB as the vendors state it: GB for GPUs).
ACCELERATORS = {
    "tpu-v5e": 16 * GiB,
    "tpu-v5p": 95 * GiB,
    "tpu-v2": 8 * GiB,  # per core (a JAX device)
    "tpu-v3": 16 * GiB,  # per core (a JAX device)
    "tpu-v4": 32 * GiB,
    "tpu-v6e": 32 * GiB,
    "a100-40gb": 40e9,
    "a100-80gb": 80e9,
    "h100-80gb": 80e9,
    "h200": 141e9,
    "l4": 24e9,
    "a10": 24e9,
    "t4": 16e9,
    "v100-16gb": 16e9,
}
DEFAULT_ACCELERATORS = ("tpu-v5e", "t4", "a100-40gb", "h100-80gb")
# Optimizer slots per trainable weight.
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, "lion": 1}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device (the largest share any one device holds)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    description: str

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, accelerator):
        """Whether `total` fits one device of `accelerator` (a name in
        `ACCELERATORS`)."""
        return self.total <= _accelerator_bytes(accelerator)

    def table(self, accelerators=DEFAULT_ACCELERATORS):
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("total", self.total),
        ]
        lines = [self.description, "| per device | GiB |", "|---|---|"]
        lines += [f"| {name} | {value / GiB:.2f} |" for name, value in rows]
        fits = ", ".join(
            f"{name}: {'fits' if self.fits(name) else 'does not fit'}" for name in accelerators
        )
        return "\n".join(lines + [fits])


def _accelerator_bytes(name):
    if name not in ACCELERATORS:
        raise ValueError(f"Unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}.")
    return ACCELERATORS[name]


def variable_shapes(config):
    """`[(path, shape)]` of a `GemmaBackbone`'s variables, from its config."""
    hidden, heads, kv_heads, head_dim = (
        config["hidden_dim"], config["num_query_heads"], config["num_key_value_heads"], config["head_dim"],
    )
    branch = config["intermediate_dim"] // 2
    shapes = [("token_embedding/embeddings", (config["vocabulary_size"], hidden))]
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    norms += ["post_attention_norm"] if config.get("use_post_attention_norm") else []
    norms += ["post_ffw_norm"] if config.get("use_post_ffw_norm") else []
    for i in range(config["num_layers"]):
        block = f"decoder_block_{i}"
        shapes += [(f"{block}/{norm}/scale", (hidden,)) for norm in norms]
        shapes += [
            (f"{block}/attention/query/kernel", (hidden, heads, head_dim)),
            (f"{block}/attention/key/kernel", (hidden, kv_heads, head_dim)),
            (f"{block}/attention/value/kernel", (hidden, kv_heads, head_dim)),
            (f"{block}/attention/attention_output/kernel", (heads, head_dim, hidden)),
            (f"{block}/feed_forward/ffw_gating/kernel", (hidden, branch)),
            (f"{block}/feed_forward/ffw_gating_2/kernel", (hidden, branch)),
            (f"{block}/feed_forward/ffw_linear/kernel", (hidden, branch)),
        ]
        if config.get("use_query_key_norm"):
            shapes += [
                (f"{block}/attention/query_norm/scale", (head_dim,)),
                (f"{block}/attention/key_norm/scale", (head_dim,)),
            ]
    shapes.append(("final_normalization/scale", (hidden,)))
    return shapes


def _lora_shapes(shapes, rank, targets):
    out = []
    for path, shape in shapes:
        name = path.split("/")[-2] if path.endswith("/kernel") else None
        if name in targets:
            stem = path[: -len("kernel")]
            out += [(stem + "lora_kernel_a", shape[:-1] + (rank,)), (stem + "lora_kernel_b", (rank, shape[-1]))]
    return out


def _split(path, shape, layouts, axis_sizes):
    """How many pieces `layouts` cuts the variable at `path` into."""
    for pattern, axes in layouts.items():
        if re.fullmatch(pattern, path):
            return math.prod(axis_sizes[a] for a in axes if a is not None)
    return 1


def plan(
    model,
    mesh=(1, 1),
    recipe="fully_sharded",
    optimizer="adamw",
    lora_rank=None,
    lora_targets=("query", "value"),
    dtype="float32",
    batch_size=1,
    sequence_length=1024,
    rematerialize=False,
):
    """The per-device memory of one fine-tuning step (see the module docstring).

    Args:
        model: a preset name, a backbone config, a `GemmaBackbone` or a
            `GemmaCausalLM`.
        mesh: `(data, model)` devices; `(1, 1)` is one device.
        recipe: `"fully_sharded"` (weights and optimizer state over both
            axes), `"model_parallel"` (over the model axis only) or
            `"data_parallel"` (whole on every device).
        optimizer: one of `OPTIMIZERS` (slots per trainable weight).
        lora_rank: `None` for full fine-tuning, else the adapters' rank.
        lora_targets: the projections with adapters.
        dtype: `"float32"`, `"bfloat16"` (weights and compute) or
            `"mixed_bfloat16"` (float32 weights, bfloat16 compute).
        batch_size: the global batch, split over the data axis.
        sequence_length: tokens per row.
        rematerialize: the decoder blocks rematerialized (built inside
            `keras.RematScope`): only each block's input is kept.
    """
    config = distribution.backbone_config(model)
    if len(mesh) != 2 or not all(isinstance(n, int) and n > 0 for n in mesh):
        raise ValueError(f"mesh must be (data, model), two positive ints; got {mesh!r}.")
    for name, value in (("batch_size", batch_size), ("sequence_length", sequence_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive int or None; got {lora_rank!r}.")
    data_size, model_size = mesh
    if recipe not in distribution.RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {', '.join(distribution.RECIPES)}.")
    if recipe in ("data_parallel", "2b_pod") and model_size != 1:
        raise ValueError(f"The {recipe} recipe has no model axis: mesh must be (devices, 1).")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}.")
    if dtype not in ("float32", "bfloat16", "mixed_bfloat16"):
        raise ValueError(f"dtype must be float32, bfloat16 or mixed_bfloat16; got {dtype!r}.")
    if batch_size % data_size:
        raise ValueError(f"batch_size={batch_size} does not split over {data_size} data replicas.")
    weight_bytes = 2 if dtype == "bfloat16" else 4
    compute_bytes = 4 if dtype == "float32" else 2
    over_data = recipe in ("fully_sharded", "2b_pod", "7b_pod") and data_size > 1
    layouts = distribution.kernel_layouts(config, model_size, data_size if over_data else 1)
    model_only = distribution.kernel_layouts(config, model_size, 1)
    axis_sizes = {"model": model_size, "batch": data_size}

    def per_device(shapes, itemsize, layouts=layouts):
        return sum(
            math.ceil(math.prod(shape) * itemsize / _split(path, shape, layouts, axis_sizes))
            for path, shape in shapes
        )

    shapes = variable_shapes(config)
    weights = per_device(shapes, weight_bytes)
    if lora_rank:
        adapters = _lora_shapes(shapes, lora_rank, lora_targets)
        adapter_bytes = per_device(adapters, 4)  # Keras keeps adapters in float32
        weights += adapter_bytes
        trainable = adapter_bytes
    else:
        trainable = weights
    activations = _activations(
        config, batch_size // data_size, sequence_length, model_size, compute_bytes, rematerialize
    )
    if over_data:
        # Fully sharded: each product gathers its weight over the data axis
        # first. XLA holds the gathered embedding (and a transposed copy,
        # whose buffers the table's whole gradient reuses in full
        # fine-tuning) and at least one block's kernels at a time, and in
        # full fine-tuning their whole gradients before reducing them onto
        # the shards.
        block = [(path, shape) for path, shape in shapes if path.startswith("decoder_block_0/")]
        gathered = 2 * per_device(shapes[:1], compute_bytes, model_only)
        gathered += per_device(block, compute_bytes, model_only)
        if not lora_rank:
            gathered += per_device(block, 4, model_only)
        activations += gathered
    tuning = f"LoRA rank {lora_rank}" if lora_rank else "full fine-tuning"
    description = (
        f"{recipe} on a {data_size} x {model_size} (data x model) mesh, {tuning}, {optimizer}, "
        f"{dtype}, batch {batch_size} x {sequence_length} tokens"
        + (", rematerialized blocks" if rematerialize else "")
    )
    return MemoryPlan(
        weights=weights,
        gradients=trainable,
        optimizer=OPTIMIZERS[optimizer] * trainable,
        activations=activations,
        description=description,
    )


def _activations(config, rows, length, model_size, itemsize, rematerialize):
    """Bytes a training step holds besides its weights, gradients and
    optimizer state, on one device whose share of the batch is `rows`.

    What each decoder block keeps for its backward pass: its input, the
    normed inputs and the residual sum (hidden wide, whole on every model
    shard), the post-norm inputs where it has them, the query, key, value
    and attention output (split by heads over the model axis where the
    heads divide), the query-key norm inputs, the float32 attention
    probabilities and the feed-forward's four branch-wide tensors (split
    over the model axis). Long sequences run the feed-forward and attention
    in rematerialized chunks (as `keras_gemma.layers` do), and then keep
    only one chunk's branch tensors or probabilities at a time. The loss
    keeps the final hidden states, their float32 gradient and one chunk's
    float32 logits and gradient. Rematerialized blocks keep
    only their input, and recompute one block at a time."""
    hidden, heads, kv_heads, head_dim = (
        config["hidden_dim"], config["num_query_heads"], config["num_key_value_heads"], config["head_dim"],
    )
    branch = config["intermediate_dim"] // 2 / model_size

    def split(count):
        return count / model_size if count % model_size == 0 else count

    tokens = rows * length
    n, k = split(heads), split(kv_heads)
    wide = 4 + bool(config.get("use_post_attention_norm")) + bool(config.get("use_post_ffw_norm"))
    per_block = tokens * (wide * hidden + (2 * n + 2 * k) * head_dim) * itemsize
    if config.get("use_query_key_norm"):
        per_block += tokens * (n + k) * head_dim * itemsize
    probs_bytes = 4 + (itemsize if itemsize != 4 else 0)
    attention_chunk = training_chunk_length(heads * length)
    ffw_chunk = training_chunk_length(config["intermediate_dim"] // 2)
    probs = rows * n * min(length, attention_chunk) * length * probs_bytes
    geglu = 4 * rows * min(length, ffw_chunk) * branch * itemsize
    if length <= attention_chunk:
        per_block += probs
    if length <= ffw_chunk:
        per_block += geglu
    # The backward pass's own working set (a block's gradients in flight,
    # a chunk's recomputed tensors) comes after the loss has let go of its
    # logits: the peak is the larger of the two, beside the kept tensors.
    working = 2 * tokens * hidden * 4 + max(probs, geglu)
    layers = config["num_layers"]
    if rematerialize:
        kept = layers * tokens * hidden * itemsize + per_block
    else:
        kept = layers * per_block
    vocabulary = config["vocabulary_size"]
    vocabulary_shard = vocabulary / model_size if vocabulary % model_size == 0 else vocabulary
    chunk = min(tokens, max(1, training.LOSS_CHUNK_ELEMENTS // vocabulary))
    # Per logit: two float32 buffers (the logits, overwritten by the
    # exponentials, and their gradient) and the label mask.
    loss = tokens * hidden * (2 * itemsize + 4) + chunk * vocabulary_shard * (2 * 4 + 1)
    return int(kept + max(working, loss))
