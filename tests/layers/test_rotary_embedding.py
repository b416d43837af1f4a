import numpy as np

from helpers import to_numpy
from keras_gemma.layers import RotaryEmbedding


def transformers_rope(x, positions, base):
    """transformers' own Gemma RoPE on (batch, seq, heads, head_dim) input."""
    import torch
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import (
        GemmaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    head_dim = x.shape[-1]
    config = GemmaConfig(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": base})
    rope = GemmaRotaryEmbedding(config)
    t = torch.tensor(x).transpose(1, 2)  # (batch, heads, seq, head_dim)
    pos = torch.tensor(positions)[None]
    cos, sin = rope(t, pos)
    q, _ = apply_rotary_pos_emb(t, t, cos, sin)
    return q.transpose(1, 2).numpy()


def test_matches_transformers_with_start_index():
    x = np.random.RandomState(0).randn(2, 5, 3, 16).astype("float32")
    for start in (0, 7, 300):
        expected = transformers_rope(x, np.arange(start, start + 5), 10000.0)
        got = to_numpy(RotaryEmbedding(max_wavelength=10000.0)(x, start_index=start))
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_base_changes_the_rotation():
    x = np.random.RandomState(0).randn(1, 4, 1, 8).astype("float32")
    a = to_numpy(RotaryEmbedding(max_wavelength=10000.0)(x, start_index=3))
    b = to_numpy(RotaryEmbedding(max_wavelength=1000000.0)(x, start_index=3))
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(
        b, transformers_rope(x, np.arange(3, 7), 1000000.0), atol=2e-5, rtol=1e-5
    )


def test_position_zero_is_identity_and_norms_are_kept():
    x = np.random.RandomState(0).randn(1, 6, 2, 8).astype("float32")
    y = to_numpy(RotaryEmbedding()(x))
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )
