"""`export_to_gguf`: what we write, read back by keras_gemma and by transformers.

Tiny models with every weight random (norm scales included) go out as GGUF and come back
through `GemmaCausalLM.from_preset` with the same logits and tokenization; transformers'
own GGUF reader (the independent oracle; it reads `gemma2` and `gemma3`, not `gemma`)
computes our logits from the exported file. llama.cpp itself runs the exported Gemma 3
270M in `test_gguf_export_270m.py`.
"""

import os

import numpy as np
import pytest

import keras_gemma
from helpers import to_numpy, train_sentencepiece

gguf = pytest.importorskip("gguf")

# 12 tokens: longer than every sliding window below; a right-padded second row.
TOKEN_IDS = np.array([[2, 17, 42, 9, 100, 5, 61, 7, 88, 23, 54, 3], [2, 30, 31, 90, 11, 0, 0, 0, 0, 0, 0, 0]])
PADDING_MASK = (TOKEN_IDS != 0).astype("int32")
PADDING_MASK[:, 0] = 1
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "<start_of_turn>user\nKnock knock.<end_of_turn>\n<start_of_turn>model\n",
    "Runs of   spaces,\ttabs and\n\nnewlines",
    "Numbers like 3.14159 and 2024; unicode: éàü 日本語 🙂",
]
SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA2_3 = dict(
    hidden_dim=64, intermediate_dim=128, num_query_heads=2, num_key_value_heads=1,
    # transformers' GGUF reader takes its default query scale, 256: head_dim 256 makes
    # it llama.cpp's too (queries scale by head_dim there).
    head_dim=256, query_pre_attn_scalar=256,
    use_post_attention_norm=True, use_post_ffw_norm=True, sliding_window_size=4,
)
CONFIGS = {
    # head_dim == hidden / heads; the down projection's rows (48) are not Q8_0 blocks.
    "gemma_multi_query": dict(
        vocabulary_size=384, num_layers=2, hidden_dim=64, intermediate_dim=96,
        num_query_heads=2, num_key_value_heads=1, head_dim=32,
    ),
    # head_dim != hidden / heads (as in Gemma 7B), linear RoPE scaling, an embedding
    # with more rows than the vocabulary has tokens (padded with unused ones).
    "gemma_multi_head": dict(
        vocabulary_size=400, num_layers=2, hidden_dim=64, intermediate_dim=128,
        num_query_heads=2, num_key_value_heads=2, head_dim=256, rope_scaling_factor=2.0,
    ),
    # llama.cpp's default Gemma 2 pattern (local first), its soft caps.
    "gemma2": dict(
        GEMMA2_3, vocabulary_size=384, num_layers=2, layer_types=[SLIDING, FULL],
        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
    ),
    # llama.cpp's default Gemma 3 pattern (five local, one global), two RoPE bases.
    "gemma3": dict(
        GEMMA2_3, vocabulary_size=384, num_layers=6, layer_types=[SLIDING] * 5 + [FULL],
        use_query_key_norm=True, rope_max_wavelength=1_000_000.0, local_rope_max_wavelength=10_000.0,
    ),
    # Another pattern (written per layer), a final soft cap, another local base, linear
    # RoPE scaling of the global layers (as Gemma 3 4B and larger).
    "gemma3_pattern": dict(
        GEMMA2_3, vocabulary_size=384, num_layers=3, layer_types=[FULL, SLIDING, FULL],
        use_query_key_norm=True, rope_max_wavelength=1_000_000.0, local_rope_max_wavelength=5_000.0,
        final_logit_soft_cap=30.0, rope_scaling_factor=8.0,
    ),
}
# The file's metadata that is not the same for every architecture.
EXPECTED_FIELDS = {
    "gemma_multi_query": {"general.architecture": "gemma", "gemma.context_length": 8192},
    "gemma_multi_head": {
        "general.architecture": "gemma", "gemma.rope.scaling.type": "linear", "gemma.rope.scaling.factor": 2.0,
    },
    "gemma2": {
        "general.architecture": "gemma2", "gemma2.attention.sliding_window": 4,
        "gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
        "gemma2.attention.sliding_window_pattern": None,  # llama.cpp's default
    },
    "gemma3": {
        "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.freq_base_swa": 1e4, "gemma3.attention.sliding_window_pattern": None,
        "gemma3.final_logit_softcapping": None,
    },
    "gemma3_pattern": {
        "gemma3.attention.sliding_window_pattern": [False, True, False],
        "gemma3.rope.freq_base_swa": 5000.0, "gemma3.final_logit_softcapping": 30.0,
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0, "gemma3.context_length": 131072,
    },
}


