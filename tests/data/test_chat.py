"""Chat data: the template, the loss mask on assistant turns only, and what is reported."""

import copy
import json

import pytest

from trainer.data.chat import DEFAULT_CHAT_TEMPLATE, ChatRenderer, resolve_chat_template
from trainer.data.examples import Example, read_file
from trainer.data.tokenize import IGNORE_INDEX, tokenize_examples
from trainer.errors import UserError

MASKED = IGNORE_INDEX
ONE_TURN = (("system", "Marv."), ("user", "Hi?"), ("assistant", "Hello."))
TWO_TURNS = ONE_TURN + (("user", "Bye?"), ("assistant", "Bye now."))
# A template of the ChatML kind: role headers, the end-of-turn token, then a newline after it.
TAGGED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(messages, line=1, source="chat.jsonl"):
    return Example("", "", source, line, tuple(messages))


def tokenize(tokenizer, examples, **kwargs):
    kwargs.setdefault("max_seq_len", 256)
    kwargs.setdefault("too_long", "error")
    return tokenize_examples(examples, tokenizer, **kwargs)


@pytest.fixture
def templated_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template of its own."""
    own = copy.deepcopy(tokenizer)
    own.chat_template = TAGGED_TEMPLATE
    return own


def test_default_template_renders_plain_text_with_the_assistant_header_as_separator(tokenizer):
    renderer = ChatRenderer(tokenizer)
    assert renderer.template == DEFAULT_CHAT_TEMPLATE
    assert renderer.render(TWO_TURNS, add_generation_prompt=False) == (
        "System: Marv.\n\nUser: Hi?\n\nAssistant: Hello.<|endoftext|>\n\nUser: Bye?\n\nAssistant: Bye now.<|endoftext|>"
    )
    assert renderer.render(TWO_TURNS[:2], add_generation_prompt=True) == "System: Marv.\n\nUser: Hi?\n\nAssistant:"


def test_template_choice_config_then_tokenizer_then_default(tokenizer, templated_tokenizer):
    assert resolve_chat_template(tokenizer) == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_template(templated_tokenizer) == TAGGED_TEMPLATE
    assert resolve_chat_template(templated_tokenizer, "{{ 'x' }}") == "{{ 'x' }}"


def test_single_turn_trains_only_the_reply_and_its_eos(tokenizer):
    [row], report = tokenize(tokenizer, [chat(ONE_TURN)])
    context = ids(tokenizer, "System: Marv.\n\nUser: Hi?\n\nAssistant:")
    reply = ids(tokenizer, " Hello.") + [tokenizer.eos_token_id]
    assert row.input_ids == context + reply
    assert row.labels == [MASKED] * len(context) + reply
    assert row.supervised_tokens == len(reply)
    assert report.warnings == [] and report.skipped == []


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_multi_turn_masks_exactly(tokenizer, train_on):
    [row], _ = tokenize(tokenizer, [chat(TWO_TURNS)], train_on=train_on)
    first_context = ids(tokenizer, "System: Marv.\n\nUser: Hi?\n\nAssistant:")
    first_reply = ids(tokenizer, " Hello.") + [tokenizer.eos_token_id]
    second_context = ids(tokenizer, "\n\nUser: Bye?\n\nAssistant:")
    second_reply = ids(tokenizer, " Bye now.") + [tokenizer.eos_token_id]
    assert row.input_ids == first_context + first_reply + second_context + second_reply
    first_labels = first_reply if train_on == "all_assistant" else [MASKED] * len(first_reply)
    assert row.labels == [MASKED] * len(first_context) + first_labels + [MASKED] * len(second_context) + second_reply


def test_eos_literal_in_a_reply_is_not_doubled(tokenizer):
    written = chat(ONE_TURN[:2] + (("assistant", "Hello.<|endoftext|>"),))
    [with_literal, without], _ = tokenize(tokenizer, [written, chat(ONE_TURN, line=2)])
    assert with_literal.input_ids == without.input_ids
    assert with_literal.input_ids.count(tokenizer.eos_token_id) == 1


def test_the_tokenizers_own_template_is_used_and_whitespace_after_the_end_token_is_not_trained(templated_tokenizer):
    tokenizer = templated_tokenizer
    [row], report = tokenize(tokenizer, [chat(TWO_TURNS)])
    eos = tokenizer.eos_token_id
    first_context = ids(tokenizer, "<|system|>\nMarv.<|endoftext|>\n<|user|>\nHi?<|endoftext|>\n<|assistant|>\n")
    first_reply = ids(tokenizer, "Hello.") + [eos]
    second_context = ids(tokenizer, "\n<|user|>\nBye?<|endoftext|>\n<|assistant|>\n")
    second_reply = ids(tokenizer, "Bye now.") + [eos]
    assert row.input_ids == first_context + first_reply + second_context + second_reply  # nothing after the last EOS
    assert row.labels == [MASKED] * len(first_context) + first_reply + [MASKED] * len(second_context) + second_reply
    assert report.warnings == []


def test_config_template_overrides_the_tokenizers(templated_tokenizer):
    [row], _ = tokenize(templated_tokenizer, [chat(ONE_TURN)], chat_template=DEFAULT_CHAT_TEMPLATE)
    assert row.input_ids[: len(ids(templated_tokenizer, "System: Marv."))] == ids(templated_tokenizer, "System: Marv.")


def test_agent_role_is_read_as_assistant_with_a_warning(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": role, "content": "Hello."}]}
        for role in ("agent", "assistant", "agent")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    file = read_file(path)
    assert [e.messages[-1] for e in file.examples] == [("assistant", "Hello.")] * 3
    assert file.alias_lines == [1, 3]
    assert file.warnings == [
        f"{path}: lines 1, 3 use the role 'agent', read as 'assistant'. "
        'Fix: write "assistant" (the role chat templates know)'
    ]


def test_a_template_that_does_not_continue_the_generation_prompt_names_the_line(tokenizer):
    # The generation prompt says "Bot:" but assistant turns render as "Assistant:": training could
    # never match inference, so the row is an error (or skipped with on_error=skip).
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Bot:{% endif %}"
    )
    with pytest.raises(UserError) as info:
        tokenize(tokenizer, [chat(ONE_TURN, line=7)], chat_template=template)
    assert "chat.jsonl line 7: the chat template renders the conversation before assistant turn 1" in str(info.value)
    rows, report = tokenize(tokenizer, [chat(ONE_TURN, line=7)], chat_template=template, on_error="skip")
    assert rows == [] and [(s.source, s.line) for s in report.skipped] == [("chat.jsonl", 7)]


def test_a_template_error_is_the_rows_problem(tokenizer):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user') }}{% endif %}"
    with pytest.raises(
        UserError, match=r"chat.jsonl line 1: the chat template cannot render this conversation: start with a user"
    ):
        tokenize(tokenizer, [chat(ONE_TURN)], chat_template=template)


def test_an_invalid_template_is_a_config_error(tokenizer):
    with pytest.raises(UserError, match="not valid Jinja"):
        tokenize(tokenizer, [chat(ONE_TURN)], chat_template="{% for %}")


def test_context_that_tokenizes_differently_in_one_piece_is_warned_about_by_line(tokenizer):
    # No special token between a reply and the next turn: "-" + ">" merge into " ->" when the
    # context is tokenized in one piece, but not turn by turn.
    template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )
    conversation = (
        ("user", "kiwi -"),
        ("assistant", "green"),
        ("user", "lime -"),
        ("assistant", "> green"),
        ("user", "x"),
        ("assistant", "y"),
    )
    rows, report = tokenize(tokenizer, [chat(conversation, line=4), chat(ONE_TURN, line=5)], chat_template=template)
    assert len(rows) == 2
    [warning] = report.warnings
    assert warning.startswith("chat.jsonl: in line 4, the chat context before an assistant turn gives other tokens")


def test_a_reply_without_an_end_token_is_warned_about(tokenizer):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    _, report = tokenize(tokenizer, [chat(ONE_TURN, line=2)], chat_template=template)
    assert any(
        w.startswith("chat.jsonl: in line 2, an assistant turn does not end with an end-of-turn token")
        for w in report.warnings
    )
