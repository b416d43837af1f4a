import numpy as np
import pytest

from helpers import to_numpy
from keras_gemma.layers import GemmaFeedForward


def test_matches_transformers_gemma_mlp():
    import torch
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    x = np.random.RandomState(0).randn(2, 3, 16).astype("float32")
    ffw = GemmaFeedForward(hidden_dim=16, intermediate_dim=64)
    ffw.build(x.shape)
    mlp = GemmaMLP(GemmaConfig(hidden_size=16, intermediate_size=32, hidden_activation="gelu_pytorch_tanh"))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.tensor(to_numpy(ffw.gate.kernel).T))
        mlp.up_proj.weight.copy_(torch.tensor(to_numpy(ffw.up.kernel).T))
        mlp.down_proj.weight.copy_(torch.tensor(to_numpy(ffw.down.kernel)))
        expected = mlp(torch.tensor(x)).numpy()
    np.testing.assert_allclose(to_numpy(ffw(x)), expected, atol=1e-5, rtol=1e-5)


def test_branch_widths_are_half_of_intermediate_dim():
    ffw = GemmaFeedForward(hidden_dim=16, intermediate_dim=64)
    ffw.build((None, None, 16))
    assert tuple(ffw.gate.kernel.shape) == (16, 32)
    assert tuple(ffw.up.kernel.shape) == (16, 32)
    assert tuple(ffw.down.kernel.shape) == (16, 32)
    with pytest.raises(ValueError, match="must be even"):
        GemmaFeedForward(hidden_dim=16, intermediate_dim=63)
