"""Our models written as one GGUF file for llama.cpp (`export_to_gguf`).

The inverse of `gguf.py`, written as llama.cpp's own converter (`convert_hf_to_gguf.py`,
classes `GemmaModel`, `Gemma2Model`, `Gemma3Model`) writes Gemma, Gemma 2 and Gemma 3:

- architecture `gemma`, `gemma2` or `gemma3`, with the metadata llama.cpp reads for it
  (`src/models/gemma*.cpp`); tensor names from the `gguf` package's own name map;
- RMSNorm scales stored as `1 + scale` (llama.cpp multiplies by the stored weight;
  `gguf.py` subtracts the 1 again), always float32, as are all 1-D tensors; the 2-D
  weights in the chosen type: `f32`, `f16` or `q8_0` (`gguf.quants.quantize`), and F16
  for a matrix whose rows are not a multiple of Q8_0's 32-weight block, the converter's
  own fallback;
- the tokenizer as `tokenizer.ggml.*` (model `llama`: SentencePiece): pieces, scores and
  piece types, where the user-defined pieces a Gemma `tokenizer_config.json` marks
  special (the tokenizer's special tokens, and `<mask>`, `<unusedN>`, ... as the
  converter recognises them) become CONTROL, and the other user-defined ones are spelled
  with real spaces for "\u2581", as the converter writes them; bos/eos/unk/pad/eot ids,
  BOS added, no EOS; Gemma's chat template when the vocabulary holds the turn tokens.

llama.cpp fixes some things that our backbone leaves open: the query scale (by
`head_dim`, except for the 27B models, which it recognises by their layer count, and
which scale by `hidden / heads`), Gemma 2's soft caps (always on) and its RoPE (the same
on local and global layers), no attention soft cap in Gemma 3. A backbone that llama.cpp
or `gguf.py` would run differently is a `ValueError` naming the option, before anything
is written (the metadata is also read back through `gguf_config` first, which must give
the backbone's architecture); so is a quantized or LoRA-enabled model (merge the
adapters first) and a tokenizer llama.cpp's SentencePiece tokenizer cannot reproduce
(normalization, merged spaces, a unigram model). The file is written beside `path`
under a temporary name and renamed at the end: a failed export leaves no half file and
an earlier file intact.
"""

import contextlib
import os
import types
import uuid

import keras
import numpy as np
from tqdm.auto import tqdm

from keras_gemma.convert import gguf_config
from keras_gemma.convert.transformers_config import backbone_config_from_transformers
from keras_gemma.convert.transformers_export import CHAT_TEMPLATE
from keras_gemma.convert.transformers_export import released_context_length
from keras_gemma.convert.weights import weight_map
from keras_gemma.convert.weights import weight_state

TYPES = ("f32", "f16", "q8_0")
_SLIDING, _FULL = "sliding_attention", "full_attention"
# llama.cpp scales the queries of these by (hidden / heads) ** -0.5, not head_dim ** -0.5:
# the 27B models, recognised by their layer count (src/models/gemma2.cpp, gemma3.cpp).
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
# llama.cpp's layer pattern when the file has none: every `period`-th layer global,
# counting from 1 (`llama_hparams::set_swa_pattern`).
_DEFAULT_PERIOD = {"gemma2": 2, "gemma3": 6}
# SentencePiece piece types (sentencepiece_model.proto), the same numbers as
# llama.cpp's token types (NORMAL 1 and BYTE 6 are written as they are).
_UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 2, 3, 4, 5


