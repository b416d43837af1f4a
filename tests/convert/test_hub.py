"""keras-hub's preset names, `kaggle://` and `hf://` handles, resolved through
kagglehub's and huggingface_hub's caches offline (conftest points both at the
suite's own caches; the tests place files in their layouts). keras-hub and
transformers, resolving the same handles from the same caches, give the
reference logits."""

import os
import shutil

import keras_hub
import numpy as np
import pytest

import keras_gemma
from helpers import TINY, save_transformers_gemma, to_numpy, train_sentencepiece, transformers_logits

TOKENS = np.array([[2, 17, 130, 41, 9, 77, 5], [2, 88, 5, 31, 0, 0, 0]], "int32")
INPUTS = {"token_ids": TOKENS, "padding_mask": (TOKENS > 0).astype("int32")}


def keras_hub_preset(path, seed, spm_proto):
    """A small random keras-hub GemmaCausalLM saved with its own save_to_preset."""
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=384, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=64, head_dim=16,
    )
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        w.assign((rng.standard_normal(w.shape) * 0.2).astype("float32"))
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(keras_hub.models.GemmaTokenizer(proto=spm_proto), sequence_length=16)
    keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(path))


def place_in_kaggle_cache(handle, directory, bundle=False):
    """`directory` as kagglehub stores a model version it downloaded file by
    file (as keras-hub asks for them), or as one bundle."""
    owner, model, framework, variation, version = handle[len("kaggle://"):].split("/")
    root = os.path.join(os.environ["KAGGLEHUB_CACHE"], "models", owner, model, framework, variation)
    shutil.copytree(directory, os.path.join(root, version))
    if bundle:
        open(os.path.join(root, f"{version}.complete"), "w").close()
        return
    for parent, _, files in os.walk(directory):
        for name in files:
            relative = os.path.relpath(os.path.join(parent, name), directory)
            marker = os.path.join(root, ".complete", version, relative + ".complete")
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()


def place_in_hf_cache(repo_id, directory, commit="1" * 40):
    """`directory` as huggingface_hub stores a downloaded repository."""
    import huggingface_hub

    repo = os.path.join(huggingface_hub.constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(directory, os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def test_a_keras_hub_preset_name(tmp_path, spm_proto):
    """`from_preset("gemma_2b_en")` means keras-hub's Kaggle handle for it."""
    handle = keras_hub.models.GemmaBackbone.presets["gemma_2b_en"]["kaggle_handle"]
    keras_hub_preset(tmp_path / "preset", seed=1, spm_proto=spm_proto)
    place_in_kaggle_cache(handle, tmp_path / "preset")
    # keras-hub probes files a preset lacks (task.weights.h5), which only the
    # network can answer: its reference reads the same files from the directory.
    expected = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    lm = keras_gemma.GemmaCausalLM.from_preset("gemma_2b_en")
    np.testing.assert_allclose(to_numpy(lm(INPUTS)), to_numpy(expected(INPUTS)), atol=1e-5, rtol=1e-5)
    assert lm.preprocessor.tokenizer.get_vocabulary() == expected.preprocessor.tokenizer.get_vocabulary()
    assert lm.generate("The quick", max_length=10) == expected.generate("The quick", max_length=10)
    tokenizer = keras_gemma.GemmaTokenizer.from_preset("gemma_2b_en")
    assert tokenizer.get_vocabulary() == expected.preprocessor.tokenizer.get_vocabulary()
    # An architecture needs no download: the backbone's config is keras_gemma's table.
    empty = keras_gemma.GemmaBackbone.from_preset("gemma_7b_en", load_weights=False, num_layers=1, vocabulary_size=16)
    assert (empty.num_query_heads, empty.hidden_dim) == (16, 3072)


def test_kaggle_handles_cached_file_by_file_or_as_a_bundle(tmp_path, spm_proto):
    keras_hub_preset(tmp_path / "preset", seed=2, spm_proto=spm_proto)
    place_in_kaggle_cache("kaggle://someone/gemma/keras/tiny_gemma/4", tmp_path / "preset")
    expected = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    lm = keras_gemma.GemmaCausalLM.from_preset("kaggle://someone/gemma/keras/tiny_gemma/4")
    np.testing.assert_allclose(to_numpy(lm(INPUTS)), to_numpy(expected(INPUTS)), atol=1e-5, rtol=1e-5)
    # A transformers checkpoint on Kaggle, cached as one bundle.
    save_transformers_gemma(tmp_path / "transformers", TINY, seed=3, spm_proto=spm_proto)
    place_in_kaggle_cache("kaggle://someone/gemma/transformers/tiny/1", tmp_path / "transformers", bundle=True)
    lm = keras_gemma.GemmaCausalLM.from_preset("kaggle://someone/gemma/transformers/tiny/1")
    reference = keras_gemma.GemmaCausalLM.from_preset(str(tmp_path / "transformers"))
    np.testing.assert_array_equal(to_numpy(lm(INPUTS)), to_numpy(reference(INPUTS)))


def test_hf_handles_of_transformers_and_keras_hub_presets(tmp_path, spm_proto):
    from transformers import AutoModelForCausalLM

    save_transformers_gemma(tmp_path / "transformers", TINY, seed=3, spm_proto=spm_proto)
    place_in_hf_cache("someone/tiny-gemma", tmp_path / "transformers")
    reference = AutoModelForCausalLM.from_pretrained("someone/tiny-gemma", attn_implementation="eager").eval()
    lm = keras_gemma.GemmaCausalLM.from_preset("hf://someone/tiny-gemma")
    valid = INPUTS["padding_mask"].astype(bool)
    expected = transformers_logits(reference, TOKENS, INPUTS["padding_mask"])
    np.testing.assert_allclose(to_numpy(lm(INPUTS))[valid], expected[valid], atol=1e-4, rtol=0)

    keras_hub_preset(tmp_path / "keras", seed=4, spm_proto=spm_proto)
    place_in_hf_cache("someone/tiny-gemma-keras", tmp_path / "keras")
    expected = keras_hub.models.GemmaCausalLM.from_preset("hf://someone/tiny-gemma-keras")
    lm = keras_gemma.GemmaCausalLM.from_preset("hf://someone/tiny-gemma-keras")
    np.testing.assert_allclose(to_numpy(lm(INPUTS)), to_numpy(expected(INPUTS)), atol=1e-5, rtol=1e-5)


def test_what_the_hubs_cannot_give_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Could not fetch hf://someone/absent with huggingface_hub.*HF_HUB_OFFLINE=1"):
        keras_gemma.GemmaCausalLM.from_preset("hf://someone/absent")
    with pytest.raises(ValueError, match=r"Unexpected Kaggle handle 'kaggle://keras/gemma'"):
        keras_gemma.GemmaBackbone.from_preset("kaggle://keras/gemma")
    with pytest.raises(ValueError, match=r"Unexpected Hugging Face handle 'hf://a/b/c'"):
        keras_gemma.GemmaBackbone.from_preset("hf://a/b/c")