@pytest.fixture(scope="module")
def gemma_proto():
    """A vocabulary as the released ones (text as written: no NFKC, no dummy
    prefix, spaces kept), with Gemma-like user-defined tokens: the turn tokens,
    `<mask>` and a run of two spaces."""
    return train_sentencepiece(
        user_defined_symbols=("<start_of_turn>", "<end_of_turn>", "<mask>", "\u2581\u2581"), gemma_normalization=True
    )


def randomize(backbone, seed):
    """Every weight random, norm scales included (they are stored as 1 + scale)."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        scale = 0.5 if "norm" in variable.path else 0.2
        variable.assign(rng.normal(0, scale, variable.shape).astype("float32"))


def logits(lm):
    return to_numpy(lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))


def mask(array):
    """Logits at real (unpadded) positions only."""
    return array[PADDING_MASK.astype(bool)]


class Exports:
    """Each config's model (built once) and its exports, made on demand."""

    def __init__(self, directory, proto):
        self.directory, self.proto = directory, proto
        self.models, self.files = {}, {}

    def model(self, name):
        if name not in self.models:
            tokenizer = keras_gemma.GemmaTokenizer(proto=self.proto)
            preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
            lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(**CONFIGS[name]), preprocessor)
            randomize(lm.backbone, seed=len(name))
            self.models[name] = (lm, logits(lm))
        return self.models[name]

    def file(self, name, type):
        if (name, type) not in self.files:
            path = self.directory / name / f"model-{type}.gguf"
            self.model(name)[0].export_to_gguf(path, type=type)
            self.files[name, type] = path
        return self.files[name, type]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, gemma_proto):
    return Exports(tmp_path_factory.mktemp("gguf_export"), gemma_proto)


# === Round trips through keras_gemma ===


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_round_trip(exports, name):
    """The metadata llama.cpp reads, and back through keras_gemma: the same
    architecture, logits (norm scales pass through `+ 1 - 1` in float32:
    within 1e-6) and tokenization."""
    lm, expected = exports.model(name)
    path = exports.file(name, "f32")
    check_metadata(lm.backbone, name, fields(path))
    loaded = keras_gemma.GemmaCausalLM.from_preset(str(path))
    for option, value in lm.backbone.get_config().items():
        if option not in ("name", "trainable", "dtype"):
            assert loaded.backbone.get_config()[option] == value, option
    got = logits(loaded)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(mask(got), mask(expected), atol=1e-6, rtol=0)
    ours, theirs = lm.preprocessor.tokenizer, loaded.preprocessor.tokenizer
    for text in TEXTS:
        assert np.asarray(theirs(text)).tolist() == np.asarray(ours(text)).tolist(), text
    assert theirs.detokenize(ours(TEXTS[1])) == TEXTS[1]


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def check_metadata(backbone, name, meta):
    """The fields llama.cpp reads for the architecture (src/models/gemma*.cpp)."""
    b = backbone
    arch = meta["general.architecture"]
    assert meta["general.file_type"] == 0  # LlamaFileType.ALL_F32
    common = {
        "block_count": b.num_layers, "embedding_length": b.hidden_dim,
        "feed_forward_length": b.intermediate_dim // 2, "attention.head_count": b.num_query_heads,
        "attention.head_count_kv": b.num_key_value_heads, "attention.key_length": b.head_dim,
        "attention.value_length": b.head_dim,
    }
    for key, value in common.items():
        assert meta[f"{arch}.{key}"] == value, key
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f"{arch}.attention.scale" not in meta  # llama.cpp's converter writes none for Gemma
    for key, value in EXPECTED_FIELDS[name].items():
        if value is None:
            assert key not in meta, key
        else:
            assert meta[key] == value, key
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == b.vocabulary_size
    if name == "gemma_multi_head":
        assert tokens[-1] == "[PAD399]" and meta["tokenizer.ggml.token_type"][-1] == 5  # unused


# How far the logits may move, as a fraction of their range. float16 rounds each weight
# to 11 significant bits (relative error <= 2**-11); Q8_0 stores round(w / d) with
# d = max|block of 32| / 127, an error of up to 1/254 of the block's largest weight
# (about 1% of a typical one). Through two or more layers, softmaxes and the tied
# embedding (used at both ends) these tiny models move their logits by up to 2.3x the
# float16 bound and 10x the Q8_0 bound (measured); the tolerances allow 8x and 25x.
# An exported layout error (a norm without its + 1, gate and up swapped) moves the
# Q8_0 logits by 70-110% of their range (measured), far outside.
TOLERANCE = {"f16": 8 * 2**-11, "q8_0": 25 / 254}
MATRIX_TYPES = {"f16": "F16", "q8_0": "Q8_0"}


