"""Where `from_preset` finds a model, and how the class asked for is built from it.

A preset is one of:

- a directory written by `save_to_preset` (its `config.json` names a registered Keras
  class): read by keras-hub's own `from_preset` of the class asked for, once the
  config is known to hold a keras_gemma model;
- a directory written by keras-hub's `save_to_preset` for its `GemmaBackbone` or
  `Gemma3Backbone` (`keras_hub_format.py`);
- one of keras-hub's Gemma preset names, or a `kaggle://` or `hf://` handle: fetched
  through `kagglehub` / `huggingface_hub` and their caches (`hub.py`), then read as
  the directory it is; a backbone with `load_weights=False` of a name in
  `keras_gemma.presets.PRESETS` is built from that table, with nothing fetched;
- a name in `keras_gemma.presets.PRESETS` (an architecture, no weights);
- a `.gguf` file (llama.cpp);
- a Hugging Face Transformers directory (`config.json` with a `model_type`);
- an official Gemma Flax checkpoint: an orbax directory without `config.json`, or
  Kaggle's directory holding one beside `tokenizer.model` (`flax.py`).

Except directories written by `save_to_preset`, these are read by loaders of this
package, each an object with
`backbone_config()` (`GemmaBackbone` arguments), `check_weights()` (fails before a
model is built when there are none to load), `load_weights(backbone)` (all or nothing),
`has_tokenizer` and `load_tokenizer(cls, **kwargs)`. Nothing here imports a model class
(DESIGN.md: dependencies point from models/ to convert/): the class to build is handed
in, and the classes it needs (`backbone_cls`, `preprocessor_cls`, `tokenizer_cls`) are
its own attributes, as in keras-hub.
"""

import collections
import json
import os

import keras
import keras_hub

from keras_gemma import presets
from keras_gemma.convert import hub
from keras_gemma.convert import keras_hub_format

# The kinds of class `from_preset` builds, told by keras-hub's public base classes.
_KINDS = (
    keras_hub.models.Backbone,
    keras_hub.models.Task,
    keras_hub.models.Preprocessor,
    keras_hub.tokenizers.Tokenizer,
)

KerasPreset = collections.namedtuple("KerasPreset", ["directory", "config"])


def from_preset(cls, preset, keras_from_preset, **kwargs):
    """The one `from_preset` of keras_gemma's four classes.

    Args:
        cls: the class asked for, a subclass of keras-hub's `Backbone`, `Task`,
            `Preprocessor` or `Tokenizer`.
        preset: a preset directory, a named architecture, a `.gguf` file or a
            Transformers directory (see the module docstring).
        keras_from_preset: keras-hub's own `from_preset` of `cls`, which reads
            directories written by `save_to_preset`.
        **kwargs: the caller's: `load_weights` for models, `config_file` for
            the preprocessing layers, and constructor arguments. For a task,
            `dtype` goes to the backbone, `backbone` and `preprocessor` (None
            for none) replace the preset's, the rest go to the task; for the
            others, all go to the constructor of `cls`.
    """
    kind = _kind(cls)
    if hub.is_hub_preset(preset):
        architecture_only = kind is keras_hub.models.Backbone and not kwargs.get("load_weights", True)
        if architecture_only and preset in presets.PRESETS:
            # keras-hub fetches the preset's config for this; keras_gemma knows it.
            source = open_preset(preset)
        else:
            preset = hub.download(preset)
            source = open_preset(preset)
    else:
        source = open_preset(preset)
    if isinstance(source, KerasPreset):
        _check_keras_preset(source, cls, kind)
        built = keras_from_preset(preset, **kwargs)
        if not isinstance(built, cls):
            raise ValueError(
                f"{source.directory} holds a {_name(type(built))}, not a "
                f"{cls.__name__}; {cls.__name__}.from_preset cannot load it."
            )
        return built
    if kind is keras_hub.models.Backbone:
        return load_backbone(cls, source, kwargs.pop("load_weights", True), **kwargs)
    if kind is keras_hub.models.Task:
        return load_task(cls, source, kwargs.pop("load_weights", True), **kwargs)
    kwargs.pop("config_file", None)  # names a file of Keras presets only
    if kind is keras_hub.models.Preprocessor:
        return load_preprocessor(cls, source, **kwargs)
    return source.load_tokenizer(cls, **kwargs)


