"""The Gemma decoder: embedding, decoder blocks, final norm."""

import contextlib
import gc
import math

import keras
from keras import ops
from keras_hub.models import Backbone

from keras_gemma import distribution
from keras_gemma.layers.attention import causal_attention_mask
from keras_gemma.layers.decoder_block import GemmaDecoderBlock
from keras_gemma.layers.projection import tied_logits
from keras_gemma.layers.rms_normalization import RMSNormalization
from keras_gemma.models import lora
from keras_gemma.models.backbone_options import check_options
from keras_gemma.models.backbone_options import check_unknown
from keras_gemma.models.backbone_options import resolve_layer_types

# The constructor arguments `get_config` writes (besides keras.Model's).
_CONFIG = (
    "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
    "hidden_dim", "intermediate_dim", "head_dim", "query_head_dim_normalize",
    "query_pre_attn_scalar", "use_post_attention_norm", "use_post_ffw_norm",
    "layer_norm_epsilon", "rope_max_wavelength", "local_rope_max_wavelength",
    "rope_scaling_factor", "attention_logit_soft_cap", "final_logit_soft_cap",
    "use_query_key_norm", "sliding_window_size", "layer_types", "dropout",
)


@contextlib.contextmanager
def collections_frozen():
    """For `quantize`: Keras runs a full garbage collection for each kernel
    it replaces (`Layer.__delattr__`), about 0.3 s each once TensorFlow and
    JAX are imported. The kernels it replaces are freed by reference counting
    (tests/models/test_gemma_causal_lm.py checks it), so those collections
    free nothing of theirs; with the objects that existed before frozen they
    scan only what quantizing creates, and one collection follows."""
    if gc.get_freeze_count():  # the caller froze objects: leave their choice alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaBackbone(Backbone):
    """Gemma core network: token ids in, final hidden states out.

    Token embeddings are multiplied by `sqrt(hidden_dim)` (cast to the compute
    dtype, as the released checkpoints expect), run through `num_layers`
    `GemmaDecoderBlock`s and a final RMSNorm. The output projection to the
    vocabulary is the embedding matrix itself (`logits(hidden_states)`), which
    `GemmaCausalLM` applies.

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
            2 27B uses `hidden_dim / num_query_heads`); then
            `query_head_dim_normalize=False` is an error (it would be ignored).
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
        sliding_window_size: int or None. Window of local attention layers
            (a query sees the `sliding_window_size` positions up to itself).
        layer_types: list of `"full_attention"` / `"sliding_attention"`, one
            per layer (as transformers' `layer_types`); None means all global.
        use_sliding_window_attention: bool or None. keras-hub's spelling for
            Gemma 2: True makes every other layer, from the first, a sliding
            one (window `sliding_window_size`, default 4096, as keras-hub);
            with False, `sliding_window_size` is unused, as in keras-hub.
            Give this or `layer_types`, not both.
        dropout: float. Dropout on the residual branches during training.
        dtype: dtype or `keras.DTypePolicy` for weights and computation, for
            example `"bfloat16"` or `"mixed_bfloat16"`. Norms, softmax and
            RoPE angles run in float32 regardless.

    An unknown argument is a `TypeError`, and an option that would have no
    effect (a window or local RoPE base without sliding layers, RoPE scaling
    without global layers) a `ValueError`.

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
        use_sliding_window_attention=None,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        check_unknown(kwargs)
        layer_types, sliding_window_size = resolve_layer_types(
            num_layers, layer_types, use_sliding_window_attention, sliding_window_size
        )
        check_options(
            hidden_dim,
            num_query_heads,
            num_key_value_heads,
            layer_types,
            sliding_window_size=sliding_window_size,
            local_rope_max_wavelength=local_rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            query_pre_attn_scalar=query_pre_attn_scalar,
            query_head_dim_normalize=query_head_dim_normalize,
            dropout=dropout,
        )
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
        query_scalar = query_pre_attn_scalar
        if query_scalar is None:
            query_scalar = head_dim if query_head_dim_normalize else hidden_dim / num_query_heads

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
                query_pre_attn_scalar=query_scalar,
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
        outputs = self._run(token_ids, padding_mask)
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
        """Freezes the backbone and adds trainable LoRA adapters of rank
        `rank` to the `target_layer_names` projections (default query and
        value; any of `lora.LORA_TARGETS`), scaled by `alpha / rank` (`alpha`
        defaults to `rank`), with Keras' `EinsumDense.enable_lora`.

        Example:
        ```python
        backbone.enable_lora(4, alpha=8, target_layer_names=["query", "value", "ffw_linear"])
        ```
        """
        lora.enable_lora(self, rank, alpha=alpha, target_layer_names=target_layer_names)

    def save_lora_weights(self, filepath, format=None):
        """Writes the adapters, in the format `filepath` names:

        - `*.lora.h5`: keras-hub's file (its `load_lora_weights` reads it;
          the scale `alpha / rank` is folded into the factors, as keras-hub
          has none);
        - a directory (existing, or `format="peft"`): a PEFT adapter
          (`adapter_config.json`, `adapter_model.safetensors`) for
          transformers' model of this backbone (`export_to_transformers`);
        - any other name: keras_gemma's safetensors file, with rank, alpha
          and targets, for example `"adapter.lora.safetensors"`.

        `format` (`"keras_gemma"`, `"keras_hub"`, `"peft"`) overrides the name.
        """
        lora.save_lora_weights(self, filepath, format)

    def load_lora_weights(self, filepath, format=None):
        """Loads adapters of any format `save_lora_weights` writes (told by
        the name, or `format`), under any backend, enabling LoRA if needed;
        any mismatch is an error and nothing is assigned. A PEFT adapter of
        rank r on `q_proj` is exactly a rank `num_query_heads * r` adapter
        here (Keras' adapters of a per-head kernel have one factor per head),
        so LoRA is enabled with the rank that holds every factor."""
        lora.load_lora_weights(self, filepath, format)

    def merge_lora_weights(self):
        """Adds each adapter into its kernel and removes the adapters."""
        lora.merge_lora_weights(self)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' `load_weights`, which also reads the `.weights.h5` files
        keras-hub's `GemmaBackbone` / `Gemma3Backbone` (or their causal LMs)
        write with `save_weights`: their layout is told from ours by its
        layer names, and converted (every tensor checked first)."""
        from keras_gemma.convert import keras_hub_format

        if not keras_hub_format.load_if_keras_hub_weights(self, filepath, skip_mismatch, kwargs):
            super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def export_to_keras_hub(self, preset_dir, max_shard_size=10):
        """Saves this backbone as a preset of keras-hub's `GemmaBackbone`
        (Gemma 1 and 2) or `Gemma3Backbone`, which keras-hub's own
        `from_preset` loads (see `GemmaCausalLM.export_to_keras_hub`)."""
        from keras_gemma.convert import keras_hub_format

        keras_hub_format.export(self, preset_dir, max_shard_size)

    def export_to_transformers(self, path, max_shard_size="5GB", dtype=None):
        """Saves this backbone as a Hugging Face Transformers checkpoint
        (config and sharded safetensors, no tokenizer; see
        `GemmaCausalLM.export_to_transformers`)."""
        from keras_gemma.convert import transformers_export

        transformers_export.export(self, None, path, max_shard_size, dtype)

    def quantize(self, mode=None, **kwargs):
        """`keras.Model.quantize`, without a full garbage collection per
        kernel (`collections_frozen`)."""
        with collections_frozen():
            super().quantize(mode, **kwargs)

    def embed(self, token_ids):
        """Token embeddings times `sqrt(hidden_dim)` in the compute dtype."""
        x = self.token_embedding(token_ids)  # (b, t, d)
        return x * ops.cast(math.sqrt(self.token_embedding.output_dim), x.dtype)

    def logits(self, hidden_states):
        """Float32 logits `(..., vocabulary_size)` of final hidden states: the
        tied output projection, soft-capped by `final_logit_soft_cap`."""
        return tied_logits(self.token_embedding, hidden_states, self.final_logit_soft_cap)

    def call(self, inputs, training=None, layer_intercept_fn=None):
        """Final hidden states `(batch, seq, hidden_dim)` of
        `{"token_ids", "padding_mask"}`. `layer_intercept_fn(x, i)`, if given,
        replaces the activations after the embedding (`i == -1`) and after
        each block `i` (see `GemmaCausalLM.score`)."""
        return self._run(
            inputs["token_ids"],
            inputs["padding_mask"],
            training=training,
            layer_intercept_fn=layer_intercept_fn,
        )

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
            and the cache with these positions written (outside autograd
            possibly in place: `keras_gemma.backend.write_cache`).
        """
        return self._run(token_ids, cache=cache, start=cache_update_index)

    def prefill(self, token_ids, cache):
        """Writes the keys and values of `token_ids` at positions `0...` into
        `cache` in one pass, computing only what the cache needs.

        Attention covers just these positions (not the whole preallocated
        cache), and the last block stops after its keys and values: its
        attention, feed-forward, the final norm and the logits would be thrown
        away. Positions after a row's padding hold keys of padding tokens;
        decoding overwrites them before any query can see them.

        Args:
            token_ids: int `(batch, seq)`, `seq <= cache_len`.
            cache: the tuple of `init_cache`.

        Returns:
            The cache with positions `0...seq - 1` written.
        """
        return self._run(token_ids, cache=cache, fill_cache_only=True)

    def _run(
        self,
        token_ids,
        padding_mask=None,
        cache=None,
        start=0,
        fill_cache_only=False,
        training=None,
        layer_intercept_fn=None,
    ):
        """The one forward loop: embed, the blocks, the final norm. Without a
        cache it returns the hidden states (symbolic tensors build the
        functional graph); with one, `(hidden_states, cache)`, or just the
        cache for a prefill (`fill_cache_only`)."""
        intercept = layer_intercept_fn or (lambda x, i: x)
        x = intercept(self.embed(token_ids), -1)
        batch, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        key_len = length if cache is None or fill_cache_only else ops.shape(cache[0])[2]
        masks = self._attention_masks(token_ids, batch, length, key_len, start, padding_mask)
        new_cache = []
        last = len(self.transformer_layers) - 1
        for i, block in enumerate(self.transformer_layers):
            mask = masks[block.sliding_window_size]
            # A symbolic graph has no mask yet: each block builds its own.
            masking = {"padding_mask": padding_mask} if mask is None else {"attention_mask": mask}
            if cache is None:
                x = block(x, training=training, **masking)
            elif fill_cache_only and i == last:
                new_cache.append(block.fill_cache(x, cache[i], start))
            else:
                x, layer_cache = block(x, cache=cache[i], cache_update_index=start, **masking)
                new_cache.append(layer_cache)
            x = intercept(x, i)
        if fill_cache_only:
            return tuple(new_cache)
        x = self.layer_norm(x)
        return x if cache is None else (x, tuple(new_cache))

    def _attention_masks(self, token_ids, batch, query_len, key_len, start, padding_mask):
        """The causal mask of each attention window in use, built once for
        all blocks: `{None: global, sliding_window_size: local}` (values None
        while building the symbolic graph)."""
        windows = {block.sliding_window_size for block in self.transformer_layers}
        if isinstance(token_ids, keras.KerasTensor):
            return dict.fromkeys(windows)
        return {
            window: causal_attention_mask(batch, query_len, key_len, start, padding_mask, window)
            for window in windows
        }

    def init_cache(self, batch_size, cache_len):
        """A zeroed key/value cache: one tensor per layer, preallocated to
        `cache_len` positions so every decoding step has the same shapes."""
        shape = (batch_size, 2, cache_len, self.num_key_value_heads, self.head_dim)
        return tuple(
            ops.zeros(shape, dtype=self.compute_dtype) for _ in range(self.num_layers)
        )

    # keras-hub's method; called on the class or on a backbone.
    get_layout_map = distribution.get_layout_map

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a backbone from a preset, loading its weights.

        Args:
            preset: one of keras-hub's Gemma preset names (`"gemma_2b_en"`:
                its Kaggle handle), a `kaggle://` or `hf://` handle (fetched
                with `kagglehub` / `huggingface_hub`, their caches and offline
                modes honoured), a directory written by `save_to_preset`
                (keras_gemma's or keras-hub's, for its Gemma and Gemma 3
                backbones), a Hugging Face Transformers directory
                (`config.json`, `*.safetensors`), an official Flax / orbax
                checkpoint, a `.gguf` file, or a name in
                `keras_gemma.presets.PRESETS` with `load_weights=False` (the
                architecture alone, nothing fetched).
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
        config.update({name: getattr(self, name) for name in _CONFIG})
        return config
