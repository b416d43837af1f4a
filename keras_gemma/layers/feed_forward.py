"""GeGLU feed-forward: `linear(gelu_tanh(gate(x)) * up(x))`."""

import keras
from keras import ops

from keras_gemma import backend
from keras_gemma.layers.projection import einsum_projection

# In training, sequences longer than a chunk of this many values per example
# (2**23 float32 values, 32 MB: 512 positions of Gemma 2B's 16384-wide
# branches, or of its 8 heads x 2048 keys) run in rematerialized chunks.
_TRAINING_CHUNK_ELEMENTS = 1 << 23


def training_chunk_length(values_per_position):
    """Positions per chunk, for `values_per_position` activations each."""
    return max(1, _TRAINING_CHUNK_ELEMENTS // values_per_position)


def position_chunks(fn, inputs, chunk, shared=()):
    """`fn(*inputs)` for a function that is position-wise over the `seq` axis
    of its `(batch, seq, ...)` inputs (static `seq`), computed `chunk`
    positions at a time, each chunk rematerialized in the backward pass.
    `shared` tensors are passed whole to every chunk, after the chunks of
    `inputs` (as arguments: TensorFlow's rematerialization drops the
    gradients of captured tensors).

    Where `keras_gemma.backend.scan_position_chunks()` says so, the chunks
    run in `ops.scan`, the last one zero-padded."""
    length = inputs[0].shape[1]
    body = keras.remat(fn)
    if not backend.scan_position_chunks():
        # A Python loop of rematerialized chunks.
        outputs = [
            body(*[x[:, start : start + chunk] for x in inputs], *shared)
            for start in range(0, length, chunk)
        ]
        return ops.concatenate(outputs, axis=1)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length

    def split(x):
        if pad:
            x = ops.pad(x, [[0, 0], [0, pad]] + [[0, 0]] * (len(x.shape) - 2))
        shape = (ops.shape(x)[0], chunks, chunk) + tuple(x.shape[2:])
        return ops.moveaxis(ops.reshape(x, shape), 1, 0)

    step = lambda carry, xs: (carry, body(*xs, *shared))  # noqa: E731
    _, ys = ops.scan(step, 0, [split(x) for x in inputs])
    ys = ops.moveaxis(ys, 0, 1)
    ys = ops.reshape(ys, (ops.shape(ys)[0], chunks * chunk) + tuple(ys.shape[3:]))
    return ys[:, :length] if pad else ys


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

    def call(self, x, training=None):
        chunk = training_chunk_length(self.intermediate_dim // 2)
        length = x.shape[1]
        if not training or length is None or length <= chunk:
            return self._geglu(x)
        # Training on long sequences: the network is position-wise, so it
        # runs over chunks of positions, each chunk rematerialized. The
        # backward pass then holds one chunk's branch activations at a time,
        # not the whole sequence's (b2l at 2048 tokens: 134 MB per
        # activation; XLA's peak temporary memory 2.30 -> 1.30 GB), at the
        # cost of one more forward pass of this network.
        return position_chunks(self._geglu, [x], chunk)

    def _geglu(self, x):
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
