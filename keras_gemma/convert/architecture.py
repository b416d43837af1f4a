"""A named architecture of `keras_gemma.presets`: a configuration, no weights."""

import copy

from keras_gemma import presets


class ArchitectureLoader:
    """The loader of a name in `keras_gemma.presets.PRESETS` (`gemma_2b_en`,
    `gemma3_1b`, ...): the backbone's configuration only. keras_gemma ships no
    weights and no tokenizer, so a task built from it has no preprocessor."""

    has_tokenizer = False

    def __init__(self, name):
        self.name = name
        self._backbone_config = presets.backbone_config(name)

    def backbone_config(self):
        return copy.deepcopy(self._backbone_config)

    def check_weights(self):
        raise ValueError(
            f"keras_gemma ships no weights for {self.name!r}: it names an "
            "architecture only. Pass `load_weights=False` for random weights, "
            "or a checkpoint (a Hugging Face Transformers or keras_gemma preset "
            "directory, or a .gguf file) for real ones."
        )

    def load_weights(self, backbone):
        self.check_weights()

    def load_tokenizer(self, cls, **kwargs):
        raise ValueError(
            f"The named preset {self.name!r} has no tokenizer; load one from a "
            "checkpoint or build `GemmaTokenizer(proto=...)`."
        )
