"""Rotary position embeddings (RoPE) in Gemma's rotate-half layout."""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class RotaryEmbedding(keras.layers.Layer):
    """Rotates query or key vectors by their absolute position.

    Gemma pairs feature `i` with feature `i + head_dim / 2` (the "rotate half"
    layout of the original JAX code and of Hugging Face transformers). The
    angles are computed in float32; the rotation is applied in float32 and the
    result cast back to the input's dtype.

    Args:
        max_wavelength: float. The RoPE base (10000 in Gemma 1).
        scaling_factor: float. Linear RoPE scaling: positions are divided by
            it before the rotation (Gemma 3's global layers in larger models).
        **kwargs: passed to `keras.layers.Layer`.

    Call arguments:
        x: tensor `(batch, seq, heads, head_dim)`.
        start_index: int or scalar tensor. Position of `x[:, 0]`, so cached
            decoding rotates a new token by its place in the whole sequence.

    Example:
    ```python
    import numpy as np
    rope = keras_gemma.layers.RotaryEmbedding(max_wavelength=10000.0)
    q = np.random.rand(1, 4, 2, 8).astype("float32")
    rope(q, start_index=3)  # rotated as positions 3, 4, 5, 6
    ```
    """

    def __init__(self, max_wavelength=10000.0, scaling_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.scaling_factor = scaling_factor

    def call(self, x, start_index=0):
        head_dim = x.shape[-1]
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {head_dim}.")
        # The inverse frequencies are constants: compute them in float64 once.
        exponents = np.arange(0, head_dim, 2, dtype="float64") / head_dim
        inverse_freq = 1.0 / self.max_wavelength**exponents / self.scaling_factor
        inverse_freq = inverse_freq.astype("float32")
        seq_len = ops.shape(x)[1]
        positions = ops.arange(seq_len, dtype="float32")
        positions = positions + ops.cast(start_index, "float32")  # (seq,)
        # float32 angles: bfloat16 positions would collide beyond 256.
        # A tensor on the backend's device (a numpy operand stays on the CPU
        # for PyTorch on a GPU).
        inverse_freq = ops.convert_to_tensor(inverse_freq[None, :])
        angles = positions[:, None] * inverse_freq  # (seq, head_dim/2)
        cos = ops.cos(angles)[None, :, None, :]  # (1, seq, 1, head_dim/2)
        sin = ops.sin(angles)[None, :, None, :]
        x32 = ops.cast(x, "float32")
        x1, x2 = ops.split(x32, 2, axis=-1)  # 2 x (batch, seq, heads, head_dim/2)
        rotated = ops.concatenate(
            [x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1
        )  # (batch, seq, heads, head_dim)
        return ops.cast(rotated, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"max_wavelength": self.max_wavelength, "scaling_factor": self.scaling_factor}
        )
        return config
