"""Gemma attention: multi-query, grouped-query or multi-head, with a KV cache."""

import math

import keras
from keras import ops

from keras_gemma import backend
from keras_gemma.layers.feed_forward import position_chunks
from keras_gemma.layers.feed_forward import training_chunk_length
from keras_gemma.layers.projection import einsum_projection
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.layers.rotary_embedding import RotaryEmbedding

# Added to masked attention logits (in float32). Finite, so a row with every
# key masked (a padding query) gives a uniform softmax instead of NaN.
_MASKED_LOGIT = -1e30


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaAttention(keras.layers.Layer):
    """Causal self-attention with rotary embeddings and a preallocated cache.

    `num_query_heads` query heads share `num_key_value_heads` key/value heads
    in groups: 1 key/value head is multi-query attention (Gemma 2B), as many
    as query heads is multi-head attention (Gemma 7B), anything between is
    grouped-query attention. Queries are scaled by
    `1 / sqrt(query_pre_attn_scalar)`, which defaults to `head_dim` (Gemma 7B
    has 16 x 256 != 3072, so the width per head is not `hidden / heads`).

    Gemma 2 and 3 options: `logit_soft_cap` squashes attention logits with
    `cap * tanh(logits / cap)`; `use_query_key_norm` applies an RMSNorm over
    `head_dim` to queries and keys before RoPE. Sliding-window (local)
    attention is a property of the mask the caller passes in.

    Args:
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads; must divide
            `num_query_heads`.
        head_dim: int. Width of every head.
        query_pre_attn_scalar: float or None. Queries are multiplied by
            `query_pre_attn_scalar ** -0.5`; `None` means `head_dim`.
        rope_max_wavelength: float. RoPE base.
        rope_scaling_factor: float. Linear RoPE scaling: positions are divided
            by it (1.0: none).
        logit_soft_cap: float or None. Soft cap of the attention logits.
        use_query_key_norm: bool. RMSNorm on queries and keys (Gemma 3).
        layer_norm_epsilon: float. Epsilon of those norms.
        kernel_initializer: initializer for the four projections.
        **kwargs: passed to `keras.layers.Layer`.

    Call arguments:
        x: `(batch, seq, hidden_dim)` inputs (already normalized).
        attention_mask: bool `(batch, seq, key_len)`, True where a query may
            attend to a key (see `causal_attention_mask`). Without a cache
            `key_len == seq`; with a cache, attention covers the first
            `key_len` cached positions (the whole cache when decoding; just
            the new positions when prefilling from position 0). Default:
            causal over everything, no padding, no window.
        cache: optional `(batch, 2, cache_len, num_key_value_heads, head_dim)`
            keys and values of earlier positions. When given, the new keys and
            values are written at `cache_update_index` and the updated cache is
            returned alongside the output.
        cache_update_index: int or scalar tensor, position of `x[:, 0]`.

    Example:
    ```python
    import numpy as np
    attention = keras_gemma.layers.GemmaAttention(
        num_query_heads=4, num_key_value_heads=1, head_dim=8
    )
    x = np.random.rand(2, 5, 16).astype("float32")
    y = attention(x)  # causal: (2, 5, 16)
    padding_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = keras_gemma.layers.causal_attention_mask(2, 5, 5, 0, padding_mask)
    y = attention(x, attention_mask=mask)
    ```
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar=None,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        logit_soft_cap=None,
        use_query_key_norm=False,
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.logit_soft_cap = logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        policy = self.dtype_policy

        def projection(equation, output_shape, name):
            return einsum_projection(
                equation, output_shape, self.kernel_initializer, policy, name
            )

        heads, kv_heads, head_dim = (
            self.num_query_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        # Kernels are laid out (inputs, outputs), contracted dimensions first:
        # XLA then runs the one-token decoding products as plain matrix-vector
        # products; with keras-hub's (heads, hidden, head_dim) it copies and
        # transposes the query kernel on every step (4x slower attention).
        # kernel (hidden, heads, head_dim): (batch, seq, hidden) -> (batch, seq, heads, head_dim)
        self.query_dense = projection("btd,dnh->btnh", (None, heads, head_dim), "query")
        self.key_dense = projection("bsd,dkh->bskh", (None, kv_heads, head_dim), "key")
        self.value_dense = projection("bsd,dkh->bskh", (None, kv_heads, head_dim), "value")
        # kernel (heads, head_dim, hidden): (batch, seq, heads, head_dim) -> (batch, seq, hidden)
        self.output_dense = projection("btnh,nhd->btd", (None, hidden_dim), "attention_output")
        self.query_dense.build(input_shape)
        self.key_dense.build(input_shape)
        self.value_dense.build(input_shape)
        self.output_dense.build((None, None, heads, head_dim))
        self.rope = RotaryEmbedding(
            max_wavelength=self.rope_max_wavelength,
            scaling_factor=self.rope_scaling_factor,
            dtype=policy,
            name="rope",
        )
        self.rope.build((None, None, heads, head_dim))  # no weights; quantize() needs it built
        self.query_norm = self.key_norm = None
        if self.use_query_key_norm:
            self.query_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=policy, name="query_norm"
            )
            self.key_norm = RMSNormalization(
                self.layer_norm_epsilon, dtype=policy, name="key_norm"
            )
            self.query_norm.build((None, None, heads, head_dim))
            self.key_norm.build((None, None, kv_heads, head_dim))

    def call(self, x, attention_mask=None, cache=None, cache_update_index=0, training=None):
        if attention_mask is None:
            key_len = ops.shape(x)[1] if cache is None else ops.shape(cache)[2]
            attention_mask = causal_attention_mask(
                ops.shape(x)[0], ops.shape(x)[1], key_len, cache_update_index
            )
        query = self.query_dense(x)  # (b, t, N, h)
        if self.use_query_key_norm:
            query = self.query_norm(query)
        query = self.rope(query, start_index=cache_update_index)
        key, value = self._keys_and_values(x, cache_update_index)
        if cache is not None:
            update = ops.stack([key, value], axis=1)  # (b, 2, t, K, h)
            cache = backend.write_cache(cache, update, cache_update_index)
            # Attend to as many cached positions as the mask is wide: all of
            # them when decoding, only the new ones in a prefill from 0.
            key_len = attention_mask.shape[-1]
            key, value = cache[:, 0, :key_len], cache[:, 1, :key_len]  # (b, s, K, h)
        length = query.shape[1]
        chunk = training_chunk_length(self.num_query_heads * (key.shape[1] or 1))
        if training and cache is None and length is not None and length > chunk:
            # Training on long sequences: queries in chunks, in a loop, each
            # rematerialized, so the backward pass holds one chunk's
            # (heads, chunk, keys) logits and probabilities at a time instead
            # of the whole (heads, seq, seq) (b2l at 2048 tokens: 134 MB each).
            # The mask travels as float32: the rematerialized function takes
            # differentiable-typed inputs on every backend.
            attended = position_chunks(
                lambda q, m, k, v: self._attend(q, k, v, m > 0.5),
                [query, ops.cast(attention_mask, "float32")],
                chunk,
                shared=(key, value),
            )
        else:
            attended = self._attend(query, key, value, attention_mask)
        output = self.output_dense(attended)
        if cache is not None:
            return output, cache
        return output

    def fill_cache(self, x, cache, cache_update_index=0):
        """Writes the keys and values of `x` (positions `cache_update_index...`)
        into `cache` and returns it, without attending: all that the last
        layer of a prefill needs."""
        key, value = self._keys_and_values(x, cache_update_index)
        update = ops.stack([key, value], axis=1)  # (b, 2, t, K, h)
        return backend.write_cache(cache, update, cache_update_index)

    def _keys_and_values(self, x, start):
        key = self.key_dense(x)  # (b, t, K, h)
        value = self.value_dense(x)  # (b, t, K, h)
        if self.use_query_key_norm:
            key = self.key_norm(key)
        return self.rope(key, start_index=start), value

    def _attend(self, query, key, value, attention_mask):
        scalar = self.query_pre_attn_scalar or self.head_dim
        query = query * ops.cast(1.0 / math.sqrt(scalar), query.dtype)
        batch, seq = ops.shape(query)[0], ops.shape(query)[1]
        groups = self.num_query_heads // self.num_key_value_heads
        # Query heads n = k * groups + g share key/value head k.
        query = ops.reshape(
            query, (batch, seq, self.num_key_value_heads, groups, self.head_dim)
        )  # (b, t, K, G, h)
        logits = ops.einsum("btkgh,bskh->bkgts", query, key)  # (b, K, G, t, s)
        # float32 softmax: bfloat16 exponentials of large logits overflow.
        logits = ops.cast(logits, "float32")
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.tanh(logits / cap) * cap
        mask = attention_mask[:, None, None, :, :]  # (b, 1, 1, t, s)
        logits = ops.where(mask, logits, _MASKED_LOGIT)
        probs = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
        output = ops.einsum("bkgts,bskh->btkgh", probs, value)  # (b, t, K, G, h)
        return ops.reshape(
            output, (batch, seq, self.num_query_heads, self.head_dim)
        )  # (b, t, N, h)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "logit_soft_cap": self.logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


def causal_attention_mask(
    batch, query_len, key_len, start, padding_mask=None, sliding_window_size=None
):
    """Bool `(batch, query_len, key_len)`: query `i` (at position `start + i`)
    sees key `j` when `j <= start + i`, key `j` is not padding and, with a
    sliding window, `start + i - j < sliding_window_size`."""
    query_positions = ops.arange(query_len, dtype="int32") + ops.cast(start, "int32")  # (t,)
    key_positions = ops.arange(key_len, dtype="int32")  # (s,)
    mask = key_positions[None, :] <= query_positions[:, None]  # (t, s)
    if sliding_window_size is not None:
        in_window = key_positions[None, :] > query_positions[:, None] - sliding_window_size
        mask = ops.logical_and(mask, in_window)  # (t, s)
    mask = ops.broadcast_to(mask[None], (batch, query_len, key_len))
    if padding_mask is not None:
        mask = ops.logical_and(mask, ops.cast(padding_mask, "bool")[:, None, :])
    return mask
