import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The hubs offline, with caches of the suite's own (set before huggingface_hub is
# imported: it reads them once): tests place files in them, never download.
_HUB_CACHES = tempfile.mkdtemp(prefix="keras_gemma_test_hubs_")
atexit.register(shutil.rmtree, _HUB_CACHES, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_HUB_CACHES, "huggingface")
os.environ["KAGGLEHUB_CACHE"] = os.path.join(_HUB_CACHES, "kagglehub")
os.environ.pop("HF_HUB_CACHE", None)

import helpers  # noqa: E402


def pytest_report_header(config):
    import keras

    return f"KERAS_BACKEND={keras.backend.backend()}"


@pytest.fixture(scope="session")
def spm_proto():
    return helpers.train_sentencepiece()


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory, spm_proto):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(spm_proto)
    return str(path)


@pytest.fixture
def tokenizer(spm_proto):
    import keras_gemma

    return keras_gemma.GemmaTokenizer(proto=spm_proto)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from float32 and a cleared Keras session."""
    import keras

    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
