"""One Gemma transformer layer: norm, attention, residual, norm, GeGLU, residual."""

import keras
from keras import ops

from keras_gemma.layers.attention import GemmaAttention
from keras_gemma.layers.attention import causal_attention_mask
from keras_gemma.layers.feed_forward import GemmaFeedForward
from keras_gemma.layers.rms_normalization import RMSNormalization


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaDecoderBlock(keras.layers.Layer):
    """A pre-norm decoder layer, with the paper's post-norms as an option.

    `x + attention(norm(x))`, then `x + feed_forward(norm(x))`. The released
    Gemma 1 checkpoints normalize only the inputs of the two sub-layers; the
    paper also normalizes their outputs, which `use_post_attention_norm` and
    `use_post_ffw_norm` switch on (Gemma 2 and 3 use both).

    A block with `sliding_window_size` attends only to the last
    `sliding_window_size` positions (local attention); without it, to all
    earlier positions (global attention).

    Args:
        hidden_dim: int. Model width.
        intermediate_dim: int. Feed-forward width, gate and up together.
        num_query_heads: int. Query heads.
        num_key_value_heads: int. Key/value heads.
        head_dim: int. Width of each head.
        query_pre_attn_scalar: float or None. Queries are scaled by its
            inverse square root; `None` means `head_dim`.
        use_post_attention_norm: bool. Normalize the attention output.
        use_post_ffw_norm: bool. Normalize the feed-forward output.
        layer_norm_epsilon: float. Epsilon of every RMSNorm.
        rope_max_wavelength: float. RoPE base.
        rope_scaling_factor: float. Linear RoPE scaling factor (1.0: none).
        sliding_window_size: int or None. Local attention window, or None for
            global attention.
        attention_logit_soft_cap: float or None. Soft cap of the attention
            logits (Gemma 2).
        use_query_key_norm: bool. RMSNorm on queries and keys (Gemma 3).
        dropout: float. Dropout on both residual branches during training.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    ```python
    import numpy as np
    block = keras_gemma.layers.GemmaDecoderBlock(
        hidden_dim=16, intermediate_dim=64, num_query_heads=4,
        num_key_value_heads=1, head_dim=8,
    )
    x = np.random.rand(2, 5, 16).astype("float32")
    padding_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    block(x, padding_mask=padding_mask)  # (2, 5, 16)
    ```
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar=None,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        rope_scaling_factor=1.0,
        sliding_window_size=None,
        attention_logit_soft_cap=None,
        use_query_key_norm=False,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.sliding_window_size = sliding_window_size
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.dropout = dropout

        def norm(name):
            return RMSNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = GemmaAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            logit_soft_cap=attention_logit_soft_cap,
            use_query_key_norm=use_query_key_norm,
            layer_norm_epsilon=layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.post_attention_norm = (
            norm("post_attention_norm") if use_post_attention_norm else None
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.feed_forward = GemmaFeedForward(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            dtype=self.dtype_policy,
            name="feed_forward",
        )
        self.post_ffw_norm = norm("post_ffw_norm") if use_post_ffw_norm else None
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.feed_forward,
            self.post_ffw_norm,
        ):
            if layer is not None:
                layer.build(input_shape)

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        attention_mask=None,
        training=None,
    ):
        """`x` `(batch, seq, hidden)`; `padding_mask` `(batch, seq)`, 1 on real
        tokens. With `cache`, `x` holds positions `cache_update_index...` and
        `(x, cache)` is returned; attention is then causal over the cache.
        `attention_mask` `(batch, seq, key_len)` replaces the mask the block
        would build (callers running many blocks build it once per window)."""
        if attention_mask is None:
            key_len = ops.shape(x)[1] if cache is None else ops.shape(cache)[2]
            attention_mask = causal_attention_mask(
                ops.shape(x)[0],
                ops.shape(x)[1],
                key_len,
                cache_update_index,
                padding_mask,
                self.sliding_window_size,
            )
        h = self.pre_attention_norm(x)
        if cache is not None:
            h, cache = self.attention(
                h,
                attention_mask=attention_mask,
                cache=cache,
                cache_update_index=cache_update_index,
            )
        else:
            h = self.attention(h, attention_mask=attention_mask)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + self.dropout_layer(h, training=training)  # (b, t, d)

        h = self.feed_forward(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h)
        x = x + self.dropout_layer(h, training=training)  # (b, t, d)
        if cache is not None:
            return x, cache
        return x

    def fill_cache(self, x, cache, cache_update_index=0):
        """Writes this block's keys and values of `x` into `cache` and returns
        it, computing nothing else (the last block of a prefill: its output
        would be thrown away)."""
        return self.attention.fill_cache(self.pre_attention_norm(x), cache, cache_update_index)

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Inside a `keras.RematScope` that selects this block, training
        recomputes the block's activations in the backward pass. Keras would
        trace every argument of `call`; only `x` and the masks are traced
        here (as float32: every backend's rematerialization takes
        differentiable-typed inputs), and the flags (`training`, a Python
        cache index, `None`s) stay Python values."""
        if super().rematerialized_call(layer_call, *args, **kwargs) is layer_call:
            return layer_call

        def call(x, **kwargs):
            names = [
                name for name in ("padding_mask", "attention_mask") if kwargs.get(name) is not None
            ]
            masks = [ops.cast(kwargs.pop(name), "float32") for name in names]

            def block(x, *masks):
                restored = {name: mask > 0.5 for name, mask in zip(names, masks)}
                return layer_call(x, **restored, **kwargs)

            return keras.remat(block)(x, *masks)

        return call

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "sliding_window_size": self.sliding_window_size,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "dropout": self.dropout,
            }
        )
        return config

