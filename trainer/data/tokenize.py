"""Tokenize examples into input ids and trained positions, masked by position.

Two guarantees, each a trap that well-known trainers fell into:

* The context's tokens in training are exactly the tokens the model gets at inference. Prompt and
  completion are tokenized separately (with the same `encode_prompt` that generation uses) and
  concatenated, so a token can never straddle the boundary and the mask can never be off by one.
  Chat rows are cut into context and assistant segments (`chat.py`) and each segment is tokenized
  on its own; `encode_chat_prompt`, which checkpoint generation uses, encodes the same segments.
* EOS is always learned. Labels are -100 on context positions (and, in the collator, on padding
  positions) because of where they are, never because of their token id, so EOS keeps its label
  even when the tokenizer's pad id equals its EOS id.

For speed the tokenizer is called on batches (a fast tokenizer's Rust backend, checked against the
plain `tokenizer(text)` call first) and the result is kept as flat arrays (`TokenizedRows`): what
the cache stores, and what `TokenizedData` turns back into `TokenizedExample`s one batch at a time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Iterator, Sequence

import numpy as np

from trainer.data.chat import ChatRenderer, ChatTemplateError, Message, Segment
from trainer.data.examples import Example, SkippedLine, listed_lines
from trainer.data.problems import Problem, row_unit
from trainer.errors import UserError

IGNORE_INDEX = -100
EOS_LITERAL = "<|endoftext|>"
ENCODE_BATCH = 1024  # rows per tokenizer call: the fast tokenizer batches well; memory stays small
MAX_LISTED = 20


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """Same length as `input_ids`; IGNORE_INDEX where the position is not trained."""
    source: str
    line: int

    @property
    def supervised_tokens(self) -> int:
        """Positions whose label the model predicts (position 0 has no previous token)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class LengthReport:
    """How the `data.too_long` policy changed the data (and, from `tokenize_examples`, the rows
    skipped for `data.on_error: skip` and warnings about the chat template)."""

    kept: int = 0
    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.kept} examples kept, {len(self.dropped)} dropped, {len(self.truncated)} truncated as too long"


# ---------------------------------------------------------------------------------------------
# One example at a time: the reference encodings, also used by generation


def start_token_id(tokenizer) -> int:
    """The token an empty prompt starts from: BOS, or EOS for GPT-2-style models that have no BOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids exactly as the model sees them at inference (training uses this too).

    An empty prompt (open-ended text) becomes the start token, so the completion's first token is
    trained and generation has something to condition on.
    """
    ids = tokenizer(prompt)["input_ids"]
    return ids if ids else [start_token_id(tokenizer)]


