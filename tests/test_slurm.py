"""scripts/slurm/train.sbatch, run with stub `srun`, `scontrol`, `scancel` and `accelerate` on PATH
and SLURM's variables set: the launch line it builds, and when it requeues the job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"

STUBS = {
    # srun: record its arguments, then run the command as one node's task would (node 0).
    "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
echo "${SRUN_CPUS_PER_TASK-unset}" > "$STUB_LOG/srun_cpus_per_task"
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
""",
    "scontrol": """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<<"$3"; exit 0; fi
echo "$*" >> "$STUB_LOG/scontrol.calls"
""",
    # scancel --signal=TERM: what SLURM does, to the stub trainer.
    "scancel": """#!/bin/bash
echo "$*" >> "$STUB_LOG/scancel.calls"
kill -TERM "$(cat "$STUB_LOG/trainer.pid")"
""",
    # accelerate (and the one-process python): record the line and the environment, then behave
    # like the trainer: exit with $STUB_EXIT, or on SIGTERM with 75 (stopped, resumable).
    "accelerate": """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG/launch.args"
echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$STUB_LOG/shutdown_timeout"
echo "${PET_RDZV_ID-unset}" > "$STUB_LOG/rdzv_id"
echo $$ > "$STUB_LOG/trainer.pid"
trap 'exit 75' TERM
if [[ -n ${STUB_WAIT:-} ]]; then touch "$STUB_LOG/started"; while true; do sleep 0.05; done; fi
exit "${STUB_EXIT:-0}"
""",
}


@pytest.fixture
def slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(), log.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "stub-python").write_text(STUBS["accelerate"])
    (bin_dir / "stub-python").chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{name_or_path: m}}\ndata: {{train_file: t.jsonl}}\noutput_dir: {tmp_path / 'run'}\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
        "HOME": os.environ.get("HOME", "/root"),
    }
    return config, env, log


def sbatch(config, env, *args, **popen):
    return subprocess.Popen(
        ["bash", str(SCRIPT), str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(process) -> tuple[int, str]:
    output, _ = process.communicate(timeout=60)
    return process.returncode, output


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    header = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header


def test_two_nodes_build_one_accelerate_launch_per_node_meeting_on_the_first(slurm):
    config, env, log = slurm
    code, output = finish(sbatch(config, env, "training.epochs=1"))
    assert code == 0, output
    assert lines(log / "srun.args")[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert lines(log / "launch.args") == [
        "launch",
        "--machine_rank",
        "0",
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--multi_gpu",
        "--rdzv_backend",
        "c10d",
        "--main_process_ip",
        "gpu-a",
        "--main_process_port",
        "14242",
        "trainer/train.py",
        str(config),
        "training.epochs=1",
    ]
    assert lines(log / "rdzv_id") == ["4242"]  # torchrun's rendezvous id: only this job's launchers meet
    assert lines(log / "shutdown_timeout") == ["280"]
    assert not (log / "scontrol.calls").exists()  # done: no requeue


def test_gpus_per_node_come_from_the_allocation(slurm):
    config, env, log = slurm
    del env["SLURM_GPUS_ON_NODE"]
    env |= {"SLURM_JOB_NODELIST": "gpu-a", "SLURM_GPUS_PER_NODE": "h100:4"}
    assert finish(sbatch(config, env))[0] == 0
    launch = lines(log / "launch.args")
    assert launch[launch.index("--num_processes") + 1] == "4" and launch[launch.index("--num_machines") + 1] == "1"


def test_one_gpu_runs_the_trainer_without_a_launcher(slurm):
    config, env, log = slurm
    env |= {
        "SLURM_JOB_NODELIST": "gpu-a",
        "SLURM_GPUS_ON_NODE": "1",
        "PYTHON": str(Path(env["PATH"].split(":")[0]) / "stub-python"),
    }
    assert finish(sbatch(config, env, "a.b=1"))[0] == 0
    assert lines(log / "launch.args") == ["trainer/train.py", str(config), "a.b=1"]


def test_the_resumable_exit_code_requeues_the_job(slurm):
    config, env, log = slurm
    code, output = finish(sbatch(config, env | {"STUB_EXIT": "75"}))
    assert code == 75 and lines(log / "scontrol.calls") == ["requeue 4242"], output


def test_a_launcher_reporting_1_requeues_only_when_the_run_says_it_stopped(slurm):
    config, env, log = slurm
    code, _ = finish(sbatch(config, env | {"STUB_EXIT": "1"}))
    assert code == 1 and not (log / "scontrol.calls").exists()  # no run: a real failure
    run = config.parent / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"status": "stopped", "step": 5, "exit_code": 75}))
    code, output = finish(sbatch(config, env | {"STUB_EXIT": "1"}))
    assert code == 75 and lines(log / "scontrol.calls") == ["requeue 4242"], output


