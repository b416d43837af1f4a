"""Hugging Face Transformers checkpoints (`config.json`, safetensors, `tokenizer.model`)."""

import json
import os

import numpy as np
from tqdm.auto import tqdm
from keras_hub.src.utils.preset_utils import PresetLoader

from keras_gemma.convert.safetensors import SafetensorsFile

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
# transformers writes "gelu" in the released Gemma 1 configs and means the tanh
# approximation (it forces it); newer versions write "gelu_pytorch_tanh".
_TANH_GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_tanh")
# Where the text decoder's weights live, by checkpoint kind.
_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
# Tensors of a multimodal Gemma 3 checkpoint that the text model does not use.
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class TransformersPresetLoader(PresetLoader):
    """Loads a local Hugging Face Transformers directory of a Gemma model.

    `model_type` `gemma`, `gemma2`, `gemma3_text`, and the text part of
    `gemma3` (image-text) checkpoints. Everything is checked before any weight
    is assigned: the config's `model_type` and options, the presence and
    shape of every tensor, and that no tensor is left over. A failed check
    raises an error naming the file and tensor, and no model is returned.
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

    def text_config(self):
        """The decoder's config (the `text_config` of an image-text model)."""
        if self.config.get("model_type") == "gemma3":
            if "text_config" not in self.config:
                raise ValueError(f"{self.config_path} (gemma3) lacks 'text_config'.")
            return {"model_type": "gemma3_text", **self.config["text_config"]}
        return self.config

    def backbone_config(self):
        """`GemmaBackbone` arguments from the transformers config."""
        self.check_backbone_class()
        c = self.text_config()
        model_type = c.get("model_type", "gemma3_text")

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
        if not c.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)):
            unsupported("tie_word_embeddings", False, "Gemma ties them")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in c:
                raise ValueError(f"{self.config_path} lacks {key!r}.")
        num_layers, num_heads = c["num_hidden_layers"], c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
        config = {
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
        if model_type == "gemma":
            rope = self._rope(c.get("rope_parameters"), c.get("rope_theta", 10000.0))
            config["rope_max_wavelength"] = rope["rope_theta"]
            return config
        # Gemma 2 and 3: post-norms, per-layer local/global attention, scalars.
        period = 2 if model_type == "gemma2" else c.get("sliding_window_pattern", 6)
        layer_types = c.get("layer_types") or [
            "sliding_attention" if (i + 1) % period else "full_attention"
            for i in range(num_layers)
        ]
        config.update(
            {
                "use_post_attention_norm": True,
                "use_post_ffw_norm": True,
                "query_pre_attn_scalar": c.get("query_pre_attn_scalar", head_dim),
                "attention_logit_soft_cap": c.get("attn_logit_softcapping"),
                "final_logit_soft_cap": c.get("final_logit_softcapping"),
                "sliding_window_size": c.get("sliding_window"),
                "layer_types": list(layer_types),
            }
        )
        parameters = c.get("rope_parameters") or {}
        if model_type == "gemma2":
            rope = self._rope(parameters, c.get("rope_theta", 10000.0))
            config["rope_max_wavelength"] = rope["rope_theta"]
            return config
        # Gemma 3: a RoPE per attention type, global layers possibly scaled.
        if "full_attention" in parameters or "sliding_attention" in parameters:
            global_rope = self._rope(parameters.get("full_attention"), 1_000_000.0)
            local_rope = self._rope(parameters.get("sliding_attention"), 10_000.0)
        else:
            global_rope = self._rope(
                c.get("rope_scaling") or parameters or None, c.get("rope_theta", 1_000_000.0)
            )
            local_rope = self._rope(None, c.get("rope_local_base_freq", 10_000.0))
        if local_rope.get("factor", 1.0) != 1.0:
            unsupported("rope_parameters", parameters, "scaled RoPE on local layers")
        config.update(
            {
                "use_query_key_norm": True,
                "rope_max_wavelength": global_rope["rope_theta"],
                "rope_scaling_factor": float(global_rope.get("factor", 1.0)),
                "local_rope_max_wavelength": local_rope["rope_theta"],
            }
        )
        return config

    def _rope(self, parameters, default_theta):
        """A RoPE entry `{"rope_theta", "factor"}`; default or linear only."""
        parameters = dict(parameters or {})
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(
                f"{self.config_path}: rope_type={rope_type!r} is not supported "
                "(default and linear RoPE only)."
            )
        parameters.setdefault("rope_theta", default_theta)
        parameters["rope_theta"] = float(parameters["rope_theta"])
        if rope_type == "default":
            parameters.pop("factor", None)
        return parameters

    def load_backbone(self, cls, load_weights, **kwargs):
        config = self.backbone_config()
        tensors = self._open_weights() if load_weights else None
        backbone = cls(**config, **kwargs)
        if load_weights:
            prefix = _text_prefix(tensors, self.preset)
            if self.config.get("model_type") == "gemma3":
                tensors = {
                    name: shard
                    for name, shard in tensors.items()
                    if not name.startswith(_NON_TEXT_PREFIXES)
                }
            assign_weights(tensors, _gemma_weight_map(backbone, prefix))
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


def _text_prefix(tensors, preset):
    """The prefix of the decoder's tensors (`model.` in text checkpoints)."""
    for prefix in _TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in tensors:
            return prefix
    raise ValueError(
        f"No embedding tensor ({' or '.join(p + 'embed_tokens.weight' for p in _TEXT_PREFIXES)}) "
        f"in the safetensors files of {preset}."
    )


def _gemma_weight_map(backbone, prefix="model."):
    """[(transformers name, source shape, keras variable, transform)]."""
    n, k, h = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim
    d, f = backbone.hidden_dim, backbone.intermediate_dim // 2
    v = backbone.vocabulary_size

    def same(w):
        return w

    def transpose(w):
        return w.T

    def rows_to_heads(heads):
        # q/k/v_proj (heads * head_dim, hidden) -> kernel (hidden, heads, head_dim)
        return lambda w: w.T.reshape(d, heads, h)

    def columns_to_heads(w):
        # o_proj (hidden, heads * head_dim) -> kernel (heads, head_dim, hidden)
        return w.T.reshape(n, h, d)

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


# Tensors a transformers checkpoint may carry that keras_gemma derives itself
# (the output projection is tied to the embedding).
_IGNORED = ("lm_head.weight",)


def assign_weights(tensors, weight_map, progress=True):
    """Checks every tensor, then assigns them all: never a half-loaded model.

    Args:
        tensors: name -> the source holding it (`SafetensorsFile`, or
            `GGUFTensors`): `.path`, `.shapes[name]`, `.get(name)`.
        weight_map: `[(name, source shape, variable, transform)]`.
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
    bar = tqdm(weight_map, desc="Loading weights", unit="tensor", disable=not progress)
    for name, _, variable, transform in bar:
        value = np.asarray(tensors[name].get(name), dtype=np.float32)
        variable.assign(transform(value))
