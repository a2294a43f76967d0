"""Library log lines that are noise for this trainer, filtered in one place.

transformers advises passing an `attention_mask` whenever a forward sees the pad token at either
end of `input_ids` without one. Here that is never a mistake: packed training rows go without a 2D
mask on purpose (their position_ids keep the examples apart: trainer/data/packing.py), and
`generate` passes every row's mask, which transformers itself drops for a batch without padding
(GPT-2's pad token is its end-of-text, which an empty prompt starts from). Printed on every run and
glued to the progress bar, it is dropped, and only it.
"""

from __future__ import annotations

import logging

ADVICE = "We strongly recommend passing in an `attention_mask`"


class _AttentionMaskAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ADVICE)


_FILTER = _AttentionMaskAdvice()


def drop_attention_mask_advice() -> None:
    """Install the filter on transformers' modeling logger (once; calling again changes nothing)."""
    logging.getLogger("transformers.modeling_utils").addFilter(_FILTER)  # a Filter already there is not added twice
