"""The data stage of a run: read and check the files, then tokenize with the loss mask.

Reading needs no tokenizer, so the recipe calls `read_data` before loading anything heavy: a
broken file fails in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trainer.config import Config
from trainer.data.examples import Example, read_examples, split_validation
from trainer.data.tokenize import TokenizedExample, tokenize_examples
from trainer.errors import UserError


@dataclass
class RawData:
    train: list[Example]
    valid: list[Example]


def _files(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_files(paths: list[str], data_format: str) -> list[Example]:
    return [example for path in paths for example in read_examples(path, data_format)]


def read_data(config: Config) -> RawData:
    """Every training and validation example, checked line by line."""
    data = config.data
    train = read_files(_files(data.train_file), data.format)
    if data.validation_file:
        return RawData(train, read_files(_files(data.validation_file), data.format))
    if data.validation_split > 0:
        return RawData(*split_validation(train, data.validation_split, config.training.seed))
    return RawData(train, [])


def tokenize_split(config: Config, examples: list[Example], tokenizer, which: str, log: Callable[[str], None]) -> list[TokenizedExample]:
    data = config.data
    tokenized, report = tokenize_examples(examples, tokenizer, max_seq_len=data.max_seq_len, too_long=data.too_long)
    if report.dropped or report.truncated:
        log(f"{which} data: {report.summary()} (data.max_seq_len={data.max_seq_len})")
    if not tokenized:
        raise UserError(
            f"no {which} examples are left after data.too_long={data.too_long}: "
            "raise data.max_seq_len or shorten the examples"
        )
    return tokenized


def train_file_bytes(config: Config) -> int:
    """Total size of the training files, for `training.epochs: auto`."""
    import os

    return sum(os.path.getsize(path) for path in _files(config.data.train_file))
