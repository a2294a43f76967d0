"""Fine-tune a causal language model from a YAML config: the training recipe.

    accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]
    python trainer/train.py CONFIG.yaml [section.key=value ...]
    python -m trainer.train CONFIG.yaml [section.key=value ...]

`setup` prepares everything in a fixed order: the run folder is locked and read first, the data is
checked before any model is loaded (a broken file fails in seconds), and every `auto` is resolved
before the run is compared with the one the folder may hold. `train` then runs the loop from step 1,
or from the step of the run's resumable state, and at each of the N checkpoint steps: eval loss ->
test prompts -> atomic checkpoint -> report -> resumable state. A stop signal or the time limit ends
the loop at a step boundary with the state saved (exit code 75); the same command continues it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py`: make the `trainer` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, set_seed
from transformers.utils import logging as hf_logging
from tqdm.auto import tqdm

from trainer import tracking
from trainer.checkpoint import CHECKPOINT_PREFIX, cast_floating, save_checkpoint
from trainer.config import Config, load_config, save_config
from trainer.data.batching import DataSchedule, collate, shard
from trainer.data.chat import resolve_chat_template
from trainer.data.packing import collate_packed, pack_examples, packing_stats
from trainer.data.pipeline import prepare_data, write_skipped_lines
from trainer.data.preflight import preflight_data, write_data_reports
from trainer.disk import check_free_space, run_bytes, tokenizer_bytes
from trainer.distributed import check_shared_folder, decide_on_main, honour_launcher, shutdown, sum_over_processes
from trainer.errors import (
    EXIT_DONE, EXIT_INTERRUPTED, EXIT_STOPPED_RESUMABLE, EXIT_USER_ERROR, TrainingDiverged, UsageError, UserError,
)
from trainer.families import estimates_memory, memory_families
from trainer.faults import crash_point
from trainer.generate import complete, encode_test_prompt
from trainer.loss import supervised_loss_sum
from trainer.metrics import MetricsLog
from trainer.model import count_parameters, load_model_config, load_tokenizer
from trainer.optim import build_optimizer, require_device_features
from trainer.plan import plan_run as estimate_memory
from trainer.report import CheckpointSummary, write_report
from trainer.report_html import write_html_report
from trainer.resolve import activation_dtype, autocast_caches_weights, resolve_config, resolve_precision
from trainer.resume import RunPlan, data_digests, plan_run
from trainer.run_folder import (
    CONFIG_FILE, DATA_REPORT_FILE, METRICS_FILE, REPORT_FILE, SKIPPED_LINES_FILE, RunLock, clear_run, rewind_to,
    write_status,
)
from trainer.selftest import failure as selftest_failure
from trainer.selftest import run_self_test
from trainer.schedule import checkpoint_steps, learning_rate_at, warmup_steps
from trainer.state import load_state, restore_rng_of, save_state, step_of
from trainer.step import accumulate_gradients, optimizer_step
from trainer.strategy import make_strategy
from trainer.stopping import Deadline, StopSignals

USAGE = "usage: accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]"


def item_sizes(items) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, supervised tokens) of every training item, computed once; steps only sum them."""
    if hasattr(items, "lengths"):  # TokenizedData keeps them as arrays already
        return items.lengths, items.supervised_tokens
    return np.array([len(i.input_ids) for i in items]), np.array([i.supervised_tokens for i in items])


def data_lines(item) -> list[str]:
    """'file line N' for a training item (a packed row names each of its examples)."""
    examples = getattr(item, "examples", (item,))
    return [f"{example.source} line {example.line}" for example in examples]