def test_slurms_warning_signal_becomes_sigterm_for_the_trainer_and_a_requeue(slurm):
    config, env, log = slurm
    process = sbatch(config, env | {"STUB_WAIT": "1"})
    deadline = time.time() + 30
    while not (log / "started").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    code, output = finish(process)
    assert lines(log / "scancel.calls") == ["--signal=TERM 4242"]
    assert code == 75 and lines(log / "scontrol.calls") == ["requeue 4242"], output
    assert "stop signal passed on: 1" in output


def launch_option(log: Path, option: str) -> str:
    launch = lines(log / "launch.args")
    return launch[launch.index(option) + 1]


def two_jobs_at_once(config, env, tmp_path, job_ids, **extra) -> list[Path]:
    """Runs the script for each job id concurrently on this host; returns each job's stub log."""
    logs, processes = [], []
    for job_id in job_ids:
        log = tmp_path / f"log-{job_id}"
        log.mkdir()
        logs.append(log)
        processes.append(sbatch(config, env | extra | {"SLURM_JOB_ID": job_id, "STUB_LOG": str(log)}))
    for process in processes:
        code, output = finish(process)
        assert code == 0, output
    return logs


def test_two_single_node_jobs_on_one_host_get_their_own_rendezvous(slurm, tmp_path):
    config, env, _ = slurm
    env |= {"SLURM_JOB_NODELIST": "gpu-a", "SLURM_GPUS_ON_NODE": "4"}
    first, second = two_jobs_at_once(config, env, tmp_path, ["4242", "4243"])
    for log, port in ((first, "14242"), (second, "14243")):
        # static rendezvous on the job's own port, not c10d's shared default localhost:29400 with run id "none"
        assert lines(log / "launch.args") == [
            "launch",
            "--machine_rank",
            "0",
            "--num_machines",
            "1",
            "--num_processes",
            "4",
            "--multi_gpu",
            "--rdzv_backend",
            "static",
            "--main_process_port",
            port,
            "trainer/train.py",
            str(config),
        ]
        assert lines(log / "rdzv_id") == ["unset"]


def test_two_multi_node_jobs_sharing_a_first_host_get_their_own_port_and_rendezvous_id(slurm, tmp_path):
    config, env, _ = slurm
    first, second = two_jobs_at_once(config, env, tmp_path, ["30001", "30002"])
    assert [launch_option(log, "--main_process_ip") for log in (first, second)] == ["gpu-a", "gpu-a"]
    assert [launch_option(log, "--main_process_port") for log in (first, second)] == ["20001", "20002"]
    assert [lines(log / "rdzv_id") for log in (first, second)] == [["30001"], ["30002"]]


def test_master_port_overrides_the_port_from_the_job_id(slurm):
    config, env, log = slurm
    assert finish(sbatch(config, env | {"MASTER_PORT": "29511"}))[0] == 0
    assert launch_option(log, "--main_process_port") == "29511"


def test_srun_gets_the_jobs_cpus_per_task(slurm):
    config, env, log = slurm
    assert finish(sbatch(config, env | {"SLURM_CPUS_PER_TASK": "32"}))[0] == 0
    assert lines(log / "srun_cpus_per_task") == ["32"]
    assert finish(sbatch(config, env))[0] == 0  # no --cpus-per-task: srun's own default
    assert lines(log / "srun_cpus_per_task") == ["unset"]


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_outside_slurm_one_line_says_what_to_run_instead(slurm, missing):
    config, env, log = slurm
    del env[missing]
    code, output = finish(sbatch(config, env))
    assert code == 2
    assert output.splitlines() == [
        "scripts/slurm/train.sbatch is a SLURM batch script and this is not a SLURM job: submit it with"
        " `sbatch scripts/slurm/train.sbatch CONFIG.yaml`, or outside SLURM run"
        " `accelerate launch trainer/train.py CONFIG.yaml` (several GPUs) or `python trainer/train.py CONFIG.yaml`"
    ]
    assert not (log / "srun.args").exists()
