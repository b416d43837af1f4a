"""GGUF files (llama.cpp): read, dequantize and map onto keras_gemma.

`GGUFFile` reads the file; the `gguf` package dequantizes each tensor to
float32. The metadata becomes a Transformers-style config (`gguf_config`),
read as any Transformers config is. Tensors are renamed to the transformers
layout, so the one weight map and its all-or-nothing checks
(`keras_gemma.convert.weights`) apply unchanged. llama.cpp's converter stores
Gemma's RMSNorm scales with the `+1` of `x * (1 + scale)` already added; this
module subtracts it again.
"""

import copy
import re

import numpy as np

from keras_gemma.convert import gguf_config
from keras_gemma.convert.gguf_file import GGUFFile
from keras_gemma.convert.transformers_config import backbone_config_from_transformers
from keras_gemma.convert.weights import assign_weights
from keras_gemma.convert.weights import weight_map

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


class GGUFLoader:
    """A `.gguf` file of a Gemma 1, 2 or 3 text model: architecture, weights
    (dequantized to float32) and the SentencePiece tokenizer rebuilt from
    its vocabulary. The metadata is read and checked when the loader is made."""

    has_tokenizer = True

    def __init__(self, path):
        self.path = path
        self.reader = GGUFFile(path)  # a ValueError naming the file if unreadable
        self.architecture = gguf_config.architecture(self.reader)
        self._backbone_config = backbone_config_from_transformers(
            gguf_config.transformers_config(self.reader), path
        )
        self._tensors = None

    def backbone_config(self):
        """`GemmaBackbone` arguments from the file's metadata."""
        return copy.deepcopy(self._backbone_config)

    def check_weights(self):
        """Checks every tensor's quantization type before a model is built."""
        self._open_tensors()

    def load_weights(self, backbone):
        tensors = self._open_tensors()
        sources = {name: tensors for name in tensors.shapes}
        assign_weights(sources, weight_map(backbone))

    def load_tokenizer(self, cls, **kwargs):
        from keras_gemma.convert.gguf_tokenizer import sentencepiece_proto_from_gguf

        return cls(proto=sentencepiece_proto_from_gguf(self.reader), **kwargs)

    def _open_tensors(self):
        if self._tensors is None:
            self._tensors = GGUFTensors(self.reader, self.path, self.architecture)
        return self._tensors
