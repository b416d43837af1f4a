"""Gemma's chat format: a conversation as the prompt the instruction-tuned
checkpoints expect, and the replies of `GemmaCausalLM.chat` / `chat_stream`."""

# Role names accepted for a turn, and the name written into the prompt.
_TURN_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def format_chat(messages, add_generation_prompt=True):
    """Render a conversation in Gemma's chat format, as a prompt string.

    The output is what the chat templates of the instruction-tuned checkpoints
    (Gemma 1, 2 and 3 `-it` on Hugging Face) render, without the leading
    `<bos>`: the preprocessor adds that. Each turn is written as
    `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`, with `"assistant"`
    written as `"model"` and the content trimmed of surrounding whitespace.

    Gemma has no system turn. As in Gemma 3's template, a system message (only
    allowed first) is folded into the first user turn: its text, as given (the
    template does not trim it), then `"\\n\\n"`, then the trimmed user text.
    Gemma 3's template silently drops a system message that no user message
    follows; here that is an error instead.

    Content may also be a list of parts `{"type": "text", "text": ...}`, as in
    Gemma 3's template: the trimmed texts are joined. Other parts (images) are
    rejected, as this is a text-only model. A system message given as parts
    keeps all its text (Gemma 3's template keeps only the first part).

    Args:
        messages: list of dicts `{"role": ..., "content": ...}`, where the role
            is `"user"`, `"model"` or `"assistant"` (or `"system"` for the
            first message), and the content a string. After the optional
            system message, roles must alternate, starting with `"user"`.
        add_generation_prompt: if True, end with `<start_of_turn>model\\n`,
            so the model writes the next turn.

    Returns:
        The prompt, a string.

    Raises:
        ValueError: for an empty list, an unknown role, a system message that
            is not first or not followed by a user message, roles that do not
            alternate user/model starting with user, or a non-text content part.
        TypeError: for a message that is not a dict, or content that is not a
            string or a list of parts.

    Example:
    ```python
    from keras_gemma.chat import format_chat

    prompt = format_chat([
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Knock knock."},
        {"role": "assistant", "content": "Who's there?"},
        {"role": "user", "content": "Gemma."},
    ])
    assert prompt == (
        "<start_of_turn>user\\nAnswer in one word.\\n\\nKnock knock.<end_of_turn>\\n"
        "<start_of_turn>model\\nWho's there?<end_of_turn>\\n"
        "<start_of_turn>user\\nGemma.<end_of_turn>\\n"
        "<start_of_turn>model\\n"
    )
    ```
    """
    messages = list(messages)
    if not messages:
        raise ValueError("`messages` is empty: a chat needs at least one user message.")
    prefix, start = "", 0
    if _role(messages[0], 0) == "system":
        if len(messages) == 1:
            raise ValueError(
                "messages[0] is a system message with no user message after it; "
                "Gemma folds the system text into the first user turn, so one must follow."
            )
        prefix, start = _text(messages[0], 0, trim=False) + "\n\n", 1

    turns = []
    for index in range(start, len(messages)):
        role = _role(messages[index], index)
        expected = "user" if (index - start) % 2 == 0 else "model"
        if role == "system":
            raise ValueError(f"messages[{index}] is a system message; only the first message may be one.")
        if role != expected:
            raise ValueError(
                f"messages[{index}] has role {messages[index]['role']!r} where a {expected!r} turn was "
                "expected: after an optional leading system message, roles must alternate "
                "user/model, starting with user."
            )
        text = _text(messages[index], index)
        if index == start:
            text = prefix + text
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)


def _role(message, index):
    """The role written for `messages[index]` ("user", "model" or "system")."""
    if not isinstance(message, dict):
        raise TypeError(
            f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}."
        )
    role = message.get("role")
    if role == "system":
        return role
    if not isinstance(role, str) or role not in _TURN_ROLES:
        raise ValueError(
            f"messages[{index}] has unknown role {role!r}; expected 'user', 'model', "
            "'assistant', or 'system' for the first message."
        )
    return _TURN_ROLES[role]


def _text(message, index, trim=True):
    """The text of `messages[index]`: a string, or the joined text parts."""
    content = message.get("content")
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            is_text = isinstance(part, dict) and part.get("type") == "text"
            if not (is_text and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"messages[{index}] has a content part of type {kind!r}; "
                    "only text parts {'type': 'text', 'text': str} are supported."
                )
            parts.append(part["text"])
    else:
        raise TypeError(
            f"messages[{index}]['content'] must be a string or a list of text parts, "
            f"got {type(content).__name__}."
        )
    # jinja's `| trim` is str.strip(); the templates trim each text part.
    return "".join(p.strip() for p in parts) if trim else "".join(parts)


def chat(lm, messages, max_length=None, stop_token_ids="auto", stream=False, **kwargs):
    """The model's reply to `messages`: a string, or (`stream=True`) the
    pieces of it as they are generated.

    The conversation is written with `format_chat` (ending with the model's
    turn opened) and generation stops at `<end_of_turn>` or `<eos>` (with
    `stop_token_ids="auto"`), which is not part of the reply. `kwargs` go to
    `generate` / `generate_stream` (for example `truncate_prompt`).
    """
    if lm.preprocessor is None:
        raise ValueError("chat needs a preprocessor with a tokenizer.")
    tokenizer = lm.preprocessor.tokenizer
    require_chat_tokens(tokenizer, "chat")
    if stop_token_ids == "auto":
        stop_token_ids = [tokenizer.end_of_turn_token_id, tokenizer.end_token_id]
    generate = lm.generate_stream if stream else lm.generate
    return generate(
        format_chat(messages, add_generation_prompt=True),
        max_length=max_length,
        stop_token_ids=stop_token_ids,
        strip_prompt=True,
        **kwargs,
    )


def require_chat_tokens(tokenizer, what):
    """A `ValueError` naming what is missing unless `tokenizer`'s vocabulary
    holds `<start_of_turn>` and `<end_of_turn>` (`what` needs them)."""
    missing = [
        token
        for token, name in (("<start_of_turn>", "start_of_turn_token_id"), ("<end_of_turn>", "end_of_turn_token_id"))
        if getattr(tokenizer, name, None) is None
    ]
    if missing:
        raise ValueError(
            f"{what} writes Gemma's chat format, but this tokenizer's vocabulary has no "
            f"{' or '.join(repr(t) for t in missing)}: use the vocabulary of a Gemma "
            "checkpoint, or write prompts yourself and call generate() / fit() on strings."
        )


def is_conversations(x):
    """Whether `x` is a list of message lists (or one message list), as
    `GemmaCausalLM.fit` takes for chat fine-tuning."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    first = x[0]
    if isinstance(first, dict):
        return "role" in first
    return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], dict)


def conversation_data(lm, conversations, y=None, sample_weight=None):
    """`(x, y, sample_weight)` of `conversations` for `GemmaCausalLM.fit`:
    the loss only on the model's replies."""
    if lm.preprocessor is None:
        raise ValueError("Fitting on conversations needs a preprocessor (a tokenizer).")
    if y is not None or sample_weight is not None:
        raise ValueError("Conversations carry their own targets: pass no `y` or `sample_weight`.")
    return lm.preprocessor.preprocess_conversations(conversations)
