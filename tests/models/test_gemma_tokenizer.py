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


def keras_hub_docstring_vocabulary(**pieces):
    """The custom vocabulary of keras-hub's GemmaTokenizer docstring: `<pad>`,
    `<bos>`, `<eos>`, `<unk>` and no chat tokens (`pieces` override)."""
    import io

    import sentencepiece as spm

    bytes_io = io.BytesIO()
    options = dict(
        vocab_size=8, model_type="WORD", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>", unk_piece="<unk>",
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["The quick brown fox jumped."]), model_writer=bytes_io,
        minloglevel=2, **{**options, **pieces},
    )
    return bytes_io.getvalue()


def test_keras_hub_rule_bos_eos_pad_required_chat_tokens_looked_up():
    """keras-hub's docstring example loads; the chat tokens it lacks are None."""
    tokenizer = keras_gemma.GemmaTokenizer(proto=keras_hub_docstring_vocabulary())
    assert (tokenizer.pad_token_id, tokenizer.start_token_id, tokenizer.end_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    assert tokenizer.start_of_turn_token_id is None and tokenizer.end_of_turn_token_id is None
    assert sorted(tokenizer.special_tokens) == ["<bos>", "<eos>", "<pad>", "<unk>"]
    assert sorted(tokenizer.special_token_ids) == [0, 1, 2, 3]


def test_chat_tokens_present_are_special_tokens(tokenizer):
    """As before they became optional: generation leaves them out of text."""
    for token in ("<start_of_turn>", "<end_of_turn>", "<unk>", "<bos>", "<eos>", "<pad>"):
        assert token in tokenizer.special_tokens
        assert tokenizer.token_to_id(token) in tokenizer.special_token_ids
    assert list(np.asarray(tokenizer("The quick brown fox jumped."))) != []


@pytest.mark.parametrize("missing", ["<pad>", "<eos>", "<bos>"])
def test_vocabulary_without_a_required_token_is_rejected(missing):
    ids = {"<pad>": "pad_id", "<bos>": "bos_id", "<eos>": "eos_id"}
    proto = keras_hub_docstring_vocabulary(**{ids[missing]: -1})
    with pytest.raises(ValueError, match=missing):
        keras_gemma.GemmaTokenizer(proto=proto)


def test_chat_without_chat_tokens_is_a_clear_error():
    tokenizer = keras_gemma.GemmaTokenizer(proto=keras_hub_docstring_vocabulary())
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=8, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    lm = keras_gemma.GemmaCausalLM(backbone, keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8))
    conversation = [{"role": "user", "content": "The fox"}, {"role": "model", "content": "jumped."}]
    with pytest.raises(ValueError, match="no '<start_of_turn>' or '<end_of_turn>'"):
        lm.chat(conversation[:1])
    with pytest.raises(ValueError, match="Fine-tuning on conversations .* no '<start_of_turn>'"):
        lm.fit([conversation])
    assert isinstance(lm.generate("The quick", max_length=6), str)  # plain generation works


def test_from_a_file_path(spm_path):
    tokenizer = keras_gemma.GemmaTokenizer(proto=spm_path)
    assert tokenizer.vocabulary_size() == 384
