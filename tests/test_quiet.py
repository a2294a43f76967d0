"""trainer/quiet.py: transformers' attention-mask advice is dropped, and nothing else."""

import logging

import pytest


@pytest.mark.parametrize("module", ["trainer.loss", "trainer.generate"])
def test_training_and_generation_drop_the_attention_mask_advice_and_nothing_else(module):
    """Packed rows have no 2D mask on purpose; generate's all-ones mask is dropped by transformers
    itself; the advice was printed on every run."""
    import importlib

    importlib.import_module(module)  # installs the filter
    logger = logging.getLogger("transformers.modeling_utils")

    def record(message):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)

    assert not logger.filter(
        record("We strongly recommend passing in an `attention_mask` since your input_ids may be padded.")
    )
    assert logger.filter(record("Some weights of the model checkpoint were not used"))
