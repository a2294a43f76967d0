"""trainer/precision.py: the one table of precision names, and what `auto` becomes."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from trainer.precision import AUTOCAST, DTYPE_CHOICES, DTYPE_NAMES, autocast_dtype, resolve_dtype, torch_dtype


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_auto_is_bfloat16_on_a_gpu_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16  # a command line's default
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32


def test_every_name_has_its_torch_dtype():
    assert DTYPE_CHOICES == ("auto", "bfloat16", "float16", "float32")
    assert [torch_dtype(name) for name in DTYPE_NAMES] == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(ValueError, match="'fp16' is not a dtype name; one of bfloat16, float16, float32"):
        torch_dtype("fp16")


def test_autocast_computes_in_the_16_bit_dtypes_only():
    assert AUTOCAST == {"bfloat16": "bf16", "float16": "fp16"}
    assert [autocast_dtype(m) for m in ("bf16", "fp16", "no")] == [torch.bfloat16, torch.float16, None]


def test_the_config_takes_its_dtype_names_from_here():
    from trainer.config import ModelConfig

    assert ModelConfig.model_fields["dtype"].annotation.__args__ == DTYPE_CHOICES


def test_a_config_typo_is_reported_without_importing_torch():
    """The fast config check: the config (and this module, which it imports) stay torch-free."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['trainer/train.py', 'configs/tiny-gpt2.yaml', 'training.learnin_rate=1']\n"
        "try:\n"
        "    runpy.run_path('trainer/train.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout == "1 False\n"
    assert (
        result.stderr
        == "error: unknown key 'training.learnin_rate' on the command line: did you mean 'training.learning_rate'?\n"
    )
