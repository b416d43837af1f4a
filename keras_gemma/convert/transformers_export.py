"""Our models written as Hugging Face Transformers checkpoints (`export_to_transformers`).

The inverse of `transformers.py` and `transformers_config.py`: `config.json` for the
`model_type` that expresses the backbone (`gemma`, `gemma2`, `gemma3_text`), the weights
under transformers' names (`weights.weight_map`, each transform inverted) in safetensors
shards with `model.safetensors.index.json` when there is more than one, and, given a
tokenizer, `tokenizer.model` with a `tokenizer_config.json` (Gemma's chat template where
the vocabulary has the turn tokens) and `generation_config.json`.

A backbone no transformers model type computes (soft caps without Gemma 2's post-norms,
a query scaling Gemma 1 cannot express, a local RoPE base in Gemma 2, ...) is an error
before anything is written; so is a quantized or LoRA-enabled model. The files are
written into a new directory beside `path` and moved into place at the end: a failed
export leaves an earlier checkpoint at `path` as it was.
"""

import json
import os
import re
import shutil
import struct
import tempfile

import keras
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from keras_gemma.convert.weights import weight_map
from keras_gemma.convert.weights import weight_state

_SLIDING, _FULL = "sliding_attention", "full_attention"
_DTYPES = {
    "float32": (np.float32, "F32"),
    "bfloat16": (ml_dtypes.bfloat16, "BF16"),
    "float16": (np.float16, "F16"),
}
_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# The context the released models were trained for (config.json of each family;
# Gemma 3 4B and larger extend theirs with linear RoPE scaling): the model does not
# hold it, as keras-hub's does not.
_CONTEXT = {"gemma": 8192, "gemma2": 8192, "gemma3_text": 32768}
_GEMMA3_SCALED_CONTEXT = 131072


def released_context_length(model_type, rope_scaling_factor):
    """The context length the released checkpoints of this family declare
    (`model_type` `gemma`, `gemma2` or `gemma3_text`)."""
    if model_type == "gemma3_text" and rope_scaling_factor != 1.0:
        return _GEMMA3_SCALED_CONTEXT
    return _CONTEXT[model_type]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# Gemma's chat format, as `keras_gemma.chat.format_chat` writes it (a system message,
