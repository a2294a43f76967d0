"""The distributed paths users take: an `accelerate config` file (FSDP, DeepSpeed, mixed precision),
FSDP in one process, a run folder every node must see, tied weights in FSDP checkpoints, and a
finished multi-process run that always exits 0.

The launcher's environment comes from accelerate's own code (`prepare_multi_gpu_env`,
`prepare_deepspeed_cmd_env` of accelerate 1.16), so the variables are exactly the ones
`accelerate launch` exports; one real `accelerate launch --config_file` run checks the whole path.
"""

import os
import sys

import pytest
import torch
import yaml

from tests.helpers import (
    TORCHRUN_2,
    checkpoint_folders,
    held_parameters,
    read_jsonl,
    run_command,
    run_forked,
    trained_weights,
    write_config,
)
from trainer.config import load_config
from trainer.distributed import SHARED_CHECK_FILE, LauncherConflict, honour_launcher, launcher_settings
from trainer.train import main

# A finished FSDP run sometimes aborted at exit (reported: 3 in 30). Each real run costs 10-30 s, so
# the suite runs one here (and one more under accelerate launch); a by-hand check runs many:
# TRAINER_TEST_EXIT_REPEATS=20 python -m pytest -p no:xdist tests/test_distributed.py -k exit_0
EXIT_REPEATS = int(os.environ.get("TRAINER_TEST_EXIT_REPEATS", "1"))


