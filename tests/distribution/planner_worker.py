"""Run by test_planner.py in a fresh JAX process with 8 simulated CPU devices:
for each case, the planner's bytes per device beside what the sharded model
actually holds and XLA's memory analysis of its compiled train step, as JSON
after `RESULT `. The cases come as JSON in `PLANNER_CASES`.

A case: a mesh `(batch, model)`, a recipe, LoRA rank or full fine-tuning,
rematerialized blocks or not, a batch, and architecture overrides."""

import contextlib
import json
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from cases import bytes_per_device  # noqa: E402

import keras_gemma  # noqa: E402
from keras_gemma import planner  # noqa: E402

# Big enough that the activations and the loss's logits weigh as they do in
# real runs; small enough to compile in seconds.
ARCHITECTURE = dict(
    vocabulary_size=8192, num_layers=2, num_query_heads=4, num_key_value_heads=1,
    hidden_dim=256, intermediate_dim=2048, head_dim=64,
)


def case(mesh_shape, recipe, lora_rank, rematerialize, rows, length, overrides):
    config = {**ARCHITECTURE, **overrides}
    mesh = keras.distribution.DeviceMesh(mesh_shape, ("batch", "model"), jax.devices())
    layouts = keras_gemma.distribution.layout_map(config, mesh, shard_over_data=recipe == "fully_sharded")
    distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    with distribution.scope():
        keras.utils.set_random_seed(0)
        blocks = [f"decoder_block_{i}" for i in range(config["num_layers"])]
        scope = keras.RematScope(mode="list_of_layers", layer_names=blocks)
        with scope if rematerialize else contextlib.nullcontext():
            backbone = keras_gemma.GemmaBackbone(**config)
        lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
        if lora_rank:
            lm.backbone.enable_lora(lora_rank)
        lm.compile(optimizer=keras.optimizers.AdamW(1e-3))
        token_ids = np.random.default_rng(0).integers(1, config["vocabulary_size"], (rows, length))
        x = {"token_ids": token_ids.astype("int32"), "padding_mask": np.ones((rows, length), "int32")}
        lm.optimizer.build(lm.trainable_variables)
        # The train step, compiled as `fit` compiles it (the state donated).
        state = tuple(
            [v.value for v in variables]
            for variables in (lm.trainable_variables, lm.non_trainable_variables,
                              lm.optimizer.variables, lm.metrics_variables)
        )
        layout = distribution.get_data_layout((rows, length)).backend_layout
        put = lambda array: jax.device_put(array, layout)  # noqa: E731
        data = ({name: put(value) for name, value in x.items()}, put(x["token_ids"]),
                put(np.ones((rows, length), "float32")))
        analysis = jax.jit(lm.train_step, donate_argnums=0).lower(state, data).compile().memory_analysis()
        slots = [slot for slot in lm.optimizer.variables if len(slot.shape) > 0]
        actual = {
            "weights": bytes_per_device(lm.weights),
            "gradients": bytes_per_device(lm.trainable_variables),  # a gradient is laid out as its variable
            "optimizer": bytes_per_device(slots),
        }
    plan = planner.plan(
        config, mesh=mesh_shape, recipe=recipe, lora_rank=lora_rank or None, batch_size=rows,
        sequence_length=length, rematerialize=rematerialize,
    )
    return {
        "plan": {"weights": plan.weights, "gradients": plan.gradients, "optimizer": plan.optimizer,
                 "total": plan.total},
        "actual": actual,
        # Everything the compiled step holds at its peak: its inputs and
        # outputs (the donated state counted once) and its temporaries.
        "xla_total": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes,
    }


def main():
    results = [case(tuple(mesh), *rest) for mesh, *rest in json.loads(os.environ["PLANNER_CASES"])]
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