# first only, is folded into the first user turn, as in Gemma 3's template).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def export(backbone, tokenizer, path, max_shard_size="5GB", dtype=None):
    """Writes `backbone` (and `tokenizer`, unless None) as a transformers
    checkpoint directory `path`; see `GemmaCausalLM.export_to_transformers`."""
    path = os.fspath(path)
    _check_exportable(backbone)
    shard_bytes = parse_size(max_shard_size)
    dtype = _dtype_name(backbone, dtype)
    config = transformers_config(backbone, dtype, tokenizer)
    proto = None if tokenizer is None else _tokenizer_proto(tokenizer)
    if os.path.exists(path) and not _replaceable(path):
        raise ValueError(
            f"{path} exists and is not a transformers checkpoint (no config.json, or not a "
            "directory); export_to_transformers writes a new directory or replaces a checkpoint."
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        _write_json(os.path.join(staging, "config.json"), config)
        _write_weights(backbone, staging, shard_bytes, dtype)
        if tokenizer is not None:
            _write_tokenizer(proto, tokenizer, staging)
        _write_json(os.path.join(staging, "generation_config.json"), _generation_config(config, tokenizer))
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def transformers_config(backbone, dtype="float32", tokenizer=None):
    """The `config.json` dict of transformers' model for `backbone`; a
    `ValueError` naming the option when no transformers Gemma computes it."""
    b = backbone
    n, h, d = b.num_query_heads, b.head_dim, b.hidden_dim
    layer_types = list(b.layer_types or [_FULL] * b.num_layers)
    sliding = _SLIDING in layer_types
    post_norms = (b.use_post_attention_norm, b.use_post_ffw_norm)

    def unsupported(what, model_type):
        raise ValueError(f"transformers' {model_type!r} models cannot express {what}; this backbone has it.")

    if b.use_query_key_norm:
        model_type = "gemma3_text"
    elif any(post_norms):
        model_type = "gemma2"
    else:
        model_type = "gemma"
    if model_type != "gemma" and not all(post_norms):
        unsupported(f"use_post_attention_norm={post_norms[0]} with use_post_ffw_norm={post_norms[1]}", model_type)
    if b.query_pre_attn_scalar is not None:
        scalar = b.query_pre_attn_scalar
    else:
        scalar = h if b.query_head_dim_normalize else d // n
        if not b.query_head_dim_normalize and d % n:
            unsupported(f"query scaling by (hidden_dim / num_query_heads) ** -0.5 = ({d}/{n}) ** -0.5", model_type)
    local_theta = b.local_rope_max_wavelength
    if local_theta is None:
        local_theta = b.rope_max_wavelength
    factor = float(b.rope_scaling_factor)
    config = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": b.vocabulary_size,
        "hidden_size": d,
        "intermediate_size": b.intermediate_dim // 2,
        "num_hidden_layers": b.num_layers,
        "num_attention_heads": n,
        "num_key_value_heads": b.num_key_value_heads,
        "head_dim": h,
        "rms_norm_eps": b.layer_norm_epsilon,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": dtype,
        **_special_token_ids(tokenizer),
    }
    if model_type == "gemma":
        for option, value in (
            ("attention_logit_soft_cap", b.attention_logit_soft_cap),
            ("final_logit_soft_cap", b.final_logit_soft_cap),
        ):
            if value is not None:
                unsupported(f"{option}={value} (Gemma 2 and 3 have soft caps)", model_type)
        if sliding:
            unsupported("sliding-window layers (Gemma 2 and 3 have them)", model_type)
        if scalar != h:
            unsupported(f"queries scaled by {scalar} ** -0.5 instead of head_dim ** -0.5", model_type)
        config["hidden_act"] = "gelu_pytorch_tanh"
        config["max_position_embeddings"] = released_context_length(model_type, factor)
        config["rope_parameters"] = _rope(b.rope_max_wavelength, factor)
        return config

    config.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=scalar,
        attn_logit_softcapping=b.attention_logit_soft_cap,
        final_logit_softcapping=b.final_logit_soft_cap,
        layer_types=layer_types,
        sliding_window=b.sliding_window_size if sliding else None,
    )
    if model_type == "gemma2":
        if local_theta != b.rope_max_wavelength and sliding:
            unsupported(f"a RoPE base of {local_theta} on sliding layers and {b.rope_max_wavelength} on global ones", model_type)
        if factor != 1.0 and sliding:
            unsupported("linear RoPE scaling of global layers only", model_type)
        config["max_position_embeddings"] = released_context_length(model_type, factor)
        config["rope_parameters"] = _rope(b.rope_max_wavelength, factor)
        return config
    config["max_position_embeddings"] = released_context_length(model_type, factor)
    config["rope_parameters"] = {_FULL: _rope(b.rope_max_wavelength, factor), _SLIDING: _rope(local_theta, 1.0)}
    config["use_bidirectional_attention"] = False
    return config


