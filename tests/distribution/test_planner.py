"""The memory planner against the real thing: the bytes each device holds of
the weights, gradients and optimizer state on a simulated mesh, and XLA's
memory analysis of the same compiled train step (`planner_worker.py`, one
JAX process with 8 simulated CPU devices); its arguments and table on every
backend."""

import json

import keras
import pytest
from launch import finish
from launch import start
from launch import xla_flags

import keras_gemma
from keras_gemma import planner

# mesh, recipe, LoRA rank (0: full fine-tuning), rematerialized blocks,
# batch rows, sequence length, architecture overrides.
CASES = [
    ((2, 4), "fully_sharded", 0, False, 8, 256, {}),
    ((8, 1), "fully_sharded", 0, False, 8, 256, {
        "num_key_value_heads": 2, "use_query_key_norm": True,
        "use_post_attention_norm": True, "use_post_ffw_norm": True,
    }),
    ((1, 8), "fully_sharded", 0, False, 8, 256, {"num_key_value_heads": 4}),
    ((8, 1), "fully_sharded", 4, True, 8, 256, {}),
    ((4, 2), "model_parallel", 4, False, 8, 256, {}),
]


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="XLA's memory analysis of a sharded step needs keras.distribution, implemented for "
    "JAX only (Keras 3.15); the JAX pass runs it in a JAX subprocess",
)
def test_planner_matches_shards_and_xla():
    env = {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": xla_flags(8),
        "PLANNER_CASES": json.dumps(CASES),
    }
    results = finish(start("planner_worker.py", env), timeout=600)
    assert len(results) == len(CASES)
    for case, result in zip(CASES, results):
        for part in ("weights", "gradients", "optimizer"):
            planned, actual = result["plan"][part], result["actual"][part]
            assert abs(planned - actual) <= 0.01 * actual, (case, part, result)
        ratio = result["plan"]["total"] / result["xla_total"]
        assert 0.7 <= ratio <= 1.3, (case, ratio, result)


def test_paper_layouts_fit_tpu_v5e():
    """The paper's layouts, in bfloat16 with AdamW, a global batch of 256 x
    2048 tokens: the 7B over 16 x 16 TPU v5e chips (blocks rematerialized)
    and the 2B over 256 fit 16 GiB per chip; the 7B without
    rematerialization, or on one chip, does not."""
    seven = planner.plan("gemma_7b_en", mesh=(16, 16), recipe="7b_pod", dtype="bfloat16",
                         batch_size=256, sequence_length=2048, rematerialize=True)
    kept = planner.plan("gemma_7b_en", mesh=(16, 16), recipe="7b_pod", dtype="bfloat16",
                        batch_size=256, sequence_length=2048)
    two = planner.plan("gemma_2b_en", mesh=(256, 1), recipe="2b_pod", dtype="bfloat16",
                       batch_size=256, sequence_length=2048)
    alone = planner.plan("gemma_7b_en", dtype="bfloat16", batch_size=1, sequence_length=2048)
    assert seven.fits("tpu-v5e") and two.fits("tpu-v5e")
    assert not kept.fits("tpu-v5e") and not alone.fits("tpu-v5e")
    # 8.5 B parameters (the paper's 7B, embeddings included) over 256 chips.
    assert abs(seven.weights - 8.54e9 * 2 / 256) < 0.03 * seven.weights
    assert "fits" in seven.table() and "tpu-v5e" in seven.table()


def test_planner_lora_on_one_gpu():
    lora = planner.plan("gemma_2b_en", lora_rank=4, dtype="bfloat16", batch_size=1, sequence_length=8192)
    full = planner.plan("gemma_2b_en", dtype="float32", batch_size=1, sequence_length=8192)
    assert lora.fits("t4") and not full.fits("t4")
    assert lora.gradients < 0.01 * lora.weights and full.gradients == full.weights


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipe": "zero"}, "Unknown recipe 'zero'"),
        ({"optimizer": "adagrad"}, "Unknown optimizer 'adagrad'"),
        ({"dtype": "int8"}, "dtype must be"),
        ({"mesh": (3, 1), "batch_size": 4}, "batch_size=4 does not split over 3"),
        ({"recipe": "data_parallel", "mesh": (2, 2), "batch_size": 4}, "no model axis"),
        ({"mesh": (8,)}, "mesh must be \\(data, model\\)"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"lora_rank": 0}, "lora_rank must be a positive int"),
    ],
)
def test_planner_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planner.plan("gemma_2b_en", **kwargs)


def test_planner_unknown_accelerator():
    with pytest.raises(ValueError, match="Unknown accelerator 'tpu-v9'"):
        planner.plan("gemma_2b_en").fits("tpu-v9")


def test_plan_command(capsys):
    from keras_gemma import cli

    assert cli.main(["plan", "gemma_7b_en", "--mesh", "16x16", "--recipe", "7b_pod", "--dtype",
                     "bfloat16", "--batch-size", "256", "--sequence-length", "2048", "--rematerialize",
                     "--accelerator", "tpu-v5e"]) == 0
    out = capsys.readouterr().out
    assert "7b_pod on a 16 x 16" in out and "tpu-v5e: fits" in out
    with pytest.raises(SystemExit, match="--mesh must be DATAxMODEL"):
        cli.main(["plan", "gemma_2b_en", "--mesh", "16"])
    with pytest.raises(SystemExit, match="keras-gemma plan: Unknown recipe 'zero'"):
        cli.main(["plan", "gemma_2b_en", "--recipe", "zero"])
    with pytest.raises(SystemExit, match="keras-gemma plan: Unknown accelerator 'tpu-v9'"):
        cli.main(["plan", "gemma_2b_en", "--accelerator", "tpu-v9"])
    assert keras_gemma.planner is planner
