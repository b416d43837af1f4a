"""keras-hub's Gemma models: its presets and weights read here, ours written for it.

keras-hub's `GemmaBackbone` (Gemma 1 and 2) and `Gemma3Backbone` (text) hold the
same variables as ours under the same paths, but for three things:

- the query, key and value kernels: `(heads, hidden, head_dim)` there,
  `(hidden, heads, head_dim)` here (the layout every other format uses);
- the down projection `ffw_linear`: `(intermediate, hidden)` there, `(hidden,
  intermediate)` here; and ours group the three feed-forward kernels under
  `feed_forward/`;
- Gemma 3's `intermediate_dim` counts one branch of the feed-forward there,
  both branches here (as Gemma 1's does in both libraries).

keras-hub builds its own model from its preset (its `from_preset`, sharded
weights included); its variables are then checked against ours, every one,
before any is copied (`weights.assign_weights`).
"""

import copy
import os
import warnings

import keras
import numpy as np

from keras_gemma.convert.weights import assign_weights

# keras-hub's registered names of the backbones read here.
GEMMA, GEMMA3 = "keras_hub>GemmaBackbone", "keras_hub>Gemma3Backbone"
_SLIDING, _FULL = "sliding_attention", "full_attention"
# What keras-hub's Gemma 1/2 attention fixes, and Gemma 3's local and global layers.
_GEMMA_ROPE = 10_000.0
_GEMMA3_LOCAL_ROPE, _GEMMA3_GLOBAL_ROPE = 10_000.0, 1_000_000.0
_HEADS_KERNELS = ("/query/kernel", "/key/kernel", "/value/kernel")


def backbone_config(registered_name, config, source):
    """Our `GemmaBackbone` arguments for keras-hub's backbone config (`source`
    names the file, for errors)."""
    config = {k: v for k, v in config.items() if k not in ("name", "trainable")}
    if registered_name == GEMMA:
        return config  # our constructor takes keras-hub's GemmaBackbone arguments
    if registered_name != GEMMA3:
        raise ValueError(f"{source}: {registered_name!r} is not a Gemma backbone keras_gemma reads.")
    for option, unsupported in (
        ("vision_encoder", lambda v: v is not None),
        ("use_bidirectional_attention", bool),
        ("is_embedding_model", bool),
        ("local_rope_scaling_factor", lambda v: v != 1.0),
    ):
        if unsupported(config.get(option)):
            raise ValueError(
                f"{source}: keras_gemma reads Gemma 3 text models; {option}={config[option]!r} "
                "is not one."
            )
    num_layers = config["num_layers"]
    sliding = config.get("use_sliding_window_attention", False)
    # As keras-hub: five sliding layers, then one global, from the first.
    layer_types = [_SLIDING if sliding and i % 6 < 5 else _FULL for i in range(num_layers)]
    ours = {
        name: config[name]
        for name in (
            "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
            "head_dim", "query_head_dim_normalize", "use_query_key_norm", "use_post_ffw_norm",
            "use_post_attention_norm", "attention_logit_soft_cap", "final_logit_soft_cap",
            "layer_norm_epsilon", "dropout",
        )
        if name in config
    }
    ours.update(
        intermediate_dim=2 * config["intermediate_dim"],
        layer_types=layer_types,
        rope_max_wavelength=_GEMMA3_GLOBAL_ROPE,
        rope_scaling_factor=config.get("global_rope_scaling_factor", 1.0),
    )
    if _SLIDING in layer_types:
        ours.update(sliding_window_size=config["sliding_window_size"], local_rope_max_wavelength=_GEMMA3_LOCAL_ROPE)
    if _FULL not in layer_types:
        ours.pop("rope_scaling_factor")
    if "dtype" in config:
        ours["dtype"] = config["dtype"]
    return ours


