"""format_chat against the chat templates of the released instruction-tuned checkpoints.

The templates below are pasted verbatim (as string literals; the escapes are
those of their sources, which Python reads the same way) and rendered with
jinja2 the way transformers' `apply_chat_template` renders them.
"""

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keras_gemma.chat import format_chat

# Gemma 1: the "google/gemma-7b-it" entry of llama.cpp's template tests,
# ggml-org/llama.cpp tests/test-chat-template.cpp (commit 03f94f19a2c4c9d039fa1a84838fe3e2110cc28d).
# This is the template as first released, without `{{ bos_token }}`; its `\\n` are jinja escapes.
# The later revision of the Gemma 1 template, e.g. the "gemma-instruct" entry of
# ollama/ollama template/index.json (commit 19934fd19943893c263c4c4a7afc36392c7e5ca0),
# prepends `{{ bos_token }}` and is otherwise GEMMA_2 below, character for character.
GEMMA_1 = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"  # noqa: E501

# Gemma 2: llama.cpp's copy of google/gemma-2-2b-it's template,
# ye-NX/llama.cpp models/templates/google-gemma-2-2b-it.jinja (commit b354d7c9ecb76c97c07098617cdebbdfffa2583e).
GEMMA_2 = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"  # noqa: E501

# Gemma 3: the "chat_template" of a google/gemma-3-*-it tokenizer_config.json, quoted (JSON-escaped)
# in ShishirPatil/gorilla berkeley-function-call-leaderboard/bfcl/model_handler/local_inference/gemma.py
# (commit 72055c51cf809ba0ee04b4332a3515d7ec8549a5).
GEMMA_3 = "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"  # noqa: E501

TEMPLATES = {"gemma1": GEMMA_1, "gemma2": GEMMA_2, "gemma3": GEMMA_3}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


# The environment of transformers' chat templates (transformers/utils/chat_template_utils.py,
# `_cached_compile_jinja_template`), less its extras no Gemma template uses.
_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.globals["raise_exception"] = _raise_exception


def render(template, messages, add_generation_prompt):
    return _ENV.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>"
    )


def expected(name, messages, add_generation_prompt=True):
    """The template's output, less the `<bos>` that format_chat leaves to the preprocessor."""
    out = render(TEMPLATES[name], messages, add_generation_prompt)
    bos = "<bos>" if "bos_token" in TEMPLATES[name] else ""
    assert out.startswith(bos)
    return out[len(bos):]


def user(text):
    return {"role": "user", "content": text}


def model(text):
    return {"role": "model", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "single_turn": [user("Hello!")],
    "three_turns": [user("Knock knock."), model("Who's there?"), user("Gemma.")],
    "ends_with_model": [user("Hi"), model("Hello."), user("Name a colour."), model("Blue.")],
    "assistant_role": [user("Hi"), assistant("Hello."), user("Again?")],
    "whitespace": [user("  \n Line one\nline two\n\n  "), model("\tAnswer:\n  indented\n"), user(" x ")],
    "unicode": [user("Grüß Gott — 你好 👋"), model("Καλημέρα!  "), user("ありがとう")],
    "empty_content": [user(""), model("   "), user("ok")],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_matches_the_released_templates(name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    got = format_chat(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected(name, messages, add_generation_prompt)


def test_design_doc_example_and_default_generation_prompt():
    messages = CONVERSATIONS["three_turns"]
    assert format_chat(messages) == (
        "<start_of_turn>user\nKnock knock.<end_of_turn>\n"
        "<start_of_turn>model\nWho's there?<end_of_turn>\n"
        "<start_of_turn>user\nGemma.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_assistant_is_written_as_model():
    assert format_chat([user("a"), assistant("b")], False) == format_chat([user("a"), model("b")], False)


def test_docstring_example():
    prompt = format_chat(
        [system("Answer in one word."), user("Knock knock."), assistant("Who's there?"), user("Gemma.")]
    )
    assert prompt == (
        "<start_of_turn>user\nAnswer in one word.\n\nKnock knock.<end_of_turn>\n"
        "<start_of_turn>model\nWho's there?<end_of_turn>\n"
        "<start_of_turn>user\nGemma.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


# System messages are compared with Gemma 3's template only: the Gemma 1 and 2 templates reject them.
@pytest.mark.parametrize("name", ["gemma1", "gemma2"])
def test_gemma_1_and_2_templates_reject_system(name):
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        render(TEMPLATES[name], [system("Be brief."), user("Hi")], True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages",
    [
        [system("Be brief."), user("Hi")],
        [system("Be brief."), user("Hi"), assistant("Hello."), user("Bye")],
        [system("  Spaces kept.\n"), user("  trimmed  ")],  # the template trims the user text only
        [system(""), user("Hi")],
        [system("Réponds en français 🇫🇷"), user("Ça va ?")],
    ],
)
def test_system_is_folded_as_in_gemma_3(messages, add_generation_prompt):
    got = format_chat(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected("gemma3", messages, add_generation_prompt)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": " one "}, {"type": "text", "text": "\ntwo\n"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Be brief. "}]}, user("Hi"), model("Hello.")],
        [user("Hi"), {"role": "assistant", "content": [{"type": "text", "text": " Hello. "}]}, user("x")],
    ],
)
def test_text_parts_as_in_gemma_3(messages):
    assert format_chat(messages) == expected("gemma3", messages)