def export(backbone, tokenizer, path, type="f32"):
    """Writes `backbone` with `tokenizer` (a `GemmaTokenizer`) as the GGUF file
    `path`, its 2-D weights in `type`; see `GemmaCausalLM.export_to_gguf`."""
    import gguf

    if type not in TYPES:
        accepted = ", ".join(map(repr, TYPES))
        raise ValueError(f"type={type!r} is not a GGUF type export_to_gguf writes; use one of {accepted}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; export_to_gguf writes one .gguf file.")
    _check_float_weights(backbone)
    arch = _architecture(backbone)
    vocabulary = _vocabulary(tokenizer, backbone.vocabulary_size)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[type]
    metadata = {
        **_model_metadata(backbone, arch, int(gguf.LlamaFileType[file_type])),
        **vocabulary,
        gguf.Keys.General.QUANTIZATION_VERSION: gguf.GGML_QUANT_VERSION,
    }
    _check_read_back(backbone, arch, metadata, path)
    tensors = _tensors(backbone, arch, type)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A new name beside `path` (created as any file is, with the umask's permissions).
    partial = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    try:
        _write(partial, arch, metadata, tensors)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


# === What llama.cpp can run ===


def _check_float_weights(backbone):
    """Refuses quantized models and enabled LoRA adapters (both public Keras layer state)."""
    lora, quantized = weight_state(backbone)
    if lora:
        raise ValueError(
            "This model has LoRA adapters enabled: call `backbone.merge_lora_weights()` first "
            "to export the merged model (GGUF holds plain weights)."
        )
    if quantized:
        raise ValueError(
            f"This model is quantized with Keras ({', '.join(quantized)}); export_to_gguf writes "
            "float weights and quantizes them itself (type='q8_0'): export before `quantize`."
        )


def _query_scalar(backbone):
    """The `query_pre_attn_scalar` the backbone's queries scale by (`** -0.5`)."""
    b = backbone
    if b.query_pre_attn_scalar is not None:
        return b.query_pre_attn_scalar
    return b.head_dim if b.query_head_dim_normalize else b.hidden_dim / b.num_query_heads


def _architecture(backbone):
    """`gemma`, `gemma2` or `gemma3`: the llama.cpp architecture that runs
    `backbone`; a `ValueError` naming the option where none does."""
    b = backbone
    sliding = _SLIDING in b.layer_types
    post_norms = (b.use_post_attention_norm, b.use_post_ffw_norm)
    arch = "gemma3" if b.use_query_key_norm else "gemma2" if any(post_norms) else "gemma"

    def refuse(what):
        raise ValueError(f"llama.cpp's {arch!r} architecture cannot express {what}; this backbone has it.")

    if arch != "gemma" and not all(post_norms):
        refuse(f"use_post_attention_norm={post_norms[0]} with use_post_ffw_norm={post_norms[1]}")
    scalar = _query_scalar(b)
    if arch == "gemma":
        if b.attention_logit_soft_cap is not None or b.final_logit_soft_cap is not None:
            refuse("soft caps (Gemma 2 and 3 have them, with post-norms)")
        if sliding:
            refuse("sliding-window layers (Gemma 2 and 3 have them, with post-norms)")
        if scalar != b.head_dim:
            refuse(f"queries scaled by {scalar} ** -0.5 (it scales by head_dim ** -0.5 = {b.head_dim} ** -0.5)")
        return arch
    # llama.cpp divides integers here: n_embd / n_head.
    llama_scalar = b.hidden_dim // b.num_query_heads if b.num_layers == _LAYERS_27B[arch] else b.head_dim
    if scalar != llama_scalar:
        refuse(
            f"queries scaled by {scalar} ** -0.5: for {b.num_layers} layers it scales them by "
            f"{llama_scalar} ** -0.5 (by head_dim, or hidden_dim // num_query_heads for its "
            f"{_LAYERS_27B[arch]}-layer 27B model)"
        )
    if arch == "gemma2":
        caps = (b.attention_logit_soft_cap, b.final_logit_soft_cap)
        if None in caps:
            refuse(f"attention_logit_soft_cap={caps[0]} with final_logit_soft_cap={caps[1]} (it always applies both)")
        local = b.local_rope_max_wavelength or b.rope_max_wavelength
        if sliding and local != b.rope_max_wavelength:
            refuse(f"a RoPE base of {local} on sliding layers and {b.rope_max_wavelength} on global ones")
        if sliding and b.rope_scaling_factor != 1.0:
            refuse("linear RoPE scaling of the global layers only (it scales the sliding ones too)")
    elif b.attention_logit_soft_cap is not None:
        refuse(f"attention_logit_soft_cap={b.attention_logit_soft_cap} (Gemma 3 has none)")
    return arch


# === Metadata ===


def _model_metadata(backbone, arch, file_type):
    """The `general.*` and `{arch}.*` fields, as llama.cpp's converter writes them
    (plus the RoPE base, layer pattern and local RoPE base where they are not
    llama.cpp's defaults)."""
    from gguf import Keys

    b = backbone
    sliding = _SLIDING in b.layer_types

    def key(name):
        return name.format(arch=arch)

    context = released_context_length("gemma3_text" if arch == "gemma3" else arch, b.rope_scaling_factor)
    fields = {
        Keys.General.TYPE: "model",
        Keys.General.FILE_TYPE: file_type,
        key(Keys.LLM.CONTEXT_LENGTH): context,
        key(Keys.LLM.EMBEDDING_LENGTH): b.hidden_dim,
        key(Keys.LLM.BLOCK_COUNT): b.num_layers,
        key(Keys.LLM.FEED_FORWARD_LENGTH): b.intermediate_dim // 2,  # one branch, as transformers counts
        key(Keys.Attention.HEAD_COUNT): b.num_query_heads,
        key(Keys.Attention.HEAD_COUNT_KV): b.num_key_value_heads,
        key(Keys.Attention.LAYERNORM_RMS_EPS): float(b.layer_norm_epsilon),
        key(Keys.Attention.KEY_LENGTH): b.head_dim,
        key(Keys.Attention.VALUE_LENGTH): b.head_dim,
        key(Keys.Rope.FREQ_BASE): float(b.rope_max_wavelength),
    }
    if b.rope_scaling_factor != 1.0:
        fields[key(Keys.Rope.SCALING_TYPE)] = "linear"
        fields[key(Keys.Rope.SCALING_FACTOR)] = float(b.rope_scaling_factor)
    if b.attention_logit_soft_cap is not None:
        fields[key(Keys.LLM.ATTN_LOGIT_SOFTCAPPING)] = float(b.attention_logit_soft_cap)
    if b.final_logit_soft_cap is not None:
        fields[key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)] = float(b.final_logit_soft_cap)
    if arch == "gemma":
        return fields
    if sliding:
        fields[key(Keys.Attention.SLIDING_WINDOW)] = b.sliding_window_size
    period = _DEFAULT_PERIOD[arch]
    default_types = [_SLIDING if (i + 1) % period else _FULL for i in range(b.num_layers)]
    if arch == "gemma2" or sliding:  # a Gemma 3 file without a window has no sliding layers
        if list(b.layer_types) != default_types:
            fields[key(Keys.Attention.SLIDING_WINDOW_PATTERN)] = [t == _SLIDING for t in b.layer_types]
    if arch == "gemma3" and sliding:
        local = b.local_rope_max_wavelength or b.rope_max_wavelength
        fields[key(Keys.Rope.FREQ_BASE_SWA)] = float(local)
    return fields


