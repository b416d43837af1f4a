"""RMSNorm as Gemma uses it: `x * rsqrt(mean(x^2) + eps) * (1 + scale)`."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gemma")
class RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalization with a zero-centred scale.

    The scale is stored as an offset from one (`1 + scale`), as in the Gemma
    checkpoints, so a freshly built layer is the identity up to normalization.
    The computation runs in float32 whatever the layer's dtype, then the result
    is cast back to the compute dtype.

    Args:
        epsilon: float. Added to the mean square before the reciprocal root.
        **kwargs: passed to `keras.layers.Layer` (`name`, `dtype`, ...).

    Example:
    ```python
    import numpy as np
    norm = keras_gemma.layers.RMSNormalization(epsilon=1e-6)
    y = norm(np.random.rand(2, 5, 16).astype("float32"))  # (2, 5, 16)
    ```
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(input_shape[-1],),
            initializer="zeros",
            trainable=True,
        )

    def call(self, x):
        # float32: squares of bfloat16 activations lose too much precision.
        x = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x), axis=-1, keepdims=True)
        y = x * ops.rsqrt(mean_square + self.epsilon)
        y = y * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
