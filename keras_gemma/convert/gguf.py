"""GGUF files (llama.cpp): read, dequantize and map onto keras_gemma.

`GGUFFile` reads the file; the `gguf` package dequantizes each tensor to
float32.
llama.cpp's converter stores Gemma's RMSNorm scales with the `+1` of
`x * (1 + scale)` already added; this module subtracts it again. Tensors are
renamed to the transformers layout, so the weight mapping and the all-or-
nothing checks of `keras_gemma.convert.transformers` apply unchanged.
"""

import re

import numpy as np
from keras_hub.src.utils.preset_utils import PresetLoader

from keras_gemma.convert.gguf_file import GGUFFile
from keras_gemma.convert.transformers import _gemma_weight_map
from keras_gemma.convert.transformers import assign_weights

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# Quantization types keras_gemma dequantizes (through the gguf package).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp block tensor name -> transformers name, per layout.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _field(reader, key, default=None, required=False, path=""):
    """A metadata value (scalar, string or list), or `default` if absent."""
    if key not in reader.metadata:
        if required:
            raise ValueError(f"{path} lacks the GGUF metadata field {key!r}.")
        return default
    return reader.metadata[key]


class GGUFTensors:
    """The tensors of a GGUF file under transformers names, dequantized on
    demand (same interface as `SafetensorsFile`: `path`, `shapes`, `get`)."""

    def __init__(self, reader, path, architecture):
        self.path = path
        self._tensors = {}
        for tensor in reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise ValueError(
                    f"{path}: tensor {tensor.name!r} is quantized as "
                    f"{tensor.tensor_type.name}, which keras_gemma does not read "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})."
                )
            self._tensors[self._rename(tensor.name, architecture)] = tensor
        # ggml lists dimensions fastest first: reverse them to numpy order.
        self.shapes = {
            name: tuple(int(n) for n in reversed(list(t.shape)))
            for name, t in self._tensors.items()
        }

    @staticmethod
    def _rename(name, architecture):
        if name == "token_embd.weight":
            return "model.embed_tokens.weight"
        if name == "output_norm.weight":
            return "model.norm.weight"
        match = _BLOCK.fullmatch(name)
        if match and match.group(2) in _BLOCK_NAMES:
            block, kind = match.groups()
            return f"model.layers.{block}.{_BLOCK_NAMES[kind]}.weight"
        if match and match.group(2) == "ffn_norm":
            # Gemma 1 names its pre-feed-forward norm after the attention.
            hf_name = "post_attention_layernorm" if architecture == "gemma" else "pre_feedforward_layernorm"
            return f"model.layers.{match.group(1)}.{hf_name}.weight"
        return name  # unknown: reported as unexpected by assign_weights

    def get(self, name):
        from gguf import quants

        tensor = self._tensors[name]
        value = quants.dequantize(tensor.data, tensor.tensor_type)
        value = np.asarray(value, dtype=np.float32).reshape(self.shapes[name])
        if name.endswith("norm.weight"):
            value = value - 1.0  # llama.cpp stored 1 + scale
        return value


class GGUFPresetLoader(PresetLoader):
    """Loads a `.gguf` file of a Gemma 1, 2 or 3 text model."""

    def __init__(self, preset, config=None):
        reader = GGUFFile(preset)  # a ValueError naming the file if unreadable
        self.reader = reader
        self.preset = preset
        architecture = _field(reader, "general.architecture", required=True, path=preset)
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{preset} holds a {architecture!r} model; keras_gemma reads GGUF "
                f"architectures {', '.join(map(repr, SUPPORTED_ARCHITECTURES))}."
            )
        self.architecture = architecture
        super().__init__(preset, self._backbone_config())

    def _backbone_config(self):
        arch, r, path = self.architecture, self.reader, self.preset

        def get(key, default=None, required=True):
            return _field(r, f"{arch}.{key}", default, required and default is None, path)

        num_layers = int(get("block_count"))
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", hidden // heads))
        tokens = r.metadata.get("tokenizer.ggml.tokens")
        embedding = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
        if embedding is None:
            raise ValueError(f"{path} lacks the tensor 'token_embd.weight'.")
        config = {
            "vocabulary_size": int(embedding.shape[1]) if tokens is None else len(tokens),
            "num_layers": num_layers,
            "num_query_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "hidden_dim": hidden,
            "intermediate_dim": 2 * int(get("feed_forward_length")),
            "head_dim": head_dim,
            "layer_norm_epsilon": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_max_wavelength": float(get("rope.freq_base", 10000.0)),
        }
        if arch == "gemma":
            return config
        # As llama.cpp: Gemma 2 alternates local/global layers, Gemma 3 has five
        # local layers per global one; queries scale by head_dim except in the
        # 27B models (62 or 46 layers), which use hidden / heads.
        period = 2 if arch == "gemma2" else 6
        is_27b = num_layers in ((46,) if arch == "gemma2" else (62,))
        config.update(
            {
                "use_post_attention_norm": True,
                "use_post_ffw_norm": True,
                "query_pre_attn_scalar": hidden / heads if is_27b else head_dim,
                "sliding_window_size": int(get("attention.sliding_window")),
                "layer_types": [
                    "sliding_attention" if (i + 1) % period else "full_attention"
                    for i in range(num_layers)
                ],
            }
        )
        if arch == "gemma2":
            config["attention_logit_soft_cap"] = get("attn_logit_softcapping", 50.0)
            config["final_logit_soft_cap"] = get("final_logit_softcapping", 30.0)
            return config
        scaling = _field(r, "gemma3.rope.scaling.type", "none")
        factor = float(_field(r, "gemma3.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        if scaling not in ("none", "linear"):
            raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported.")
        config.update(
            {
                "use_query_key_norm": True,
                "local_rope_max_wavelength": 10000.0,
                "rope_scaling_factor": factor,
            }
        )
        return config

    def check_backbone_class(self):
        from keras_gemma.models.gemma_backbone import GemmaBackbone

        return GemmaBackbone

    def load_backbone(self, cls, load_weights, **kwargs):
        tensors = GGUFTensors(self.reader, self.preset, self.architecture) if load_weights else None
        backbone = cls(**self.config, **kwargs)
        if load_weights:
            sources = {name: tensors for name in tensors.shapes}
            assign_weights(sources, _gemma_weight_map(backbone), progress=True)
        return backbone

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        from keras_gemma.convert.gguf_tokenizer import sentencepiece_proto_from_gguf

        return cls(proto=sentencepiece_proto_from_gguf(self.reader), **kwargs)

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        return super().load_preprocessor(cls, **kwargs)


