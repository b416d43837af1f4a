"""Run by test_sharding.py in a fresh JAX process with 8 simulated CPU devices:
each case's single-device and sharded results, as JSON on stdout's last line.

A case: an architecture and a mesh `(batch, model)`. The reference is the same
model on one device (no distribution); the sharded model is built under
`ModelParallel` with `keras_gemma.distribution.layout_map`, given the
reference's initial weights, and both take two AdamW steps of `fit` with the
default `compile()` (the chunked loss) on the same batches.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from cases import ARCHITECTURES  # noqa: E402
from cases import BASE  # noqa: E402
from cases import bytes_per_device  # noqa: E402
from cases import data  # noqa: E402
from cases import fit_losses  # noqa: E402

import keras_gemma  # noqa: E402

SHARDED = ("token_embedding/embeddings", "/query/", "/key/", "/value/", "/attention_output/", "/ffw_")


def build(config, lora_rank, weights=None, quantize=None, adapters=None):
    """The model, given `weights` (its float weights), then quantized
    (`"int8"`, `"int4"`), then with LoRA adapters (given `adapters`)."""
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**config), preprocessor=None)
    for variable, value in zip(lm.weights, weights or []):
        variable.assign(value)
    if quantize:
        lm.quantize(quantize)
    if lora_rank:
        lm.backbone.enable_lora(lora_rank)
        for variable, value in zip(lora_variables(lm), adapters or []):
            variable.assign(value)
    return lm


def lora_variables(lm):
    return [v for v in lm.weights if "lora_kernel" in v.path]


def greedy_tokens(lm):
    """Greedy continuations of two prompts of different lengths, as token ids."""
    token_ids = np.zeros((2, 12), "int32")
    padding_mask = np.zeros((2, 12), "int32")
    token_ids[0, :5], padding_mask[0, :5] = [2, 17, 30, 41, 9], 1
    token_ids[1, :3], padding_mask[1, :3] = [2, 88, 5], 1
    out = lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    return np.asarray(out["token_ids"]).tolist()


def train(lm, generate, loss_chunk=None):
    """`loss_chunk`: tokens per device in each chunk of the loss (by default
    one chunk holds the whole batch here)."""
    x, y, sample_weight = data()
    logits = np.asarray(lm.predict(x, batch_size=16, verbose=0))  # one compiled call
    tokens = greedy_tokens(lm) if generate else None
    options = {}
    if loss_chunk:
        options["loss"] = keras_gemma.training.ChunkedCrossEntropy(chunk_size=loss_chunk)
    lm.compile(optimizer=keras.optimizers.AdamW(1e-2), **options)
    losses = fit_losses(lm, x, y, sample_weight, batch_size=8)
    return logits, tokens, losses, [np.asarray(w) for w in lm.weights]


def is_split(variable):
    sharding = variable.value.sharding
    return tuple(sharding.shard_shape(variable.shape)) != tuple(variable.shape)


_REFERENCES = {}
# The references some case compares greedy tokens with (set by main).
_GENERATING = set()


def reference(name, lora_rank, quantize=None):
    """The one-device model's initial float weights and results (the same
    for every mesh)."""
    key = name, lora_rank, quantize
    if key not in _REFERENCES:
        keras.utils.set_random_seed(0)
        config = {**BASE, **ARCHITECTURES[name]}
        initial = [np.asarray(w) for w in build(config, 0).weights]
        lm = build(config, lora_rank, initial, quantize)
        adapters = [np.asarray(v) for v in lora_variables(lm)]
        _REFERENCES[key] = (initial, adapters, *train(lm, generate=key in _GENERATING))
    return _REFERENCES[key]


def case(name, mesh_shape, lora_rank=0, shard_over_data=True, generate=False, recipe=None,
         loss_chunk=None, quantize=None):
    """One mesh: a layout map on `mesh_shape`, or the named recipe (whose
    mesh must come out as `mesh_shape`)."""
    config = {**BASE, **ARCHITECTURES[name]}
    initial, adapters, ref_logits, ref_tokens, ref_losses, ref_weights = reference(
        name, lora_rank, quantize
    )
    ref_tokens = ref_tokens if generate else None

    if recipe is None:
        mesh = keras.distribution.DeviceMesh(mesh_shape, ("batch", "model"), jax.devices())
        layouts = keras_gemma.distribution.layout_map(config, mesh, shard_over_data=shard_over_data)
        distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    else:
        sizes = {} if recipe.endswith("_pod") else {"model_parallel_size": mesh_shape[1]}
        distribution = keras_gemma.distribution.recipe(recipe, config, **sizes)
        assert tuple(distribution.device_mesh.shape) == tuple(mesh_shape), distribution.device_mesh
    with distribution.scope():
        lm = build(config, lora_rank, initial, quantize, adapters)
        logits, tokens, losses, weights = train(lm, generate, loss_chunk)
        unsplit = [
            v.path
            for v in lm.weights
            if v.path.endswith(("/kernel", "/embeddings"))
            and any(key in v.path for key in SHARDED)
            and not is_split(v)
        ]
        slot_mismatches = []
        for variable in lm.trainable_weights:
            prefix = variable.path.replace("/", "_") + "_"
            for slot in lm.optimizer.variables:
                if slot.path.split("/")[-1].startswith(prefix) and (
                    slot.value.sharding.spec != variable.value.sharding.spec
                ):
                    slot_mismatches.append(slot.path)
        slots = [s for s in lm.optimizer.variables if len(s.shape) > 0]
        return {
            "case": f"{name} {mesh_shape} lora={lora_rank} over_data={shard_over_data} recipe={recipe} "
            f"quantize={quantize}",
            "tokens": tokens,
            "ref_tokens": ref_tokens,
            "model_axis": mesh_shape[1],
            "logits_diff": float(np.max(np.abs(logits - ref_logits))),
            "losses": losses,
            "ref_losses": ref_losses,
            "weights_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(weights, ref_weights)),
            "unsplit": unsplit,
            "slot_mismatches": slot_mismatches,
            "slots_checked": len(slots),
            # What one device holds of the weights and the optimizer state,
            # against all of it.
            "held_fraction": bytes_per_device(lm.weights + slots)
            / sum(np.asarray(v).nbytes for v in lm.weights + slots),
        }


def int4_under_keras_model_parallel():
    """`quantize("int4")` under Keras' own ModelParallel with our layout map:
    the error, and how many weights it left quantized (none should be)."""
    config = {**BASE, **ARCHITECTURES["multi_head"]}
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    layouts = keras_gemma.distribution.layout_map(config, mesh)
    with keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope():
        lm = build(config, 0)
        try:
            lm.quantize("int4")
            error = None
        except ValueError as e:
            error = str(e)
    quantized = [v.path for v in lm.weights if v.dtype == "int8"]
    return {"case": "int4 under keras' ModelParallel", "error": error, "quantized": quantized}


def main():
    cases = json.loads(sys.argv[1])
    _GENERATING.update(
        (name, options.get("lora_rank", 0), options.get("quantize"))
        for name, _, options in cases
        if options.get("generate")
    )
    results = [case(name, tuple(mesh), **options) for name, mesh, options in cases]
    results.append(int4_under_keras_model_parallel())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
