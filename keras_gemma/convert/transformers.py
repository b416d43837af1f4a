"""Hugging Face Transformers checkpoints (`config.json`, safetensors, `tokenizer.model`)."""

import copy
import json
import os

from keras_gemma.convert.safetensors import SafetensorsFile
from keras_gemma.convert.transformers_config import backbone_config_from_transformers
from keras_gemma.convert.weights import assign_weights
from keras_gemma.convert.weights import weight_map

# Where the text decoder's weights live, by checkpoint kind.
_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
# Tensors of a multimodal Gemma 3 checkpoint that the text model does not use.
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class TransformersLoader:
    """A local Hugging Face Transformers directory of a Gemma model.

    `model_type` `gemma`, `gemma2`, `gemma3_text`, and the text part of
    `gemma3` (image-text) checkpoints. The config is checked when the loader
    is made; the weights, when they are loaded, all before any is assigned:
    the presence and shape of every tensor, and that none is left over. A
    failed check raises an error naming the file and tensor.
    """

    has_tokenizer = True

    def __init__(self, directory, config):
        self.directory = directory
        self.config = config
        self.config_path = os.path.join(directory, "config.json")
        self._backbone_config = backbone_config_from_transformers(config, self.config_path)
        self._tensors = None

    def backbone_config(self):
        """`GemmaBackbone` arguments from `config.json`."""
        return copy.deepcopy(self._backbone_config)

    def check_weights(self):
        """Finds every tensor (headers only) before a model is built for them."""
        self._open_weights()

    def load_weights(self, backbone):
        tensors = self._open_weights()
        prefix = _text_prefix(tensors, self.directory)
        if self.config.get("model_type") == "gemma3":
            tensors = {
                name: shard
                for name, shard in tensors.items()
                if not name.startswith(_NON_TEXT_PREFIXES)
            }
        assign_weights(tensors, weight_map(backbone, prefix))

    def tokenizer_path(self):
        path = os.path.join(self.directory, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: keras_gemma's tokenizer needs the SentencePiece "
                "model `tokenizer.model` of the checkpoint (tokenizer.json alone "
                "is not enough)."
            )
        return path

    def load_tokenizer(self, cls, **kwargs):
        return cls(proto=self.tokenizer_path(), **kwargs)

    def _open_weights(self):
        """name -> `SafetensorsFile` for every tensor of the checkpoint."""
        if self._tensors is not None:
            return self._tensors
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(
                name for name in os.listdir(self.directory) if name.endswith(".safetensors")
            )
        if not files:
            raise FileNotFoundError(
                f"No *.safetensors weights in {self.directory} (keras_gemma reads "
                "safetensors, not pytorch_model.bin)."
            )
        tensors = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{index_path} lists {name}, which is not in {self.directory}."
                )
            shard = SafetensorsFile(path)
            for tensor_name in shard.shapes:
                if tensor_name in tensors:
                    raise ValueError(
                        f"Tensor {tensor_name!r} is in both {tensors[tensor_name].path} "
                        f"and {path}."
                    )
                tensors[tensor_name] = shard
        self._tensors = tensors
        return tensors


def _text_prefix(tensors, directory):
    """The prefix of the decoder's tensors (`model.` in text checkpoints)."""
    for prefix in _TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in tensors:
            return prefix
    raise ValueError(
        f"No embedding tensor ({' or '.join(p + 'embed_tokens.weight' for p in _TEXT_PREFIXES)}) "
        f"in the safetensors files of {directory}."
    )
