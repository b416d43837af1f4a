import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

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
