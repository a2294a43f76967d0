"""Fine-tune a causal language model from a YAML config: the training recipe.

    accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]
    python trainer/train.py CONFIG.yaml [section.key=value ...]
    python -m trainer.train CONFIG.yaml [section.key=value ...]

`setup` prepares everything in a fixed order (data is read and checked before any model is
loaded, so a broken file fails in seconds), then `train` runs the loop and, at each of the N
checkpoint steps: eval loss -> test prompts -> atomic checkpoint -> report.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py`: make the `trainer` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers.utils import logging as hf_logging
from tqdm.auto import tqdm

from trainer.checkpoint import CHECKPOINT_PREFIX, save_checkpoint
from trainer.config import Config, load_config, save_config
from trainer.data.batching import DataSchedule, collate, shard
from trainer.data.packing import collate_packed, pack_examples, packing_stats
from trainer.data.chat import resolve_chat_template
from trainer.data.pipeline import SKIPPED_LINES_FILE, prepare_data, train_file_bytes, write_skipped_lines
from trainer.data.validate import preflight_data, write_data_reports
from trainer.errors import UsageError, UserError
from trainer.generate import complete, encode_test_prompt
from trainer.loss import supervised_loss_sum
from trainer.metrics import MetricsLog
from trainer.optim import build_optimizer, require_device_features
from trainer.model import apply_method, count_parameters, load_model, load_tokenizer, lora_target_modules, resolve_dtype
from trainer.report import CheckpointSummary, write_report
from trainer.schedule import auto_epochs, checkpoint_steps, learning_rate_at, warmup_steps

USAGE = "usage: accelerate launch trainer/train.py CONFIG.yaml [section.key=value ...]"
DATA_REPORT_FILE = "data_report.json"
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", DATA_REPORT_FILE, SKIPPED_LINES_FILE)


def mixed_precision_mode(setting: str) -> str:
    """`auto`: bf16 autocast on a CUDA GPU that supports it, none elsewhere."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def previous_run(output_dir: Path) -> list[str]:
    """What an earlier run left in `output_dir` (checkpoints and run files)."""
    return sorted(p.name for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")) + [
        name for name in RUN_FILES if (output_dir / name).exists()
    ]


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder, unless told to replace the old one."""
    old = previous_run(output_dir)
    if old and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}). "
            "Fix: choose a new folder (output_dir=runs/another) or set overwrite_output_dir=true"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file. Fix: choose a folder (output_dir=runs/another)")


def clear_output_dir(output_dir: Path) -> None:
    """Remove an earlier run's files (overwrite_output_dir) and create the folder. Called only once
    the new run's data has passed its checks, so a typo never costs the old checkpoints."""
    for name in previous_run(output_dir):
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for partial in output_dir.glob(f".{CHECKPOINT_PREFIX}*.partial"):
        shutil.rmtree(partial)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output_dir {output_dir} ({err.strerror}). Fix: choose a folder you can write to") from None


