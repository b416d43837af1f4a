"""A GGUF file's metadata, as the Transformers-style config of the same model.

`transformers_config(gguf_file)` gives the dict a Hugging Face `config.json` of the
model would hold (`model_type` `gemma`, `gemma2` or `gemma3_text`); keras_gemma then
reads it as it reads any Transformers config
(`transformers_config.backbone_config_from_transformers`), so the rules that are not
stored in the file (which layers slide, RoPE per layer type) are applied in one place.
What llama.cpp assumes where the file is silent is written into the dict here, with
llama.cpp's defaults:

- the query scale: `{arch}.attention.scale` is the factor llama.cpp multiplies the
  queries by (`1 / sqrt(query_pre_attn_scalar)`). Its converter does not write it for
  Gemma: llama.cpp then scales by `head_dim`, except for the 27B models, which it
  recognises by their layer count and scales by `hidden / heads`. Here a file without
  the field takes the `query_pre_attn_scalar` of the released architecture of
  `keras_gemma.presets` with the same shape, and `head_dim` if none has it.
- Gemma 2's soft caps (50 on attention logits, 30 on final logits) where absent;
- Gemma 3's local RoPE base, 10000, unless `{arch}.rope.freq_base_swa` says otherwise.
"""

import numpy as np

from keras_gemma import presets

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
# llama.cpp's defaults for what a Gemma file may leave out.
_DEFAULT_ROPE_BASE = 10000.0
_GEMMA2_SOFT_CAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
# The fields of a backbone config that fix the shape of every weight but the embedding.
_SHAPE = ("num_layers", "hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim", "intermediate_dim")
_MISSING = object()


def architecture(gguf_file):
    """`general.architecture`, which must be one keras_gemma reads."""
    arch = gguf_file.metadata.get("general.architecture")
    if arch is None:
        raise ValueError(f"{gguf_file.path} lacks the GGUF metadata field 'general.architecture'.")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_file.path} holds a {arch!r} model; keras_gemma reads GGUF "
            f"architectures {', '.join(map(repr, SUPPORTED_ARCHITECTURES))}."
        )
    return arch


def transformers_config(gguf_file):
    """The Transformers-style config dict of the Gemma model in `gguf_file` (a
    `GGUFFile`: `path`, `metadata`, `tensors`)."""
    arch = architecture(gguf_file)
    path = gguf_file.path

    def get(key, default=_MISSING):
        full_key = f"{arch}.{key}"
        if full_key not in gguf_file.metadata:
            if default is _MISSING:
                raise ValueError(f"{path} lacks the GGUF metadata field {full_key!r}.")
            return default
        return _decimal(gguf_file.metadata[full_key])

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    config = {
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": _vocabulary_size(gguf_file),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "hidden_activation": "gelu_pytorch_tanh",
    }
    rope = {"rope_type": "default", "rope_theta": get("rope.freq_base", _DEFAULT_ROPE_BASE)}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=get("rope.scaling.factor"))
    elif scaling != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (none or linear).")
    if arch == "gemma":
        return {**config, "rope_parameters": rope}

    config["query_pre_attn_scalar"] = _query_pre_attn_scalar(get("attention.scale", None), config)
    config["sliding_window"] = get("attention.sliding_window", None) or None
    pattern = get("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # one flag per layer: true for a sliding one
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern is not None:
        config["sliding_window_pattern"] = int(pattern)
    if arch == "gemma2":
        for key, default in _GEMMA2_SOFT_CAPS.items():
            config[key] = get(key, default) or None
        return {**config, "rope_parameters": rope}
    config["final_logit_softcapping"] = get("final_logit_softcapping", None) or None
    local = {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)}
    return {**config, "rope_parameters": {"full_attention": rope, "sliding_attention": local}}


def _vocabulary_size(gguf_file):
    """The number of tokens: the vocabulary's, or the embedding's rows."""
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    embedding = next((t for t in gguf_file.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{gguf_file.path} lacks the tensor 'token_embd.weight'.")
    return int(embedding.shape[1])  # ggml order: (hidden, vocabulary)


def _query_pre_attn_scalar(scale, config):
    """`query_pre_attn_scalar` from the file's query scale, else from the
    released architecture of the same shape, else `head_dim`."""
    if scale:
        return 1.0 / scale**2
    shape = {
        "num_layers": config["num_hidden_layers"],
        "hidden_dim": config["hidden_size"],
        "num_query_heads": config["num_attention_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "intermediate_dim": 2 * config["intermediate_size"],
    }
    for released in presets.PRESETS.values():
        if "query_pre_attn_scalar" in released and all(released[k] == shape[k] for k in _SHAPE):
            return released["query_pre_attn_scalar"]
    return config["head_dim"]


def _decimal(value):
    """A metadata value, floats as the shortest decimal that GGUF's float32
    rounds to (`1e-06`, not `9.99999997e-07`): the value that was written."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value
