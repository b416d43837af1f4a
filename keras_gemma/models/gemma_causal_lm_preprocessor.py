"""Packs text for Gemma: `<bos>` + tokens (+ `<eos>`), labels shifted by one."""

import keras
from keras_hub.models import CausalLMPreprocessor
from keras_hub.src.utils.tensor_utils import preprocessing_function

from keras_gemma.models.gemma_backbone import GemmaBackbone
from keras_gemma.models.gemma_tokenizer import GemmaTokenizer


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(CausalLMPreprocessor):
    """Turns strings into `(x, y, sample_weight)` for training a Gemma LM.

    Called on a string or a batch of strings (a list, a tensor, or inside
    `tf.data`), it tokenizes, adds `<bos>` and `<eos>`, pads with `<pad>` to
    `sequence_length + 1` and splits into `x = {"token_ids", "padding_mask"}`
    (all but the last token), `y` (all but the first: the next token at each
    place) and `sample_weight` (zero wherever `y` is padding). Training inputs
    longer than `sequence_length` are cut to fit, as in keras-hub.

    For generation, `generate_preprocess` packs prompts without `<eos>` and
    raises if a prompt does not leave room for at least one new token, and
    `generate_postprocess` turns ids back into text, dropping padding and
    special tokens.

    Args:
        tokenizer: a `keras_gemma.GemmaTokenizer`.
        sequence_length: int. Length of the packed `x`.
        add_start_token: bool. Prepend `<bos>`.
        add_end_token: bool. Append `<eos>` (training only).

    Example:
    ```python
    tokenizer = keras_gemma.GemmaTokenizer(proto="tokenizer.model")
    preprocessor = keras_gemma.GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sample_weight = preprocessor(["The quick brown fox.", "Hi."])
    ```
    """

    backbone_cls = GemmaBackbone
    tokenizer_cls = GemmaTokenizer

    @classmethod
    def from_preset(cls, preset, config_file="preprocessor.json", **kwargs):
        """The preprocessor of a preset directory (keras_gemma or Transformers).

        Example:
        ```python
        preprocessor = keras_gemma.GemmaCausalLMPreprocessor.from_preset(
            "path/to/gemma-2b", sequence_length=512
        )
        ```
        """
        from keras_gemma.convert import check_preset_class, get_preset_loader

        loader = get_preset_loader(preset)
        check_preset_class(loader, cls)
        return loader.load_preprocessor(cls, config_file, **kwargs)

    # Set for one call by `GemmaCausalLM.generate(truncate_prompt=...)`.
    truncate_prompt = False

    @preprocessing_function
    def generate_preprocess(self, x, sequence_length=None):
        """Tokenizes and packs prompts for `generate`: `<bos>`, no `<eos>`,
        right-padded to `sequence_length`.

        A prompt that leaves no room for a new token is an error naming its
        length, unless `truncate_prompt` is set: then its oldest tokens are
        dropped to leave room for `sequence_length // 4` new tokens (at least
        one), and `<bos>` is kept.
        """
        if not self.built:
            self.build(None)
        sequence_length = sequence_length or self.sequence_length
        token_ids = self.tokenizer(x)
        if hasattr(token_ids, "row_lengths"):  # a tf.RaggedTensor batch
            lengths = [int(n) for n in token_ids.row_lengths()]
        elif hasattr(token_ids, "shape") and len(token_ids.shape) == 1:
            lengths = [int(token_ids.shape[0])]
        else:  # python lists from the SentencePiece fallback
            lengths = [len(row) for row in token_ids]
        start = int(self.add_start_token)
        longest = max(lengths, default=0) + start
        if longest >= sequence_length:
            if not self.truncate_prompt:
                raise ValueError(
                    f"A prompt is {longest} tokens long (with <bos>), which "
                    f"leaves no room to generate within max_length={sequence_length}. "
                    "Pass a larger `max_length`, shorten the prompt, or pass "
                    "`truncate_prompt=True` to keep only its end."
                )
            keep = sequence_length - start - max(1, sequence_length // 4)
            if isinstance(token_ids, list):
                token_ids = [row[-keep:] for row in token_ids]
            elif len(token_ids.shape) == 1:  # one prompt
                token_ids = token_ids[-keep:]
            else:
                token_ids = token_ids[:, -keep:]
        token_ids, padding_mask = self.packer(
            token_ids, sequence_length=sequence_length, add_end_value=False
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}
