"""Generation features: compile-once prompt buckets, streaming, chat, seeds,
prompt truncation."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_gemma
from helpers import to_numpy
from keras_gemma.generation import prefill_bucket
from test_gemma_causal_lm import full_forward_greedy, make_lm

PROMPT = "The quick brown fox"


def make_text_lm(tokenizer, sequence_length=40, **config):
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    return make_lm(preprocessor, **config)


def packed(rows, length):
    token_ids = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = row
    return {"token_ids": token_ids, "padding_mask": token_ids != 0}


def test_prefill_bucket():
    assert prefill_bucket(0, 64) == 0  # a lone <bos>: nothing to prefill
    assert [prefill_bucket(n, 64) for n in (1, 15, 16, 17, 31, 33)] == [16, 16, 16, 32, 32, 64]
    assert prefill_bucket(100, 64) == 64
    assert prefill_bucket(10, 12) == 12


@pytest.mark.parametrize(
    "config",
    [
        {},
        # Gemma 3 style: local layers with a window shorter than the prompts.
        dict(
            layer_types=["sliding_attention", "full_attention"],
            sliding_window_size=4,
            use_query_key_norm=True,
            local_rope_max_wavelength=100.0,
        ),
    ],
    ids=["global", "sliding"],
)
def test_bucketed_prefill_greedy_equals_full_forward_argmax(config):
    # Shortest prompt 20 tokens: the prefill covers a 32-position bucket that
    # runs past the end of the shorter row into its padding.
    rng = np.random.RandomState(3)
    prompts = [[2] + list(rng.randint(4, 300, n - 1)) for n in (20, 26, 23)]
    lm = make_lm(**config)
    out = lm.generate(packed(prompts, 36), stop_token_ids=None)
    for row, prompt in zip(out["token_ids"], prompts):
        assert list(row) == full_forward_greedy(lm, prompt, 36)


def test_prompt_length_in_the_same_bucket_does_not_recompile():
    if keras.config.backend() == "torch":
        pytest.skip("PyTorch generates eagerly: there is no compiled function to reuse.")
    lm = make_lm()
    traces = []
    generate_step = lm.generate_step

    def counting_generate_step(*args, **kwargs):
        traces.append(kwargs.get("prefill_length"))  # runs once per trace
        return generate_step(*args, **kwargs)

    lm.generate_step = counting_generate_step
    lm.generate(packed([[2] + [7] * 5], 40), stop_token_ids=None)
    lm.generate(packed([[2] + [9] * 11], 40), stop_token_ids=None)  # same bucket
    lm.generate(packed([[2] + [5] * 8, [2] + [4] * 14], 40), stop_token_ids=None)
    assert traces == [16, 16]  # one trace for batch 1, one for batch 2
    lm.generate(packed([[2] + [7] * 20], 40), stop_token_ids=None)  # next bucket
    assert traces == [16, 16, 32]


@pytest.mark.parametrize("strip_prompt", [False, True])
def test_stream_pieces_join_to_the_generated_text(tokenizer, strip_prompt):
    lm = make_text_lm(tokenizer)
    pieces = list(lm.generate_stream(PROMPT, max_length=30, strip_prompt=strip_prompt))
    assert len(pieces) > 3
    assert "".join(pieces) == lm.generate(PROMPT, max_length=30, strip_prompt=strip_prompt)


def test_seeded_stream_equals_seeded_generate(tokenizer):
    lm = make_text_lm(tokenizer)
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=20, seed=5))
    text = lm.generate(PROMPT, max_length=30)
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=20, seed=5))
    assert "".join(lm.generate_stream(PROMPT, max_length=30)) == text


@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda seed: keras_hub.samplers.TopKSampler(k=50, seed=seed),
        lambda seed: keras_hub.samplers.TopPSampler(p=0.95, seed=seed),
        lambda seed: keras_hub.samplers.RandomSampler(temperature=2.0, seed=seed),
    ],
    ids=["top_k", "top_p", "temperature"],
)
def test_seed_makes_sampling_reproducible(make_sampler):
    lm = make_lm()
    inputs = packed([[2, 17, 42], [2, 30, 8, 9]], 24)

    def sample(seed):
        lm.compile(sampler=make_sampler(seed))
        return lm.generate(inputs, stop_token_ids=None)["token_ids"]

    first = sample(7)
    np.testing.assert_array_equal(sample(7), first)
    assert (sample(8) != first).any()


def test_streaming_refuses_beam_search(tokenizer):
    lm = make_text_lm(tokenizer)
    lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=2))
    with pytest.raises(ValueError, match="cannot stream"):
        next(lm.generate_stream(PROMPT))


def test_long_prompt_is_an_error_unless_truncation_is_asked_for(tokenizer):
    lm = make_text_lm(tokenizer)
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        lm.generate(long_prompt, max_length=16)
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        next(lm.generate_stream(long_prompt, max_length=16))
    seen = []
    postprocess = lm.preprocessor.generate_postprocess
    lm.preprocessor.generate_postprocess = lambda x: seen.append(x) or postprocess(x)
    lm.generate(long_prompt, max_length=16, truncate_prompt=True, stop_token_ids=None)
    ids = to_numpy(seen[0]["token_ids"])[0]
    tokens = [int(t) for t in to_numpy(tokenizer(long_prompt))]
    keep = 16 - 1 - 16 // 4  # <bos>, then room for a quarter of max_length
    assert list(ids[: keep + 1]) == [tokenizer.start_token_id] + tokens[-keep:]
    # The flag lasts for one call only.
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate(long_prompt, max_length=16)


def test_chat_formats_the_conversation_and_stops_at_end_of_turn(tokenizer):
    lm = make_text_lm(tokenizer, sequence_length=48)
    messages = [
        {"role": "user", "content": "Knock knock."},
        {"role": "assistant", "content": "Who's there?"},
        {"role": "user", "content": "Gemma."},
    ]
    prompt = keras_gemma.format_chat(messages)
    assert prompt.endswith("<start_of_turn>model\n")
    eot = tokenizer.end_of_turn_token_id
    prompt_ids = [tokenizer.start_token_id] + [int(t) for t in to_numpy(tokenizer(prompt))]
    assert tokenizer.start_of_turn_token_id in prompt_ids and eot in prompt_ids
    seen = []
    postprocess = lm.preprocessor.generate_postprocess
    lm.preprocessor.generate_postprocess = lambda x: seen.append(x) or postprocess(x)

    # Make <end_of_turn> the certain first token of the reply: point its
    # (tied) embedding along the hidden state that predicts it. The prompt
    # holds <end_of_turn> too, so repeat until the argmax settles.
    x = packed([prompt_ids], 48)
    n = len(prompt_ids)
    for _ in range(5):
        hidden = to_numpy(lm.backbone(x))[0, n - 1]
        embeddings = to_numpy(lm.backbone.token_embedding.embeddings)
        embeddings[eot] = 1000.0 * hidden / np.dot(hidden, hidden)
        lm.backbone.token_embedding.embeddings.assign(embeddings)
        if to_numpy(lm(x))[0, n - 1].argmax() == eot:
            break
    assert to_numpy(lm(x))[0, n - 1].argmax() == eot

    assert lm.chat(messages) == ""
    ids, mask = (np.asarray(seen[-1][k])[0] for k in ("token_ids", "padding_mask"))
    assert list(ids[mask]) == [eot]  # the reply stopped right after <end_of_turn>
    assert "".join(lm.chat_stream(messages)) == ""
    lm.generate(prompt, stop_token_ids=None)  # without the stop, it goes on
    ids, mask = (np.asarray(seen[-1][k])[0] for k in ("token_ids", "padding_mask"))
    assert mask.all() and list(ids[: n + 1]) == prompt_ids + [eot]


def test_chat_reply_equals_generate_with_turn_stop(tokenizer):
    lm = make_text_lm(tokenizer, sequence_length=48)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    stops = [tokenizer.end_of_turn_token_id, tokenizer.end_token_id]
    expected = lm.generate(
        keras_gemma.format_chat(messages), stop_token_ids=stops, strip_prompt=True
    )
    assert lm.chat(messages) == expected
    assert "".join(lm.chat_stream(messages)) == expected
