"""The training recipe: setup in a fixed order, then the loop, a step, a checkpoint, a state, the end.

`setup` runs the `_setup_*` parts in the order the story needs: the run folder is locked and read
first, the data is checked before any model is loaded (a broken file fails in seconds), every
`auto` is resolved before the run is compared with the one the folder may hold, the model is built,
logging starts, a resumed run gets its state back (the random generators last), and the self-test
checks the real model before step 1. `train` then runs the loop from step 1 or the state's step;
at each of the N checkpoint steps: eval loss -> task metrics -> test prompts -> atomic checkpoint ->
report and recommendation -> resumable state. A stop signal or the time limit ends the loop at a
step boundary with the state saved (exit code 75); the same command continues it.

Each part's bookkeeping lives with its owner: the counters a resume needs in trainer/progress.py,
step arithmetic in trainer/schedule.py, each step's batches in trainer/data/batching.py, the stop
policy in trainer/stopping.py, evaluation in trainer/evaluation.py, metric rows in
trainer/metrics.py, everything under output_dir in trainer/run_folder.py.
"""

from __future__ import annotations

import sys
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from trainer import tracking
from trainer.checkpoint import save_checkpoint
from trainer.config import Config
from trainer.data.batching import TrainingBatches
from trainer.data.chat import resolve_chat_template
from trainer.data.packing import training_rows
from trainer.data.pipeline import prepare_data
from trainer.data.preflight import preflight_data
from trainer.disk import check_free_space, run_bytes, tokenizer_bytes
from trainer.distributed import check_shared_folder, decide_on_main, make_accelerator, sum_over_processes
from trainer.errors import EXIT_DONE, EXIT_STOPPED_RESUMABLE, TrainingDiverged, UserError
from trainer.evaluation import Evaluator, detected_task
from trainer.faults import crash_point
from trainer.generate import encode_test_prompt, test_prompt_samples
from trainer.model import count_parameters, load_model_config, load_tokenizer
from trainer.optim import build_optimizer, require_device_features
from trainer.plan import memory_message
from trainer.precision import torch_dtype
from trainer.progress import TrainingProgress
from trainer.report import CheckpointSummary
from trainer.resolve import activation_dtype, resolve_config
from trainer.resume import RunDecision, data_digests, decide_run
from trainer.run_folder import RunFolder
from trainer.run_lock import RunLock
from trainer.schedule import RunSchedule
from trainer.selftest import failure as selftest_failure
from trainer.selftest import run_self_test
from trainer.state import load_state, restore_rng_of, save_state
from trainer.step import optimizer_step
from trainer.stopping import StopPolicy, StopSignals
from trainer.strategy import make_strategy