def strip_eos_literal(text: str, eos_text: str | None) -> str:
    """`text` without a trailing `<|endoftext|>` (or the tokenizer's EOS text): the EOS id is added by position."""
    for literal in {EOS_LITERAL, eos_text or EOS_LITERAL}:
        if text.endswith(literal):
            return text[: -len(literal)]
    return text


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion ids ending in exactly one EOS id: a trailing `<|endoftext|>` (or the tokenizer's
    EOS text) written in the data becomes the EOS id, and a completion without one gets it appended."""
    text = strip_eos_literal(completion, tokenizer.eos_token)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def chat_messages(messages: Iterable[Message], eos_text: str | None) -> tuple[Message, ...]:
    """Messages as the template gets them: an assistant reply that ends with `<|endoftext|>` loses
    it, because templates write the end-of-turn token themselves."""
    return tuple(
        (role, strip_eos_literal(content, eos_text) if role == "assistant" else content) for role, content in messages
    )


def _chat_ids(
    segments: list[Segment], encoded: list[list[int]], start_id: int, *, trained_turns: set[int] | None
) -> tuple[list[int], list[int], list[tuple[list[int], str]]]:
    """Concatenate separately encoded segments. Returns the ids, the trained spans (start, end
    pairs) and, before each trained turn, its context as (ids encoded from text, text) for the
    joint-tokenization check.

    `trained_turns` (assistant segment numbers, from 0) are trained; None means inference: every
    segment is context and the text after the last assistant turn (the generation prompt) is kept.
    An empty context before the first reply becomes the start token, as for an empty prompt.
    """
    ids: list[int] = []
    spans: list[int] = []
    contexts: list[tuple[list[int], str]] = []
    texts: list[str] = []
    lead = 0  # 1 once a start token (which no text encodes) leads the ids
    turn = -1
    last_turn = max((i for i, s in enumerate(segments) if s.assistant), default=-1)
    for index, (segment, segment_ids) in enumerate(zip(segments, encoded)):
        if trained_turns is not None and index > last_turn:
            break  # training: nothing after the last reply is learned, so it is not kept
        if segment.assistant:
            turn += 1
            if not ids:
                ids.append(start_id)
                lead = 1
            if trained_turns is not None and turn in trained_turns:
                contexts.append((ids[lead:], "".join(texts)))
                spans += [len(ids), len(ids) + len(segment_ids)]
        ids += segment_ids
        texts.append(segment.text)
    if not ids:
        ids.append(start_id)
    return ids, spans, contexts


def encode_chat_prompt(tokenizer, messages: Sequence[Message], chat_template: str | None = None) -> list[int]:
    """A chat test prompt's ids: the conversation rendered with the generation prompt, encoded
    segment by segment exactly as training encodes the context before an assistant turn."""
    renderer = ChatRenderer(tokenizer, chat_template)
    try:
        segments = renderer.segments(chat_messages(messages, tokenizer.eos_token), generation_prompt=True)
    except ChatTemplateError as err:
        raise UserError(f"chat test prompt: {err}") from None
    encoded = [tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments]
    ids, _, _ = _chat_ids(segments, encoded, start_token_id(tokenizer), trained_turns=None)
    return ids


def render_chat_prompt(tokenizer, messages: Sequence[Message], chat_template: str | None = None) -> str:
    """The text of a chat test prompt (for samples.jsonl): what `encode_chat_prompt` encodes."""
    renderer = ChatRenderer(tokenizer, chat_template)
    return renderer.render(chat_messages(messages, tokenizer.eos_token), add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Batches: the same encodings, many rows per tokenizer call


class BatchEncoder:
    """`tokenizer(text, add_special_tokens=...)["input_ids"]` for a list of texts, in one call to a
    fast tokenizer's backend (no offsets, no Python per token). The backend path is used only after
    it gave the same ids as the plain call on the first texts; otherwise every text takes the plain call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        usable = (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and bool(getattr(backend, "encode_special_tokens", False))
            == bool(getattr(tokenizer, "split_special_tokens", False))
        )
        self._backend = backend if usable else None
        self._checked: dict[bool, bool] = {}

    def _reference(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] for text in texts]

    def _fast(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]

    def __call__(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is None:
            return self._reference(texts, add_special_tokens)
        result = self._fast(texts, add_special_tokens)
        if not self._checked.get(add_special_tokens):
            sample = texts[:16]
            if result[: len(sample)] != self._reference(sample, add_special_tokens):
                self._backend = None  # this tokenizer's Python side adds something: always take the plain call
                return self._reference(texts, add_special_tokens)
            self._checked[add_special_tokens] = True
        return result


@dataclass
class TokenizedRows:
    """Tokenized rows of one file (or a shard of it) as flat arrays: what the cache stores.

    Row i's tokens are `ids[offsets[i]:offsets[i+1]]`; its trained positions are the half-open
    spans in `spans[span_offsets[i]:span_offsets[i+1]]` (start, end, start, end, ...). Both offset
    arrays start at 0 and end at the length of the array they index.
    """

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than rows
    spans: np.ndarray  # int32
    span_offsets: np.ndarray  # int64, one more than rows
    lines: np.ndarray  # int64: the row's line (JSONL) or row number (tables)
    source: str = ""

    @classmethod
    def build(
        cls,
        pieces: list[list[int]],
        lengths: list[int],
        spans: list[int],
        span_counts: list[int],
        lines: list[int],
        source: str = "",
    ) -> "TokenizedRows":
        """From the encoder's lists: `pieces` are every row's id lists end to end."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        span_offsets = np.zeros(len(span_counts) + 1, dtype=np.int64)
        np.cumsum(span_counts, out=span_offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(offsets[-1]))
        return cls(
            ids, offsets, np.asarray(spans, dtype=np.int32), span_offsets, np.asarray(lines, dtype=np.int64), source
        )

    def __len__(self) -> int:
        return len(self.lines)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @cached_property
    def _span_rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.span_offsets) // 2)

    @cached_property
    def first_trained(self) -> np.ndarray:
        """Each row's first trained position (its length when nothing is trained)."""
        first = self.lengths.copy()
        has_spans = np.diff(self.span_offsets) > 0
        first[has_spans] = self.spans[self.span_offsets[:-1][has_spans]]
        return first

    def supervised(self, max_len: int | None = None) -> np.ndarray:
        """Supervised tokens per row (trained positions after position 0, within `max_len`)."""
        pairs = self.spans.reshape(-1, 2).astype(np.int64)
        ends = pairs[:, 1] if max_len is None else np.minimum(pairs[:, 1], max_len)
        counts = np.clip(ends - np.maximum(pairs[:, 0], 1), 0, None)
        return np.bincount(self._span_rows, weights=counts, minlength=len(self)).astype(np.int64)

    def example(self, row: int, max_len: int | None = None) -> TokenizedExample:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if max_len is not None:
            end = min(end, start + max_len)
        ids = self.ids[start:end].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        row_spans = self.spans[self.span_offsets[row] : self.span_offsets[row + 1]].tolist()
        for span_start, span_end in zip(row_spans[::2], row_spans[1::2]):
            labels[span_start:span_end] = ids[span_start:span_end]
        return TokenizedExample(ids, labels, self.source, int(self.lines[row]))


@dataclass
class EncodeNotes:
    """What encoding found besides tokens: rows the template could not handle (`Problem`s of kind
    `chat_template`), and rows to warn about."""

    problems: list[Problem] = field(default_factory=list)
    merged_context_lines: list[int] = field(default_factory=list)
    open_turn_lines: list[int] = field(default_factory=list)

    def extend(self, other: "EncodeNotes") -> None:
        self.problems += other.problems
        self.merged_context_lines += other.merged_context_lines
        self.open_turn_lines += other.open_turn_lines

    def warning_problems(self, source: str) -> list[Problem]:
        """The warnings as `Problem`s of kind `chat_tokenization` (about the whole file)."""
        unit = row_unit(source)
        found = []
        if self.merged_context_lines:
            found.append(
                Problem(
                    "chat_tokenization",
                    source,
                    None,
                    f"in {listed_lines(sorted(self.merged_context_lines), unit)}, the chat context before an "
                    "assistant turn gives other tokens when tokenized in one piece than turn by turn "
                    "(the template joins two turns without a special token between them, "
                    "and the tokenizer merges across the join). "
                    "Training uses the turn-by-turn tokens and so do the checkpoints' test prompts; "
                    "encode prompts turn "
                    "by turn when you use the model too, or end each turn with a special token in data.chat_template",
                )
            )
        if self.open_turn_lines:
            found.append(
                Problem(
                    "chat_tokenization",
                    source,
                    None,
                    f"in {listed_lines(sorted(self.open_turn_lines), unit)}, an assistant turn does not end "
                    "with an end-of-turn token, so the model will not learn to stop",
                    "use a chat template that ends each assistant turn with {{ eos_token }} (data.chat_template)",
                )
            )
        return found

    def warnings(self, source: str) -> list[str]:
        """The warnings as the trainer logs them: 'FILE: what. Fix: how'."""
        return [f"{source}: {problem.sentence()}" for problem in self.warning_problems(source)]


class _RowsBuilder:
    """Collects encoded rows as lists, then hands them to `TokenizedRows.build` in one go."""

    def __init__(self):
        self.pieces: list[list[int]] = []
        self.lengths: list[int] = []
        self.spans: list[int] = []
        self.span_counts: list[int] = []
        self.lines: list[int] = []

    def add(self, pieces: list[list[int]], length: int, spans: list[int], line: int) -> None:
        self.pieces += pieces
        self.lengths.append(length)
        self.spans += spans
        self.span_counts.append(len(spans))
        self.lines.append(line)

    def rows(self, source: str) -> TokenizedRows:
        return TokenizedRows.build(self.pieces, self.lengths, self.spans, self.span_counts, self.lines, source)


def _encode_prompt_completion(batch: list[Example], encode: BatchEncoder, tokenizer, out: _RowsBuilder) -> None:
    eos_id, start_id = tokenizer.eos_token_id, start_token_id(tokenizer)
    prompts = encode([e.prompt for e in batch], add_special_tokens=True)  # as `encode_prompt`
    completions = encode(
        [strip_eos_literal(e.completion, tokenizer.eos_token) for e in batch], add_special_tokens=False
    )
    for example, prompt_ids, completion_ids in zip(batch, prompts, completions):
        if not prompt_ids:
            prompt_ids = [start_id]
        completion_ids.append(eos_id)
        prompt_length = len(prompt_ids)
        length = prompt_length + len(completion_ids)
        out.add([prompt_ids, completion_ids], length, [prompt_length, length], example.line)


def _encode_chats(
    batch: list[Example],
    encode: BatchEncoder,
    tokenizer,
    renderer: ChatRenderer,
    train_on: str,
    out: _RowsBuilder,
    notes: EncodeNotes,
    source: str,
) -> None:
    rendered: list[tuple[Example, list[Segment]]] = []
    for example in batch:
        try:
            segments = renderer.segments(chat_messages(example.messages, tokenizer.eos_token))
        except ChatTemplateError as err:
            notes.problems.append(Problem("chat_template", source, example.line, err.message, err.fix))
            continue
        rendered.append((example, segments))
    texts = [segment.text for _, segments in rendered for segment in segments]
    encoded = iter(encode(texts, add_special_tokens=False))
    start_id = start_token_id(tokenizer)
    checks: list[tuple[int, list[int], str]] = []  # (line, context ids, context text)
    for example, segments in rendered:
        turns = sum(segment.assistant for segment in segments)
        trained = set(range(turns)) if train_on == "all_assistant" else {turns - 1}
        segment_ids = [next(encoded) for _ in segments]
        ids, spans, contexts = _chat_ids(segments, segment_ids, start_id, trained_turns=trained)
        if not any(end - start for start, end in zip(spans[::2], spans[1::2])):
            notes.problems.append(
                Problem(
                    "chat_template",
                    source,
                    example.line,
                    "the chat template renders no assistant text for this conversation, so there is nothing to learn",
                    "check data.chat_template",
                )
            )
            continue
        if any(segment.assistant and not renderer.ends_turn(segment.text) for segment in segments):
            notes.open_turn_lines.append(example.line)
        checks += [(example.line, context, text) for context, text in contexts if text]
        out.add([ids], len(ids), spans, example.line)
    # The boundary check: each trained turn's context, tokenized in one piece, must give the same ids.
    joint = encode([text for _, _, text in checks], add_special_tokens=False)
    merged = {line for (line, context, text), whole in zip(checks, joint) if text and context != whole}
    notes.merged_context_lines += sorted(merged)


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    chat_template: str | None = None,
    train_on: str = "all_assistant",
    source: str | None = None,
) -> tuple[TokenizedRows, EncodeNotes]:
    """Encode examples (of one file) into `TokenizedRows`, with their full length: the length
    policy is applied later, so a new `max_seq_len` needs no new tokenization. Rows the chat
    template cannot handle are left out and reported in the notes' `problems`."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, so completions cannot learn to stop: use a tokenizer with one")
    encode = BatchEncoder(tokenizer)
    renderer = ChatRenderer(tokenizer, chat_template) if any(e.messages is not None for e in examples) else None
    out, notes = _RowsBuilder(), EncodeNotes()
    name = source if source is not None else (examples[0].source if examples else "")
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = list(examples[start : start + ENCODE_BATCH])
        # A file holds one format, but a caller may pass a mix: keep the order, batch each run.
        for is_chat, group in itertools.groupby(batch, key=lambda e: e.messages is not None):
            group = list(group)
            if is_chat:
                _encode_chats(group, encode, tokenizer, renderer, train_on, out, notes, name)
            else:
                _encode_prompt_completion(group, encode, tokenizer, out)
    return out.rows(name), notes


# ---------------------------------------------------------------------------------------------
# Many files, selected rows, and the length policy


class TokenizedData(Sequence[TokenizedExample]):
    """The examples a run trains on: rows of several `TokenizedRows` (files or cache shards),
    selected (validation split, length policy) and truncated to `max_len`, without copying tokens.
    Items are `TokenizedExample`s built on access, so a large dataset never becomes Python lists."""

    def __init__(self, parts: Sequence[TokenizedRows], rows: np.ndarray | None = None, max_len: int | None = None):
        self.parts = list(parts)
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)]).astype(np.int64)
        total = int(self._starts[-1])
        self.rows = np.arange(total, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.max_len = max_len
        self._part = np.searchsorted(self._starts, self.rows, side="right") - 1
        self._row = self.rows - self._starts[self._part]

    def select(self, indices: Sequence[int] | np.ndarray, max_len: int | None = None) -> "TokenizedData":
        """A subset (indices into this data, kept in the given order), optionally truncated."""
        limit = max_len if self.max_len is None else (self.max_len if max_len is None else min(max_len, self.max_len))
        return TokenizedData(self.parts, self.rows[np.asarray(indices, dtype=np.int64)], limit)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.parts[self._part[index]].example(int(self._row[index]), self.max_len)

    def __iter__(self) -> Iterator[TokenizedExample]:
        for index in range(len(self)):
            yield self[index]

    def _gather(self, per_part: list[np.ndarray]) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, np.int64)
        return np.concatenate(per_part)[self.rows]

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per example (after truncation)."""
        lengths = self._gather([p.lengths for p in self.parts])
        return lengths if self.max_len is None else np.minimum(lengths, self.max_len)

    @cached_property
    def supervised_tokens(self) -> np.ndarray:
        """Supervised tokens per example (after truncation), as `TokenizedExample.supervised_tokens`."""
        return self._gather([p.supervised(self.max_len) for p in self.parts])

    @cached_property
    def first_trained(self) -> np.ndarray:
        return self._gather([p.first_trained for p in self.parts])

    def where(self, index: int) -> str:
        """'file line N' for messages."""
        part = self.parts[self._part[index]]
        return f"{part.source} line {int(part.lines[self._row[index]])}"


