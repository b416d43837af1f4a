"""The one weight map of keras_gemma: checkpoint tensors onto a backbone's variables.

Every format is read under Hugging Face Transformers' tensor names (`model.layers.0.
self_attn.q_proj.weight`, ...): Transformers checkpoints carry them, and the GGUF reader
renames llama.cpp's tensors to them. `weight_map(backbone)` lists, for each variable of a
`GemmaBackbone`, the tensor it takes, that tensor's shape and the transform from the
transformers layout; `assign_weights` checks every tensor before assigning any, so a bad
checkpoint is an error naming the file and the tensor, never a half-loaded model.
"""

import numpy as np
from tqdm.auto import tqdm

# Tensors a checkpoint may carry that keras_gemma derives itself: the output
# projection is tied to the embedding.
IGNORED = ("lm_head.weight",)


class Transform:
    """A tensor's way from the transformers layout to a variable's
    (`transform(tensor)`), and back (`transform.inverse(value)`, for export)."""

    def __init__(self, forward, inverse):
        self._forward, self.inverse = forward, inverse

    def __call__(self, tensor):
        return self._forward(tensor)


def weight_map(backbone, prefix="model."):
    """`[(tensor name, tensor shape, variable, transform)]` for every variable of
    `backbone`; `prefix` is where the decoder's tensors live (`model.` in text
    checkpoints, `model.language_model.` in image-text Gemma 3 ones). Each
    `transform` is a `Transform`: its `inverse` gives the tensor back."""
    n, k, h = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim
    d, f = backbone.hidden_dim, backbone.intermediate_dim // 2
    v = backbone.vocabulary_size

    same = Transform(lambda w: w, lambda w: w)
    transpose = Transform(np.transpose, np.transpose)

    def rows_to_heads(heads):
        # q/k/v_proj (heads * head_dim, hidden) <-> kernel (hidden, heads, head_dim)
        return Transform(lambda w: w.T.reshape(d, heads, h), lambda w: w.reshape(d, heads * h).T)

    # o_proj (hidden, heads * head_dim) <-> kernel (heads, head_dim, hidden)
    columns_to_heads = Transform(lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)

    entries = [
        (prefix + "embed_tokens.weight", (v, d), backbone.token_embedding.embeddings, same),
        (prefix + "norm.weight", (d,), backbone.layer_norm.scale, same),
    ]
    for i, block in enumerate(backbone.transformer_layers):
        p = f"{prefix}layers.{i}."
        attention, ffw = block.attention, block.feed_forward
        entries += [
            (p + "input_layernorm.weight", (d,), block.pre_attention_norm.scale, same),
            (p + "self_attn.q_proj.weight", (n * h, d), attention.query_dense.kernel, rows_to_heads(n)),
            (p + "self_attn.k_proj.weight", (k * h, d), attention.key_dense.kernel, rows_to_heads(k)),
            (p + "self_attn.v_proj.weight", (k * h, d), attention.value_dense.kernel, rows_to_heads(k)),
            (p + "self_attn.o_proj.weight", (d, n * h), attention.output_dense.kernel, columns_to_heads),
            (p + "mlp.gate_proj.weight", (f, d), ffw.gate.kernel, transpose),
            (p + "mlp.up_proj.weight", (f, d), ffw.up.kernel, transpose),
            (p + "mlp.down_proj.weight", (d, f), ffw.down.kernel, same),
        ]
        if block.post_attention_norm is None:
            # Gemma 1 in transformers names its pre-feed-forward norm this way.
            entries.append((p + "post_attention_layernorm.weight", (d,), block.pre_ffw_norm.scale, same))
        else:
            entries.append((p + "post_attention_layernorm.weight", (d,), block.post_attention_norm.scale, same))
            entries.append((p + "pre_feedforward_layernorm.weight", (d,), block.pre_ffw_norm.scale, same))
        if block.post_ffw_norm is not None:
            entries.append((p + "post_feedforward_layernorm.weight", (d,), block.post_ffw_norm.scale, same))
        if attention.query_norm is not None:
            entries.append((p + "self_attn.q_norm.weight", (h,), attention.query_norm.scale, same))
            entries.append((p + "self_attn.k_norm.weight", (h,), attention.key_norm.scale, same))
    return entries


def assign_weights(tensors, weight_map, progress=True):
    """Checks every tensor, then assigns them all: never a half-loaded model.

    Args:
        tensors: name -> the source holding it (a `SafetensorsFile`, or
            `GGUFTensors`): `.path`, `.shapes[name]`, `.get(name)`.
        weight_map: `[(name, source shape, variable, transform)]`, as
            `weight_map(backbone)` gives.
        progress: show a progress bar while reading and converting.
    """
    files = ", ".join(sorted({t.path for t in tensors.values()}))
    missing = [name for name, *_ in weight_map if name not in tensors]
    if missing:
        raise ValueError(
            f"The checkpoint ({files}) lacks {len(missing)} tensor(s) the model "
            f"needs, first {missing[0]!r}: {missing[:8]}"
        )
    for name, shape, variable, _ in weight_map:
        found = tuple(tensors[name].shapes[name])
        if found != tuple(shape):
            raise ValueError(
                f"{tensors[name].path}: tensor {name!r} has shape {found}, but the "
                f"model built from the checkpoint's config needs {tuple(shape)} (for "
                f"{variable.path})."
            )
    known = {name for name, *_ in weight_map}
    extra = sorted(set(tensors) - known - set(IGNORED))
    if extra:
        raise ValueError(
            f"{tensors[extra[0]].path}: tensor {extra[0]!r} has no place in the "
            f"model built from the checkpoint's config ({len(extra)} such tensors: "
            f"{extra[:6]}); is the checkpoint of another architecture?"
        )
    bar = tqdm(weight_map, desc="Loading weights", unit="tensor", disable=not progress)
    for name, _, variable, transform in bar:
        value = np.asarray(tensors[name].get(name), dtype=np.float32)
        variable.assign(transform(value))


def weight_state(backbone):
    """`(lora_enabled, quantization modes)` of the backbone's embedding and
    projections, from public Keras layer state: what every export checks
    before writing plain float weights."""
    layers = [backbone.token_embedding]
    for block in backbone.transformer_layers:
        attention, ffw = block.attention, block.feed_forward
        layers += [attention.query_dense, attention.key_dense, attention.value_dense, attention.output_dense]
        layers += [ffw.gate, ffw.up, ffw.down]
    lora = any(getattr(layer, "lora_enabled", False) for layer in layers)
    return lora, sorted({layer.quantization_mode for layer in layers if layer.quantization_mode is not None})