def item_sizes(items) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, supervised tokens) of every training item, computed once; steps only sum them."""
    if hasattr(items, "lengths"):  # TokenizedData keeps them as arrays already
        return items.lengths, items.supervised_tokens
    return np.array([len(i.input_ids) for i in items]), np.array([i.supervised_tokens for i in items])


class FineTuneRecipe:
    def __init__(self, config: Config):
        self.config = config
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision_mode(config.training.mixed_precision),
            # Without a GPU, say so: only then does accelerate join torchrun/mpirun CPU processes.
            cpu=not torch.cuda.is_available(),
        )
        self.is_main = self.accelerator.is_main_process
        self.output_dir = Path(config.output_dir)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    # ------------------------------------------------------------------------------------------
    # Setup, in order

    def setup(self) -> None:
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.training.seed)

        # 1. Run folder: fail before any work if it would mix two runs.
        check_output_dir(self.output_dir, cfg.overwrite_output_dir)

        # 2. Preflight, on the main process: the checks of `scripts/prepare_data.py validate`
        #    before anything heavy loads. Errors stop the run (unless data.on_error=skip); warnings
        #    are printed now and saved in the run folder below.
        data_reports = preflight_data(cfg, log=self.log) if self.is_main else []
        acc.wait_for_everyone()

        # 3. Tokenizer, then the data: read, tokenize with the loss mask (cached: a rerun or a resume
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

        # The data passed: only now may an earlier run in output_dir be replaced.
        if self.is_main:
            clear_output_dir(self.output_dir)
            write_data_reports(self.output_dir / DATA_REPORT_FILE, data_reports)
            if data.skipped:
                write_skipped_lines(self.output_dir / SKIPPED_LINES_FILE, data.skipped)
        acc.wait_for_everyone()

        # 3b. Packing: several examples per max_seq_len row, each attending only to itself. The
        # schedule then runs over packed rows; evaluation stays on padded batches.
        self.collate_train = collate
        if cfg.data.packing:
            self.train_data = pack_examples(self.train_data, cfg.data.max_seq_len)
            self.collate_train = collate_packed
            self.log(f"packing: {packing_stats(self.train_data, cfg.data.max_seq_len).summary()}")

        # 4. Schedule: steps, warmup, checkpoint steps (a bad checkpoints.count fails here, still early).
        if cfg.training.epochs == "auto":
            cfg.training.epochs = float(auto_epochs(train_file_bytes(cfg)))
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

        # 5. Model: dtype -> load (4-bit for QLoRA) -> gradient checkpointing -> LoRA or full.
        require_device_features(cfg, acc.device)
        dtype = resolve_dtype(cfg.model.dtype, acc.device)
        cfg.model.dtype = str(dtype).removeprefix("torch.")
        model, cfg.model.attention = load_model(cfg, dtype, acc.device)
        if cfg.method in ("lora", "qlora"):
            cfg.lora.target_modules = lora_target_modules(cfg, model)
        model = apply_method(cfg, model)
        trainable, total = count_parameters(model)

        # 6. Optimizer, then let accelerate place and wrap both (DDP across processes). Compiling
        #    goes last: it wraps the finished model, and unwrap_model strips it again for saving.
        optimizer = build_optimizer(cfg, model, acc.device)
        if cfg.training.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)

        # 7. The resolved config (auto values filled in) goes into the run folder.
        if self.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.checkpoints: list[CheckpointSummary] = []
        self.log(
            f"model {cfg.model.name_or_path} ({cfg.model.dtype}, {cfg.method}, {cfg.model.attention} attention): "
            f"{trainable:,} of {total:,} parameters trainable\n"
            f"{len(self.train_data)} training {'rows' if cfg.data.packing else 'examples'} and "
            f"{len(self.valid_data)} validation examples; "
            f"{cfg.training.epochs:g} epochs = {self.total_steps} optimizer steps on {acc.num_processes} process(es); "
            f"checkpoints at steps {self.checkpoint_steps}"
        )

    # ------------------------------------------------------------------------------------------
    # Training

    def train(self) -> None:
        self.model.train()
        # In a batch job's log file, a bar redrawn ten times a second is noise: redraw every 30 s.
        progress = tqdm(
            total=self.total_steps, disable=not self.is_main, desc="training", unit="step",
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        loss_since_checkpoint, tokens_since_checkpoint = 0.0, 0
        for step in range(1, self.total_steps + 1):
            loss, supervised = self.train_step(step)
            loss_since_checkpoint += loss * supervised
            tokens_since_checkpoint += supervised
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redraw on tqdm's own schedule
            if step in self.checkpoint_steps:
                self.save_checkpoint(step, loss_since_checkpoint / tokens_since_checkpoint)
                loss_since_checkpoint, tokens_since_checkpoint = 0.0, 0
        progress.close()
        if self.is_main:
            print(self.report_text)
            print(f"run folder: {self.output_dir}")

    def accumulate_gradients(self, step: int) -> tuple[torch.Tensor, list[int], int]:
        """Forward and backward over every micro-batch of optimizer step `step`.

        Leaves in `.grad` (sum of all token losses of the step, on all processes) / (the step's
        supervised tokens). Returns this process's loss sum, the indices of the step's training
        items (all processes) and its supervised-token count.
        """
        acc = self.accelerator
        plan = self.schedule.plan(step)
        # Every process knows the whole step's items, so the normalizer needs no communication.
        step_items = [i for mb in plan.micro_batches for i in mb]
        step_tokens = int(self.train_supervised[step_items].sum())
        loss_sum = torch.zeros((), device=acc.device)
        for index, global_micro_batch in enumerate(plan.micro_batches):
            mine, real = shard(global_micro_batch, acc.process_index, acc.num_processes)
            batch = self.collate_train([self.train_data[i] for i in mine], self.tokenizer.pad_token_id, supervise=real)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            last = index == len(plan.micro_batches) - 1
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            with nullcontext() if last else acc.no_sync(self.model):
                micro_loss = supervised_loss_sum(self.model, batch)
                # DDP averages gradients over processes; times num_processes makes it the sum, so
                # the update is (sum of all token losses of the step) / (its supervised tokens).
                acc.backward(micro_loss * acc.num_processes / step_tokens)
            loss_sum += micro_loss.detach()
        return loss_sum, step_items, step_tokens

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (mean token loss over the step, supervised tokens)."""
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        learning_rate = learning_rate_at(
            step, peak=cfg.training.learning_rate, total_steps=self.total_steps,
            warmup=self.warmup_steps, schedule=cfg.training.lr_scheduler,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        loss_sum, step_items, step_tokens = self.accumulate_gradients(step)

        max_norm = cfg.training.max_grad_norm or math.inf
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        # .item() waits for the GPU: once per step, for the log line.
        loss = acc.reduce(loss_sum, reduction="sum").item() / step_tokens
        grad_norm = float(grad_norm)
        seconds = time.perf_counter() - started
        tokens = int(self.train_tokens[step_items].sum())
        self.metrics.write(
            step=step,
            epoch=round(step / self.schedule.steps_per_epoch, 4),
            loss=loss,
            learning_rate=learning_rate,
            grad_norm=grad_norm,
            tokens=tokens,
            supervised_tokens=step_tokens,
            tokens_per_second=round(tokens / seconds, 1),
        )
        return loss, step_tokens

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
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with self.accelerator.autocast():
            samples = [
                complete(model, self.tokenizer, p, seed=self.config.training.seed, chat_template=self.config.data.chat_template)
                for p in self.config.test_prompts
            ]
        model.train()
        return samples

    def save_checkpoint(self, step: int, train_loss: float) -> None:
        cfg, acc = self.config, self.accelerator
        eval_loss = self.evaluate()
        epoch = step / self.schedule.steps_per_epoch
        if eval_loss is not None:
            self.metrics.write(step=step, epoch=round(epoch, 4), eval_loss=eval_loss)
        if self.is_main:
            samples = self.generate_samples()
            info = {"step": step, "epoch": epoch, "train_loss": train_loss, "eval_loss": eval_loss}
            path = save_checkpoint(
                self.output_dir, step, model=acc.unwrap_model(self.model), tokenizer=self.tokenizer,
                config=cfg, samples=samples, info=info,
            )
            self.checkpoints.append(CheckpointSummary(step, epoch, train_loss, eval_loss, samples))
            self.report_text = write_report(
                self.output_dir / "report.md", f"Run report: {self.output_dir}",
                [p.label for p in cfg.test_prompts], self.checkpoints,
            )
            eval_text = "-" if eval_loss is None else f"{eval_loss:.4f}"
            self.log(f"saved {path} (train loss {train_loss:.4f}, eval loss {eval_text})")
        acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    hf_logging.disable_progress_bar()  # transformers' per-file load/save bars drown the training log
    try:
        if not argv or argv[0] in ("-h", "--help"):
            if argv:
                print(f"{USAGE}\n\n{__doc__}")
                return 0
            raise UsageError(f"no config file given\n{USAGE}")
        config = load_config(argv[0], argv[1:])
        recipe = FineTuneRecipe(config)
        recipe.setup()
        recipe.train()
    except UserError as err:
        # Usually every process hits the same error, but one that only a single rank hits must
        # not vanish: rank 0 prints it plainly, the others with their rank.
        rank = os.environ.get("RANK", "0")
        print(f"error: {err}" if rank == "0" else f"[rank {rank}] error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
