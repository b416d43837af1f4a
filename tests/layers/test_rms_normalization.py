import numpy as np

from helpers import to_numpy
from keras_gemma.layers import RMSNormalization


def test_matches_transformers_gemma_rmsnorm():
    import torch
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    x = np.random.RandomState(0).randn(2, 3, 16).astype("float32") * 3
    scale = np.random.RandomState(1).randn(16).astype("float32")
    norm = RMSNormalization(epsilon=1e-6)
    norm.build(x.shape)
    norm.scale.assign(scale)
    reference = GemmaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(scale))
        expected = reference(torch.tensor(x)).numpy()
    np.testing.assert_allclose(to_numpy(norm(x)), expected, atol=1e-5, rtol=1e-5)


def test_computes_in_float32_under_bfloat16():
    # Values whose squares overflow bfloat16's precision budget: a float32
    # computation, cast at the end, is within one bfloat16 rounding.
    x = (np.random.RandomState(0).randn(1, 4, 64) * 300).astype("float32")
    norm = RMSNormalization(dtype="bfloat16")
    y = to_numpy(norm(x)).astype("float32")
    assert str(norm.compute_dtype) == "bfloat16"
    exact = x / np.sqrt(np.mean(x.astype("float64") ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, exact, rtol=1 / 128, atol=1e-2)


def test_zero_scale_is_plain_rms_normalization():
    x = np.random.RandomState(0).randn(2, 8).astype("float32")
    y = to_numpy(RMSNormalization(epsilon=1e-6)(x))
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, expected, atol=1e-6, rtol=1e-5)