def test_image_parts_are_rejected():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].*'image'"):
        format_chat(messages)


NOT_ALTERNATING = {
    "user_user": ([user("a"), user("b")], r"messages\[1\] has role 'user' where a 'model'"),
    "starts_with_model": ([model("a"), user("b")], r"messages\[0\] has role 'model' where a 'user'"),
    "starts_with_assistant": ([assistant("a")], r"messages\[0\] has role 'assistant' where a 'user'"),
    "model_model": ([user("a"), model("b"), model("c")], r"messages\[2\] has role 'model' where a 'user'"),
}


@pytest.mark.parametrize("case", NOT_ALTERNATING)
def test_non_alternating_roles_are_rejected(case):
    messages, message = NOT_ALTERNATING[case]
    with pytest.raises(ValueError, match=message):
        format_chat(messages)


@pytest.mark.parametrize("case", NOT_ALTERNATING)
@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_also_reject_non_alternating_roles(name, case):
    messages, _ = NOT_ALTERNATING[case]
    with pytest.raises(jinja2.exceptions.TemplateError, match="Conversation roles must alternate"):
        render(TEMPLATES[name], messages, True)


def test_system_after_system_prefix_alternation_is_checked():
    # Gemma 3 checks alternation after the system message: it must be followed by a user turn.
    messages = [system("s"), model("a")]
    with pytest.raises(ValueError, match=r"messages\[1\] has role 'model' where a 'user'"):
        format_chat(messages)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Conversation roles must alternate"):
        render(GEMMA_3, messages, True)


def test_system_not_first_is_rejected():
    # The templates only catch this at an even position; at an odd one they write a "system" turn.
    with pytest.raises(ValueError, match=r"messages\[1\] is a system message; only the first"):
        format_chat([user("a"), system("b")])
    with pytest.raises(ValueError, match=r"messages\[2\] is a system message"):
        format_chat([system("s"), user("a"), system("b")])


def test_system_alone_is_rejected():
    # Gemma 3's template drops such a system message without a word; we raise instead.
    assert render(GEMMA_3, [system("Be brief.")], True) == "<bos><start_of_turn>model\n"
    with pytest.raises(ValueError, match="no user message after it"):
        format_chat([system("Be brief.")])


@pytest.mark.parametrize("role", ["tool", "User", None])
def test_unknown_role_is_rejected(role):
    with pytest.raises(ValueError, match=f"unknown role {role!r}"):
        format_chat([user("a"), {"role": role, "content": "b"}])


def test_empty_conversation_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        format_chat([])


@pytest.mark.parametrize("content", [None, 3, {"text": "a"}])
def test_non_string_content_is_rejected(content):
    with pytest.raises(TypeError, match=r"messages\[1\]\['content'\] must be a string"):
        format_chat([user("a"), {"role": "model", "content": content}])


def test_non_dict_message_is_rejected():
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict"):
        format_chat(["hello"])


def test_local_renderer_matches_transformers():
    """Our jinja2 environment renders as transformers' own chat-template renderer."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(utils, "render_jinja_template"):
        pytest.skip("this transformers has no render_jinja_template")
    messages = CONVERSATIONS["whitespace"]
    for name, template in TEMPLATES.items():
        for add_generation_prompt in (True, False):
            rendered, _ = utils.render_jinja_template(
                conversations=[messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                bos_token="<bos>",
            )
            assert rendered[0] == render(template, messages, add_generation_prompt)
    rendered, _ = utils.render_jinja_template(
        conversations=[[system(" s "), user(" u ")]], chat_template=GEMMA_3, add_generation_prompt=True,
        bos_token="<bos>",
    )
    assert rendered[0] == render(GEMMA_3, [system(" s "), user(" u ")], True)