@pytest.mark.parametrize("name", ["gemma_multi_query", "gemma2", "gemma3"])
def test_float16_and_q8_0_round_trips(exports, name):
    """Logits within the rounding of the stored type; norms (and every 1-D
    tensor) float32, the matrices `type`, or F16 where rows are not 32-weight
    blocks (the down projection of `gemma_multi_query`, rows of 48)."""
    _, expected = exports.model(name)
    for type in ("f16", "q8_0"):
        path = exports.file(name, type)
        reader = gguf.GGUFReader(str(path))
        for tensor in reader.tensors:
            if tensor.name.endswith("_norm.weight") or len(tensor.shape) == 1:
                want = "F32"
            elif type == "q8_0" and tensor.shape[0] % 32:  # ggml order: row length first
                want = "F16"
            else:
                want = MATRIX_TYPES[type]
            assert tensor.tensor_type.name == want, tensor.name
        if name == "gemma_multi_query" and type == "q8_0":
            assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.ffn_down.weight"] == "F16"
        got = logits(keras_gemma.GemmaCausalLM.from_preset(str(path)))
        error = np.abs(mask(got) - mask(expected)).max()
        scale = np.abs(mask(expected)).max()
        assert 0 < error < TOLERANCE[type] * scale, (type, error, scale)


# === The tokenizer's metadata; transformers reading the file ===


