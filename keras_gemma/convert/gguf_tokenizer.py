"""Gemma's SentencePiece model, rebuilt from the tokenizer metadata of a GGUF file.

A GGUF (llama.cpp's format) carries no `tokenizer.model`. It stores the vocabulary as
`tokenizer.ggml.*` metadata instead, written by llama.cpp's `convert_hf_to_gguf.py` from
the original SentencePiece model and the Hugging Face `tokenizer_config.json`:

    import sentencepiece
    proto = sentencepiece_proto_from_gguf("gemma-3-270m.gguf")
    sentencepiece.SentencePieceProcessor(model_proto=proto).encode("Hello")

Two things the converter changed are undone here, so that the rebuilt model tokenizes as
Gemma's real one does:

- Every token that `tokenizer_config.json` marks special became CONTROL (type 3). In
  Gemma's SentencePiece model only `<pad>`, `<eos>` and `<bos>` are control pieces (never
  matched in text) and `<unk>` is the unknown piece; `<start_of_turn>`, `<end_of_turn>`,
  `<mask>` and the `<unusedN>` pieces are USER_DEFINED, matched whole wherever they appear
  in the text. So CONTROL maps back to USER_DEFINED except for the pad/eos/bos ids.
- In user-defined tokens "\u2581" (SentencePiece's escaped space) was replaced by a real
  space: Gemma's runs of spaces ("\u2581\u2581", ...) are stored as "  ". They are respelled.

What a GGUF does not store is set as in Gemma's model: BPE (the scores order the merges),
byte fallback when the file has byte tokens, identity normalization (no NFKC), spaces
escaped and kept as written. The dummy prefix follows `tokenizer.ggml.add_space_prefix`
(false for Gemma). Whether BOS is prepended (`tokenizer.ggml.add_bos_token`) is the
caller's business, as with any SentencePiece model.
"""

from sentencepiece import sentencepiece_model_pb2 as model_pb2

from keras_gemma.convert.gguf_file import GGUFFile

_Piece = model_pb2.ModelProto.SentencePiece

# llama.cpp's token types (llama_token_type) to SentencePiece piece types. CONTROL is
# decided per token in `_piece_type`. 0 is llama.cpp's "undefined", written for plain tokens.
_PIECE_TYPES = {
    0: _Piece.NORMAL,
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}
_CONTROL = 3


def _field(reader, key, required=True, default=None):
    """The value of metadata field `key`: a scalar, a string or a list."""
    if key not in reader.metadata:
        if required:
            raise ValueError(
                f"{_name(reader)} has no {key!r} field; it holds no SentencePiece tokenizer."
            )
        return default
    return reader.metadata[key]


def _name(reader):
    return reader.path


def _piece_type(token_type, token_id, special_ids, key):
    """The SentencePiece type of the token `token_id` that llama.cpp typed `token_type`."""
    if token_type == _CONTROL:
        return _Piece.CONTROL if token_id in special_ids else _Piece.USER_DEFINED
    if token_type not in _PIECE_TYPES:
        raise ValueError(
            f"{key}[{token_id}] is {token_type}, not a llama.cpp token type (0 to 6)."
        )
    return _PIECE_TYPES[token_type]


def sentencepiece_proto_from_gguf(gguf_file):
    """The serialized SentencePiece `ModelProto` (bytes) that `gguf_file` (a path, or a
    `keras_gemma.convert.gguf_file.GGUFFile`) describes. Raises `ValueError` if the file
    holds no SentencePiece ("llama") tokenizer or lacks a field the model needs."""
    reader = gguf_file if isinstance(gguf_file, GGUFFile) else GGUFFile(gguf_file)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(
            f"{_name(reader)} has 'tokenizer.ggml.model' = {model!r}; only 'llama' "
            "(a SentencePiece vocabulary, as Gemma's) can be rebuilt as a SentencePiece model."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    for key, values in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if len(values) != len(tokens):
            raise ValueError(f"{_name(reader)} has {len(values)} {key!r} for {len(tokens)} tokens.")

    def token_id(key, required):
        value = _field(reader, f"tokenizer.ggml.{key}", required=required, default=-1)
        if not -1 <= value < len(tokens):
            raise ValueError(
                f"{_name(reader)} has 'tokenizer.ggml.{key}' = {value}, outside its "
                f"{len(tokens)} tokens."
            )
        return value

    unk_id = token_id("unknown_token_id", required=True)
    bos_id, eos_id, pad_id = (
        token_id(key, False) for key in ("bos_token_id", "eos_token_id", "padding_token_id")
    )
    special_ids = {bos_id, eos_id, pad_id} - {-1}

    proto = model_pb2.ModelProto()
    for i, (token, score, token_type) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        # SentencePiece spells a space "\u2581"; no piece of a SentencePiece vocabulary holds a
        # real one, so any found was respelled by the converter (see the module docstring).
        piece.piece = token.replace(" ", "\u2581")
        piece.score = score
        if i == unk_id:
            piece.type = _Piece.UNKNOWN
        else:
            piece.type = _piece_type(token_type, i, special_ids, "tokenizer.ggml.token_type")

    def piece_at(i, default):
        return proto.pieces[i].piece if i >= 0 else default

    trainer = proto.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    # Of the training settings only byte_fallback and treat_whitespace_as_suffix change how a
    # BPE model encodes; split_digits (from the Gemma report) only says how it was trained.
    trainer.byte_fallback = any(p.type == _Piece.BYTE for p in proto.pieces)
    trainer.treat_whitespace_as_suffix = False
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    trainer.unk_piece = piece_at(unk_id, "<unk>")
    trainer.bos_piece = piece_at(bos_id, "<s>")
    trainer.eos_piece = piece_at(eos_id, "</s>")
    trainer.pad_piece = piece_at(pad_id, "<pad>")

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"  # no NFKC: the text is tokenized as written
    # llama.cpp's defaults when a file does not say: a dummy prefix, extra spaces kept.
    normalizer.add_dummy_prefix = bool(
        _field(reader, "tokenizer.ggml.add_space_prefix", required=False, default=True)
    )
    normalizer.remove_extra_whitespaces = bool(
        _field(reader, "tokenizer.ggml.remove_extra_whitespaces", required=False, default=False)
    )
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
