"""The training recipe: setup in a fixed order, then the loop, a step, a checkpoint, a state, the end.

`setup` runs the `_setup_*` parts in the order the story needs: the run folder is locked and read
first, the data is checked before any model is loaded (a broken file fails in seconds), every
`auto` is resolved before the run is compared with the one the folder may hold, the model is built,
logging starts, a resumed run gets its state back (the random generators last), and the self-test
checks the real model before step 1. `train` then runs the loop from step 1 or the state's step;
at each of the N checkpoint steps: eval loss -> task metrics -> test prompts -> atomic checkpoint ->
report and recommendation -> resumable state. A stop signal or the time limit ends the loop at a
step boundary with the state saved (exit code 75); the same command continues it.

Each part's bookkeeping lives with its owner: the counters a resume needs in `TrainingProgress`,
step arithmetic in trainer/schedule.py, the stop policy in trainer/stopping.py, metric rows in
trainer/metrics.py, the folder's layout in trainer/layout.py and trainer/run_folder.py.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from trainer import tracking
from trainer.checkpoint import cast_floating, save_checkpoint
from trainer.config import Config, save_config
from trainer.data.batching import DataSchedule, item_sizes, shard
from trainer.data.chat import resolve_chat_template
from trainer.data.packing import training_rows
from trainer.data.pipeline import prepare_data
from trainer.data.preflight import preflight_data
from trainer.disk import check_free_space, run_bytes, tokenizer_bytes
from trainer.distributed import (
    check_shared_folder,
    decide_on_main,
    make_accelerator,
    sum_over_processes,
)
from trainer.errors import TrainingDiverged, UserError
from trainer.evaluation import (
    detected_task,
    plan_evaluation,
    score_checkpoint,
    validation_loss,
)
from trainer.families import estimates_memory, memory_families
from trainer.faults import crash_point
from trainer.generate import encode_test_prompt, test_prompt_samples
from trainer.layout import (
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
)
from trainer.metrics import MetricsLog
from trainer.model import count_parameters, load_model_config, load_tokenizer
from trainer.optim import build_optimizer, require_device_features
from trainer.plan import estimate_run
from trainer.recommend import recommend, write_recommendation
from trainer.report import CheckpointSummary, write_report
from trainer.report_html import write_html_report
from trainer.resolve import activation_dtype, resolve_config
from trainer.resume import RunDecision, data_digests, decide_run
from trainer.run_folder import RunLock, make_run_folder, write_status
from trainer.schedule import RunSchedule
from trainer.selftest import failure as selftest_failure
from trainer.selftest import run_self_test
from trainer.state import load_state, restore_rng_of, save_state
from trainer.step import optimizer_step
from trainer.stopping import Deadline, StopSignals, boundary_decision
from trainer.strategy import make_strategy


@dataclass
class TrainingProgress:
    """The counters a resume needs, saved in the resumable state and restored as one thing."""

    step: int = 0
    loss_since_checkpoint: float = 0.0
    """Token-weighted loss sum of the steps since the last checkpoint (its train loss)."""
    tokens_since_checkpoint: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    checkpoints: list[CheckpointSummary] = field(default_factory=list)

    #: The state.json keys, as runs have always saved them.
    KEYS = ("loss_since_checkpoint", "tokens_since_checkpoint", "bad_steps_in_a_row", "skipped_steps", "checkpoints")

    def state_info(self) -> dict:
        return {key: getattr(self, key) for key in self.KEYS[:-1]} | {
            "checkpoints": [asdict(summary) for summary in self.checkpoints]
        }

    @classmethod
    def from_state(cls, step: int, info: dict) -> "TrainingProgress":
        return cls(
            step,
            *(info[key] for key in cls.KEYS[:-1]),
            [CheckpointSummary(**summary) for summary in info["checkpoints"]],
        )

    def record_step(self, result, step_tokens: int) -> None:
        """A finished optimizer step (trainer/step.py's result): a non-finite one changed nothing."""
        self.bad_steps_in_a_row = self.bad_steps_in_a_row + 1 if result.bad else 0
        self.skipped_steps += result.skipped
        if not result.bad:
            self.loss_since_checkpoint += result.loss * step_tokens
            self.tokens_since_checkpoint += step_tokens

    def take_train_loss(self) -> float | None:
        """The mean token loss since the last checkpoint; the count starts again."""
        loss = self.loss_since_checkpoint / self.tokens_since_checkpoint if self.tokens_since_checkpoint else None
        self.loss_since_checkpoint, self.tokens_since_checkpoint = 0.0, 0
        return loss


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
        self.config, self.stop = config, stop
        self.started = time.time() if started is None else started
        self.accelerator = make_accelerator(config)  # honours the launcher, resolves the precision
        self.is_main = self.accelerator.is_main_process
        self.output_dir = Path(config.output_dir)
        self.lock: RunLock | None = None
        self.owns_folder = False  # set once this job has made the folder its run's
        self.data_reports = data_reports
        self.progress = TrainingProgress()
        self.start_step = 0

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
            self.lock = RunLock(self.output_dir).acquire()

        decide_on_main(acc, take_lock)
        # Every process must see the folder the main process locked (a node with its own output_dir
        # would die at the first save): the main process writes a token that all must read back.
        check_shared_folder(acc, self.output_dir)

        # The checks of `scripts/prepare_data.py validate`, before anything heavy loads: errors
        # stop the run (unless data.on_error=skip); warnings are printed and saved with the run.
        def preflight() -> list:
            return self.data_reports if self.data_reports is not None else preflight_data(cfg, log=self.log)

        self.data_reports = decide_on_main(acc, preflight)
        self.model_config = load_model_config(cfg)
        resolve_config(cfg, device=acc.device, model_config=self.model_config, num_processes=acc.num_processes)
        self.decision = decide_on_main(acc, lambda: decide_run(cfg, acc.num_processes))

    def _setup_data(self) -> None:
        """Tokenizer and data (tokenized with the loss mask, cached; each node's main process goes
        first, the others load its cache), the task metrics' examples, training rows (packed or
        not), the schedule; then, the data having passed, the folder becomes this run's."""
        cfg, acc = self.config, self.accelerator
        self.tokenizer = load_tokenizer(cfg)
        # Checkpoints carry the chat template training used, so apply_chat_template matches it.
        self.tokenizer.chat_template = resolve_chat_template(self.tokenizer, cfg.data.chat_template)
        with acc.local_main_process_first():
            data = prepare_data(cfg, self.tokenizer, self.log)
        self.valid_data = data.valid
        # Test prompts are encoded now: a template that cannot render one fails here, not at the
        # first checkpoint hours later.
        for test_prompt in cfg.test_prompts:
            encode_test_prompt(self.tokenizer, test_prompt, cfg.data.chat_template)
        task, classes = detected_task(self.data_reports)
        self.eval_examples, self.eval_settings = plan_evaluation(
            cfg.eval,
            self.valid_data,
            self.tokenizer,
            seed=cfg.training.seed,
            task=task,
            classes=classes,
            batch_size=cfg.training.micro_batch_size,
        )
        if self.eval_examples and self.eval_settings.metrics:
            self.log(
                f"task metrics: {', '.join(self.eval_settings.metrics)} on {len(self.eval_examples)} validation "
                f"examples ({self.eval_settings.why})"
            )
        self.train_data, self.collate_train = training_rows(data.train, cfg.data, self.log)
        if self.is_main and acc.device.type == "cuda":
            self.warn_about_memory(self.model_config)
        self.data_schedule = DataSchedule(
            len(self.train_data),
            micro_batch_size=cfg.training.micro_batch_size,
            accumulation=cfg.training.gradient_accumulation_steps,
            world_size=acc.num_processes,
            seed=cfg.training.seed,
        )
        self.train_tokens, self.train_supervised = item_sizes(self.train_data)
        self.schedule = RunSchedule.of(cfg.training, cfg.checkpoints, self.data_schedule)
        # Only now may the folder change: a fresh run clears what an earlier run or a failed start
        # left; a resume rewinds the folder to the step of its state.
        if self.is_main:
            make_run_folder(self.output_dir, self.decision, self.data_reports, data.skipped)
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
            checkpoint_dtype=getattr(torch, cfg.model.dtype),
        )
        decide_on_main(acc, self.check_disk)
        if self.strategy.sharded:
            held = self.strategy.held_parameters(model)
            print(
                f"[rank {acc.process_index}] FSDP: this process holds {held:,} of {self.parameters[1]:,} parameters",
                flush=True,
            )
        optimizer = build_optimizer(cfg, model, acc.device)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)

    def _setup_logging(self) -> None:
        """The resolved config and the status into the run folder, metrics.jsonl, the trackers (a
        resumed run continues its W&B run), and the run's summary in the log."""
        cfg, acc = self.config, self.accelerator
        if self.is_main:
            save_config(cfg, self.output_dir / CONFIG_FILE)
            write_status(
                self.output_dir,
                "running",
                step=self.decision.state.step if self.decision.state else 0,
                total_steps=self.schedule.total_steps,
            )
        self.metrics = MetricsLog(self.output_dir / METRICS_FILE, enabled=self.is_main)
        self.tracker_run_id = (
            self.decision.state.info.get("tracker_run_id") if self.decision.action == "resume" else None
        ) or tracking.new_run_id()
        tracking.start(acc, cfg, self.tracker_run_id)
        trainable, total = self.parameters
        self.log(
            f"model {cfg.model.name_or_path} ({cfg.model.dtype}, {cfg.method}, {cfg.model.attention} attention, "
            f"{'FSDP' if self.strategy.sharded else 'DDP' if acc.num_processes > 1 else 'one process'}): "
            f"{trainable:,} of {total:,} parameters trainable\n"
            f"{len(self.train_data)} training {'rows' if cfg.data.packing else 'examples'} and "
            f"{len(self.valid_data)} validation examples; {cfg.training.epochs:g} epochs = "
            f"{self.schedule.total_steps} optimizer steps on {acc.num_processes} process(es); "
            f"checkpoints at steps {self.schedule.checkpoint_steps}"
        )

    def _setup_restore(self) -> None:
        """Where training starts: step 1, or the saved state's step with everything that makes the
        continuation exact. The random generators come back last, so that nothing in setup (LoRA's
        initialisation, for one) consumes them afterwards. Then a time limit that leaves no room
        for a step and a state save is refused."""
        cfg, acc = self.config, self.accelerator
        # The main process's clock decides the time limit for all (at_step_boundary).
        self.deadline = Deadline.for_job(cfg.training.time_limit, self.started) if self.is_main else Deadline(None)
        self.data_digests = data_digests(cfg)
        if self.decision.action == "resume":
            state, info = self.decision.state, self.decision.state.info
            load_state(acc, state, model=self.unwrapped_model, optimizer=self.optimizer, sharded=self.strategy.sharded)
            self.start_step = state.step
            self.progress = TrainingProgress.from_state(state.step, info)
            for kind, seconds in info["longest_seconds"].items():
                self.deadline.record(kind, seconds)
            if self.is_main:
                self.write_reports()
            restore_rng_of(acc, state)
            self.log(
                f"resumed from step {state.step} of {self.schedule.total_steps} (state saved at "
                f"{info['saved_at']}, reason: {info['reason']})"
            )
        decide_on_main(acc, lambda: self.refuse_a_time_limit_too_short(after_first_step=False))

    def _setup_self_test(self) -> None:
        """On the real model, device and dtype (trainer/selftest.py): a backend or batch layout that
        does not compute what training promises stops the run before step 1."""
        cfg, acc = self.config, self.accelerator
        items, batch, real = self.first_micro_batch()
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

    # Setup's helpers

    def refuse_a_time_limit_too_short(self, after_first_step: bool) -> None:
        """Main process (its clock decides the time limit): raise TimeLimitTooShort, with the numbers."""
        err = self.deadline.too_short(time.time(), self.config.training.time_limit, after_first_step=after_first_step)
        if err is not None:
            raise err

    def warn_about_memory(self, model_config, gpu_memory_bytes: int | None = None) -> str | None:
        """Log (and return) the planner's warning when the run's estimate exceeds the GPU."""
        if not estimates_memory(model_config):  # the planner models the families it has entries for
            self.log(
                f"note: no memory estimate for model_type {model_config.model_type!r} (the planner knows "
                f"{', '.join(memory_families())}); training goes on without one"
            )
            return None
        memory = gpu_memory_bytes or torch.cuda.get_device_properties(self.accelerator.device).total_memory
        warning = estimate_run(
            self.config, gpus=self.accelerator.num_processes, gpu_memory_bytes=memory, model_config=model_config
        ).warning()
        if warning:
            self.log(f"warning: {warning}")
        return warning

    def check_disk(self) -> None:
        done = self.decision.state.step if self.decision.action == "resume" else 0
        check_free_space(
            self.output_dir,
            self.run_sizes,
            checkpoints_left=sum(s > done for s in self.schedule.checkpoint_steps),
            states_present=1 if self.decision.action == "resume" else 0,
        )

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> str:
        """Run the remaining steps; returns "complete", or "stopped" (state saved, resumable)."""
        cfg, total = self.config, self.schedule.total_steps
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
        self.last_state_time = time.time()
        try:
            for step in range(self.start_step + 1, total + 1):
                self.progress.step = step
                loss = self.train_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redraw on tqdm's own schedule
                if self.progress.bad_steps_in_a_row >= cfg.training.max_bad_steps:
                    self.save_resumable_state(step, "non-finite loss")
                    raise self.diverged(step)
                if step in self.schedule.checkpoint_steps:
                    self.checkpoint(step)
                if step == total:
                    break
                stop, save, reason = self.at_step_boundary(step)
                if save or stop:
                    self.save_resumable_state(step, reason)
                if stop and reason == "time limit" and step == self.start_step + 1:
                    # One step per job: a requeue loop that never ends. The state is saved above.
                    decide_on_main(self.accelerator, lambda: self.refuse_a_time_limit_too_short(after_first_step=True))
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
            print(f"run folder: {self.output_dir}")
        return "complete"

    def at_step_boundary(self, step: int) -> tuple[bool, bool, str]:
        """(stop now, save the state now, why), the same on every process (trainer/stopping.py
        `boundary_decision`): a stop signal on any process, or, by the main process's clock, the
        time limit or the state interval."""
        cfg = self.config.checkpoints
        now = time.time()
        signalled = bool(self.stop and self.stop.requested)
        interval_due = (
            self.is_main
            and bool(cfg.state_every_minutes)
            and now - self.last_state_time >= 60 * cfg.state_every_minutes
        )
        out_of_time = self.is_main and self.deadline.must_stop(now, step + 1 in self.schedule.checkpoint_steps)
        flags = [flag > 0 for flag in sum_over_processes(self.accelerator, [signalled, interval_due, out_of_time])]
        return boundary_decision(
            step,
            *flags,
            checkpoint_steps=self.schedule.checkpoint_steps,
            state_every_steps=cfg.state_every_steps,
            own_signal=self.stop.requested if self.stop else None,
        )

    def first_micro_batch(self) -> tuple[list, dict, bool]:
        """This process's first micro-batch of the next step: its items, the collated batch, and
        whether it trains (a process with no item of its own gets a stand-in with no labels)."""
        acc = self.accelerator
        global_micro_batch = self.data_schedule.step_batches(self.start_step + 1).micro_batches[0]
        mine, real = shard(global_micro_batch, acc.process_index, acc.num_processes)
        items = [self.train_data[i] for i in mine]
        return items, self.collate_train(items, self.tokenizer.pad_token_id, supervise=real), real

    def micro_batches(self, step: int) -> tuple[list[dict], list[int], int]:
        """This process's micro-batches of optimizer step `step` (collated, on the CPU), the indices
        of the step's training items (all processes) and the step's supervised tokens."""
        acc = self.accelerator
        step_batches = self.data_schedule.step_batches(step)
        # Every process knows the whole step's items, so the normalizer needs no communication.
        step_items = [i for mb in step_batches.micro_batches for i in mb]
        step_tokens = int(self.train_supervised[step_items].sum())
        batches = []
        for global_micro_batch in step_batches.micro_batches:
            mine, real = shard(global_micro_batch, acc.process_index, acc.num_processes)
            batches.append(
                self.collate_train([self.train_data[i] for i in mine], self.tokenizer.pad_token_id, supervise=real)
            )
        return batches, step_items, step_tokens

    # ------------------------------------------------------------------------------------------
    # A step

    def train_step(self, step: int) -> float:
        """One optimizer step (trainer/step.py); returns the mean token loss over the step (NaN if
        not finite). A step whose loss or gradient norm is not finite changes nothing (no update)
        and counts towards `training.max_bad_steps`."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        learning_rate = self.schedule.learning_rate(step)
        batches, step_items, step_tokens = self.micro_batches(step)
        result = optimizer_step(
            self.model,
            self.optimizer,
            batches,
            step_tokens=step_tokens,
            learning_rate=learning_rate,
            max_grad_norm=cfg.training.max_grad_norm,
            accelerator=acc,
            strategy=self.strategy,
            on_micro_batch=lambda: crash_point("mid_step", step, acc.process_index),
        )
        self.progress.record_step(result, step_tokens)
        self.bad_step_items = step_items
        seconds = time.perf_counter() - started
        self.deadline.record("step", seconds)
        tokens = int(self.train_tokens[step_items].sum())
        self.metrics.write_step(
            step,
            epoch=step / self.data_schedule.steps_per_epoch,
            result=result,
            learning_rate=learning_rate,
            tokens=tokens,
            supervised_tokens=step_tokens,
            seconds=seconds,
        )
        if acc.trackers:
            acc.log(
                {
                    "train/loss": result.loss,
                    "train/learning_rate": learning_rate,
                    "train/grad_norm": result.grad_norm,
                    "train/tokens_per_second": tokens / seconds,
                },
                step=step,
            )
        return result.loss

    def diverged(self, step: int) -> TrainingDiverged:
        cfg, bad = self.config.training, self.progress.bad_steps_in_a_row
        lines = [line for item in self.bad_step_items[:3] for line in data_lines(self.train_data[item])][:5]
        return TrainingDiverged.after(
            step, bad, learning_rate=cfg.learning_rate, mixed_precision=cfg.mixed_precision, data_lines=lines
        )

    # ------------------------------------------------------------------------------------------
    # A checkpoint

    def checkpoint(self, step: int) -> None:
        """Eval loss -> task metrics -> test prompts -> the checkpoint folder (atomic) -> reports
        and recommendation. Collective: every process calls it at the same step."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        train_loss = self.progress.take_train_loss()
        eval_loss = validation_loss(
            self.model,
            self.valid_data,
            self.tokenizer.pad_token_id,
            micro_batch_size=cfg.training.micro_batch_size,
            accelerator=acc,
        )
        scored = None
        if self.eval_examples and self.eval_settings.metrics:
            scored = score_checkpoint(
                self.unwrapped_model,
                self.tokenizer,
                self.eval_examples,
                self.eval_settings,
                acc,
                sharded=self.strategy.sharded,
            )  # collective
        task_metrics = scored.metrics if scored else {}
        epoch = step / self.data_schedule.steps_per_epoch
        if eval_loss is not None or task_metrics:
            self.metrics.write_eval(step, epoch=epoch, eval_loss=eval_loss, task_metrics=task_metrics)
            acc.log(
                {
                    f"eval/{name}": value
                    for name, value in {"loss": eval_loss, **task_metrics}.items()
                    if value is not None
                },
                step=step,
            )
        weights = self.strategy.full_state_dict(self.model)  # collective under FSDP
        # Under FSDP every process generates (the sharded forward is collective): all get the same text.
        samples = (
            test_prompt_samples(self.unwrapped_model, self.tokenizer, cfg, acc.autocast)
            if self.is_main or self.strategy.sharded
            else []
        )
        if self.is_main:
            info = {
                "step": step,
                "epoch": epoch,
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                **({"metrics": task_metrics, "eval_examples": scored.n} if scored else {}),
            }
            if cfg.method == "full":  # float32 master weights are saved in the compute dtype
                weights = cast_floating(weights, getattr(torch, cfg.model.dtype))
            path = save_checkpoint(
                self.output_dir,
                step,
                model=self.unwrapped_model,
                tokenizer=self.tokenizer,
                config=cfg,
                samples=samples,
                info=info,
                state_dict=weights,
                expected_bytes=self.run_sizes.checkpoint,
                predictions=scored.prediction_records() if scored else None,
            )
            self.progress.checkpoints.append(
                CheckpointSummary(
                    step, epoch, train_loss, eval_loss, samples, **(scored.summary_fields() if scored else {})
                )
            )
            write_status(self.output_dir, "running", step=step, total_steps=self.schedule.total_steps)
            self.write_reports()
            tracking.log_samples(acc, cfg, step, samples)
            figures = {"train loss": train_loss, "eval loss": eval_loss, **task_metrics}
            shown = ", ".join(f"{name} {'-' if value is None else f'{value:.4f}'}" for name, value in figures.items())
            self.log(f"saved {path} ({shown}{f'; scored in {scored.seconds:.1f} s' if scored else ''})")
        acc.wait_for_everyone()
        self.deadline.record("checkpoint", time.perf_counter() - started)

    def write_reports(self) -> None:
        """report.md, report.html (loss.png, metrics.png) and recommendation.json: main process,
        at each checkpoint, on resume and at the end."""
        title = f"Run report: {self.output_dir}"
        checkpoints = self.progress.checkpoints
        recommendation = recommend(checkpoints, self.eval_settings.primary)
        self.report_text = write_report(
            self.output_dir / REPORT_FILE,
            title,
            [p.label for p in self.config.test_prompts],
            checkpoints,
            recommendation,
        )
        write_html_report(self.output_dir, title, self.config.test_prompts, checkpoints, recommendation)
        write_recommendation(self.output_dir, recommendation)

    # ------------------------------------------------------------------------------------------
    # A resumable state

    def save_resumable_state(self, step: int, reason: str, final: bool = False) -> None:
        """The resumable state of `step` (collective: every process calls it at the same step)."""
        started = time.perf_counter()
        info = {
            "total_steps": self.schedule.total_steps,
            "reason": reason,
            **self.progress.state_info(),
            "longest_seconds": self.deadline.longest,
            "data_files": self.data_digests,
            "tracker_run_id": self.tracker_run_id,
        }
        save_state(
            self.accelerator,
            self.output_dir,
            step,
            model=self.unwrapped_model,
            optimizer=self.optimizer,
            config=self.config,
            info=info,
            final=final,
            sharded=self.strategy.sharded,
            expected_bytes=self.run_sizes.state,
        )
        self.deadline.record("state", time.perf_counter() - started)
        self.last_state_time = time.time()

    # ------------------------------------------------------------------------------------------
    # The end

    def finish(self, status: str, step: int, message: str) -> None:
        from trainer.errors import EXIT_DONE, EXIT_STOPPED_RESUMABLE

        if self.is_main:
            code = EXIT_DONE if status == "complete" else EXIT_STOPPED_RESUMABLE
            write_status(
                self.output_dir,
                status,
                step=step,
                total_steps=self.schedule.total_steps,
                exit_code=code,
                message=message,
            )
            self.write_reports()  # report.html shows how the run ended
            if status == "stopped":
                self.log(
                    f"{message}: the resumable state is saved in {self.output_dir}; run the same command to "
                    f"continue (exit code {EXIT_STOPPED_RESUMABLE})"
                )

    def run(self) -> str:
        """Setup and train: "complete" (now, or already before), or "stopped" (resumable)."""
        decision = self.setup()
        if decision.action == "complete":
            self.log(
                f"the run in {self.output_dir} is already complete (step {decision.state.step}): nothing to do. "
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
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            try:
                write_status(
                    self.output_dir,
                    "failed",
                    exit_code=exit_code,
                    message=message,
                    **({"step": self.progress.step} if hasattr(self, "model") else {}),
                )
            except OSError:
                pass

    def close(self) -> None:
        # Flush and close the trackers. Not accelerator.end_training(): it also destroys the process
        # group without a barrier, which trainer.distributed.shutdown does for all processes together.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.lock is not None:
            self.lock.release()


def data_lines(item) -> list[str]:
    """'file line N' for a training item (a packed row names each of its examples)."""
    examples = getattr(item, "examples", (item,))
    return [f"{example.source} line {example.line}" for example in examples]