def launcher_env(*flags: str) -> dict[str, str]:
    """The environment `accelerate launch` gives its workers for these flags (accelerate's own code)."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no", *flags, "trainer/train.py"]
    )
    args.mixed_precision = args.mixed_precision or "no"  # what accelerate launch fills in when not given
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dirs):
    return write_config(tmp_path, tiny_model_dirs["gpt2"], "lora", training={"epochs": 1})


# ---------------------------------------------------------------------------------------------
# 1. What `accelerate launch` asks for


def test_an_fsdp_launcher_means_our_fsdp_with_its_options(tiny_config):
    env = launcher_env(
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_reshard_after_forward",
        "false",
        "--fsdp_offload_params",
        "true",
        "--fsdp_activation_checkpointing",
        "true",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
    )
    config = load_config(tiny_config)  # LoRA: `auto` would be DDP
    settings = honour_launcher(config, env)
    assert settings.fsdp and not settings.deepspeed and settings.mixed_precision == "no"
    assert (
        config.distributed.strategy,
        config.distributed.reshard_after_forward,
        config.distributed.cpu_offload,
        config.model.gradient_checkpointing,
    ) == ("fsdp", False, True, True)
    assert config.training.mixed_precision == "auto"  # the launcher's `no` is its default: no preference
    # accelerate must not build its own FSDP plugin on top (on a GPU it would wrap the model again).
    assert "ACCELERATE_USE_FSDP" not in env and env["FSDP_VERSION"] == "2"
    # The same settings the config file already says: no conflict.
    agreeing = load_config(tiny_config, ["distributed.strategy=fsdp", "distributed.cpu_offload=true"])
    honour_launcher(agreeing, launcher_env("--use_fsdp", "--fsdp_version", "2", "--fsdp_offload_params", "true"))
    assert agreeing.distributed.cpu_offload is True and agreeing.distributed.reshard_after_forward is True


def test_a_launcher_without_fsdp_changes_nothing(tiny_config):
    config = load_config(tiny_config)
    env = launcher_env("--multi_gpu")
    assert honour_launcher(config, env) == launcher_settings({"ACCELERATE_MIXED_PRECISION": "no"})
    assert config.model_dump() == load_config(tiny_config).model_dump()


@pytest.mark.parametrize(
    "flags, setting, named",
    [
        (["--fsdp_version", "1"], "FSDP_VERSION", "fsdp_version: 2"),
        (
            ["--fsdp_version", "2", "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP"],
            "FSDP_AUTO_WRAP_POLICY",
            "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
        ),
        (
            ["--fsdp_version", "2", "--fsdp_auto_wrap_policy", "NO_WRAP"],
            "FSDP_AUTO_WRAP_POLICY",
            "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
        ),
        (
            ["--fsdp_version", "2", "--fsdp_forward_prefetch", "true"],
            "FSDP_FORWARD_PREFETCH",
            "fsdp_forward_prefetch: false",
        ),
        (
            [
                "--fsdp_version",
                "2",
                "--fsdp_activation_checkpointing",
                "true",
                "--fsdp_activation_checkpointing_offload",
                "true",
            ],
            "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD",
            "fsdp_activation_checkpointing_offload: false",
        ),
        (
            ["--fsdp_version", "2", "--fsdp_state_dict_type", "LOCAL_STATE_DICT"],
            "FSDP_STATE_DICT_TYPE",
            "fsdp_state_dict_type: SHARDED_STATE_DICT",
        ),
    ],
)
def test_fsdp_options_it_cannot_do_are_refused_by_name(tiny_config, flags, setting, named):
    with pytest.raises(LauncherConflict) as refused:
        honour_launcher(load_config(tiny_config), launcher_env("--use_fsdp", *flags))
    assert refused.value.setting == setting and refused.value.config_key is None
    assert f"{setting}=" in str(refused.value) and f"Fix: set `{named}`" in str(refused.value)


@pytest.mark.parametrize(
    "overrides, flags, config_key",
    [
        (["distributed.strategy=ddp"], [], "distributed.strategy"),
        # The launcher exports offload_params=false when its config file does not set it: a config that
        # asks for CPU offload must say so to the launcher too (or drop the key).
        (["distributed.cpu_offload=true"], [], "distributed.cpu_offload"),
        (
            ["distributed.reshard_after_forward=true"],
            ["--fsdp_reshard_after_forward", "false"],
            "distributed.reshard_after_forward",
        ),
        (
            ["model.gradient_checkpointing=false"],
            ["--fsdp_activation_checkpointing", "true"],
            "model.gradient_checkpointing",
        ),
    ],
)
def test_fsdp_launcher_against_the_config_file_is_an_error_naming_both(tiny_config, overrides, flags, config_key):
    with pytest.raises(LauncherConflict) as conflict:
        honour_launcher(load_config(tiny_config, overrides), launcher_env("--use_fsdp", "--fsdp_version", "2", *flags))
    assert conflict.value.config_key == config_key
    assert config_key in str(conflict.value) and conflict.value.setting in str(conflict.value)


@pytest.mark.parametrize(
    "launcher, configured, result",
    [
        ("bf16", "auto", "bf16"),
        ("fp16", "auto", "fp16"),
        ("no", "auto", "auto"),
        ("bf16", "bf16", "bf16"),
        ("no", "bf16", "bf16"),
        ("no", "fp16", "fp16"),
        (None, "no", "no"),
        ("fp16", "bf16", "conflict"),
        ("bf16", "fp16", "conflict"),
        ("bf16", "no", "conflict"),
        ("fp16", "no", "conflict"),
        ("fp8", "auto", "refused"),
    ],
)
def test_mixed_precision_the_config_wins_auto_takes_the_launchers(tiny_config, launcher, configured, result):
    config = load_config(tiny_config, {"training.mixed_precision": configured})
    env = {} if launcher is None else {"ACCELERATE_MIXED_PRECISION": launcher}
    if result in ("conflict", "refused"):
        with pytest.raises(LauncherConflict) as err:
            honour_launcher(config, env)
        assert err.value.setting == "ACCELERATE_MIXED_PRECISION" and err.value.value == launcher
        assert err.value.config_key == ("training.mixed_precision" if result == "conflict" else None)
        if result == "conflict":
            assert f"mixed_precision={launcher}" in str(err.value)
            assert f"training.mixed_precision={configured}" in str(err.value)
    else:
        honour_launcher(config, env)
        assert config.training.mixed_precision == result


def test_deepspeed_is_refused_before_the_model_loads(tmp_path, tiny_config, monkeypatch, capsys):
    env = launcher_env("--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "bf16")
    with pytest.raises(LauncherConflict) as refused:
        honour_launcher(load_config(tiny_config), env)
    assert refused.value.setting == "ACCELERATE_USE_DEEPSPEED"
    # The real command: the model path does not even exist, and the run folder is never made.
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.setenv(name, env[name])
    run = tmp_path / "never"
    assert main([str(tiny_config), "model.name_or_path=/no/such/model", f"output_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "asks for DeepSpeed" in err and "distributed.strategy=fsdp" in err and "without the DeepSpeed config" in err
    assert not run.exists()


ACCELERATE_FSDP_CONFIG = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "main_process_port": 0,
    "mixed_precision": "no",
    "use_cpu": False,
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "GPT2Block",
        "fsdp_reshard_after_forward": False,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
    },
}


def test_an_accelerate_config_file_with_fsdp_shards_the_model(tmp_path, tiny_model_dirs):
    """`accelerate launch --config_file F` with `distributed_type: FSDP` (what `accelerate config`
    writes), on the CPU: LoRA, which would otherwise run as DDP, is sharded with the file's options."""
    config = write_config(
        tmp_path,
        tiny_model_dirs["gpt2"],
        "lora",
        training={"epochs": 0.34, "self_test": False},
        checkpoints={"count": 1},
    )
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(yaml.safe_dump(ACCELERATE_FSDP_CONFIG), encoding="utf-8")
    run = run_command(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_config),
            "trainer/train.py",
            str(config),
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-3000:]
    held = held_parameters(run.stdout + run.stderr)
    assert sorted(held) == [0, 1] and held[0][0] + held[1][0] == held[0][1]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert resolved["distributed"] == {"strategy": "fsdp", "reshard_after_forward": False, "cpu_offload": False}


