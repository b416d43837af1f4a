"""Presets on the model hubs: keras-hub's preset names, `kaggle://` and `hf://` handles.

They mean what they mean in keras-hub: a name of keras-hub's Gemma or Gemma 3 presets
is its Kaggle handle (`keras_hub.models.GemmaBackbone.presets[name]["kaggle_handle"]`,
keras-hub's public registry); `kaggle://{owner}/{model}/{framework}/{variation}[/
{version}]` is fetched by `kagglehub` and `hf://{owner}/{name}` by `huggingface_hub`,
each with its own cache, offline mode (`HF_HUB_OFFLINE`; a versioned Kaggle handle found
in `KAGGLEHUB_CACHE` needs no network) and credentials from the environment
(`KAGGLE_USERNAME` / `KAGGLE_KEY`, `HF_TOKEN`). What comes down is a local directory,
read like any other preset directory: a keras-hub preset, a keras_gemma one or a
Hugging Face Transformers checkpoint.
"""

import json
import os

KAGGLE, HF = "kaggle://", "hf://"
# What a preset directory on the Hugging Face Hub holds that a loader here reads:
# keras presets (config, weights, assets) and transformers checkpoints (config,
# safetensors, SentencePiece model); not the .bin, .gguf or original/ copies.
_KERAS_OPTIONAL = ("tokenizer.json", "preprocessor.json", "task.json", "assets/tokenizer/vocabulary.spm")
_HF_PATTERNS = ["*.json", "*.safetensors", "*.h5", "tokenizer.model", "assets/*", "assets/**/*"]


def keras_hub_presets():
    """`{name: kaggle handle}` of keras-hub's Gemma and Gemma 3 presets."""
    import keras_hub

    handles = {}
    for cls in (keras_hub.models.GemmaBackbone, keras_hub.models.Gemma3Backbone):
        for name, preset in cls.presets.items():
            handles[name] = preset["kaggle_handle"]
    return handles


def is_hub_preset(preset):
    """Whether `preset` is a hub handle or one of keras-hub's preset names."""
    if not isinstance(preset, str):
        return False
    if preset.startswith((KAGGLE, HF)):
        return True
    return not os.path.exists(preset) and preset in keras_hub_presets()


def download(preset):
    """The local directory of hub preset `preset` (downloaded, or found in
    the library's cache)."""
    handle = keras_hub_presets().get(preset, preset)
    if handle.startswith(KAGGLE):
        return _kaggle(handle, preset)
    return _hugging_face(handle)


def _kaggle(handle, preset):
    """The local directory of a Kaggle handle's files, fetched one by one as
    keras-hub fetches them (so each library finds what the other cached)."""
    import kagglehub

    path = handle[len(KAGGLE):]
    if len(path.split("/")) not in (4, 5) or "" in path.split("/"):
        raise ValueError(
            f"Unexpected Kaggle handle {handle!r}: the form is "
            "kaggle://{owner}/{model}/{framework}/{variation}[/{version}], for example "
            "'kaggle://keras/gemma/keras/gemma_2b_en/3'."
        )
    named = f" (keras-hub's preset {preset!r})" if preset != handle else ""

    def fetch(name, required=True):
        try:
            return kagglehub.model_download(path, name)
        except Exception as error:  # kagglehub raises its own HTTP, auth and network errors
            if not _absent(error):
                raise ValueError(
                    f"Could not fetch {name} of {handle}{named} with kagglehub: "
                    f"{type(error).__name__}: {error}. Gemma models are gated: accept the license "
                    "on kaggle.com and set KAGGLE_USERNAME and KAGGLE_KEY; offline, a versioned "
                    "handle loads from the kagglehub cache "
                    f"({os.environ.get('KAGGLEHUB_CACHE', '~/.cache/kagglehub')}) once downloaded."
                ) from error
            if required:
                raise FileNotFoundError(f"{handle}{named} has no {name}.") from error
            return None

    try:
        config_path = fetch("config.json")
    except (ValueError, FileNotFoundError) as first:
        # No config.json to fetch (a Flax checkpoint), or the whole version is
        # cached as one bundle (Kaggle's and Colab's caches): the bundle.
        try:
            directory = kagglehub.model_download(path)
        except Exception:
            raise first from None
        return directory
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if "registered_name" in config:  # a Keras preset, laid out as keras-hub saves one
        if fetch("model.weights.h5", required=False) is None:
            _fetch_shards(fetch, "model.weights.json")
        for name in _KERAS_OPTIONAL:
            fetch(name, required=False)
    else:  # a Transformers checkpoint
        if not _fetch_shards(fetch, "model.safetensors.index.json"):
            fetch("model.safetensors", required=False)
        fetch("tokenizer.model", required=False)
    return os.path.dirname(config_path)


def _fetch_shards(fetch, index_name):
    """Fetches the index `index_name` (if there is one) and every file its
    `weight_map` names; whether there was an index."""
    index_path = fetch(index_name, required=False)
    if index_path is None:
        return False
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    names = set()
    for value in weight_map.values():
        names.update(value if isinstance(value, list) else [value])
    for name in sorted(names):
        fetch(name)
    return True


def _absent(error):
    """Whether a kagglehub error says the file is not in the model (as
    keras-hub's `get_file` tells them), rather than that it could not ask."""
    message = str(error)
    return isinstance(error, FileNotFoundError) or "404 Client Error" in message or "is not present in the model files" in message


def _hugging_face(handle):
    import huggingface_hub

    repo_id = handle[len(HF):]
    if len(repo_id.split("/")) not in (1, 2) or "" in repo_id.split("/"):
        raise ValueError(
            f"Unexpected Hugging Face handle {handle!r}: the form is hf://{{owner}}/{{name}}, for "
            "example 'hf://google/gemma-2b'."
        )
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=_HF_PATTERNS)
    except Exception as error:  # huggingface_hub raises its own HTTP, auth and offline errors
        raise ValueError(
            f"Could not fetch {handle} with huggingface_hub: {type(error).__name__}: {error}. "
            "Gated models (Gemma) need the license accepted on huggingface.co and HF_TOKEN set; "
            "with HF_HUB_OFFLINE=1 the repository loads from the cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) once it has been downloaded."
        ) from error