def test_tokenizer_metadata(exports):
    """Types as llama.cpp's converter gives Gemma's: the special pieces
    CONTROL (user-defined ones included), a run of spaces USER_DEFINED and
    spelled with real spaces, `<unk>` UNKNOWN, bytes BYTE; the ids; BOS added;
    Gemma's chat template, which renders as `format_chat`."""
    import jinja2

    lm, _ = exports.model("gemma3")
    tokenizer = lm.preprocessor.tokenizer
    meta = fields(exports.file("gemma3", "f32"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    type_of = dict(zip(tokens, types))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    for token in ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<mask>"):
        assert type_of[token] == 3, token
    assert type_of["<unk>"] == 2 and type_of["  "] == 4 and "\u2581\u2581" not in type_of
    assert type_of["<0x41>"] == 6 and type_of["\u2581the"] == 1
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert (meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (3, 0)
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.end_of_turn_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Knock knock."},
        {"role": "assistant", "content": "Who's there?"},
        {"role": "user", "content": "Gemma."},
    ]
    template = jinja2.Environment().from_string(meta["tokenizer.chat_template"])
    rendered = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert rendered == "<bos>" + keras_gemma.format_chat(messages)


@pytest.mark.parametrize("name, types", [("gemma2", ("f32", "f16")), ("gemma3", ("f32", "q8_0"))])
def test_transformers_reads_the_export(exports, name, types):
    """transformers' GGUF reader (it knows gemma2 and gemma3, not gemma) on the
    exported file computes the logits we compute from it: of our model itself
    for float32; for float16 and Q8_0, of what keras_gemma loads back (the
    file's values, dequantized by each side). Its tokenizer, built from the
    file's vocabulary, tokenizes as ours."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaTokenizer

    for type in types:
        path = exports.file(name, type)
        if type == "f32":
            lm, expected = exports.model(name)
            tokenizer = GemmaTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            for text in TEXTS:
                want = np.asarray(lm.preprocessor.tokenizer(text)).tolist()
                assert tokenizer(text, add_special_tokens=False)["input_ids"] == want, text
        else:
            expected = logits(keras_gemma.GemmaCausalLM.from_preset(str(path)))
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"  # exact caps, windows
        ).eval()
        # Each row alone, without its padding: the real positions, in `mask`'s order.
        # (A padded batch made transformers' logits differ by 1e-3 in some processes.)
        with torch.no_grad():
            rows = [
                model(input_ids=torch.tensor(ids[keep == 1][None], dtype=torch.long)).logits[0].float().numpy()
                for ids, keep in zip(TOKEN_IDS, PADDING_MASK)
            ]
        np.testing.assert_allclose(np.concatenate(rows), mask(expected), atol=1e-4, rtol=0, err_msg=type)


# === Refusals: a clear error, and nothing written ===


def tiny_lm(proto, **config):
    tokenizer = keras_gemma.GemmaTokenizer(proto=proto)
    backbone = keras_gemma.GemmaBackbone(**{**CONFIGS["gemma_multi_query"], **config})
    return keras_gemma.GemmaCausalLM(backbone, keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8))


def test_unknown_type_and_no_preprocessor(tmp_path, gemma_proto):
    lm = tiny_lm(gemma_proto)
    with pytest.raises(ValueError, match=r"type='q4_k' is not a GGUF type.*'f32', 'f16', 'q8_0'"):
        lm.export_to_gguf(tmp_path / "model.gguf", type="q4_k")
    with pytest.raises(ValueError, match="no preprocessor"):
        keras_gemma.GemmaCausalLM(lm.backbone).export_to_gguf(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="is a directory"):
        lm.export_to_gguf(tmp_path)
    assert os.listdir(tmp_path) == []


LLAMA_CPP_CANNOT = {
    "query scaling in Gemma 1": (dict(query_head_dim_normalize=False, head_dim=16), r"'gemma'.*queries scaled by 32.0"),
    "soft caps without post-norms": (dict(final_logit_soft_cap=30.0), r"'gemma'.*soft caps"),
    "one post-norm": (
        dict(use_post_attention_norm=True), r"'gemma2'.*use_post_attention_norm=True with use_post_ffw_norm=False"
    ),
    "Gemma 2 without soft caps": (
        dict(GEMMA2_3, layer_types=[SLIDING, FULL]),
        r"'gemma2'.*attention_logit_soft_cap=None with final_logit_soft_cap=None \(it always applies both\)",
    ),
    "Gemma 2 local RoPE base": (
        dict(GEMMA2_3, layer_types=[SLIDING, FULL], attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
             local_rope_max_wavelength=500.0),
        r"'gemma2'.*RoPE base of 500.0 on sliding layers",
    ),
    "Gemma 3 query scale": (
        dict(GEMMA2_3, layer_types=[SLIDING, FULL], use_query_key_norm=True, query_pre_attn_scalar=20),
        r"'gemma3'.*queries scaled by 20 \*\* -0.5.*256 \*\* -0.5",
    ),
    "Gemma 3 attention soft cap": (
        dict(GEMMA2_3, layer_types=[SLIDING, FULL], use_query_key_norm=True, attention_logit_soft_cap=50.0),
        r"'gemma3'.*attention_logit_soft_cap=50.0",
    ),
}


def test_layouts_llama_cpp_cannot_express(tmp_path, gemma_proto):
    for case, (options, message) in LLAMA_CPP_CANNOT.items():
        with pytest.raises(ValueError, match=message):
            tiny_lm(gemma_proto, **options).export_to_gguf(tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == []


def test_quantized_and_lora_models_are_refused(tmp_path, gemma_proto):
    lm = tiny_lm(gemma_proto)
    lm.backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"LoRA adapters enabled: call `backbone.merge_lora_weights\(\)`"):
        lm.export_to_gguf(tmp_path / "model.gguf")
    lm = tiny_lm(gemma_proto)
    lm.backbone.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized with Keras \(int8\).*type='q8_0'"):
        lm.export_to_gguf(tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == []


def test_a_vocabulary_llama_cpp_would_tokenize_differently(tmp_path, spm_proto):
    """SentencePiece's defaults (NFKC, merged spaces) are not what llama.cpp's
    tokenizer does: refused, not exported to tokenize differently."""
    with pytest.raises(ValueError, match=r"normalizes text \('nmt_nfkc'.*merges runs of spaces"):
        tiny_lm(spm_proto).export_to_gguf(tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == []


def test_a_failed_export_keeps_the_previous_file(tmp_path, monkeypatch, gemma_proto):
    """The file is written under a temporary name and renamed at the end."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"an earlier export")
    calls = []

    def disk_full(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    lm = tiny_lm(gemma_proto)
    with pytest.raises(OSError, match="No space left"):
        lm.export_to_gguf(path)
    assert path.read_bytes() == b"an earlier export"
    assert os.listdir(tmp_path) == ["model.gguf"]
    monkeypatch.undo()
    lm.export_to_gguf(path)  # a file is replaced
    assert keras_gemma.GemmaBackbone.from_preset(str(path)).num_layers == 2
    assert os.listdir(tmp_path) == ["model.gguf"]
