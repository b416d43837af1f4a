"""Gemma's SentencePiece tokenizer, on keras-hub's SentencePieceTokenizer."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_gemma.models.gemma_backbone import GemmaBackbone

# (token, attribute): looked up by string in the vocabulary, never by number.
SPECIAL_TOKENS = (
    ("<bos>", "start_token"),
    ("<eos>", "end_token"),
    ("<pad>", "pad_token"),
    ("<unk>", "unk_token"),
    ("<start_of_turn>", "start_of_turn_token"),
    ("<end_of_turn>", "end_of_turn_token"),
)


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaTokenizer(SentencePieceTokenizer):
    """Gemma tokenizer: a SentencePiece model plus Gemma's special tokens.

    Works eagerly and inside `tf.data` (it is keras-hub's
    `SentencePieceTokenizer`). The ids of `<bos>`, `<eos>`, `<pad>`, `<unk>`,
    `<start_of_turn>` and `<end_of_turn>` are looked up by string and exposed
    as `start_token_id`, `end_token_id`, `pad_token_id`, `unk_token_id`,
    `start_of_turn_token_id` and `end_of_turn_token_id`; a vocabulary that
    lacks one of them is rejected with an error naming it.

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
        super().__init__(proto=proto, **kwargs)

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