def keras_hub_backbone_config(backbone):
    """`(registered name, config)` of the keras-hub backbone equal to ours, or
    a `ValueError` naming the option keras-hub cannot express."""
    c = backbone.get_config()
    layer_types = list(c["layer_types"])
    n = c["num_layers"]
    gemma3 = c["use_query_key_norm"] or c["local_rope_max_wavelength"] is not None

    def unsupported(option, why):
        return ValueError(f"keras-hub's {'Gemma3Backbone' if gemma3 else 'GemmaBackbone'} cannot hold this model: {option} {why}.")

    scalar = c["query_pre_attn_scalar"]
    normalize = c["query_head_dim_normalize"]
    if scalar is not None:
        if scalar == c["head_dim"]:
            normalize = True
        elif scalar == c["hidden_dim"] / c["num_query_heads"]:
            normalize = False
        else:
            raise unsupported(f"query_pre_attn_scalar={scalar}", "is neither head_dim nor hidden_dim / num_query_heads")
    config = {
        name: c[name]
        for name in (
            "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
            "intermediate_dim", "head_dim", "use_post_ffw_norm", "use_post_attention_norm",
            "attention_logit_soft_cap", "final_logit_soft_cap", "layer_norm_epsilon", "dropout",
        )
    }
    if not normalize and c["head_dim"] != c["hidden_dim"] / c["num_query_heads"]:
        # keras-hub's GemmaDecoderBlock builds its attention with
        # query_head_dim_normalize=True whatever its config says.
        raise unsupported(
            f"queries scaled by (hidden_dim / num_query_heads) ** -0.5 = ({c['hidden_dim']}/{c['num_query_heads']}) ** -0.5",
            "are scaled by head_dim ** -0.5 there (its decoder block ignores query_head_dim_normalize=False)",
        )
    config.update(query_head_dim_normalize=normalize, dtype=c["dtype"])
    sliding = _SLIDING in layer_types
    if gemma3:
        if layer_types not in ([_FULL] * n, [_SLIDING if i % 6 < 5 else _FULL for i in range(n)]):
            raise unsupported(f"layer_types={layer_types}", "is not five sliding layers then one global")
        if sliding and c["local_rope_max_wavelength"] != _GEMMA3_LOCAL_ROPE:
            raise unsupported(f"local_rope_max_wavelength={c['local_rope_max_wavelength']}", f"is not {_GEMMA3_LOCAL_ROPE}")
        if c["rope_max_wavelength"] != _GEMMA3_GLOBAL_ROPE:
            raise unsupported(f"rope_max_wavelength={c['rope_max_wavelength']}", f"is not {_GEMMA3_GLOBAL_ROPE}")
        if c["intermediate_dim"] % 2:
            raise unsupported(f"intermediate_dim={c['intermediate_dim']}", "is odd (it counts both branches)")
        config.update(
            intermediate_dim=c["intermediate_dim"] // 2,
            use_query_key_norm=c["use_query_key_norm"],
            use_sliding_window_attention=sliding,
            global_rope_scaling_factor=c["rope_scaling_factor"],
            image_size=896,  # unused without a vision encoder; keras-hub requires it
        )
        if sliding:
            config["sliding_window_size"] = c["sliding_window_size"]
        return GEMMA3, config
    if layer_types not in ([_FULL] * n, [_SLIDING if i % 2 == 0 else _FULL for i in range(n)]):
        raise unsupported(f"layer_types={layer_types}", "is not all global, nor sliding and global in turn")
    if c["rope_max_wavelength"] != _GEMMA_ROPE:
        raise unsupported(f"rope_max_wavelength={c['rope_max_wavelength']}", f"is not {_GEMMA_ROPE}")
    if c["rope_scaling_factor"] != 1.0:
        raise unsupported(f"rope_scaling_factor={c['rope_scaling_factor']}", "is not 1.0")
    config["use_sliding_window_attention"] = sliding
    if sliding:
        config["sliding_window_size"] = c["sliding_window_size"]
    return GEMMA, config


def weight_map(backbone):
    """`[(keras-hub variable path, its shape, our variable, transform)]` for
    every variable of our `backbone` (see the module docstring)."""
    entries = []
    for variable in backbone.weights:
        name, shape = variable.path.replace("feed_forward/", ""), tuple(variable.shape)
        if name.endswith(_HEADS_KERNELS):
            entries.append((name, (shape[1], shape[0], shape[2]), variable, lambda w: w.transpose(1, 0, 2)))
        elif name.endswith("/ffw_linear/kernel"):
            entries.append((name, shape[::-1], variable, np.transpose))
        else:
            entries.append((name, shape, variable, lambda w: w))
    return entries


