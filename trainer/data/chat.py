"""Chat templates: render a conversation as text, cut into context and assistant segments.

A conversation is rendered with a Jinja chat template exactly as Hugging Face's
`apply_chat_template` renders it (the same sandboxed environment, the tokenizer's special tokens as
variables). The template is, in order of preference, `data.chat_template`, the tokenizer's own
template, or `DEFAULT_CHAT_TEMPLATE`, a plain-text one for models that have none (GPT-J, GPT-NeoX):

    System: Marv is a sarcastic bot.

    User: What's the capital of France?

    Assistant: Paris, as if everyone didn't know.<|endoftext|>

    User: ...

The assistant header (`Assistant:`) is the separator: it is the generation prompt, so the model
sees the same text before every assistant turn in training and at inference, and each assistant
turn ends with EOS, so the model learns to stop.

`ChatRenderer.segments` cuts the rendered text where each assistant turn starts and ends, by
rendering the conversation up to each turn with the generation prompt (what inference sees) and
through it. The tokenizer then encodes each segment on its own, so the context's tokens never
depend on the reply that follows: training and inference encode the very same context segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainer.errors import UserError

Message = tuple[str, str]  # (role, content)

# Jinja, rendered like Hugging Face chat templates (trim_blocks, lstrip_blocks). Messages are joined
# by a blank line; the generation prompt is the assistant header without the space, so the reply's
# first word keeps its leading space (" Paris"), as in prompt/completion data.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] }}"
    "{%- else -%}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages %}{{ '\\n\\n' }}{% endif %}{{ 'Assistant:' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """The template cannot render this conversation in a way training can use (one row's problem):
    `message` says what, `fix` how to fix it ("" when the template's own error is all we know)."""

    def __init__(self, message: str = "", fix: str = ""):
        super().__init__(f"{message}. Fix: {fix}" if fix else message)
        self.message, self.fix = message, fix


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: context, or one assistant turn (its content and its
    end-of-turn token), which is what the loss may cover."""

    text: str
    assistant: bool


def resolve_chat_template(tokenizer, configured: str | None = None) -> str:
    """The template in use: `data.chat_template`, else the tokenizer's own, else the plain-text default."""
    if configured:
        return configured
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the one apply_chat_template uses by default
        own = own.get("default")
    return own or DEFAULT_CHAT_TEMPLATE


def _compile(template: str):
    """Compile in transformers' sandbox (same filters and globals as `apply_chat_template`)."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the same sandbox, built here
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def _compile_jinja_template(source: str):
            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = raise_exception
            return env.from_string(source)

    try:
        return _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise UserError(
            f"the chat template is not valid Jinja (line {err.lineno}: {err.message}). "
            "Fix: correct data.chat_template, or remove it to use the tokenizer's template or the default"
        ) from None


class ChatRenderer:
    """Renders conversations with one template for one tokenizer (compiled once)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.template = resolve_chat_template(tokenizer, template)
        self._compiled = _compile(self.template)
        # The variables apply_chat_template passes: bos_token, eos_token, pad_token, ...
        self._variables = dict(tokenizer.special_tokens_map)
        # Texts of added tokens (EOS, <|im_end|>, ...): an assistant turn ending in one has an end token.
        self.end_tokens = tuple(sorted(getattr(tokenizer, "added_tokens_encoder", {}) or (), key=len, reverse=True))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """The conversation as text, as `apply_chat_template(..., tokenize=False)` renders it."""
        import jinja2

        try:
            return self._compiled.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._variables,
            )
        except Exception as err:  # noqa: BLE001 - a user's template can raise anything (TypeError, ...)
            kind = "" if isinstance(err, jinja2.TemplateError) else f"{type(err).__name__}: "
            raise ChatTemplateError(f"the chat template cannot render this conversation: {kind}{err}") from None

    def ends_turn(self, text: str) -> bool:
        """Whether an assistant segment ends with an end-of-turn token (so the model learns to stop)."""
        return text.endswith(self.end_tokens) if self.end_tokens else False

    def _turn_end(self, before: str, through: str) -> int:
        """Where an assistant turn's trained text ends: after its end-of-turn token. Whitespace a
        template writes after that token (ChatML's newline) is context, not something to learn."""
        turn = through[len(before) :]
        stripped = turn.rstrip()
        if stripped != turn and self.ends_turn(stripped):
            return len(before) + len(stripped)
        return len(through)

    def segments(self, messages: Sequence[Message], *, generation_prompt: bool = False) -> list[Segment]:
        """Cut the rendered conversation into context and assistant segments.

        Before each assistant turn, the text is exactly the rendering of the conversation up to
        that turn with the generation prompt, i.e. the prompt at inference. With
        `generation_prompt`, the text ends with the prompt for a new assistant turn (chat test
        prompts). Raises `ChatTemplateError` for a template that renders a turn differently once
        the conversation continues (then no training context could equal the inference prompt).
        """
        full = self.render(messages, add_generation_prompt=generation_prompt)
        pieces: list[Segment] = []
        position = 0
        turn = 0
        for index, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            turn += 1
            before = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= position):
                raise ChatTemplateError(
                    f"the chat template renders the conversation before assistant turn {turn} (with the generation "
                    "prompt) differently from the same conversation continued, so the context learned in training "
                    "would not be the prompt the model gets at inference",
                    "set data.chat_template to a template whose generation prompt is exactly how it starts an "
                    "assistant turn",
                )
            end = self._turn_end(before, through)
            pieces += [Segment(full[position : len(before)], False), Segment(full[len(before) : end], True)]
            position = end
        pieces.append(Segment(full[position:], False))
        return [piece for piece in pieces if piece.text]
