"""The rules of `GemmaBackbone`'s options: keras-hub's spelling of them,
and an error for any option that is unknown or would have no effect."""

LAYER_TYPES = ("full_attention", "sliding_attention")
# keras-hub's GemmaBackbone: its window when `use_sliding_window_attention`
# is given without `sliding_window_size`.
_KERAS_HUB_SLIDING_WINDOW = 4096
# Keyword arguments of keras.Model that a backbone (or its saved config) may carry.
_MODEL_KWARGS = ("name", "trainable")


def check_unknown(kwargs):
    """A `TypeError` naming any keyword argument the backbone does not take."""
    unknown = sorted(set(kwargs) - set(_MODEL_KWARGS))
    if unknown:
        raise TypeError(
            f"GemmaBackbone got unexpected keyword argument(s) {unknown}; it takes "
            "keras_hub.models.GemmaBackbone's arguments and the Gemma 2/3 options "
            "in its docstring."
        )


def resolve_layer_types(num_layers, layer_types, use_sliding_window_attention, sliding_window_size):
    """`(layer_types, sliding_window_size)` from ours or keras-hub's spelling."""
    if use_sliding_window_attention is not None:  # keras-hub's spelling
        if layer_types is not None:
            raise ValueError(
                "Give either use_sliding_window_attention (keras-hub's spelling) "
                "or layer_types, not both."
            )
        if not use_sliding_window_attention:
            return ["full_attention"] * num_layers, None  # keras-hub's configs carry a size
        # As keras-hub: every other layer slides, from the first.
        layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
        sliding_window_size = sliding_window_size or _KERAS_HUB_SLIDING_WINDOW
    layer_types = list(layer_types or ["full_attention"] * num_layers)
    if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ValueError(
            f"layer_types must list {num_layers} entries, each one of "
            f"{LAYER_TYPES}; got {layer_types}."
        )
    return layer_types, sliding_window_size


def check_options(
    hidden_dim,
    num_query_heads,
    num_key_value_heads,
    layer_types,
    sliding_window_size,
    local_rope_max_wavelength,
    rope_scaling_factor,
    query_pre_attn_scalar,
    query_head_dim_normalize,
    dropout,
):
    """A `ValueError` naming any option that is invalid or would be ignored."""
    if num_query_heads % num_key_value_heads:
        raise ValueError(
            f"num_query_heads ({num_query_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})."
        )
    if "sliding_attention" in layer_types:
        if not (isinstance(sliding_window_size, int) and sliding_window_size > 0):
            raise ValueError(
                "layer_types has sliding_attention layers: set sliding_window_size "
                f"(a positive int); got {sliding_window_size!r}."
            )
    else:
        for name, value in (
            ("sliding_window_size", sliding_window_size),
            ("local_rope_max_wavelength", local_rope_max_wavelength),
        ):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} would have no effect: no layer is a "
                    "sliding_attention layer (set layer_types, or "
                    "use_sliding_window_attention=True)."
                )
    if "full_attention" not in layer_types and rope_scaling_factor != 1.0:
        raise ValueError(
            f"rope_scaling_factor={rope_scaling_factor!r} would have no effect: it "
            "scales the full_attention layers, and there is none."
        )
    if (
        query_pre_attn_scalar is not None
        and not query_head_dim_normalize
        and query_pre_attn_scalar != hidden_dim / num_query_heads
    ):
        raise ValueError(
            "query_head_dim_normalize=False would have no effect: "
            f"query_pre_attn_scalar={query_pre_attn_scalar!r} sets the query scale "
            f"(False means hidden_dim / num_query_heads = {hidden_dim / num_query_heads})."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}.")
