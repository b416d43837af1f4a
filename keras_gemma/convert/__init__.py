"""Where `from_preset` finds a model: one loader per source format."""

import json
import os

from keras_hub.src.utils.preset_utils import KerasPresetLoader
from keras_hub.src.utils.preset_utils import PresetLoader

from keras_gemma import presets


class ArchitecturePresetLoader(PresetLoader):
    """A named architecture of `keras_gemma.presets`: configuration only."""

    def check_backbone_class(self):
        from keras_gemma.models.gemma_backbone import GemmaBackbone

        return GemmaBackbone

    def load_backbone(self, cls, load_weights, **kwargs):
        if load_weights:
            raise ValueError(
                f"keras_gemma ships no weights for {self.preset!r}: it names an "
                "architecture only. Pass `load_weights=False` for random weights, "
                "or the directory of a checkpoint (Hugging Face Transformers or "
                "keras_gemma preset) for real ones."
            )
        return cls(**{**self.config, **kwargs})

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        raise ValueError(
            f"The named preset {self.preset!r} has no tokenizer; load one from a "
            "checkpoint directory or build `GemmaTokenizer(proto=...)`."
        )

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        # No tokenizer ships with an architecture: the task comes without one.
        kwargs.setdefault("preprocessor", None)
        return super().load_task(cls, load_weights, load_task_weights, **kwargs)

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        return self.load_tokenizer(cls.tokenizer_cls)


def get_preset_loader(preset):
    """The loader for `preset`: a named architecture, a `.gguf` file or a
    local directory."""
    if isinstance(preset, str) and preset in presets.PRESETS:
        return ArchitecturePresetLoader(preset, presets.backbone_config(preset))
    if isinstance(preset, (str, os.PathLike)) and os.fspath(preset).endswith(".gguf"):
        if not os.path.isfile(preset):
            raise FileNotFoundError(f"GGUF file {os.fspath(preset)} not found.")
        from keras_gemma.convert.gguf import GGUFPresetLoader

        return GGUFPresetLoader(os.fspath(preset))
    if not isinstance(preset, (str, os.PathLike)) or not os.path.isdir(preset):
        raise ValueError(
            f"Unknown preset {preset!r}: not a named preset "
            f"({', '.join(presets.PRESETS)}) and not an existing directory."
        )
    preset = os.fspath(preset)
    config_path = os.path.join(preset, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: a preset directory holds a config.json "
            "(written by `save_to_preset`, or a Hugging Face Transformers checkpoint)."
        )
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if "registered_name" in config:
        return KerasPresetLoader(preset, config)
    if "model_type" in config:
        from keras_gemma.convert.transformers import TransformersPresetLoader

        return TransformersPresetLoader(preset, config)
    raise ValueError(
        f"{config_path} is neither a Keras preset config (no 'registered_name') "
        "nor a Transformers config (no 'model_type')."
    )


def from_preset(cls, preset, keras_from_preset, **kwargs):
    """The one `from_preset` of keras_gemma's four classes.

    `cls` is the class asked for (a keras-hub `Backbone`, `Task`,
    `Preprocessor` or `Tokenizer` subclass); `keras_from_preset` is
    keras-hub's own `from_preset` of that class, which reads Keras presets
    (directories written by `save_to_preset`). `kwargs` are those of the
    caller (`load_weights` for models, `config_file` for the preprocessing
    layers, constructor overrides).
    """
    import keras_hub

    loader = get_preset_loader(preset)
    check_preset_class(loader, cls)
    if isinstance(cls, type) and issubclass(cls, keras_hub.models.Backbone):
        return loader.load_backbone(cls, kwargs.pop("load_weights", True), **kwargs)
    if issubclass(cls, keras_hub.models.Task):
        return loader.load_task(cls, kwargs.pop("load_weights", True), True, **kwargs)
    if issubclass(cls, keras_hub.models.Preprocessor):
        return loader.load_preprocessor(cls, kwargs.pop("config_file", "preprocessor.json"), **kwargs)
    return loader.load_tokenizer(cls, kwargs.pop("config_file", "tokenizer.json"), **kwargs)


def check_preset_class(loader, cls):
    """The backbone class of `loader`, which must be one of keras_gemma's."""
    from keras_gemma.models.gemma_backbone import GemmaBackbone

    backbone_cls = loader.check_backbone_class()
    if not issubclass(backbone_cls, GemmaBackbone):
        raise ValueError(
            f"{loader.preset} holds a {backbone_cls.__module__}.{backbone_cls.__name__}, "
            f"not a keras_gemma model; {cls.__name__}.from_preset cannot load it."
        )
    return backbone_cls