class ModelVariables:
    """A keras-hub model's variables as the tensors of a checkpoint (what
    `assign_weights` reads): `path` (the file, for errors), `shapes`, `get`."""

    def __init__(self, model, path):
        self.path = path
        self._variables = {v.path: v for v in model.weights}
        self.shapes = {name: tuple(v.shape) for name, v in self._variables.items()}

    def get(self, name):
        return keras.ops.convert_to_numpy(self._variables[name])


def copy_from_keras_hub(theirs, backbone, source):
    """keras-hub backbone `theirs`' weights onto our `backbone`, all checked
    first (`source`: where they came from, for errors)."""
    tensors = ModelVariables(theirs, source)
    assign_weights({name: tensors for name in tensors.shapes}, weight_map(backbone))


def keras_hub_backbone(backbone):
    """keras-hub's backbone of our `backbone`'s architecture (its own random
    weights)."""
    import keras_hub

    registered_name, config = keras_hub_backbone_config(backbone)
    cls = keras_hub.models.GemmaBackbone if registered_name == GEMMA else keras_hub.models.Gemma3Backbone
    return cls(**config)


def keras_hub_weights_level(path):
    """`"backbone"` or `"task"` if `path` is a `.weights.h5` file keras-hub's
    Gemma models wrote (`save_weights`: its feed-forward layers are
    `gating_ffw`, `gating_ffw_2`, `ffw_linear`; ours sit under
    `feed_forward/`), else None."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        return None  # not HDF5: Keras' own load_weights says what it is
    with f:
        names = []
        f.visit(names.append)
    if not any(name.endswith(("/gating_ffw", "/ffw_linear")) for name in names):
        return None
    task = any(name.startswith(("layers/gemma_backbone/", "layers/gemma3_backbone/")) for name in names)
    return "task" if task else "backbone"


def load_if_keras_hub_weights(backbone, path, skip_mismatch, kwargs):
    """Loads `path` onto `backbone` if it is keras-hub's `.weights.h5`
    (`keras_hub_weights_level`); whether it was (else Keras' own
    `load_weights` reads it)."""
    path = os.fspath(path)
    level = keras_hub_weights_level(path) if path.endswith(".weights.h5") else None
    if level is None:
        return False
    if skip_mismatch or kwargs:
        raise ValueError(
            f"{path} is keras-hub's layout, converted whole: skip_mismatch and {sorted(kwargs)} do not apply."
        )
    load_keras_hub_weights(backbone, path, level)
    return True


def load_keras_hub_weights(backbone, path, level):
    """keras-hub's `.weights.h5` at `path` (`level` as
    `keras_hub_weights_level` tells) onto our `backbone`: keras-hub's own
    model of this architecture reads it (Keras' `load_weights`), then every
    variable is checked and copied (`copy_from_keras_hub`)."""
    import keras_hub

    theirs = keras_hub_backbone(backbone)
    holder = theirs
    if level == "task":
        task_cls = keras_hub.models.Gemma3CausalLM if isinstance(theirs, keras_hub.models.Gemma3Backbone) else keras_hub.models.GemmaCausalLM
        holder = task_cls(backbone=theirs, preprocessor=None)
    mismatch = f"{path} holds keras-hub Gemma weights that do not fit this model's architecture"
    # Keras reads a file with more blocks than the model without a word: the
    # weight tensors are counted and their shapes compared first (scalars
    # aside: a task's file holds random-seed states too).
    stored = sorted(shape for shape in _stored_shapes(path) if shape)
    expected = sorted(tuple(w.shape) for w in holder.weights if w.shape)
    if stored != expected:
        raise ValueError(
            f"{mismatch}: the file has {len(stored)} tensors, keras-hub's {type(holder).__name__} "
            f"of it {len(expected)}, and their shapes differ ({sorted(set(stored) ^ set(expected))[:4]})."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns before it raises on a mismatch
            holder.load_weights(path)
    except ValueError as error:
        raise ValueError(f"{mismatch} (keras-hub's {type(holder).__name__} of it could not read them): {error}") from error
    copy_from_keras_hub(theirs, backbone, path)


def _stored_shapes(path):
    """The shape of every tensor a `.weights.h5` file holds."""
    import h5py

    shapes = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: shapes.append(tuple(item.shape)) if isinstance(item, h5py.Dataset) else None)
    return shapes


def to_keras_hub(backbone):
    """A keras-hub backbone equal to our `backbone`, weights included."""
    theirs = keras_hub_backbone(backbone)
    cls = type(theirs)
    by_path = {v.path: v for v in theirs.weights}
    entries = weight_map(backbone)
    missing = sorted(set(by_path) - {name for name, *_ in entries})
    if missing or len(entries) != len(by_path):
        raise ValueError(f"keras-hub's {cls.__name__} has variables this model does not: {missing[:6]}")
    for name, shape, variable, transform in entries:
        value = keras.ops.convert_to_numpy(variable)
        # Each transform is its own inverse here (a transpose of two axes).
        by_path[name].assign(transform(value))
    return theirs


class KerasHubLoader:
    """A directory written by keras-hub's `save_to_preset` for its
    `GemmaBackbone` or `Gemma3Backbone` (text): config, weights (sharded or
    not) and, when present, the tokenizer."""

    def __init__(self, directory, config):
        self.directory = directory
        self.config_path = os.path.join(directory, "config.json")
        self.registered_name = config["registered_name"]
        self._backbone_config = backbone_config(self.registered_name, config.get("config", {}), self.config_path)

    @property
    def has_tokenizer(self):
        return os.path.isfile(self._vocabulary_path())

    def backbone_config(self):
        return copy.deepcopy(self._backbone_config)

    def check_weights(self):
        names = ("model.weights.h5", "model.weights.json")
        if not any(os.path.isfile(os.path.join(self.directory, name)) for name in names):
            raise FileNotFoundError(
                f"{self.directory} holds no keras-hub weights (model.weights.h5, or "
                "model.weights.json for sharded ones); pass load_weights=False for random weights."
            )

    def load_weights(self, backbone):
        import keras_hub

        self.check_weights()
        theirs = keras_hub.models.Backbone.from_preset(self.directory)
        copy_from_keras_hub(theirs, backbone, os.path.join(self.directory, "model.weights.h5"))

    def _vocabulary_path(self):
        return os.path.join(self.directory, "assets", "tokenizer", "vocabulary.spm")

    def load_tokenizer(self, cls, **kwargs):
        path = self._vocabulary_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: this keras-hub preset has no tokenizer.")
        return cls(proto=path, **kwargs)


def export(model, preset_dir, max_shard_size=10):
    """Writes our backbone or causal LM (`model`) as a keras-hub preset: its
    `GemmaBackbone` / `Gemma3Backbone`, and for a causal LM its task and, with
    a preprocessor, its tokenizer and preprocessor; keras-hub's
    `save_to_preset` writes the files. Nothing is written when the model is
    one keras-hub cannot hold."""
    import keras_hub

    backbone = getattr(model, "backbone", model)
    theirs = to_keras_hub(backbone)
    if backbone is model:
        theirs.save_to_preset(preset_dir, max_shard_size=max_shard_size)
        return
    models = keras_hub.models
    gemma3 = isinstance(theirs, models.Gemma3Backbone)
    preprocessor = None
    if model.preprocessor is not None:
        proto = model.preprocessor.tokenizer.proto
        if gemma3:
            tokenizer = models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
            preprocessor_cls = models.Gemma3CausalLMPreprocessor
        else:
            tokenizer, preprocessor_cls = models.GemmaTokenizer(proto=proto), models.GemmaCausalLMPreprocessor
        preprocessor = preprocessor_cls(tokenizer=tokenizer, sequence_length=model.preprocessor.sequence_length)
    task_cls = models.Gemma3CausalLM if gemma3 else models.GemmaCausalLM
    task_cls(backbone=theirs, preprocessor=preprocessor).save_to_preset(preset_dir, max_shard_size=max_shard_size)