def test_fsdp_wrap_classes_must_name_the_models_blocks(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    config = write_config(
        tmp_path,
        tiny_model_dirs["gpt2"],
        "full",
        training={"epochs": 0.17, "self_test": False},
        checkpoints={"count": 1},
    )
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "GPTJBlock")
    assert main([str(config), "distributed.strategy=fsdp"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "`fsdp_transformer_layer_cls_to_wrap: GPT2Block`" in err and "GPTJBlock" in err
    assert not torch.distributed.is_initialized()  # the one-process group was shut down


# ---------------------------------------------------------------------------------------------
# 2 and 10. FSDP in one process; tied weights stored once


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, tiny_model_dirs):
    """GPT-2 (tied embeddings), full fine-tuning, 6 steps: replicated and sharded in one process."""
    folder = tmp_path_factory.mktemp("one-process")
    config = write_config(
        folder, tiny_model_dirs["gpt2"], "full", training={"epochs": 1, "self_test": False}, checkpoints={"count": 1}
    )
    assert main([str(config), f"output_dir={folder / 'ddp'}"]) == 0
    assert main([str(config), f"output_dir={folder / 'fsdp'}", "distributed.strategy=fsdp"]) == 0
    return config, folder / "ddp", folder / "fsdp"


def test_fsdp_in_one_process_trains_like_the_replicated_run(one_process_runs):
    _, ddp, fsdp = one_process_runs
    assert yaml.safe_load((fsdp / "config.yaml").read_text(encoding="utf-8"))["distributed"]["strategy"] == "fsdp"
    assert (fsdp / "state-6" / "state.json").is_file()
    losses = lambda run: [m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "grad_norm" in m]
    assert len(losses(ddp)) == len(losses(fsdp)) == 6
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(losses(ddp), losses(fsdp))), (losses(ddp), losses(fsdp))
    mine, theirs = trained_weights(checkpoint_folders(fsdp)[-1]), trained_weights(checkpoint_folders(ddp)[-1])
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-5
    assert not torch.distributed.is_initialized()  # its process group of one was shut down


# ---------------------------------------------------------------------------------------------
# 3. One run folder for every process


def test_an_output_dir_that_differs_per_process_is_refused_with_one_message(tmp_path, tiny_config, capfd):
    folders = [tmp_path / "node-a", tmp_path / "node-b"]
    codes = run_forked(lambda rank: [str(tiny_config), f"output_dir={folders[rank]}"], processes=2)
    assert codes == [1, 1]
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert (
        f"output_dir must be one folder on a filesystem shared by all nodes: process 1 (host "
        f"{os.uname().nodename}) does not see in {folders[1]} the file that process 0"
    ) in err
    assert "Fix: set output_dir to a path on a shared filesystem" in err
    assert not (folders[0] / SHARED_CHECK_FILE).exists() and not folders[1].exists()


# ---------------------------------------------------------------------------------------------
# 10 and 11. Two FSDP processes: tied weights stored once, and the run exits 0 every time


def test_finished_fsdp_runs_exit_0_and_store_tied_weights_once(tmp_path, one_process_runs):
    config, ddp, _ = one_process_runs
    expected = set(trained_weights(checkpoint_folders(ddp)[-1]))
    assert "transformer.wte.weight" in expected and "lm_head.weight" not in expected  # GPT-2 ties them
    for attempt in range(EXIT_REPEATS):  # 2 steps each
        run = tmp_path / f"run-{attempt}"
        done = run_command([*TORCHRUN_2, str(config), f"output_dir={run}", "training.epochs=0.34"])
        assert done.returncode == 0 and "terminate called" not in done.stderr, (attempt, done.stderr[-3000:])
        assert set(trained_weights(checkpoint_folders(run)[-1])) == expected
        assert not (run / SHARED_CHECK_FILE).exists()


def forked_group(work, processes: int = 2, timeout: float = 60) -> list[int]:
    """`work(rank)` (its return value is the exit code) in `processes` processes forked from this
    one, joined in one gloo process group."""
    import signal
    import time

    from tests.helpers import _free_port

    port, pids = _free_port(), []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                torch.distributed.init_process_group(
                    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes
                )
                code = work(rank)
            finally:
                os._exit(code)
        pids.append(pid)
    deadline, codes = time.time() + timeout, {}
    while len(codes) < processes and time.time() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    for pid in pids:
        if pid not in codes:  # hung: the test fails on its exit code
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return [codes.get(pid, -signal.SIGKILL) for pid in pids]


def test_shutdown_destroys_the_group_together_and_never_waits_for_a_process_that_is_gone():
    import time

    from trainer.distributed import shutdown

    def together(rank: int) -> int:
        shutdown()
        return 0 if not torch.distributed.is_initialized() else 1

    def alone(rank: int) -> int:
        if rank == 1:
            time.sleep(4)  # failed on its own: never reaches the barrier
            return 1
        started = time.time()
        shutdown(timeout_s=1)
        waited = time.time() - started
        return 0 if waited < 3.5 and torch.distributed.is_initialized() else 2

    assert forked_group(together) == [0, 0]
    assert forked_group(alone) == [0, 1]
