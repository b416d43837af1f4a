"""Run by test_other_backends.py in a fresh TensorFlow process with 2 logical
CPU devices: two AdamW steps of `fit` (default `compile()`, the chunked loss)
on one device and under `tf.distribute.MirroredStrategy` over both, from the
same initial weights. Prints the losses and the largest weight difference
(JSON, after `RESULT`)."""

import json
import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cases import ARCHITECTURES  # noqa: E402
from cases import BASE  # noqa: E402
from cases import data  # noqa: E402
from cases import fit_losses  # noqa: E402

import keras_gemma  # noqa: E402


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        backbone = keras_gemma.GemmaBackbone(**BASE, **ARCHITECTURES["grouped_query"])
        lm = keras_gemma.GemmaCausalLM(backbone, preprocessor=None)
        lm.compile(optimizer=keras.optimizers.AdamW(1e-2))
    x, y, sample_weight = data()
    return fit_losses(lm, x, y, sample_weight, batch_size=8), [np.asarray(w) for w in lm.weights]


one_losses, one_weights = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
two_losses, two_weights = run(strategy)
print("RESULT", json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "one_device": one_losses,
    "mirrored": two_losses,
    "weights_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one_weights, two_weights)),
}))
