"""The Gemma decoder: embedding, decoder blocks, final norm."""

import math

import keras
from keras import ops
from keras_hub.models import Backbone

from keras_gemma.layers.attention import causal_attention_mask
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.models import lora

LAYER_TYPES = ("full_attention", "sliding_attention")


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(Backbone):
    """Gemma core network: token ids in, final hidden states out.

    Token embeddings are multiplied by `sqrt(hidden_dim)` (cast to the compute
    dtype, as the released checkpoints expect), run through `num_layers`
    `GemmaDecoderBlock`s and a final RMSNorm. The output projection to the
    vocabulary is the embedding matrix itself (`token_embedding(x,
    reverse=True)`), which `GemmaCausalLM` applies.

    The constructor arguments match `keras_hub.models.GemmaBackbone`, so a
    keras-hub user can switch by changing the import. The defaults are Gemma
    1; Gemma 2 and Gemma 3 text models are the same network with options
    switched on (post-norms, soft caps, local attention on the layers that
    `layer_types` names, query/key norms, a RoPE base per attention type).

    Args:
        vocabulary_size: int. Size of the token vocabulary.
        num_layers: int. Number of decoder blocks.
        num_query_heads: int. Query heads per block.
        num_key_value_heads: int. Key/value heads per block (1: multi-query,
            `num_query_heads`: multi-head, between: grouped-query).
        hidden_dim: int. Model width.
        intermediate_dim: int. Feed-forward width, gate and up branches
            together (Table 1 of the Gemma paper: 32768 for 2B).
        head_dim: int. Width of each attention head.
        query_head_dim_normalize: bool. Scale queries by `head_dim ** -0.5`
            (True, as Gemma does) or by `(hidden_dim / num_query_heads) ** -0.5`.
        query_pre_attn_scalar: float or None. If given, queries are scaled by
            `query_pre_attn_scalar ** -0.5` instead (transformers' name; Gemma
            2 27B uses `hidden_dim / num_query_heads`).
        use_post_attention_norm: bool. The paper's RMSNorm on each attention
            output. Off by default: the released checkpoints have none.
        use_post_ffw_norm: bool. The same for each feed-forward output.
        layer_norm_epsilon: float. Epsilon of every RMSNorm.
        rope_max_wavelength: float. RoPE base of global layers (10000 in Gemma
            1 and 2, 1e6 in Gemma 3).
        local_rope_max_wavelength: float or None. RoPE base of sliding-window
            layers (10000 in Gemma 3); None means `rope_max_wavelength`.
        rope_scaling_factor: float. Linear RoPE scaling of global layers
            (positions divided by it; 8 in the larger Gemma 3 models).
        attention_logit_soft_cap: float or None. `cap * tanh(logits / cap)` on
            attention logits (50 in Gemma 2).
        final_logit_soft_cap: float or None. The same on output logits (30 in
            Gemma 2).
        use_query_key_norm: bool. RMSNorm on queries and keys (Gemma 3).
        sliding_window_size: int or None. Window of local attention layers.
        layer_types: list of `"full_attention"` / `"sliding_attention"`, one
            per layer (as transformers' `layer_types`); None means all global.
        dropout: float. Dropout on the residual branches during training.
        dtype: dtype or `keras.DTypePolicy` for weights and computation, for
            example `"bfloat16"` or `"mixed_bfloat16"`. Norms, softmax and
            RoPE angles run in float32 regardless.

    Example:
    ```python
    import numpy as np
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=1000, num_layers=2, num_query_heads=4,
        num_key_value_heads=1, hidden_dim=64, intermediate_dim=256,
        head_dim=16,
    )
    inputs = {
        "token_ids": np.array([[2, 17, 42, 9, 0]]),
        "padding_mask": np.array([[1, 1, 1, 1, 0]]),
    }
    backbone(inputs)  # (1, 5, 64)
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_head_dim_normalize=True,
        query_pre_attn_scalar=None,
        use_post_attention_norm=False,
        use_post_ffw_norm=False,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000.0,
        local_rope_max_wavelength=None,
        rope_scaling_factor=1.0,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_query_key_norm=False,
        sliding_window_size=None,
        layer_types=None,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        layer_types = list(layer_types or ["full_attention"] * num_layers)
        if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
            raise ValueError(
                f"layer_types must list {num_layers} entries, each one of "
                f"{LAYER_TYPES}; got {layer_types}."
            )
        if "sliding_attention" in layer_types and not sliding_window_size:
            raise ValueError("layer_types has sliding_attention layers: set sliding_window_size.")
        # === Layers ===
        self.token_embedding = keras.layers.ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
            dtype=dtype,
            name="token_embedding",
        )
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = (
                head_dim if query_head_dim_normalize else hidden_dim / num_query_heads
            )

        def attention_options(layer_type):
            if layer_type == "sliding_attention":
                return {
                    "sliding_window_size": sliding_window_size,
                    "rope_max_wavelength": local_rope_max_wavelength or rope_max_wavelength,
                }
            return {
                "rope_max_wavelength": rope_max_wavelength,
                "rope_scaling_factor": rope_scaling_factor,
            }

        self.transformer_layers = [
            GemmaDecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                use_post_attention_norm=use_post_attention_norm,
                use_post_ffw_norm=use_post_ffw_norm,
                layer_norm_epsilon=layer_norm_epsilon,
                attention_logit_soft_cap=attention_logit_soft_cap,
                use_query_key_norm=use_query_key_norm,
                dropout=dropout,
                dtype=dtype,
                name=f"decoder_block_{i}",
                **attention_options(layer_type),
            )
            for i, layer_type in enumerate(layer_types)
        ]
        self.layer_norm = RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization"
        )

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embed(token_ids)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.query_head_dim_normalize = query_head_dim_normalize
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.use_post_attention_norm = use_post_attention_norm
        self.use_post_ffw_norm = use_post_ffw_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.local_rope_max_wavelength = local_rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.use_query_key_norm = use_query_key_norm
        self.sliding_window_size = sliding_window_size
        self.layer_types = layer_types
        self.dropout = dropout

    def default_lora_layer_names(self):
        """LoRA targets of `enable_lora()` by default: query and value."""
        return list(lora.DEFAULT_LORA_TARGETS)

    def enable_lora(self, rank, alpha=None, target_layer_names=None):
        """Freezes the backbone and adds trainable LoRA adapters.

        Each target projection learns a rank-`rank` update of its frozen
        kernel, scaled by `alpha / rank` (Keras' `EinsumDense.enable_lora`).

        Args:
            rank: int. Rank of every adapter.
            alpha: float or None. Scale numerator; `None` means `rank`
                (scale 1).
            target_layer_names: names of the projections to adapt, among
                "query", "key", "value", "attention_output", "ffw_gating",
                "ffw_gating_2" and "ffw_linear"; default query and value.

        Example:
        ```python
        backbone.enable_lora(4, alpha=8, target_layer_names=["query", "value", "ffw_linear"])
        ```
        """
        lora.enable_lora(self, rank, alpha=alpha, target_layer_names=target_layer_names)

    def save_lora_weights(self, filepath):
        """Writes the adapters (with rank, alpha and targets) to a
        safetensors file, for example `"adapter.lora.safetensors"`."""
        lora.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Loads adapters written by `save_lora_weights`, under any backend.
        Enables LoRA with the file's rank, alpha and targets if it is not
        enabled; otherwise they must match. Any mismatch is an error and
        nothing is assigned."""
        lora.load_lora_weights(self, filepath)

    def merge_lora_weights(self):
        """Adds each adapter into its kernel (`kernel + alpha / rank * a @ b`)
        and removes the adapters: the backbone is then a plain one, for export
        or faster inference."""
        lora.merge_lora_weights(self)

    def embed(self, token_ids):
        """Token embeddings times `sqrt(hidden_dim)` in the compute dtype."""
        x = self.token_embedding(token_ids)  # (b, t, d)
        return x * ops.cast(math.sqrt(self.token_embedding.output_dim), x.dtype)

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Runs `token_ids` at positions `cache_update_index...` over a cache.

        Args:
            token_ids: int `(batch, seq)`.
            cache: a tuple with one `(batch, 2, cache_len, num_key_value_heads,
                head_dim)` tensor per layer (see `init_cache`).
            cache_update_index: int or scalar tensor, the position of
                `token_ids[:, 0]`.

        Returns:
            `(hidden_states, cache)`: final-normed `(batch, seq, hidden_dim)`
            and the cache with these positions written. On PyTorch, outside
            autograd, the cache tensors are written in place.
        """
        batch, seq = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        masks = self._attention_masks(batch, seq, ops.shape(cache[0])[2], cache_update_index)
        x = self.embed(token_ids)
        new_cache = []
        for block, layer_cache in zip(self.transformer_layers, cache):
            x, layer_cache = block(
                x,
                cache=layer_cache,
                cache_update_index=cache_update_index,
                attention_mask=masks[block.sliding_window_size],
            )
            new_cache.append(layer_cache)
        return self.layer_norm(x), tuple(new_cache)

    def prefill(self, token_ids, cache):
        """Writes the keys and values of `token_ids` at positions `0...` into
        `cache` in one pass, computing only what the cache needs.

        Attention covers just these positions (not the whole preallocated
        cache), and the last block stops after its keys and values: its
        feed-forward, the final norm and the logits would be thrown away.
        Positions after a row's padding hold keys of padding tokens; decoding
        overwrites them before any query can see them.

        Args:
            token_ids: int `(batch, seq)`, `seq <= cache_len`.
            cache: the tuple of `init_cache`.

        Returns:
            The cache with positions `0...seq - 1` written.
        """
        batch, seq = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        masks = self._attention_masks(batch, seq, seq, 0)
        x = self.embed(token_ids)
        new_cache = []
        last = len(self.transformer_layers) - 1
        for i, (block, layer_cache) in enumerate(zip(self.transformer_layers, cache)):
            mask = masks[block.sliding_window_size]
            if i < last:
                x, layer_cache = block(
                    x, cache=layer_cache, cache_update_index=0, attention_mask=mask
                )
            else:
                h = block.pre_attention_norm(x)
                _, layer_cache = block.attention(
                    h, attention_mask=mask, cache=layer_cache, cache_update_index=0
                )
            new_cache.append(layer_cache)
        return tuple(new_cache)

    def _attention_masks(self, batch, query_len, key_len, start):
        """The causal mask of each attention window in use, built once for
        all blocks: `{None: global, sliding_window_size: local}`."""
        return {
            window: causal_attention_mask(batch, query_len, key_len, start, None, window)
            for window in {block.sliding_window_size for block in self.transformer_layers}
        }

    def init_cache(self, batch_size, cache_len):
        """A zeroed key/value cache: one tensor per layer, preallocated to
        `cache_len` positions so every decoding step has the same shapes."""
        shape = (batch_size, 2, cache_len, self.num_key_value_heads, self.head_dim)
        return tuple(
            ops.zeros(shape, dtype=self.compute_dtype) for _ in range(self.num_layers)
        )

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a preset, loading its weights.

        Args:
            preset: a directory written by `save_to_preset`, a local Hugging
                Face Transformers directory (`config.json`, `*.safetensors`),
                or a name in `keras_gemma.presets.PRESETS` (architecture only:
                use `load_weights=False`).
            load_weights: bool. Load the weights (True) or keep random ones.
            **kwargs: constructor overrides, for example `dtype="bfloat16"`.

        Example:
        ```python
        backbone = keras_gemma.GemmaBackbone.from_preset("path/to/gemma-2b")
        random_2b = keras_gemma.GemmaBackbone.from_preset(
            "gemma_2b_en", load_weights=False
        )
        ```
        """
        from keras_gemma import convert

        return convert.from_preset(cls, preset, super().from_preset, load_weights=load_weights, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "head_dim": self.head_dim,
                "query_head_dim_normalize": self.query_head_dim_normalize,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "use_post_attention_norm": self.use_post_attention_norm,
                "use_post_ffw_norm": self.use_post_ffw_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "local_rope_max_wavelength": self.local_rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "attention_logit_soft_cap": self.attention_logit_soft_cap,
                "final_logit_soft_cap": self.final_logit_soft_cap,
                "use_query_key_norm": self.use_query_key_norm,
                "sliding_window_size": self.sliding_window_size,
                "layer_types": self.layer_types,
                "dropout": self.dropout,
            }
        )
        return config
