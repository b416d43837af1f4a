"""Packs text for Gemma: `<bos>` + tokens (+ `<eos>`), labels shifted by one."""

import keras
from keras import ops
from keras_hub.models import CausalLMPreprocessor

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
        from keras_gemma import convert

        return convert.from_preset(cls, preset, super().from_preset, config_file=config_file, **kwargs)

    def generate_preprocess(self, x, sequence_length=None, truncate_prompt=False):
        """Tokenizes and packs prompts for `generate`: `<bos>`, no `<eos>`,
        right-padded to `sequence_length` (default: `self.sequence_length`).

        `x` is a string or a batch of them (a list, a numpy array, a tensor);
        the result is `{"token_ids", "padding_mask"}`, one row per prompt
        (unbatched for one string). A prompt that leaves no room for a new
        token is an error naming its length, unless `truncate_prompt` is set:
        then its oldest tokens are dropped to leave room for
        `sequence_length // 4` new tokens (at least one), and `<bos>` is kept.
        """
        import numpy as np

        sequence_length = sequence_length or self.sequence_length
        prompts = np.asarray(x, dtype=object)
        rows = [
            np.asarray(self.tokenizer(p.decode("utf-8") if isinstance(p, bytes) else p), "int32")
            for p in prompts.reshape(-1)
        ]
        start = [self.tokenizer.start_token_id] if self.add_start_token else []
        longest = max((len(row) for row in rows), default=0) + len(start)
        if longest >= sequence_length:
            if not truncate_prompt:
                raise ValueError(
                    f"A prompt is {longest} tokens long (with <bos>), which "
                    f"leaves no room to generate within max_length={sequence_length}. "
                    "Pass a larger `max_length`, shorten the prompt, or pass "
                    "`truncate_prompt=True` to keep only its end."
                )
            keep = max(0, sequence_length - len(start) - max(1, sequence_length // 4))
            rows = [row[len(row) - min(keep, len(row)) :] for row in rows]
        token_ids = np.full((len(rows), sequence_length), self.tokenizer.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), sequence_length), bool)
        for i, row in enumerate(rows):
            ids = start + row.tolist()
            token_ids[i, : len(ids)] = ids
            padding_mask[i, : len(ids)] = True
        if prompts.ndim == 0:
            token_ids, padding_mask = token_ids[0], padding_mask[0]
        return {
            "token_ids": ops.convert_to_tensor(token_ids),
            "padding_mask": ops.convert_to_tensor(padding_mask),
        }

    def preprocess_conversations(self, conversations, sequence_length=None, truncate=False):
        """Chat fine-tuning data: the loss only on the model's replies.

        Each conversation is rendered with `keras_gemma.format_chat` (no
        generation prompt), tokenized with `<bos>` in front and padded to
        `sequence_length + 1`. `sample_weight` is 1 exactly where the label
        `y` is a token of a model reply, its closing `<end_of_turn>`
        included, and 0 on `<bos>`, the turn markers, the user's and system
        text and padding. (A token that straddles the start of a reply, should
        the vocabulary merge it with the template's newline, counts as reply.)

        Args:
            conversations: one conversation (a list of `{"role", "content"}`
                messages, as `format_chat` takes) or a list of them.
            sequence_length: int. Length of the packed `x`; default
                `self.sequence_length`.
            truncate: bool. A conversation longer than `sequence_length + 1`
                tokens is an error naming it; with `truncate=True` its end is
                cut instead.

        Returns:
            `(x, y, sample_weight)` numpy arrays: `x = {"token_ids",
            "padding_mask"}` `(batch, sequence_length)`, `y` and
            `sample_weight` `(batch, sequence_length)`. `GemmaCausalLM.fit`
            calls this for conversations.

        Example:
        ```python
        chats = [[
            {"role": "user", "content": "What is Keras?"},
            {"role": "model", "content": "A deep learning library."},
        ]]
        x, y, sample_weight = preprocessor.preprocess_conversations(chats)
        ```
        """
        import numpy as np

        from keras_gemma.chat import format_chat
        from keras_gemma.chat import require_chat_tokens

        require_chat_tokens(self.tokenizer, "Fine-tuning on conversations")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        length = (sequence_length or self.sequence_length) + 1
        processor = self.tokenizer.sentencepiece_processor()
        pad = self.tokenizer.pad_token_id
        token_ids = np.full((len(conversations), length), pad, "int32")
        reply_mask = np.zeros((len(conversations), length), bool)
        padding_mask = np.zeros((len(conversations), length), bool)
        for row, messages in enumerate(conversations):
            text, spans = _render_with_reply_spans(messages, format_chat)
            ids, is_reply = _tokenize_with_spans(processor, text, spans)
            if self.add_start_token:
                ids, is_reply = [self.tokenizer.start_token_id] + ids, [False] + is_reply
            if len(ids) > length:
                if not truncate:
                    raise ValueError(
                        f"Conversation {row} is {len(ids)} tokens long (with <bos>), more "
                        f"than sequence_length + 1 = {length}. Raise sequence_length, "
                        "shorten it, or pass truncate=True to cut its end."
                    )
                ids, is_reply = ids[:length], is_reply[:length]
            token_ids[row, : len(ids)] = ids
            reply_mask[row, : len(ids)] = is_reply
            padding_mask[row, : len(ids)] = True
        x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        return x, token_ids[:, 1:], reply_mask[:, 1:].astype("float32")


def _render_with_reply_spans(messages, format_chat):
    """The rendered conversation and the character spans of each model reply
    with its `<end_of_turn>` (the newline after it belongs to the template).
    The spans come from rendering each prefix with `format_chat` itself."""
    text = format_chat(messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") not in ("model", "assistant"):
            continue
        before = format_chat(messages[:k], add_generation_prompt=True)
        through = format_chat(messages[: k + 1], add_generation_prompt=False)
        # through = before + reply + "<end_of_turn>\n"
        assert text.startswith(through) and through.startswith(before), "format_chat changed"
        spans.append((len(before), len(through) - 1))
    return text, spans


def _tokenize_with_spans(processor, text, spans):
    """Token ids of `text`, and whether each token overlaps one of the
    character `spans`."""
    try:
        pieces = processor.encode(text, return_type="proto").pieces  # sentencepiece >= 0.2.1
    except TypeError:
        pieces = processor.encode(text, out_type="immutable_proto").pieces
    # SentencePiece reports byte offsets into the UTF-8 text.
    to_bytes = [0]
    for character in text:
        to_bytes.append(to_bytes[-1] + len(character.encode("utf-8")))
    byte_spans = [(to_bytes[a], to_bytes[b]) for a, b in spans]
    ids, is_reply = [], []
    for piece in pieces:
        ids.append(piece.id)
        if piece.begin == piece.end:  # e.g. one byte of a character split into bytes
            inside = any(start <= piece.begin < end for start, end in byte_spans)
        else:
            inside = any(piece.begin < end and piece.end > start for start, end in byte_spans)
        is_reply.append(inside)
    return ids, is_reply