class FineTuneRecipe:
    def __init__(
        self,
        config: Config,
        stop: StopSignals | None = None,
        started: float | None = None,
        data_reports: list | None = None,
    ):
        """`data_reports`: the data preflight's reports when the command line ran it already
        (before the heavy imports, trainer/train.py); otherwise the main process runs it in setup."""
        self.config, self.signals = config, stop
        self.started = time.time() if started is None else started
        self.accelerator = make_accelerator(config)  # honours the launcher, resolves the precision
        self.is_main = self.accelerator.is_main_process
        self.folder = RunFolder(config.output_dir)
        self.lock: RunLock | None = None
        self.owns_folder = False  # set once this job has made the folder its run's
        self.data_reports = data_reports
        self.progress = TrainingProgress()
        self.start_step = 0
        self.step_items: list[int] = []  # the last step's training items (named when it diverges)
        self.report_text = ""

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.strategy.unwrap(self.model)

    # ------------------------------------------------------------------------------------------
    # Setup, in order

    def setup(self) -> RunDecision:
        set_seed(self.config.training.seed)
        self._setup_run_folder()
        if self.decision.action == "complete":
            return self.decision
        self._setup_data()
        self._setup_model()
        self._setup_logging()
        self._setup_restore()
        if self.config.training.self_test:
            self._setup_self_test()
        return self.decision

    def _setup_run_folder(self) -> None:
        """Lock the folder, check the data (main process), resolve every `auto`, and decide: a
        fresh run, the continuation of the run the folder holds, that run already complete, or a
        refusal naming what differs."""
        cfg, acc = self.config, self.accelerator

        def take_lock() -> None:
            self.lock = self.folder.lock()

        decide_on_main(acc, take_lock)
        # Every process must see the folder the main process locked (a node with its own output_dir
        # would die at the first save): the main process writes a token that all must read back.
        check_shared_folder(acc, self.folder.path)
        # The checks of `scripts/prepare_data.py validate`, before anything heavy loads: errors stop
        # the run (unless data.on_error=skip); warnings are printed and saved with the run.
        reports = self.data_reports
        self.data_reports = decide_on_main(
            acc, lambda: reports if reports is not None else preflight_data(cfg, log=self.log)
        )
        self.model_config = load_model_config(cfg)
        resolve_config(cfg, device=acc.device, model_config=self.model_config, num_processes=acc.num_processes)
        self.decision = decide_on_main(acc, lambda: decide_run(cfg, acc.num_processes))
        if self.decision.note:
            self.log(f"note: {self.decision.note}")

    def _setup_data(self) -> None:
        """Tokenizer and data (tokenized with the loss mask, cached; each node's main process goes
        first, the others load its cache), the evaluation, training rows (packed or not), each
        step's batches and the schedule; then, the data having passed, the folder becomes this run's."""
        cfg, acc = self.config, self.accelerator
        self.tokenizer = load_tokenizer(cfg)
        # Checkpoints carry the chat template training used, so apply_chat_template matches it.
        self.tokenizer.chat_template = resolve_chat_template(self.tokenizer, cfg.data.chat_template)
        with acc.local_main_process_first():
            data = prepare_data(cfg, self.tokenizer, self.log)
        # Test prompts are encoded now: a template that cannot render one fails here, not at the
        # first checkpoint hours later.
        for test_prompt in cfg.test_prompts:
            encode_test_prompt(self.tokenizer, test_prompt, cfg.data.chat_template)
        task, classes = detected_task(self.data_reports)
        self.evaluate = Evaluator(
            cfg.eval,
            data.valid,
            self.tokenizer,
            seed=cfg.training.seed,
            task=task,
            classes=classes,
            batch_size=cfg.training.micro_batch_size,
        )
        if description := self.evaluate.describe():
            self.log(description)
        rows, collate_rows = training_rows(data.train, cfg.data, self.log)
        if self.is_main and acc.device.type == "cuda":
            gpu_memory = torch.cuda.get_device_properties(acc.device).total_memory
            if note := memory_message(cfg, self.model_config, gpus=acc.num_processes, gpu_memory_bytes=gpu_memory):
                self.log(note)
        self.batches = TrainingBatches.for_run(
            rows,
            collate_rows,
            self.tokenizer.pad_token_id,
            cfg.training,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.schedule = RunSchedule.of(cfg.training, cfg.checkpoints, self.batches.schedule)
        # Only now may the folder change: a fresh run clears what an earlier run or a failed start
        # left; a resume rewinds the folder to the step of its state.
        if self.is_main:
            self.folder.prepare(self.decision, self.data_reports, data.skipped)
        self.owns_folder = True
        acc.wait_for_everyone()

    def _setup_model(self) -> None:
        """The model, spread over the processes by the strategy (replicated or FSDP2): load (4-bit
        for QLoRA, float32 master weights for full fine-tuning, attention as resolved) -> gradient
        checkpointing -> LoRA or full -> (shard); the disk check; the optimizer; prepare (DDP,
        compile last)."""
        cfg, acc = self.config, self.accelerator
        require_device_features(cfg, acc.device)
        self.strategy = make_strategy(acc, cfg)
        model = self.strategy.build_model()
        self.parameters = count_parameters(model)
        self.run_sizes = run_bytes(
            model,
            method=cfg.method,
            optimizer=cfg.training.optimizer,
            tokenizer_size=tokenizer_bytes(self.tokenizer),
            checkpoint_dtype=torch_dtype(cfg.model.dtype),
        )
        resumed = self.decision.action == "resume"
        done = self.decision.state.step if resumed else 0
        checkpoints_left = sum(step > done for step in self.schedule.checkpoint_steps)
        decide_on_main(
            acc,
            lambda: check_free_space(
                self.folder.path, self.run_sizes, checkpoints_left=checkpoints_left, states_present=int(resumed)
            ),
        )
        optimizer = build_optimizer(cfg, model, acc.device)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)

    def _setup_logging(self) -> None:
        """The resolved config and the status into the run folder, metrics.jsonl, the trackers (a
        resumed run continues its W&B run), and the run's summary in the log."""
        cfg, acc, state = self.config, self.accelerator, self.decision.state
        if self.is_main:
            self.folder.save_config(cfg)
            step = state.step if state else 0
            self.folder.write_status("running", step=step, total_steps=self.schedule.total_steps)
        self.metrics = self.folder.metrics_log(enabled=self.is_main)
        resumed_run_id = state.info.get("tracker_run_id") if self.decision.action == "resume" else None
        self.tracker_run_id = resumed_run_id or tracking.new_run_id()
        tracking.start(acc, cfg, self.tracker_run_id)
        trainable, total = self.parameters
        layout = "FSDP" if self.strategy.sharded else "DDP" if acc.num_processes > 1 else "one process"
        self.log(
            f"model {cfg.model.name_or_path} ({cfg.model.dtype}, {cfg.method}, {cfg.model.attention} attention, "
            f"{layout}): {trainable:,} of {total:,} parameters trainable\n"
            f"{len(self.batches.rows)} training {'rows' if cfg.data.packing else 'examples'} and "
            f"{len(self.evaluate.valid_data)} validation examples; {cfg.training.epochs:g} epochs = "
            f"{self.schedule.total_steps} optimizer steps on {acc.num_processes} process(es); "
            f"checkpoints at steps {self.schedule.checkpoint_steps}"
        )

    def _setup_restore(self) -> None:
        """Where training starts: step 1, or the saved state's step with everything that makes the
        continuation exact. The random generators come back last, so that nothing in setup (LoRA's
        initialisation, for one) consumes them afterwards. Then a time limit that leaves no room
        for a step and a state save is refused."""
        cfg, acc = self.config, self.accelerator
        self.stop_policy = StopPolicy.for_job(
            self.signals, self.started, cfg.training, cfg.checkpoints, is_main=self.is_main
        )
        self.data_digests = data_digests(cfg)
        if self.decision.action == "resume":
            state, info = self.decision.state, self.decision.state.info
            load_state(acc, state, model=self.unwrapped_model, optimizer=self.optimizer, sharded=self.strategy.sharded)
            self.start_step = state.step
            self.progress = TrainingProgress.from_state(state.step, info)
            for kind, seconds in info["longest_seconds"].items():
                self.stop_policy.deadline.record(kind, seconds)
            if self.is_main:
                self.write_reports()
            restore_rng_of(acc, state)
            self.log(
                f"resumed from step {state.step} of {self.schedule.total_steps} (state saved at "
                f"{info['saved_at']}, reason: {info['reason']})"
            )
        decide_on_main(acc, lambda: self.stop_policy.refuse_too_short(after_first_step=False))

    def _setup_self_test(self) -> None:
        """On the real model, device and dtype (trainer/selftest.py): a backend or batch layout that
        does not compute what training promises stops the run before step 1."""
        cfg, acc = self.config, self.accelerator
        items, batch, real = self.batches.first_micro_batch(self.start_step + 1)
        result = run_self_test(
            self.model,
            attention=cfg.model.attention,
            packing=cfg.data.packing,
            compute_dtype=activation_dtype(cfg),
            autocast=acc.autocast,
            device=acc.device,
            first_batch=(items, batch) if real else None,
            tokenizer=self.tokenizer,
            data_format=cfg.data.format,
        )
        if result.failed:
            raise selftest_failure(result)
        self.log(result.summary())

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> str:
        """Run the remaining steps; returns "complete", or "stopped" (state saved, resumable)."""
        total, checkpoint_steps = self.schedule.total_steps, self.schedule.checkpoint_steps
        self.model.train()
        # In a batch job's log file, a bar redrawn ten times a second is noise: redraw every 30 s.
        bar = tqdm(
            total=total,
            initial=self.start_step,
            disable=not self.is_main,
            desc="training",
            unit="step",
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        agree = lambda flags: sum_over_processes(self.accelerator, flags)
        self.stop_policy.state_saved()  # the state interval counts from the loop's start
        try:
            for step in range(self.start_step + 1, total + 1):
                self.progress.step = step
                loss = self.train_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redraw on tqdm's own schedule
                if self.progress.bad_steps_in_a_row >= self.config.training.max_bad_steps:
                    self.save_resumable_state(step, "non-finite loss")
                    raise self.diverged(step)
                if step in checkpoint_steps:
                    self.checkpoint(step)
                if step == total:
                    break
                stop, save, reason = self.stop_policy.at_boundary(step, checkpoint_steps, agree)
                if save or stop:
                    self.save_resumable_state(step, reason)
                if stop and reason == "time limit" and step == self.start_step + 1:
                    # One step per job: a requeue loop that never ends. The state is saved above.
                    decide_on_main(self.accelerator, lambda: self.stop_policy.refuse_too_short(after_first_step=True))
                if stop:
                    bar.close()  # before the message: a bar redrawn after it would bury it
                    self.finish("stopped", step, f"stopped at step {step} of {total} ({reason})")
                    return "stopped"
        finally:
            bar.close()
        self.save_resumable_state(total, "complete", final=True)
        self.finish("complete", total, f"all {total} steps trained")
        if self.is_main:
            print(self.report_text)
            print(f"run folder: {self.folder.path}")
        return "complete"

    # ------------------------------------------------------------------------------------------
    # A step

    def train_step(self, step: int) -> float:
        """One optimizer step (trainer/step.py); returns the mean token loss over the step (NaN if
        not finite). A step whose loss or gradient norm is not finite changes nothing (no update)
        and counts towards `training.max_bad_steps`."""
        acc = self.accelerator
        started = time.perf_counter()
        learning_rate = self.schedule.learning_rate(step)
        batches, self.step_items, step_tokens = self.batches.of_step(step)
        result = optimizer_step(
            self.model,
            self.optimizer,
            batches,
            step_tokens=step_tokens,
            learning_rate=learning_rate,
            max_grad_norm=self.config.training.max_grad_norm,
            accelerator=acc,
            strategy=self.strategy,
            on_micro_batch=lambda: crash_point("mid_step", step, acc.process_index),
        )
        self.progress.record_step(result, step_tokens)
        seconds = time.perf_counter() - started
        self.stop_policy.deadline.record("step", seconds)
        tokens = self.batches.tokens_of(self.step_items)
        epoch = step / self.batches.schedule.steps_per_epoch
        self.metrics.write_step(
            step,
            epoch=epoch,
            result=result,
            learning_rate=learning_rate,
            tokens=tokens,
            supervised_tokens=step_tokens,
            seconds=seconds,
        )
        tracking.log_step(acc, step, result, learning_rate=learning_rate, tokens_per_second=tokens / seconds)
        return result.loss

    def diverged(self, step: int) -> TrainingDiverged:
        cfg = self.config.training
        return TrainingDiverged.after(
            step,
            self.progress.bad_steps_in_a_row,
            learning_rate=cfg.learning_rate,
            mixed_precision=cfg.mixed_precision,
            data_lines=self.batches.source_lines(self.step_items),
        )

    # ------------------------------------------------------------------------------------------
    # A checkpoint

    def checkpoint(self, step: int) -> None:
        """Eval loss -> task metrics -> test prompts -> the checkpoint folder (atomic) -> reports
        and recommendation. Collective: every process calls it at the same step."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        train_loss = self.progress.take_train_loss()
        evaluated = self.evaluate(self.model, self.unwrapped_model, acc, sharded=self.strategy.sharded)  # collective
        epoch = step / self.batches.schedule.steps_per_epoch
        if evaluated.eval_loss is not None or evaluated.metrics:
            self.metrics.write_eval(step, epoch=epoch, eval_loss=evaluated.eval_loss, task_metrics=evaluated.metrics)
            tracking.log_eval(acc, step, evaluated.eval_loss, evaluated.metrics)
        weights = self.strategy.full_state_dict(self.model)  # collective under FSDP
        # Under FSDP every process generates (the sharded forward is collective): all get the same text.
        samples = []
        if self.is_main or self.strategy.sharded:
            samples = test_prompt_samples(self.unwrapped_model, self.tokenizer, cfg, acc.autocast)
        if self.is_main:
            path = save_checkpoint(
                self.folder.path,
                step,
                model=self.unwrapped_model,
                tokenizer=self.tokenizer,
                config=cfg,
                samples=samples,
                info={"step": step, "epoch": epoch, "train_loss": train_loss, **evaluated.info()},
                state_dict=weights,
                expected_bytes=self.run_sizes.checkpoint,
                predictions=evaluated.prediction_records(),
            )
            summary = CheckpointSummary(
                step, epoch, train_loss, evaluated.eval_loss, samples, **evaluated.summary_fields()
            )
            self.progress.checkpoints.append(summary)
            self.folder.write_status("running", step=step, total_steps=self.schedule.total_steps)
            self.write_reports()
            tracking.log_samples(acc, cfg, step, samples)
            self.log(f"saved {path} ({evaluated.describe(train_loss)})")
        acc.wait_for_everyone()
        self.stop_policy.deadline.record("checkpoint", time.perf_counter() - started)

    def write_reports(self) -> None:
        """Main process, at each checkpoint, on resume and at the end (trainer/run_folder.py)."""
        self.report_text = self.folder.write_reports(
            self.config.test_prompts, self.progress.checkpoints, self.evaluate.settings.primary
        )

    # ------------------------------------------------------------------------------------------
    # A resumable state

    def save_resumable_state(self, step: int, reason: str, final: bool = False) -> None:
        """The resumable state of `step` (collective: every process calls it at the same step)."""
        started = time.perf_counter()
        info = {
            "total_steps": self.schedule.total_steps,
            "reason": reason,
            **self.progress.state_info(),
            "longest_seconds": self.stop_policy.deadline.longest,
            "data_files": self.data_digests,
            "tracker_run_id": self.tracker_run_id,
        }
        save_state(
            self.accelerator,
            self.folder.path,
            step,
            model=self.unwrapped_model,
            optimizer=self.optimizer,
            config=self.config,
            info=info,
            final=final,
            sharded=self.strategy.sharded,
            expected_bytes=self.run_sizes.state,
        )
        self.stop_policy.deadline.record("state", time.perf_counter() - started)
        self.stop_policy.state_saved()

    # ------------------------------------------------------------------------------------------
    # The end

    def finish(self, status: str, step: int, message: str) -> None:
        if not self.is_main:
            return
        code = EXIT_DONE if status == "complete" else EXIT_STOPPED_RESUMABLE
        total = self.schedule.total_steps
        self.folder.write_status(status, step=step, total_steps=total, exit_code=code, message=message)
        self.write_reports()  # report.html shows how the run ended
        if status == "stopped":
            self.log(
                f"{message}: the resumable state is saved in {self.folder.path}; run the same command to "
                f"continue (exit code {EXIT_STOPPED_RESUMABLE})"
            )

    def run(self) -> str:
        """Setup and train: "complete" (now, or already before), or "stopped" (resumable)."""
        decision = self.setup()
        if decision.action == "complete":
            self.log(
                f"the run in {self.folder.path} is already complete (step {decision.state.step}): nothing to do. "
                "To train it again set overwrite_output_dir=true, or choose another output_dir"
            )
            return "complete"
        return self.train()

    def where(self) -> str:
        """` at step N of T`, or ` during setup`: where the run was when it failed."""
        if not hasattr(self, "schedule") or not hasattr(self, "model"):
            return " during setup"
        return f" at step {self.progress.step} of {self.schedule.total_steps}"

    def failed(self, err: Exception, exit_code: int) -> None:
        """Record how the run ended in its status (only a folder this job made its own)."""
        if self.is_main and self.owns_folder:
            if isinstance(err, KeyboardInterrupt):
                message = "interrupted by a second Ctrl-C"
            else:
                message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            step = {"step": self.progress.step} if hasattr(self, "model") else {}
            try:
                self.folder.write_status("failed", exit_code=exit_code, message=message, **step)
            except OSError:
                pass

    def close(self) -> None:
        # Flush and close the trackers. Not accelerator.end_training(): it also destroys the process
        # group without a barrier, which trainer.distributed.shutdown does for all processes together.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.lock is not None:
            self.lock.release()