class FineTuneRecipe:
    def __init__(self, config: Config, stop: StopSignals | None = None, started: float | None = None):
        self.config = config
        self.stop = stop
        self.started = time.time() if started is None else started
        # What `accelerate launch` asked for (its config file's FSDP or DeepSpeed, mixed precision) is
        # honoured in the config or refused, before the dtypes are resolved (trainer/distributed.py).
        honour_launcher(config)
        # The dtypes decide the Accelerator's autocast, so they are resolved first (trainer/resolve.py).
        resolve_precision(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        # accelerate keeps one AcceleratorState per process; another recipe in the same process (the
        # tests, a notebook) may ask for another precision. The process group itself is kept.
        AcceleratorState._reset_state()
        cache = autocast_caches_weights(config.method, config.model.gradient_checkpointing)
        tracking.check_installed(config)
        self.accelerator = Accelerator(
            **tracking.accelerator_options(config),
            mixed_precision=config.training.mixed_precision,
            # Without a GPU, say so: only then does accelerate join torchrun/mpirun CPU processes.
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[] if cache else [AutocastKwargs(cache_enabled=False)],
        )
        self.is_main = self.accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.lock: RunLock | None = None
        self.owns_folder = False  # set once this job has made the folder its run's
        self.start_step = self.step = 0

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

    # ------------------------------------------------------------------------------------------
    # Setup, in order

    def setup(self) -> RunPlan:
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.training.seed)

        # 1. Run folder: one job at a time; the lock is taken before anything is written.
        def take_lock() -> None:
            self.lock = RunLock(self.output_dir).acquire()

        decide_on_main(acc, take_lock)
        # Every process must see the folder the main process locked (a node with its own output_dir
        # would die at the first save): the main process writes a token that all must read back.
        check_shared_folder(acc, self.output_dir)

        # 2. Preflight, on the main process: the checks of `scripts/prepare_data.py validate`
        #    before anything heavy loads. Errors stop the run (unless data.on_error=skip); warnings
        #    are printed now and saved in the run folder below.
        self.data_reports = []

        def preflight() -> None:
            self.data_reports = preflight_data(cfg, log=self.log)

        decide_on_main(acc, preflight)

        # 3. Every `auto` resolved (from config.json, file sizes and the device), then the one
        #    decision about the folder: a fresh run, the continuation of the run it holds, that
        #    run already complete, or a refusal naming what differs.
        model_config = load_model_config(cfg)
        resolve_config(cfg, device=acc.device, model_config=model_config)
        self.plan = decide_on_main(acc, lambda: plan_run(cfg, acc.num_processes))
        if self.plan.action == "complete":
            return self.plan

        # 4. Tokenizer, then the data: read, tokenize with the loss mask (cached: a rerun or a resume
        #    only hashes the files), split off validation data, apply the length policy. Each node's
        #    main process goes first; the others then load its cache instead of tokenizing too.
        self.tokenizer = load_tokenizer(cfg)
        # Checkpoints carry the chat template training used, so apply_chat_template matches it.
        self.tokenizer.chat_template = resolve_chat_template(self.tokenizer, cfg.data.chat_template)
        with acc.local_main_process_first():
            data = prepare_data(cfg, self.tokenizer, self.log)
        self.train_data, self.valid_data = data.train, data.valid
        # Test prompts are encoded once now: a template that cannot render one fails here, not
        # after hours of training at the first checkpoint.
        for test_prompt in cfg.test_prompts:
            encode_test_prompt(self.tokenizer, test_prompt, cfg.data.chat_template)

        # 4b. Packing: several examples per max_seq_len row, each attending only to itself. The
        # schedule then runs over packed rows; evaluation stays on padded batches.
        self.collate_train = collate
        if cfg.data.packing:
            self.train_data = pack_examples(self.train_data, cfg.data.max_seq_len)
            self.collate_train = collate_packed
            self.log(f"packing: {packing_stats(self.train_data, cfg.data.max_seq_len).summary()}")

        # 4c. On GPUs: will it fit? The planner's estimate (scripts/plan.py), as a warning only: the
        #     estimate is a model of the memory, not a measurement.
        if self.is_main and acc.device.type == "cuda":
            self.warn_about_memory(model_config)

        # 5. Schedule: steps, warmup, checkpoint steps (a bad checkpoints.count fails here, still
        #    before anything is written).
        self.schedule = DataSchedule(
            len(self.train_data),
            micro_batch_size=cfg.training.micro_batch_size,
            accumulation=cfg.training.gradient_accumulation_steps,
            world_size=acc.num_processes,
            seed=cfg.training.seed,
        )
        self.train_tokens, self.train_supervised = item_sizes(self.train_data)
        self.total_steps = self.schedule.total_steps(cfg.training.epochs)
        self.warmup_steps = warmup_steps(self.total_steps, cfg.training.warmup_ratio)
        self.checkpoint_steps = checkpoint_steps(self.total_steps, cfg.checkpoints.count)

        # 6. The data passed: only now may the folder change. A fresh run clears what an earlier
        #    run (overwrite_output_dir) or a failed start left; a resume rewinds the folder to the
        #    step of its state.
        if self.is_main:
            self.prepare_folder(data)
        self.owns_folder = True
        acc.wait_for_everyone()

        # 7. Model, spread over the processes by the strategy: replicated (DDP) or sharded (FSDP2).
        #    Load (4-bit for QLoRA; float32 master weights for full fine-tuning; attention as
        #    resolved) -> gradient checkpointing -> LoRA or full -> (shard). Then, before the first
        #    step, check that the run's files fit on the disk.
        require_device_features(cfg, acc.device)
        self.strategy = make_strategy(acc, cfg)
        model = self.strategy.build_model()
        trainable, total = count_parameters(model)
        self.run_sizes = run_bytes(model, method=cfg.method, optimizer=cfg.training.optimizer,
                                   tokenizer_size=tokenizer_bytes(self.tokenizer),
                                   checkpoint_dtype=getattr(torch, cfg.model.dtype))
        decide_on_main(acc, self.check_disk)
        if self.strategy.sharded:
            held = self.strategy.held_parameters(model)
            print(f"[rank {acc.process_index}] FSDP: this process holds {held:,} of {total:,} parameters", flush=True)

        # 8. Optimizer, then the strategy prepares both (accelerate's DDP; compiling goes last: it
        #    wraps the finished model, and unwrap strips it again for saving).
        optimizer = build_optimizer(cfg, model, acc.device)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)

        # 9. The resolved config (auto values filled in) goes into the run folder.
        if self.is_main:
            save_config(cfg, self.output_dir / CONFIG_FILE)
            write_status(self.output_dir, "running", step=self.plan.state.step if self.plan.state else 0,
                         total_steps=self.total_steps)
        self.metrics = MetricsLog(self.output_dir / METRICS_FILE, enabled=self.is_main)
        # Trackers: a resumed run continues its W&B run (the id is in the state).
        self.tracker_run_id = (self.plan.state.info.get("tracker_run_id") if self.plan.action == "resume" else None) \
            or tracking.new_run_id()
        tracking.start(acc, cfg, self.tracker_run_id)
        self.log(
            f"model {cfg.model.name_or_path} ({cfg.model.dtype}, {cfg.method}, {cfg.model.attention} attention, "
            f"{'FSDP' if self.strategy.sharded else 'DDP' if acc.num_processes > 1 else 'one process'}): "
            f"{trainable:,} of {total:,} parameters trainable\n"
            f"{len(self.train_data)} training {'rows' if cfg.data.packing else 'examples'} and "
            f"{len(self.valid_data)} validation examples; "
            f"{cfg.training.epochs:g} epochs = {self.total_steps} optimizer steps on {acc.num_processes} process(es); "
            f"checkpoints at steps {self.checkpoint_steps}"
        )

        # 10. Where training starts: step 1, or the saved state's step with everything that makes
        #     the continuation exact. The random generators come back last, so that nothing in
        #     setup (LoRA's initialisation, for one) consumes them afterwards.
        self.checkpoints: list[CheckpointSummary] = []
        self.loss_since_checkpoint, self.tokens_since_checkpoint = 0.0, 0
        self.bad_steps_in_a_row, self.skipped_steps = 0, 0
        # The main process's clock decides the time limit for all (at_step_boundary).
        self.deadline = Deadline.for_job(cfg.training.time_limit, self.started) if self.is_main else Deadline(None)
        self.data_digests = data_digests(cfg)
        if self.plan.action == "resume":
            self.restore(self.plan)

        # A time limit that leaves no room for a step and a state save is refused before step 1.
        decide_on_main(acc, lambda: self.refuse_a_time_limit_too_short(after_first_step=False))

        # 11. The self-test, on the real model, device and dtype (trainer/selftest.py): a backend or
        #     batch layout that does not compute what training promises stops the run here.
        if cfg.training.self_test:
            self.self_test()
        return self.plan

    def refuse_a_time_limit_too_short(self, after_first_step: bool) -> None:
        """Main process (its clock decides the time limit): raise TimeLimitTooShort, with the numbers."""
        err = self.deadline.too_short(time.time(), self.config.training.time_limit, after_first_step=after_first_step)
        if err is not None:
            raise err

    def self_test(self) -> None:
        cfg, acc = self.config, self.accelerator
        items, batch, real = self.first_micro_batch()
        result = run_self_test(
            self.model, attention=cfg.model.attention, packing=cfg.data.packing,
            compute_dtype=activation_dtype(cfg), autocast=acc.autocast, device=acc.device,
            first_batch=(items, batch) if real else None, tokenizer=self.tokenizer, data_format=cfg.data.format,
        )
        if result.failed:
            raise selftest_failure(result)
        self.log(result.summary())

    def warn_about_memory(self, model_config, gpu_memory_bytes: int | None = None) -> str | None:
        """Log (and return) the planner's warning when the run's estimate exceeds the GPU."""
        if not estimates_memory(model_config):  # the planner models the families it has entries for
            self.log(f"note: no memory estimate for model_type {model_config.model_type!r} (the planner knows "
                     f"{', '.join(memory_families())}); training goes on without one")
            return None
        memory = gpu_memory_bytes or torch.cuda.get_device_properties(self.accelerator.device).total_memory
        warning = estimate_memory(self.config, gpus=self.accelerator.num_processes, gpu_memory_bytes=memory,
                                  model_config=model_config).warning()
        if warning:
            self.log(f"warning: {warning}")
        return warning

    def prepare_folder(self, data) -> None:
        """Main process: make `output_dir` this run's (see step 6 of `setup`)."""
        if self.plan.action == "fresh":
            clear_run(self.output_dir)
        else:
            step = self.plan.state.step
            if self.plan.copy_history_from is not None:
                self.copy_history(self.plan.copy_history_from, step)
            rewind_to(self.output_dir, step)
        write_data_reports(self.output_dir / DATA_REPORT_FILE, self.data_reports)
        if data.skipped:
            write_skipped_lines(self.output_dir / SKIPPED_LINES_FILE, data.skipped)

    def copy_history(self, source: Path, step: int) -> None:
        """`resume=PATH` from another run folder: its metrics and checkpoints up to `step` come along."""
        clear_run(self.output_dir)
        if (source / METRICS_FILE).exists():
            shutil.copyfile(source / METRICS_FILE, self.output_dir / METRICS_FILE)
        for checkpoint in source.glob(f"{CHECKPOINT_PREFIX}*"):
            if step_of(checkpoint, CHECKPOINT_PREFIX) is not None:
                shutil.copytree(checkpoint, self.output_dir / checkpoint.name)

    def check_disk(self) -> None:
        done = self.plan.state.step if self.plan.action == "resume" else 0
        check_free_space(self.output_dir, self.run_sizes, checkpoints_left=sum(s > done for s in self.checkpoint_steps),
                         states_present=1 if self.plan.action == "resume" else 0)

    def restore(self, plan: RunPlan) -> None:
        state, info = plan.state, plan.state.info
        load_state(self.accelerator, state, model=self.unwrapped_model, optimizer=self.optimizer,
                   sharded=self.strategy.sharded)
        self.start_step = self.step = state.step
        self.loss_since_checkpoint = info["loss_since_checkpoint"]
        self.tokens_since_checkpoint = info["tokens_since_checkpoint"]
        self.bad_steps_in_a_row, self.skipped_steps = info["bad_steps_in_a_row"], info["skipped_steps"]
        self.checkpoints = [CheckpointSummary(**summary) for summary in info["checkpoints"]]
        for kind, seconds in info["longest_seconds"].items():
            self.deadline.record(kind, seconds)
        if self.is_main:
            self.write_report()
        restore_rng_of(self.accelerator, state)
        self.log(f"resumed from step {state.step} of {self.total_steps} (state saved at {info['saved_at']}, "
                 f"reason: {info['reason']})")

    # ------------------------------------------------------------------------------------------
    # Training

    def train(self) -> str:
        """Run the remaining steps; returns "complete", or "stopped" (state saved, resumable)."""
        cfg = self.config
        self.model.train()
        # In a batch job's log file, a bar redrawn ten times a second is noise: redraw every 30 s.
        progress = tqdm(
            total=self.total_steps, initial=self.start_step, disable=not self.is_main, desc="training", unit="step",
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        self.last_state_time = time.time()
        try:
            for step in range(self.start_step + 1, self.total_steps + 1):
                self.step = step
                loss = self.train_step(step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redraw on tqdm's own schedule
                if self.bad_steps_in_a_row >= cfg.training.max_bad_steps:
                    self.save_state(step, "non-finite loss")
                    raise self.diverged(step)
                if step in self.checkpoint_steps:
                    self.save_checkpoint(step)
                if step == self.total_steps:
                    break
                stop, save, reason = self.at_step_boundary(step)
                if save or stop:
                    self.save_state(step, reason)
                if stop and reason == "time limit" and step == self.start_step + 1:
                    # One step per job: a requeue loop that never ends. The state is saved above.
                    decide_on_main(self.accelerator, lambda: self.refuse_a_time_limit_too_short(after_first_step=True))
                if stop:
                    progress.close()  # before the message: a bar redrawn after it would bury it
                    self.finish("stopped", step, f"stopped at step {step} of {self.total_steps} ({reason})")
                    return "stopped"
        finally:
            progress.close()
        self.save_state(self.total_steps, "complete", final=True)
        self.finish("complete", self.total_steps, f"complete: {self.total_steps} steps")
        if self.is_main:
            print(self.report_text)
            print(f"run folder: {self.output_dir}")
        return "complete"

    def at_step_boundary(self, step: int) -> tuple[bool, bool, str]:
        """(stop now, save the state now, why), the same on every process: a stop signal on any
        process, or (decided by the main process's clock) the time limit or the state interval."""
        cfg = self.config.checkpoints
        now = time.time()
        signalled = bool(self.stop and self.stop.requested)
        interval_due = self.is_main and bool(cfg.state_every_minutes) and now - self.last_state_time >= 60 * cfg.state_every_minutes
        out_of_time = self.is_main and self.deadline.must_stop(now, step + 1 in self.checkpoint_steps)
        signalled, interval_due, out_of_time = (
            flag > 0 for flag in sum_over_processes(self.accelerator, [signalled, interval_due, out_of_time])
        )
        every_steps = bool(cfg.state_every_steps) and step % cfg.state_every_steps == 0
        if signalled:
            mine = self.stop.requested if self.stop and self.stop.requested else None
            reason = f"signal {mine}" if mine else "stop signal on another process"
        elif out_of_time:
            reason = "time limit"
        else:
            reason = "checkpoint" if step in self.checkpoint_steps else "interval"
        return signalled or out_of_time, step in self.checkpoint_steps or every_steps or interval_due, reason

    def first_micro_batch(self) -> tuple[list, dict, bool]:
        """This process's first micro-batch of the next step: its items, the collated batch, and
        whether it trains (a process with no item of its own gets a stand-in with no labels)."""
        acc = self.accelerator
        global_micro_batch = self.schedule.plan(self.start_step + 1).micro_batches[0]
        mine, real = shard(global_micro_batch, acc.process_index, acc.num_processes)
        items = [self.train_data[i] for i in mine]
        return items, self.collate_train(items, self.tokenizer.pad_token_id, supervise=real), real

    def micro_batches(self, step: int) -> tuple[list[dict], list[int], int]:
        """This process's micro-batches of optimizer step `step` (collated, on the CPU), the indices
        of the step's training items (all processes) and the step's supervised tokens."""
        acc = self.accelerator
        plan = self.schedule.plan(step)
        # Every process knows the whole step's items, so the normalizer needs no communication.
        step_items = [i for mb in plan.micro_batches for i in mb]
        step_tokens = int(self.train_supervised[step_items].sum())
        batches = []
        for global_micro_batch in plan.micro_batches:
            mine, real = shard(global_micro_batch, acc.process_index, acc.num_processes)
            batches.append(self.collate_train([self.train_data[i] for i in mine], self.tokenizer.pad_token_id, supervise=real))
        return batches, step_items, step_tokens

    def accumulate_gradients(self, step: int) -> tuple[torch.Tensor, list[int], int]:
        """Forward and backward over every micro-batch of step `step` (no update); returns this
        process's loss sum, the step's items and its supervised tokens."""
        batches, step_items, step_tokens = self.micro_batches(step)
        loss_sum = accumulate_gradients(self.model, batches, step_tokens=step_tokens, accelerator=self.accelerator,
                                        strategy=self.strategy)
        return loss_sum, step_items, step_tokens

    def train_step(self, step: int) -> float:
        """One optimizer step (trainer/step.py); returns the mean token loss over the step (NaN if
        not finite). A step whose loss or gradient norm is not finite changes nothing (no update)
        and counts towards `training.max_bad_steps`."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        learning_rate = learning_rate_at(
            step, peak=cfg.training.learning_rate, total_steps=self.total_steps,
            warmup=self.warmup_steps, schedule=cfg.training.lr_scheduler,
        )
        batches, step_items, step_tokens = self.micro_batches(step)
        result = optimizer_step(
            self.model, self.optimizer, batches, step_tokens=step_tokens, learning_rate=learning_rate,
            max_grad_norm=cfg.training.max_grad_norm, accelerator=acc, strategy=self.strategy,
            on_micro_batch=lambda: crash_point("mid_step", step, acc.process_index),
        )
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if result.bad else 0
        self.skipped_steps += result.skipped
        if not result.bad:
            self.loss_since_checkpoint += result.loss * step_tokens
            self.tokens_since_checkpoint += step_tokens
        self.bad_step_items = step_items
        seconds = time.perf_counter() - started
        self.deadline.record("step", seconds)
        tokens = int(self.train_tokens[step_items].sum())
        self.metrics.write(
            step=step,
            epoch=round(step / self.schedule.steps_per_epoch, 4),
            loss=result.loss,
            learning_rate=learning_rate,
            grad_norm=result.grad_norm,
            tokens=tokens,
            supervised_tokens=step_tokens,
            tokens_per_second=round(tokens / seconds, 1),
            **({"skipped": True} if result.skipped else {}),
        )
        if acc.trackers:
            acc.log({"train/loss": result.loss, "train/learning_rate": learning_rate, "train/grad_norm": result.grad_norm,
                     "train/tokens_per_second": tokens / seconds}, step=step)
        return result.loss

    def diverged(self, step: int) -> TrainingDiverged:
        cfg = self.config.training
        first = step - self.bad_steps_in_a_row + 1
        lines = [line for item in self.bad_step_items[:3] for line in data_lines(self.train_data[item])][:5]
        return TrainingDiverged(
            f"training stopped at step {step}: the loss or gradient norm was not finite in {self.bad_steps_in_a_row} steps "
            f"in a row (steps {first} to {step}; they changed no weight). The resumable state of step {step} is saved. "
            f"Likely causes: a learning rate too high (training.learning_rate={cfg.learning_rate:g}), fp16 overflow "
            f"(training.mixed_precision={cfg.mixed_precision}: use bf16 where the GPU has it), or bad data (the last "
            f"bad step trained on {', '.join(lines)}). Fix the cause and start a new run (overwrite_output_dir=true); "
            "raise training.max_bad_steps and rerun to continue this one as it is",
            step=step,
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-level mean loss over the validation data, split across processes."""
        if not self.valid_data:
            return None
        acc = self.accelerator
        self.model.eval()
        valid_tokens, valid_supervised = item_sizes(self.valid_data)
        by_length = np.argsort(valid_tokens, kind="stable").tolist()  # less padding per batch
        width = self.config.training.micro_batch_size * acc.num_processes
        loss_sum = torch.zeros((), device=acc.device)
        for start in range(0, len(by_length), width):
            mine, real = shard(by_length[start : start + width], acc.process_index, acc.num_processes)
            batch = collate([self.valid_data[i] for i in mine], self.tokenizer.pad_token_id, supervise=real)
            loss_sum += supervised_loss_sum(self.model, {k: v.to(acc.device) for k, v in batch.items()})
        self.model.train()
        total_tokens = int(valid_supervised.sum())
        return acc.reduce(loss_sum, reduction="sum").item() / total_tokens  # GPU sync

    @torch.no_grad()
    def generate_samples(self) -> list[dict]:
        """Every test prompt's completion. Under FSDP every process runs it (the sharded model's
        forward is collective), with the same prompts and seeds, so all get the same text."""
        model = self.unwrapped_model
        model.eval()
        with self.accelerator.autocast():
            samples = [
                complete(model, self.tokenizer, p, seed=self.config.training.seed, chat_template=self.config.data.chat_template)
                for p in self.config.test_prompts
            ]
        model.train()
        return samples

    def save_checkpoint(self, step: int) -> None:
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        train_loss = self.loss_since_checkpoint / self.tokens_since_checkpoint if self.tokens_since_checkpoint else None
        eval_loss = self.evaluate()
        epoch = step / self.schedule.steps_per_epoch
        if eval_loss is not None:
            self.metrics.write(step=step, epoch=round(epoch, 4), eval_loss=eval_loss)
            acc.log({"eval/loss": eval_loss}, step=step)
        weights = self.strategy.full_state_dict(self.model)  # collective under FSDP
        samples = self.generate_samples() if self.is_main or self.strategy.sharded else []
        if self.is_main:
            info = {"step": step, "epoch": epoch, "train_loss": train_loss, "eval_loss": eval_loss}
            if cfg.method == "full":  # float32 master weights are saved in the compute dtype
                weights = cast_floating(weights, getattr(torch, cfg.model.dtype))
            path = save_checkpoint(
                self.output_dir, step, model=self.unwrapped_model, tokenizer=self.tokenizer,
                config=cfg, samples=samples, info=info, state_dict=weights, expected_bytes=self.run_sizes.checkpoint,
            )
            self.checkpoints.append(CheckpointSummary(step, epoch, train_loss, eval_loss, samples))
            write_status(self.output_dir, "running", step=step, total_steps=self.total_steps)
            self.write_report()
            tracking.log_samples(acc, cfg, step, samples)
            eval_text = "-" if eval_loss is None else f"{eval_loss:.4f}"
            train_text = "-" if train_loss is None else f"{train_loss:.4f}"
            self.log(f"saved {path} (train loss {train_text}, eval loss {eval_text})")
        self.loss_since_checkpoint, self.tokens_since_checkpoint = 0.0, 0
        acc.wait_for_everyone()
        self.deadline.record("checkpoint", time.perf_counter() - started)

    def write_report(self) -> None:
        """report.md, and report.html with loss.png beside it (main process, at each checkpoint)."""
        title = f"Run report: {self.output_dir}"
        self.report_text = write_report(self.output_dir / REPORT_FILE, title, [p.label for p in self.config.test_prompts],
                                        self.checkpoints)
        write_html_report(self.output_dir, title, self.config.test_prompts, self.checkpoints)

    def save_state(self, step: int, reason: str, final: bool = False) -> None:
        """The resumable state of `step` (collective: every process calls it at the same step)."""
        started = time.perf_counter()
        info = {
            "total_steps": self.total_steps,
            "reason": reason,
            "loss_since_checkpoint": self.loss_since_checkpoint,
            "tokens_since_checkpoint": self.tokens_since_checkpoint,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
            "skipped_steps": self.skipped_steps,
            "checkpoints": [asdict(summary) for summary in self.checkpoints],
            "longest_seconds": self.deadline.longest,
            "data_files": self.data_digests,
            "tracker_run_id": self.tracker_run_id,
        }
        save_state(self.accelerator, self.output_dir, step, model=self.unwrapped_model, optimizer=self.optimizer,
                   config=self.config, info=info, final=final, sharded=self.strategy.sharded,
                   expected_bytes=self.run_sizes.state)
        self.deadline.record("state", time.perf_counter() - started)
        self.last_state_time = time.time()

    def finish(self, status: str, step: int, message: str) -> None:
        if self.is_main:
            code = EXIT_DONE if status == "complete" else EXIT_STOPPED_RESUMABLE
            write_status(self.output_dir, status, step=step, total_steps=self.total_steps, exit_code=code, message=message)
            self.write_report()  # report.html shows how the run ended
            if status == "stopped":
                self.log(f"{message}: the resumable state is saved in {self.output_dir}; run the same command to "
                         f"continue (exit code {EXIT_STOPPED_RESUMABLE})")

    # ------------------------------------------------------------------------------------------
    # The whole job

    def run(self) -> int:
        """Setup and train; the exit code (0 done, 75 stopped and resumable)."""
        plan = self.setup()
        if plan.action == "complete":
            self.log(f"the run in {self.output_dir} is already complete (step {plan.state.step}): nothing to do. "
                     "To train it again set overwrite_output_dir=true, or choose another output_dir")
            return EXIT_DONE
        return EXIT_DONE if self.train() == "complete" else EXIT_STOPPED_RESUMABLE

    def where(self) -> str:
        """` at step N of T`, or ` during setup`: where the run was when it failed."""
        if not hasattr(self, "total_steps") or not hasattr(self, "model"):
            return " during setup"
        return f" at step {self.step} of {self.total_steps}"

    def failed(self, err: Exception, exit_code: int | None = None) -> None:
        """Record how the run ended in its status (only a folder this job made its own)."""
        if self.is_main and self.owns_folder:
            code = exit_code if exit_code is not None else getattr(err, "exit_code", EXIT_USER_ERROR)
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            try:
                write_status(self.output_dir, "failed", exit_code=code, message=message,
                             **({"step": self.step} if hasattr(self, "model") else {}))
            except OSError:
                pass

    def close(self) -> None:
        # Flush and close the trackers. Not accelerator.end_training(): it also destroys the process
        # group without a barrier, which trainer.distributed.shutdown does for all processes together.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.lock is not None:
            self.lock.release()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hf_logging.disable_progress_bar()  # transformers' per-file load/save bars drown the training log
    started = time.time()
    rank = os.environ.get("RANK", "0")
    recipe = None
    with StopSignals() as stop:
        try:
            if not argv or argv[0] in ("-h", "--help"):
                if argv:
                    print(f"{USAGE}\n\n{__doc__}")
                    return EXIT_DONE
                raise UsageError(f"no config file given\n{USAGE}")
            recipe = FineTuneRecipe(load_config(argv[0], argv[1:]), stop=stop, started=started)
            return recipe.run()
        except UserError as err:
            # Usually every process hits the same error (a shared one is printed by rank 0 alone), but
            # one that only a single rank hits must not vanish: it is printed with its rank.
            if rank == "0":
                print(f"error: {err}", file=sys.stderr)
            elif not getattr(err, "shared", False):
                print(f"[rank {rank}] error: {err}", file=sys.stderr)
            if recipe is not None:
                recipe.failed(err)
            return err.exit_code
        except OSError as err:  # the environment: a folder that is not writable, a full disk
            err = UserError(f"{err.strerror or err}: {err.filename}. Fix: check that this path is writable and its "
                            "disk has free space")
            print(f"error: {err}", file=sys.stderr)
            if recipe is not None:
                recipe.failed(err)
            return EXIT_USER_ERROR
        except torch.OutOfMemoryError as err:
            err = UserError(f"out of {'GPU ' if torch.cuda.is_available() else ''}memory{recipe.where() if recipe else ''}. "
                            "Fix: lower training.micro_batch_size (raise gradient_accumulation_steps to keep the batch), "
                            "set model.gradient_checkpointing=true, or lower data.max_seq_len; "
                            "`python scripts/plan.py CONFIG` estimates the memory a config needs")
            print(f"{'' if rank == '0' else f'[rank {rank}] '}error: {err}", file=sys.stderr)
            if recipe is not None:
                recipe.failed(err)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            if rank == "0":
                print("\ninterrupted by a second Ctrl-C: stopped at once, without saving. Rerun the same command to "
                      "continue from the newest resumable state", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:  # not the user's: a library's error, or a bug of ours
            where = recipe.where() if recipe is not None else " while starting"
            print(f"{'' if rank == '0' else f'[rank {rank}] '}error: the run failed{where} with "
                  f"{type(err).__name__}: {err}. This is a bug in the trainer or a library, not in your config or "
                  "data: the traceback follows; report it with the output of `python -m trainer.doctor CONFIG`",
                  file=sys.stderr, flush=True)
            traceback.print_exc()
            if recipe is not None:
                recipe.failed(err, exit_code=EXIT_USER_ERROR)
            return EXIT_USER_ERROR
        finally:
            if recipe is not None:
                recipe.close()
            shutdown()  # all processes leave the process group together (trainer/distributed.py)


if __name__ == "__main__":
    sys.exit(main())
