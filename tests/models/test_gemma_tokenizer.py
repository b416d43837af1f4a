import numpy as np
import pytest

import keras_gemma
from helpers import CORPUS, train_sentencepiece


def test_special_tokens_found_by_string(tokenizer, spm_proto):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    for token, attribute in [
        ("<pad>", "pad_token_id"),
        ("<eos>", "end_token_id"),
        ("<bos>", "start_token_id"),
        ("<unk>", "unk_token_id"),
        ("<start_of_turn>", "start_of_turn_token_id"),
        ("<end_of_turn>", "end_of_turn_token_id"),
    ]:
        assert getattr(tokenizer, attribute) == sp.piece_to_id(token)
    assert (tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id) == (0, 1, 2)


def test_ids_match_sentencepiece(tokenizer, spm_proto):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    texts = CORPUS[:8] + ["<start_of_turn>user\nHi<end_of_turn>\n"]
    ours = tokenizer(texts)
    for text, ids in zip(texts, ours):
        assert list(np.asarray(ids)) == sp.encode(text)
    assert tokenizer.detokenize(tokenizer(CORPUS[0])) == sp.decode(sp.encode(CORPUS[0]))


def test_works_inside_tf_data(tokenizer):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(CORPUS[:4]).map(tokenizer)
    eager = [list(np.asarray(x)) for x in tokenizer(CORPUS[:4])]
    assert [list(x.numpy()) for x in ds] == eager


def test_vocabulary_without_a_special_token_is_rejected():
    proto = train_sentencepiece(user_defined_symbols=["<start_of_turn>"])  # no <end_of_turn>
    with pytest.raises(ValueError, match="<end_of_turn>"):
        keras_gemma.GemmaTokenizer(proto=proto)


def test_from_a_file_path(spm_path):
    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_path)
    assert tokenizer.vocabulary_size() == 384