def _vocabulary(tokenizer, vocabulary_size):
    """The `tokenizer.*` fields of `tokenizer`'s SentencePiece model, the
    vocabulary padded to the embedding's `vocabulary_size` rows with unused
    `[PADi]` tokens, as the converter pads it."""
    from gguf import Keys
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = tokenizer.proto
    if isinstance(proto, str):
        with open(proto, "rb") as f:
            proto = f.read()
    model = model_pb2.ModelProto.FromString(proto)
    _check_tokenizer(model)
    pieces = list(model.pieces)
    if len(pieces) > vocabulary_size:
        raise ValueError(
            f"The tokenizer has {len(pieces)} tokens, the model's embedding {vocabulary_size} rows: "
            "the vocabulary must not be larger than the embedding."
        )
    special = set(tokenizer.special_tokens)
    tokens, token_types = [], []
    for piece in pieces:
        kind = piece.type
        if kind == _USER_DEFINED and (piece.piece in special or _looks_special(piece.piece)):
            kind = _CONTROL
        tokens.append(piece.piece.replace("\u2581", " ") if kind == _USER_DEFINED else piece.piece)
        token_types.append(kind)
    scores = [float(p.score) for p in pieces]
    for i in range(len(pieces), vocabulary_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        token_types.append(_UNUSED)
    unknown = [i for i, p in enumerate(pieces) if p.type == _UNKNOWN]
    if len(unknown) != 1:
        raise ValueError(f"The tokenizer has {len(unknown)} unknown pieces; a SentencePiece model has one.")
    fields = {
        Keys.Tokenizer.MODEL: "llama",
        Keys.Tokenizer.PRE: "default",
        Keys.Tokenizer.LIST: tokens,
        Keys.Tokenizer.SCORES: scores,
        Keys.Tokenizer.TOKEN_TYPE: token_types,
        Keys.Tokenizer.BOS_ID: int(tokenizer.start_token_id),
        Keys.Tokenizer.EOS_ID: int(tokenizer.end_token_id),
        Keys.Tokenizer.UNK_ID: unknown[0],
        Keys.Tokenizer.PAD_ID: int(tokenizer.pad_token_id),
        Keys.Tokenizer.ADD_BOS: True,  # Gemma is trained with <bos> first
        Keys.Tokenizer.ADD_EOS: False,
        Keys.Tokenizer.ADD_PREFIX: bool(model.normalizer_spec.add_dummy_prefix),
    }
    if tokenizer.end_of_turn_token_id is not None:
        fields[Keys.Tokenizer.EOT_ID] = int(tokenizer.end_of_turn_token_id)
        if tokenizer.start_of_turn_token_id is not None:
            fields[Keys.Tokenizer.CHAT_TEMPLATE] = CHAT_TEMPLATE
    return fields


def _looks_special(token):
    """The user-defined tokens llama.cpp's converter makes CONTROL by their look
    (`TextModel.does_token_look_special`), those of Gemma's vocabulary among them."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _check_tokenizer(model):
    """Refuses what llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`)
    would tokenize differently: it merges pieces by score (BPE), escapes spaces
    and prepends one if asked, and does nothing else to the text."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    problems = []
    if model.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        kind = model_pb2.TrainerSpec.ModelType.Name(model.trainer_spec.model_type)
        problems.append(f"it is a {kind} model (llama.cpp runs SentencePiece BPE)")
    normalizer = model.normalizer_spec
    if normalizer.precompiled_charsmap:
        problems.append(f"it normalizes text ({normalizer.name!r}; Gemma's tokenizer uses 'identity')")
    if normalizer.remove_extra_whitespaces:
        problems.append("it merges runs of spaces (remove_extra_whitespaces)")
    if not normalizer.escape_whitespaces or model.trainer_spec.treat_whitespace_as_suffix:
        problems.append("it does not mark spaces as a word prefix '\u2581'")
    if problems:
        raise ValueError(
            "llama.cpp would tokenize differently from this tokenizer: " + "; ".join(problems) + "."
        )


def _check_read_back(backbone, arch, metadata, path):
    """The architecture `gguf.py` reads from `metadata` must be `backbone`'s:
    anything the file cannot say (a query scale our reader and llama.cpp infer
    differently, ...) is an error before the file is written."""

    # What gguf_config reads of a GGUFFile; GGUF stores these floats as float32.
    stored = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in metadata.items()}
    stored["general.architecture"] = arch  # GGUFWriter writes it
    file = types.SimpleNamespace(path=path, metadata=stored, tensors=[])
    read = backbone_config_from_transformers(gguf_config.transformers_config(file), path)
    ours, theirs = _effective(backbone.get_config()), _effective(read)
    for name, value in ours.items():
        if theirs[name] != value:
            raise ValueError(
                f"A GGUF file cannot hold this backbone's {name} ({value!r}): keras_gemma's "
                f"GGUF reader would read it back as {theirs[name]!r}."
            )


def _effective(config):
    """What a `GemmaBackbone` config computes, defaults resolved, floats as GGUF's float32."""

    def f32(x):
        return None if x is None else float(np.float32(x))

    layer_types = list(config.get("layer_types") or [_FULL] * config["num_layers"])
    sliding, full = _SLIDING in layer_types, _FULL in layer_types
    rope = config.get("rope_max_wavelength", 10000.0)
    scalar = config.get("query_pre_attn_scalar")
    if scalar is None:
        normalize = config.get("query_head_dim_normalize", True)
        scalar = config["head_dim"] if normalize else config["hidden_dim"] / config["num_query_heads"]
    shape = (
        "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
        "hidden_dim", "intermediate_dim", "head_dim",
    )
    flags = ("use_post_attention_norm", "use_post_ffw_norm", "use_query_key_norm")
    return {
        **{name: config[name] for name in shape},
        **{name: bool(config.get(name, False)) for name in flags},
        "layer_types": layer_types,
        "sliding_window_size": config.get("sliding_window_size") if sliding else None,
        "query scaling": f32(scalar),
        "layer_norm_epsilon": f32(config.get("layer_norm_epsilon", 1e-6)),
        "rope_max_wavelength": f32(rope) if full else None,
        "local_rope_max_wavelength": f32(config.get("local_rope_max_wavelength") or rope) if sliding else None,
        "rope_scaling_factor": f32(config.get("rope_scaling_factor", 1.0)) if full else None,
        "attention_logit_soft_cap": f32(config.get("attention_logit_soft_cap")),
        "final_logit_soft_cap": f32(config.get("final_logit_soft_cap")),
    }


# === Tensors ===


def _tensors(backbone, arch, type):
    """`[(gguf name, ggml type, numpy shape, value())]` in the order written;
    `value()` gives the tensor to write (norms + 1, quantized as its type)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], backbone.num_layers)
    matrix_type = gguf.GGMLQuantizationType[type.upper()]
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    plan = []
    for hf_name, shape, variable, transform in weight_map(backbone):
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:  # the map and gguf's names disagree: a bug, not bad input
            raise AssertionError(f"gguf has no {arch} name for {hf_name}")
        norm = name.endswith("_norm.weight")
        if norm or len(shape) == 1:
            qtype = gguf.GGMLQuantizationType.F32  # as llama.cpp: 1-D tensors and norms stay float32
        elif matrix_type == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % block_size:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's fallback for rows Q8_0 cannot block
        else:
            qtype = matrix_type

        def value(variable=variable, transform=transform, norm=norm, qtype=qtype, shape=shape):
            tensor = transform.inverse(np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32))
            if tensor.shape != tuple(shape):  # the map and its inverse disagree: a bug
                raise AssertionError(f"{variable.path}: {tensor.shape} != {shape}")
            if norm:
                tensor = tensor + np.float32(1.0)  # llama.cpp multiplies by the stored scale
            return gguf.quants.quantize(np.ascontiguousarray(tensor), qtype)

        plan.append((name, qtype, tuple(shape), value))
    return plan


def _write(path, arch, metadata, tensors):
    """The GGUF file: header, metadata, tensor index, then each tensor as it is
    made (one in memory at a time)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        _add(writer, key, value)
    for name, qtype, shape, _ in tensors:
        if qtype == gguf.GGMLQuantizationType.F32:
            dtype, stored = np.float32, shape
        elif qtype == gguf.GGMLQuantizationType.F16:
            dtype, stored = np.float16, shape
        else:
            dtype, stored = np.uint8, gguf.quant_shape_to_byte_shape(shape, qtype)
        nbytes = int(np.prod(stored)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(name, stored, np.dtype(dtype), nbytes, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, value in tqdm(tensors, desc="Writing GGUF", unit="tensor"):
            writer.write_tensor_data(value())
    finally:
        writer.close()


def _add(writer, key, value):
    """One metadata field, typed as llama.cpp's converter types it."""
    if isinstance(value, (bool, np.bool_)):
        writer.add_bool(key, bool(value))
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)  # strings, float32 scores, int32 token types, bools