def parse_size(size):
    """Bytes of `max_shard_size`: an int, or a string such as `"5GB"` or
    `"500MiB"` (transformers' units: GB = 10**9 bytes, GiB = 2**30)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '5GB', not {size!r}.")
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size={size!r} is not a size such as '5GB', '500MB' or '2GiB'.")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return size


def _check_exportable(backbone):
    lora, quantized = weight_state(backbone)
    if lora:
        raise ValueError(
            "This backbone has LoRA adapters enabled: call `merge_lora_weights()` first to "
            "export the merged model, or save the adapter itself with `save_lora_weights`."
        )
    if quantized:
        raise ValueError(
            f"This backbone is quantized ({', '.join(quantized)}); transformers checkpoints hold "
            "float weights: export the model before calling `quantize`."
        )


def _dtype_name(backbone, dtype):
    name = keras.backend.standardize_dtype(dtype if dtype is not None else backbone.dtype_policy.variable_dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: export_to_transformers writes {', '.join(_DTYPES)}.")
    return name


def _rope(theta, factor):
    if factor == 1.0:
        return {"rope_theta": float(theta), "rope_type": "default"}
    return {"rope_theta": float(theta), "rope_type": "linear", "factor": factor}


def _special_token_ids(tokenizer):
    """bos, eos and pad ids: the tokenizer's, else Gemma's (2, 1, 0)."""
    if tokenizer is None:
        return {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    return {
        "bos_token_id": tokenizer.start_token_id,
        "eos_token_id": tokenizer.end_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _generation_config(config, tokenizer):
    eos = [config["eos_token_id"]]
    end_of_turn = None if tokenizer is None else tokenizer.end_of_turn_token_id
    if end_of_turn is not None:
        eos.append(end_of_turn)  # as the released checkpoints: a reply ends at <end_of_turn>
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": config["pad_token_id"],
    }


def _tokenizer_proto(tokenizer):
    """The tokenizer's serialized SentencePiece model, checked to be one
    transformers' `GemmaTokenizer` reproduces: it rebuilds every Gemma
    vocabulary as a byte-fallback BPE that tokenizes text as written, and
    reads none of the model's own normalization settings."""
    from sentencepiece import sentencepiece_model_pb2

    proto = tokenizer.proto
    if isinstance(proto, str):
        with open(proto, "rb") as f:
            proto = f.read()
    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    expected = {
        "model_type": (sentencepiece_model_pb2.TrainerSpec.BPE, trainer.model_type, "BPE"),
        "byte_fallback": (True, trainer.byte_fallback, True),
        "normalizer": ("identity", normalizer.name, "identity"),
        "add_dummy_prefix": (False, normalizer.add_dummy_prefix, False),
        "remove_extra_whitespaces": (False, normalizer.remove_extra_whitespaces, False),
    }
    differences = [f"{key}={found!r} (Gemma's: {shown!r})" for key, (want, found, shown) in expected.items() if want != found]
    if differences:
        raise ValueError(
            "transformers' GemmaTokenizer would not tokenize as this vocabulary does: it "
            "assumes Gemma's SentencePiece settings, and this one has "
            + ", ".join(differences)
            + ". Export the backbone alone (`backbone.export_to_transformers`) and bring a tokenizer."
        )
    return proto


def _write_tokenizer(proto, tokenizer, directory):
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(proto)
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    if tokenizer.unk_token_id is not None:
        config["unk_token"] = "<unk>"
    if tokenizer.start_of_turn_token_id is not None and tokenizer.end_of_turn_token_id is not None:
        config["chat_template"] = CHAT_TEMPLATE
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)


def _write_weights(backbone, directory, shard_bytes, dtype):
    """The weights in safetensors shards of at most `shard_bytes` (a tensor
    larger than that gets a shard of its own), with an index for several."""
    np_dtype, st_dtype = _DTYPES[dtype]
    entries = weight_map(backbone)
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * np.dtype(np_dtype).itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    index, total = {}, 0
    bar = tqdm(total=len(entries), desc="Writing weights", unit="tensor")
    for name, shard in zip(names, shards):
        tensors = {}
        for tensor_name, shape, variable, transform in shard:
            value = transform.inverse(np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32))
            if value.shape != tuple(shape):  # the map and its inverse disagree: a bug, not bad input
                raise AssertionError(f"{tensor_name}: {value.shape} != {shape}")
            tensors[tensor_name] = np.ascontiguousarray(value.astype(np_dtype))
            index[tensor_name] = name
            total += tensors[tensor_name].nbytes
            bar.update()
        write_safetensors(os.path.join(directory, name), tensors, st_dtype)
    bar.close()
    if len(shards) > 1:
        _write_json(
            os.path.join(directory, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": index},
        )


def write_safetensors(path, tensors, st_dtype):
    """One safetensors file of same-dtype numpy arrays (bfloat16 included,
    which the `safetensors` package's numpy writer does not take)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": st_dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(array.tobytes())


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _replaceable(path):
    return os.path.isdir(path) and (not os.listdir(path) or os.path.isfile(os.path.join(path, "config.json")))


def _move_into_place(staging, path):
    """`staging` renamed to `path`; an earlier checkpoint there is removed
    only once the new one is in place."""
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    old = staging + ".old"
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
