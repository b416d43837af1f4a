"""GeGLU feed-forward: `linear(gelu_tanh(gate(x)) * up(x))`."""

import keras

from keras_gemma.layers.projection import einsum_projection


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaFeedForward(keras.layers.Layer):
    """Gated feed-forward network with a tanh-approximate GELU on the gate.

    Args:
        hidden_dim: int. Model width (input and output).
        intermediate_dim: int. Gate and up branches together, as in the Gemma
            paper's Table 1 (32768 for 2B): each branch is half of it wide.
        kernel_initializer: initializer for the three projections.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    ```python
    import numpy as np
    ffw = keras_gemma.layers.GemmaFeedForward(hidden_dim=16, intermediate_dim=64)
    ffw(np.random.rand(2, 5, 16).astype("float32"))  # (2, 5, 16)
    ```
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if intermediate_dim % 2:
            raise ValueError(
                "intermediate_dim counts the gate and up branches together, so "
                f"it must be even; got {intermediate_dim}."
            )
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        branch_dim = self.intermediate_dim // 2

        def dense(equation, output_shape, name):
            return einsum_projection(
                equation, output_shape, self.kernel_initializer, self.dtype_policy, name
            )

        # Names as in keras-hub, so its layout maps and LoRA targets carry over.
        self.gate = dense("btd,df->btf", (None, branch_dim), "ffw_gating")  # (b, t, f)
        self.up = dense("btd,df->btf", (None, branch_dim), "ffw_gating_2")  # (b, t, f)
        # kernel (hidden, f), as transformers' down_proj: for one token XLA's
        # matrix-vector product over the minor dimension is 1.5x faster than
        # over the major one (keras-hub's (f, hidden)).
        self.down = dense("btf,df->btd", (None, self.hidden_dim), "ffw_linear")  # (b, t, d)
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build((None, None, branch_dim))

    def call(self, x):
        gate = keras.activations.gelu(self.gate(x), approximate=True)
        return self.down(gate * self.up(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
