"""Hugging Face Transformers checkpoints (`config.json`, safetensors, `tokenizer.model`)."""

import json
import os

import numpy as np
from keras_hub.src.utils.preset_utils import PresetLoader

from keras_gemma.convert.safetensors import SafetensorsFile

SUPPORTED_MODEL_TYPES = ("gemma",)
# transformers writes "gelu" in the released Gemma 1 configs and means the tanh
# approximation (it forces it); newer versions write "gelu_pytorch_tanh".
_TANH_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_tanh")


class TransformersPresetLoader(PresetLoader):
    """Loads a local Hugging Face Transformers directory of a Gemma model.

    Everything is checked before any weight is assigned: the config's
    `model_type` and options, the presence and shape of every tensor, and that
    no tensor is left over. A failed check raises an error naming the file
    and tensor, and no model is returned.
    """

    def __init__(self, preset, config):
        super().__init__(preset, config)
        self.config_path = os.path.join(preset, "config.json")

    # === Architecture ===

    def check_backbone_class(self):
        from keras_gemma.models.gemma_backbone import GemmaBackbone

        model_type = self.config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{self.config_path} has model_type {model_type!r}; keras_gemma "
                f"loads {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}."
            )
        return GemmaBackbone

    def backbone_config(self):
        """`GemmaBackbone` arguments from the transformers config."""
        self.check_backbone_class()
        c = self.config

        def unsupported(key, value, why):
            raise ValueError(
                f"{self.config_path}: {key}={value!r} is not supported ({why})."
            )

        activation = c.get("hidden_activation") or c.get("hidden_act", "gelu")
        if activation not in _TANH_GELU_NAMES:
            unsupported("hidden_activation", activation, "Gemma uses tanh GELU")
        if c.get("attention_bias", False):
            unsupported("attention_bias", True, "Gemma has no biases")
        if c.get("use_bidirectional_attention"):
            unsupported("use_bidirectional_attention", True, "Gemma is causal")
        if not c.get("tie_word_embeddings", True):
            unsupported("tie_word_embeddings", False, "Gemma ties them")
        rope = c.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" or c.get("rope_scaling"):
            unsupported("rope_type", c.get("rope_scaling") or rope_type, "plain RoPE only")
        rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in c:
                raise ValueError(f"{self.config_path} lacks {key!r}.")
        num_heads = c["num_attention_heads"]
        return {
            "vocabulary_size": c["vocab_size"],
            "num_layers": c["num_hidden_layers"],
            "num_query_heads": num_heads,
            "num_key_value_heads": c.get("num_key_value_heads") or num_heads,
            "hidden_dim": c["hidden_size"],
            # transformers counts one branch; keras_gemma (like the paper) both.
            "intermediate_dim": 2 * c["intermediate_size"],
            "head_dim": c.get("head_dim") or c["hidden_size"] // num_heads,
            "layer_norm_epsilon": c.get("rms_norm_eps", 1e-6),
            "rope_max_wavelength": float(rope_theta),
        }

    def load_backbone(self, cls, load_weights, **kwargs):
        config = self.backbone_config()
        tensors = self._open_weights() if load_weights else None
        backbone = cls(**config, **kwargs)
        if load_weights:
            assign_weights(tensors, _gemma_weight_map(backbone))
        return backbone

    # === Tokenizer and task ===

    def tokenizer_path(self):
        path = os.path.join(self.preset, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: keras_gemma's tokenizer needs the SentencePiece "
                "model `tokenizer.model` of the checkpoint (tokenizer.json alone "
                "is not enough)."
            )
        return path

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        return cls(proto=self.tokenizer_path(), **kwargs)

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        if "preprocessor" not in kwargs and cls.preprocessor_cls:
            self.tokenizer_path()  # Fail before reading gigabytes of weights.
        return super().load_task(cls, load_weights, load_task_weights, **kwargs)

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        return super().load_preprocessor(cls, **kwargs)

    # === Weights ===

    def _open_weights(self):
        """name -> (SafetensorsFile) for every tensor of the checkpoint."""
        index_path = os.path.join(self.preset, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(
                name for name in os.listdir(self.preset) if name.endswith(".safetensors")
            )
        if not files:
            raise FileNotFoundError(
                f"No *.safetensors weights in {self.preset} (keras_gemma reads "
                "safetensors, not pytorch_model.bin)."
            )
        tensors = {}
        for name in files:
            path = os.path.join(self.preset, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{index_path} lists {name}, which is not in {self.preset}."
                )
            shard = SafetensorsFile(path)
            for tensor_name in shard.shapes:
                if tensor_name in tensors:
                    raise ValueError(
                        f"Tensor {tensor_name!r} is in both {tensors[tensor_name].path} "
                        f"and {path}."
                    )
                tensors[tensor_name] = shard
        return tensors


# The transformers layout, mapped onto keras_gemma's variables.


def _gemma_weight_map(backbone):
    """[(transformers name, source shape, keras variable, transform)]."""
    n, k, h = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim
    d, f = backbone.hidden_dim, backbone.intermediate_dim // 2
    v = backbone.vocabulary_size

    def same(w):
        return w

    def transpose(w):
        return w.T

    def rows_to_heads(heads):
        # q/k/v_proj (heads * head_dim, hidden) -> kernel (heads, hidden, head_dim)
        return lambda w: w.reshape(heads, h, d).transpose(0, 2, 1)

    def columns_to_heads(w):
        # o_proj (hidden, heads * head_dim) -> kernel (heads, head_dim, hidden)
        return w.T.reshape(n, h, d)

    entries = [
        ("model.embed_tokens.weight", (v, d), backbone.token_embedding.embeddings, same),
        ("model.norm.weight", (d,), backbone.layer_norm.scale, same),
    ]
    for i, block in enumerate(backbone.transformer_layers):
        p = f"model.layers.{i}."
        attention, ffw = block.attention, block.feed_forward
        entries += [
            (p + "input_layernorm.weight", (d,), block.pre_attention_norm.scale, same),
            (p + "self_attn.q_proj.weight", (n * h, d), attention.query_dense.kernel, rows_to_heads(n)),
            (p + "self_attn.k_proj.weight", (k * h, d), attention.key_dense.kernel, rows_to_heads(k)),
            (p + "self_attn.v_proj.weight", (k * h, d), attention.value_dense.kernel, rows_to_heads(k)),
            (p + "self_attn.o_proj.weight", (d, n * h), attention.output_dense.kernel, columns_to_heads),
            # Gemma 1 in transformers names its pre-feed-forward norm this way.
            (p + "post_attention_layernorm.weight", (d,), block.pre_ffw_norm.scale, same),
            (p + "mlp.gate_proj.weight", (f, d), ffw.gate.kernel, transpose),
            (p + "mlp.up_proj.weight", (f, d), ffw.up.kernel, transpose),
            (p + "mlp.down_proj.weight", (d, f), ffw.down.kernel, transpose),
        ]
    return entries


# Tensors a transformers checkpoint may carry that keras_gemma derives itself
# (the output projection is tied to the embedding).
_IGNORED = ("lm_head.weight",)


def assign_weights(tensors, weight_map):
    """Checks every tensor, then assigns them all: never a half-loaded model.

    Args:
        tensors: name -> `SafetensorsFile` holding it.
        weight_map: `[(name, source shape, variable, transform)]`.
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
                f"model built from config.json needs {tuple(shape)} (for "
                f"{variable.path})."
            )
    known = {name for name, *_ in weight_map}
    extra = sorted(set(tensors) - known - set(_IGNORED))
    if extra:
        raise ValueError(
            f"{tensors[extra[0]].path}: tensor {extra[0]!r} has no place in the "
            f"model built from config.json ({len(extra)} such tensors: "
            f"{extra[:6]}); is the checkpoint of another architecture?"
        )
    for name, _, variable, transform in weight_map:
        value = np.asarray(tensors[name].get(name), dtype=np.float32)
        variable.assign(transform(value))
