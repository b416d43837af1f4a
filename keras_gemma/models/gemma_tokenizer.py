"""Gemma's SentencePiece tokenizer, on keras-hub's SentencePieceTokenizer."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_gemma.models.gemma_backbone import GemmaBackbone

# (token, attribute): looked up by string in the vocabulary, never by number.
# Required, as by keras-hub's GemmaTokenizer: a vocabulary without one is an
# error naming it.
SPECIAL_TOKENS = (
    ("<bos>", "start_token"),
    ("<eos>", "end_token"),
    ("<pad>", "pad_token"),
)
# Looked up when present (the id is None otherwise): chat and chat
# fine-tuning need the turn tokens, and say so when they are missing.
OPTIONAL_TOKENS = (
    ("<unk>", "unk_token"),
    ("<start_of_turn>", "start_of_turn_token"),
    ("<end_of_turn>", "end_of_turn_token"),
)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(SentencePieceTokenizer):
    """Gemma tokenizer: a SentencePiece model plus Gemma's special tokens.

    Works eagerly and inside `tf.data` (it is keras-hub's
    `SentencePieceTokenizer`). As in keras-hub, the vocabulary must hold
    `<bos>`, `<eos>` and `<pad>` (their ids: `start_token_id`, `end_token_id`,
    `pad_token_id`; a vocabulary without one is rejected with an error naming
    it). `<unk>`, `<start_of_turn>` and `<end_of_turn>` are looked up when
    present (`unk_token_id`, `start_of_turn_token_id`, `end_of_turn_token_id`,
    None when absent); `chat()` and fine-tuning on conversations need the
    turn tokens. Every id is looked up by string, never assumed.

    Args:
        proto: path to a SentencePiece `.model` file, or its serialized bytes.
        **kwargs: passed to `keras_hub.tokenizers.SentencePieceTokenizer`.

    Example:
    ```python
    tokenizer = keras_gemma.GemmaTokenizer(proto="tokenizer.model")
    ids = tokenizer("The quick brown fox.")            # int32 ids
    tokenizer(["Two", "strings"])                       # ragged batch
    tokenizer.detokenize(ids)                           # back to text
    ```
    """

    backbone_cls = GemmaBackbone

    def __init__(self, proto, **kwargs):
        for token, name in SPECIAL_TOKENS:
            self._add_special_token(token, name)
        for token, name in OPTIONAL_TOKENS:
            setattr(self, name, token)
            setattr(self, f"{name}_id", None)
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        super().set_proto(proto)
        for token, name in OPTIONAL_TOKENS:
            setattr(self, f"{name}_id", self._id_if_present(token))

    @property
    def special_tokens(self):
        """keras-hub's (`<bos>`, `<eos>`, `<pad>`) and the optional ones the
        vocabulary holds."""
        return list(set(super().special_tokens) | {token for token, _ in self._optional_present()})

    @property
    def special_token_ids(self):
        return list(set(super().special_token_ids) | {token_id for _, token_id in self._optional_present()})

    def _optional_present(self):
        """`[(token, id)]` of the optional tokens the vocabulary holds."""
        pairs = [(token, getattr(self, f"{name}_id", None)) for token, name in OPTIONAL_TOKENS]
        return [(token, token_id) for token, token_id in pairs if token_id is not None]

    def _id_if_present(self, token):
        """`token`'s id, or None when the vocabulary lacks it (SentencePiece
        maps an unknown piece to `<unk>`'s id, so the id is checked back)."""
        if self.proto is None:
            return None
        token_id = self.token_to_id(token)
        return token_id if self.id_to_token(token_id) == token else None

    def sentencepiece_processor(self):
        """A `sentencepiece.SentencePieceProcessor` of the same model (for
        what the tokenizer layer does not give, such as piece offsets)."""
        import sentencepiece as spm

        if self.proto is None:
            raise ValueError("No vocabulary is set: construct the tokenizer with `proto`.")
        if getattr(self, "_processor_for", None) is not self.proto:
            self._processor = spm.SentencePieceProcessor(model_proto=self.proto)
            self._processor_for = self.proto
        return self._processor

    @classmethod
    def from_preset(cls, preset, config_file="tokenizer.json", **kwargs):
        """The tokenizer of a preset directory (keras_gemma or Transformers).

        Example:
        ```python
        tokenizer = keras_gemma.GemmaTokenizer.from_preset("path/to/gemma-2b")
        ```
        """
        from keras_gemma import convert

        return convert.from_preset(cls, preset, super().from_preset, config_file=config_file, **kwargs)