def apply_length_policy(data: TokenizedData, *, max_seq_len: int, too_long: str) -> tuple[TokenizedData, LengthReport]:
    """`data.too_long`: `error` lists every example over `max_seq_len`; `drop` leaves them out;
    `truncate` cuts their end, and drops those whose trained part starts beyond the window."""
    lengths = data.lengths
    over = np.flatnonzero(lengths > max_seq_len)
    report = LengthReport()
    if too_long == "error" and over.size:
        listed = "\n".join(f"  {data.where(i)} ({lengths[i]} tokens)" for i in over[:MAX_LISTED])
        more = f"\n  ... and {over.size - MAX_LISTED} more" if over.size > MAX_LISTED else ""
        raise UserError(
            f"{over.size} examples are longer than data.max_seq_len={max_seq_len}:\n{listed}{more}\n"
            "Fix: raise data.max_seq_len, shorten them, or set data.too_long to drop or truncate"
        )
    keep = lengths <= max_seq_len
    if too_long == "truncate":
        fits = data.first_trained[over] < max_seq_len  # something trained is left in the window
        keep[over[fits]] = True
        report.truncated = [data.where(i) for i in over[fits]]
        report.dropped = [data.where(i) for i in over[~fits]]
    else:
        report.dropped = [data.where(i) for i in over]
    kept = data.select(np.flatnonzero(keep), max_len=max_seq_len if too_long == "truncate" else None)
    report.kept = len(kept)
    return kept, report


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    *,
    max_seq_len: int,
    too_long: str,
    chat_template: str | None = None,
    train_on: str = "all_assistant",
    on_error: str = "error",
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize, mask and apply the length policy (`error` | `drop` | `truncate`), in memory.

    Chat rows use `chat_template` (default: the tokenizer's, else the plain-text one) and train
    `train_on` (`all_assistant` | `last_assistant`). Rows the template cannot render raise a
    `UserError` naming their lines, or with `on_error="skip"` land in the report's `skipped`.
    """
    parts: list[TokenizedRows] = []
    report_skipped: list[SkippedLine] = []
    warnings: list[str] = []
    problems: list[str] = []
    for source, group in itertools.groupby(examples, key=lambda e: e.source):
        rows, notes = encode_examples(
            list(group), tokenizer, chat_template=chat_template, train_on=train_on, source=source
        )
        parts.append(rows)
        warnings += notes.warnings(source)
        for problem in sorted(notes.problems, key=lambda p: p.line):
            problems.append(problem.located())
            report_skipped.append(SkippedLine(problem))
    if problems and on_error == "error":
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{len(problems)} chat examples cannot be used:\n{listed}{more}")
    kept, report = apply_length_policy(TokenizedData(parts), max_seq_len=max_seq_len, too_long=too_long)
    report.skipped, report.warnings = report_skipped, warnings
    return list(kept), report
