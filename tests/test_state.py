import errno
import random
import stat

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from trainer.atomic import file_mode
from trainer.config import Config
from trainer.errors import SaveFailed, UserError
from trainer.state import (
    COMPLETE_MARKER,
    capture_rng,
    complete_states,
    load_state,
    newest_state,
    read_state,
    restore_rng,
    save_state,
)


def draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_random_generators_come_back_exactly():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draw()
    saved = capture_rng()
    expected = draw()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(torch.load(_roundtrip(saved), weights_only=True))  # through the file format, safely loaded
    assert draw() == expected


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def small_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen: not in the state
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def config(tmp_path) -> Config:
    return Config.model_validate(
        {"model": {"name_or_path": "m"}, "data": {"train_file": "t"}, "output_dir": str(tmp_path)}
    )


def test_weights_optimizer_and_metadata_round_trip(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = small_model_and_optimizer()
    path = save_state(
        accelerator, tmp_path, 7, model=model, optimizer=optimizer, config=config(tmp_path), info={"reason": "test"}
    )
    assert path.name == "state-7" and (path / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "config.yaml",
        "optimizer.pt",
        "rng-0.pt",
        "state.json",
        "trainable.safetensors",
    ]
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {file_mode()}

    state = newest_state(tmp_path)
    assert (state.step, state.world_size, state.complete, state.info["reason"]) == (7, 1, False, "test")
    fresh, fresh_optimizer = small_model_and_optimizer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_optimizer.state.clear()
    load_state(accelerator, state, model=fresh, optimizer=fresh_optimizer)
    assert torch.equal(fresh[1].weight, model[1].weight) and torch.equal(fresh[0].bias, model[0].bias)
    assert torch.equal(fresh[0].weight, torch.zeros(3, 4))  # frozen weights are not the state's business
    for mine, theirs in zip(fresh_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_only_the_newest_complete_state_is_kept_and_partial_ones_are_never_used(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = small_model_and_optimizer()
    for step in (3, 6):
        save_state(accelerator, tmp_path, step, model=model, optimizer=optimizer, config=config(tmp_path), info={})
    assert [p.name for p in complete_states(tmp_path)] == ["state-6"]
    (tmp_path / "state-9").mkdir()  # no marker: a crash while it was written
    assert newest_state(tmp_path).step == 6
    with pytest.raises(UserError, match="not a complete resumable state"):
        read_state(tmp_path / "state-9")
    final = save_state(
        accelerator, tmp_path, 10, model=model, optimizer=optimizer, config=config(tmp_path), info={}, final=True
    )
    assert newest_state(tmp_path).complete and sorted(p.name for p in final.iterdir()) == [
        "COMPLETE",
        "config.yaml",
        "state.json",
    ]


def test_a_full_disk_during_a_save_keeps_the_previous_state(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model, optimizer = small_model_and_optimizer()
    save_state(accelerator, tmp_path, 3, model=model, optimizer=optimizer, config=config(tmp_path), info={})

    def disk_full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr("trainer.state.save_file", disk_full)
    with pytest.raises(
        SaveFailed, match=r"state of step 6 .*No space left on device.*the last resumable state is state-3 \(intact\)"
    ):
        save_state(accelerator, tmp_path, 6, model=model, optimizer=optimizer, config=config(tmp_path), info={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-3"]