def open_preset(preset):
    """The loader for `preset`, or a `KerasPreset` for a directory written by
    `save_to_preset`. Anything else is a clear error."""
    if isinstance(preset, str) and preset in presets.PRESETS:
        from keras_gemma.convert.architecture import ArchitectureLoader

        return ArchitectureLoader(preset)
    if isinstance(preset, (str, os.PathLike)) and os.fspath(preset).endswith(".gguf"):
        path = os.fspath(preset)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} not found.")
        from keras_gemma.convert.gguf import GGUFLoader

        return GGUFLoader(path)
    if not isinstance(preset, (str, os.PathLike)) or not os.path.isdir(preset):
        raise ValueError(
            f"Unknown preset {preset!r}: not a named preset "
            f"({', '.join(presets.PRESETS)}), not a .gguf file and not an "
            "existing directory."
        )
    directory = os.fspath(preset)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        from keras_gemma.convert import flax

        checkpoint = flax.find_checkpoint(directory)
        if checkpoint is not None:
            return flax.FlaxLoader(checkpoint)
        raise FileNotFoundError(
            f"{config_path} not found: a preset directory holds a config.json "
            "(written by `save_to_preset`, or a Hugging Face Transformers checkpoint), "
            "or is an official Gemma Flax checkpoint (orbax's `_METADATA`, ...)."
        )
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if config.get("registered_name") in (keras_hub_format.GEMMA, keras_hub_format.GEMMA3):
        return keras_hub_format.KerasHubLoader(directory, config)
    if "registered_name" in config:
        return KerasPreset(directory, config)
    if "model_type" in config:
        from keras_gemma.convert.transformers import TransformersLoader

        return TransformersLoader(directory, config)
    raise ValueError(
        f"{config_path} is neither a Keras preset config (no 'registered_name') "
        "nor a Transformers config (no 'model_type')."
    )


def load_backbone(cls, loader, load_weights=True, **kwargs):
    """`cls` built from the loader's config (`kwargs` override it), with the
    loader's weights if `load_weights`."""
    if load_weights:
        loader.check_weights()
    backbone = cls(**{**loader.backbone_config(), **kwargs})
    if load_weights:
        loader.load_weights(backbone)
    return backbone


def load_preprocessor(cls, loader, **kwargs):
    """`cls(tokenizer=<the loader's>, **kwargs)`, as keras-hub builds a
    preprocessor for a preset that has no preprocessor.json."""
    if "tokenizer" not in kwargs:
        kwargs["tokenizer"] = loader.load_tokenizer(cls.tokenizer_cls)
    return cls(**kwargs)


def load_task(cls, loader, load_weights=True, **kwargs):
    """`cls(backbone=..., preprocessor=..., **kwargs)`, as keras-hub builds a
    task for a preset that has no task.json: `dtype` goes to the backbone; a
    loader without a tokenizer gives no preprocessor."""
    if "preprocessor" not in kwargs:
        # Built before the backbone, so that a missing tokenizer fails before
        # gigabytes of weights are read.
        has_preprocessor = cls.preprocessor_cls is not None and loader.has_tokenizer
        kwargs["preprocessor"] = load_preprocessor(cls.preprocessor_cls, loader) if has_preprocessor else None
    if "backbone" not in kwargs:
        preprocessor = kwargs["preprocessor"]
        if preprocessor is not None and getattr(preprocessor, "tokenizer", None) is not None:
            # Before gigabytes of weights are read (the model checks again).
            pieces = preprocessor.tokenizer.vocabulary_size()
            rows = loader.backbone_config()["vocabulary_size"]
            if pieces > rows:
                raise ValueError(
                    f"The tokenizer of this preset has {pieces} pieces, but its embedding has "
                    f"{rows} rows: ids {rows} and up would have no embedding."
                )
        backbone_kwargs = {"dtype": kwargs.pop("dtype")} if "dtype" in kwargs else {}
        kwargs["backbone"] = load_backbone(cls.backbone_cls, loader, load_weights, **backbone_kwargs)
    return cls(**kwargs)


def _kind(cls):
    """Which of keras-hub's base classes `cls` derives from."""
    for kind in _KINDS:
        if isinstance(cls, type) and issubclass(cls, kind):
            return kind
    raise TypeError(
        f"from_preset builds keras-hub Backbone, Task, Preprocessor or Tokenizer "
        f"subclasses, not {cls!r}."
    )


def _check_keras_preset(source, cls, kind):
    """A `ValueError` unless the preset's backbone is one `cls` works with:
    keras_gemma's classes do not load another library's presets."""
    expected = cls if kind is keras_hub.models.Backbone else cls.backbone_cls
    registered_name = source.config["registered_name"]
    saved = keras.saving.get_registered_object(registered_name)
    if not (isinstance(saved, type) and issubclass(saved, expected)):
        held = _name(saved) if isinstance(saved, type) else f"{registered_name!r} (no class registered under that name)"
        raise ValueError(
            f"{source.directory} holds a {held}, not a keras_gemma model; "
            f"{cls.__name__}.from_preset cannot load it."
        )


def _name(cls):
    return f"{cls.__module__}.{cls.__name__}"
