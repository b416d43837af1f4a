"""Run by test_multiprocess.py: one of two JAX processes (4 simulated CPU
devices each, gloo collectives over the loopback address) joined by
`keras.distribution.initialize` into one (batch 2, model 4) mesh spanning
both; or, with PROCESS_ID unset, the same two AdamW steps on one device.
Prints the fit losses (process 0) as JSON after `RESULT` (gloo writes to
stdout too)."""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from cases import ARCHITECTURES  # noqa: E402
from cases import BASE  # noqa: E402
from cases import data  # noqa: E402
from cases import fit_losses  # noqa: E402

import keras_gemma  # noqa: E402


def fit(lm, x, y, sample_weight, batch_size):
    lm.compile(optimizer=keras.optimizers.AdamW(1e-2))
    return fit_losses(lm, x, y, sample_weight, batch_size)


def build():
    keras.utils.set_random_seed(0)
    backbone = keras_gemma.GemmaBackbone(**BASE, **ARCHITECTURES["multi_query"])
    return keras_gemma.GemmaCausalLM(backbone, preprocessor=None)


def main():
    x, y, sample_weight = data()  # two steps of 8 rows
    if "PROCESS_ID" not in os.environ:
        print("RESULT", json.dumps(fit(build(), x, y, sample_weight, batch_size=8)))
        return
    process_id = int(os.environ["PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=os.environ["COORDINATOR"], num_processes=2, process_id=process_id
    )
    devices = keras.distribution.list_devices()
    assert len(devices) == 8 and jax.local_device_count() == 4, devices
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layouts = keras_gemma.distribution.layout_map(BASE | ARCHITECTURES["multi_query"], mesh)
    distribution = keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    # Both processes pass the same global dataset, batched to a static size:
    # Keras gives each process its devices' rows of every batch.
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(8, drop_remainder=True)
    with distribution.scope():
        losses = fit(build(), dataset, None, None, batch_size=None)
    if process_id == 0:
        print("RESULT", json.dumps(losses))


if __name__ == "__main__":
    main()
