"""Shared test helpers: tiny configurations, a tiny SentencePiece vocabulary,
and transformers checkpoints with random weights (the independent oracle)."""

import io
import os

import numpy as np

# Small but with every structural feature: grouped heads and a head width
# that is not hidden_dim / num_query_heads (as in Gemma 7B: 16 x 256 != 3072).
TINY = dict(
    vocabulary_size=384,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=96,
    head_dim=16,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of open models built from research and technology.",
    "Keras runs on JAX, TensorFlow and PyTorch with the same code.",
    "Attention is computed with rotary position embeddings in every layer.",
    "Numbers like 3.14159, 2024 and 42 appear in text, and so do tabs\tand  spaces.",
    "def main():\n    print('hello, world')\n",
    "Knock knock. Who's there? Gemma. Gemma who?",
    "Les modèles ouverts sont utiles; éàü and 日本語 are unicode.",
] * 4


def train_sentencepiece(vocab_size=384, user_defined_symbols=("<start_of_turn>", "<end_of_turn>"), gemma_normalization=False):
    """Serialized SentencePiece model with Gemma's special tokens and ids
    (pad 0, eos 1, bos 2, unk 3, then the chat control tokens).
    `gemma_normalization`: text as written, as the released Gemma vocabularies
    (no NFKC, no dummy prefix, spaces kept), which transformers' GemmaTokenizer
    assumes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(user_defined_symbols),
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        **(
            dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)
            if gemma_normalization
            else {}
        ),
    )
    return model.getvalue()


def transformers_config(config, **overrides):
    """A transformers GemmaConfig equal to a keras_gemma backbone config."""
    from transformers import GemmaConfig

    kwargs = dict(
        vocab_size=config["vocabulary_size"],
        hidden_size=config["hidden_dim"],
        intermediate_size=config["intermediate_dim"] // 2,
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        rms_norm_eps=config.get("layer_norm_epsilon", 1e-6),
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return GemmaConfig(**kwargs)


def save_transformers_gemma(path, config, seed=0, spm_proto=None, **overrides):
    """Writes a transformers GemmaForCausalLM with every weight random (norm
    scales included) to `path` with `save_pretrained`; returns the torch model."""
    return save_transformers_model(
        path, transformers_config(config, **overrides), seed=seed, spm_proto=spm_proto
    )


def save_transformers_model(path, hf_config, seed=0, spm_proto=None):
    """Any transformers causal LM config: random weights, `save_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"  # exact soft caps and windows
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "norm" in name else 0.2
            param.copy_(torch.randn_like(param) * scale)
    model.save_pretrained(path)
    if spm_proto is not None:
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(spm_proto)
    return model


def transformers_logits(model, token_ids, padding_mask):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(token_ids), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(padding_mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


def to_numpy(x):
    import keras

    return keras.ops.convert_to_numpy(x)


# llama.cpp's Gemma 3 tensor names for transformers' ones.
_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name):
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, block, rest = name.split(".", 3)
    return f"blk.{block}.{_NAMES[rest[: -len('.weight')]]}.weight"


def write_gemma3_gguf(path, model, quantization, spm_proto=None):
    """Writes a transformers Gemma 3 `model` as llama.cpp's converter does:
    norms stored as 1 + scale, 2-D weights in `quantization` (a
    `gguf.GGMLQuantizationType`), the rest in float32; the vocabulary from
    `spm_proto` (SentencePiece piece types are llama.cpp's token types) or
    placeholder tokens of the right number."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(c.sliding_window)
    # A vocabulary of the right size (transformers takes vocab_size from it).
    if spm_proto is None:
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(4, c.vocab_size)]
        scores = [-float(i) for i in range(c.vocab_size)]
        types = [3, 3, 3, 2] + [1] * (c.vocab_size - 4)
    else:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(spm_proto)
        tokens = [p.piece for p in proto.pieces]
        scores = [p.score for p in proto.pieces]
        types = [int(p.type) for p in proto.pieces]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_space_prefix(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        value = tensor.float().numpy()
        if name.endswith("norm.weight"):
            writer.add_tensor(gguf_name(name), value + 1.0)
        elif value.ndim == 2:
            data = gguf.quants.quantize(value, quantization)
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name(name), value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def value_and_grads(fn, *arrays):
    """`fn(*tensors)` (a scalar) and its gradients with respect to each
    float array, by the backend's own automatic differentiation."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(arrays))))(*arrays)
    elif backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
    else:
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors)
    return to_numpy(value), [to_numpy(g) for g in grads]


def backend_independent(name, key, compute):
    """`compute()`, once for the three backend passes of `run_all_backends.sh`.

    Some oracles do not depend on the Keras backend: transformers loading the
    Gemma 3 270M GGUF takes about 80 s, three times over without this. The
    script points `KERAS_GEMMA_ORACLE_CACHE` at a fresh directory that it
    deletes at the end; without it (a plain `pytest` run) nothing is stored.
    `compute` returns (a JSON-able value, {name: numpy array}); `key` (JSON-
    able) must name everything the result depends on: files, versions,
    inputs."""
    import hashlib
    import json

    directory = os.environ.get("KERAS_GEMMA_ORACLE_CACHE")
    if not directory:
        return compute()
    digest = hashlib.sha256(json.dumps([name, key], sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(directory, f"{name}-{digest}")
    if os.path.exists(path + ".npz"):
        with open(path + ".json") as f:
            value = json.load(f)
        with np.load(path + ".npz") as arrays:
            return value, dict(arrays)
    value, arrays = compute()
    os.makedirs(directory, exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(value, f)
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path + ".npz")  # written last: marks the entry complete
    return value, arrays
