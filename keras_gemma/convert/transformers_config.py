"""A Hugging Face Transformers Gemma config, as `GemmaBackbone` constructor arguments.

The one place where a checkpoint's configuration becomes a keras_gemma architecture:
Transformers directories pass their `config.json`, and the GGUF reader first translates
a file's metadata into the same Transformers-style dict. So the rules that are not
written in every config (which layers slide, how queries scale, which RoPE each layer
type takes) live here once, as transformers applies them.

Transformers configs come in two generations and both are read: the released Gemma 1
ones carry `"hidden_act": "gelu"` (which transformers runs as the tanh approximation)
and `rope_theta`; transformers 5 writes `gelu_pytorch_tanh` and `rope_parameters`.
"""

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
_TANH_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_tanh")
# Without `layer_types`, transformers slides every layer but each `period`-th: Gemma 2
# alternates (period 2); Gemma 3 takes `sliding_window_pattern`, by default 6.
_GEMMA2_PERIOD = 2
_GEMMA3_DEFAULT_PERIOD = 6
# transformers' default RoPE bases where a config names none.
_DEFAULT_ROPE_THETA = {"gemma": 10_000.0, "gemma2": 10_000.0, "gemma3_text": 1_000_000.0}
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0


def text_config(config, source):
    """The decoder's config: `config` itself, or the `text_config` of an
    image-text Gemma 3 (`model_type` `gemma3`)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source} has model_type {model_type!r}; keras_gemma loads "
            f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))}."
        )
    if model_type == "gemma3":
        if "text_config" not in config:
            raise ValueError(f"{source} (gemma3) lacks 'text_config'.")
        return {"model_type": "gemma3_text", **config["text_config"]}
    return config


def backbone_config_from_transformers(config, source):
    """`GemmaBackbone` arguments from a transformers Gemma config dict.

    Args:
        config: the dict of a `config.json` (`model_type` `gemma`, `gemma2`,
            `gemma3_text`, or `gemma3` whose `text_config` is read).
        source: where `config` comes from (a path), named in errors.

    Options a config sets that keras_gemma does not implement are a
    `ValueError` naming `source` and the field, never silently dropped.
    Arguments are given only where they apply: no window or local RoPE base
    without sliding layers, no RoPE scaling factor of 1.
    """
    c = text_config(config, source)
    model_type = c["model_type"]

    def unsupported(key, value, why):
        raise ValueError(f"{source}: {key}={value!r} is not supported ({why}).")

    activation = c.get("hidden_activation") or c.get("hidden_act", "gelu")
    if activation not in _TANH_GELU_NAMES:
        unsupported("hidden_activation", activation, "Gemma uses tanh GELU")
    if c.get("attention_bias", False):
        unsupported("attention_bias", True, "Gemma has no biases")
    if c.get("use_bidirectional_attention"):
        unsupported("use_bidirectional_attention", True, "Gemma is causal")
    if not c.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
        unsupported("tie_word_embeddings", False, "Gemma ties them")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in c:
            raise ValueError(f"{source} lacks {key!r}.")
    num_layers, num_heads = c["num_hidden_layers"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
    args = {
        "vocabulary_size": c["vocab_size"],
        "num_layers": num_layers,
        "num_query_heads": num_heads,
        "num_key_value_heads": c.get("num_key_value_heads") or num_heads,
        "hidden_dim": c["hidden_size"],
        # transformers counts one branch; keras_gemma (like the paper) both.
        "intermediate_dim": 2 * c["intermediate_size"],
        "head_dim": head_dim,
        "layer_norm_epsilon": c.get("rms_norm_eps", 1e-6),
    }
    parameters = c.get("rope_parameters") or {}
    if model_type in ("gemma", "gemma2"):
        global_rope = _rope(c.get("rope_scaling") or parameters, c.get("rope_theta"), model_type, source)
        local_rope = global_rope
    elif "full_attention" in parameters or "sliding_attention" in parameters:
        # transformers 5: one RoPE per attention type.
        local_theta = c.get("rope_local_base_freq", _GEMMA3_LOCAL_ROPE_THETA)
        global_rope = _rope(parameters.get("full_attention"), c.get("rope_theta"), model_type, source)
        local_rope = _rope(parameters.get("sliding_attention"), local_theta, model_type, source)
    else:
        # transformers 4: `rope_theta` (+ `rope_scaling`) global, `rope_local_base_freq` local.
        global_rope = _rope(c.get("rope_scaling") or parameters, c.get("rope_theta"), model_type, source)
        local_rope = {"rope_theta": float(c.get("rope_local_base_freq", _GEMMA3_LOCAL_ROPE_THETA))}
    args["rope_max_wavelength"] = global_rope["rope_theta"]
    if model_type == "gemma":
        return _with_scaling(args, global_rope, ["full_attention"])

    # Gemma 2 and 3: post-norms, local and global layers, a query scalar.
    layer_types = _layer_types(c, model_type, num_layers, source)
    args.update(
        {
            "use_post_attention_norm": True,
            "use_post_ffw_norm": True,
            "query_pre_attn_scalar": c.get("query_pre_attn_scalar", head_dim),
            "layer_types": layer_types,
        }
    )
    for key, name in (("attn_logit_softcapping", "attention_logit_soft_cap"), ("final_logit_softcapping", "final_logit_soft_cap")):
        if c.get(key) is not None:
            args[name] = c[key]
    if model_type == "gemma3_text":
        args["use_query_key_norm"] = True
    if "sliding_attention" in layer_types:
        args["sliding_window_size"] = c["sliding_window"]
        if local_rope.get("factor", 1.0) != 1.0:
            unsupported("rope_parameters", parameters, "scaled RoPE on sliding layers")
        if model_type == "gemma3_text":
            args["local_rope_max_wavelength"] = local_rope["rope_theta"]
    return _with_scaling(args, global_rope, layer_types)


def _layer_types(c, model_type, num_layers, source):
    """Each layer's attention: `layer_types` if the config lists them, else
    transformers' periodic rule; all global without a sliding window."""
    window = c.get("sliding_window")
    if c.get("layer_types"):
        layer_types = list(c["layer_types"])
        if len(layer_types) != num_layers:
            raise ValueError(
                f"{source}: layer_types lists {len(layer_types)} layers, "
                f"num_hidden_layers is {num_layers}."
            )
        if "sliding_attention" in layer_types and not window:
            raise ValueError(f"{source}: layer_types has sliding_attention layers but sliding_window is {window!r}.")
        return layer_types
    if not window:
        # No window: every layer attends to all positions (llama.cpp reads a
        # Gemma 3 GGUF without `sliding_window` so).
        return ["full_attention"] * num_layers
    period = _GEMMA2_PERIOD if model_type == "gemma2" else c.get("sliding_window_pattern", _GEMMA3_DEFAULT_PERIOD)
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"{source}: sliding_window_pattern={period!r} is not a positive int.")
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]


def _rope(parameters, default_theta, model_type, source):
    """A RoPE entry `{"rope_theta", "factor"}`; default or linear RoPE only."""
    parameters = dict(parameters or {})
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"{source}: rope_type={rope_type!r} is not supported "
            "(default and linear RoPE only)."
        )
    theta = parameters.get("rope_theta", default_theta)
    parameters["rope_theta"] = float(_DEFAULT_ROPE_THETA[model_type] if theta is None else theta)
    if rope_type == "default":
        parameters.pop("factor", None)
    return parameters


def _with_scaling(args, global_rope, layer_types):
    """`args` with the global RoPE's linear scaling factor, where it applies."""
    factor = float(global_rope.get("factor", 1.0))
    if factor != 1.0 and "full_attention" in layer_types:
        args["rope_scaling_factor"] = factor
    return args
