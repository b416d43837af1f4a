import pytest

from helpers import TINY, save_transformers_gemma
from keras_gemma import cli


def test_generate_with_the_demo_model_says_it_is_random(capsys):
    assert cli.main(["generate", "The capital of France is", "--max-length", "16"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in err
    assert out.startswith("The capital of France is")


def test_generate_from_a_checkpoint(tmp_path, capsys, spm_proto):
    save_transformers_gemma(tmp_path, TINY, seed=2, spm_proto=spm_proto)
    assert cli.main(["generate", "--preset", str(tmp_path), "Keras runs", "--max-length", "12"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOMLY" not in err
    assert out.startswith("Keras runs")


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a named preset"):
        cli.main(["generate", "--preset", str(tmp_path / "missing"), "Hi"])
