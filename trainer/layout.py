"""The run folder's layout: every file and folder name under `output_dir`, in one place.

Imports nothing, so every module that reads or writes the folder (the recipe, checkpoints, states,
reports, trackers, the compare page, export) can take its names from here.

    output_dir/
      config.yaml  metrics.jsonl  status.json  run.lock
      report.md  report.html  loss.png  metrics.png  recommendation.json
      data_report.json  skipped_lines.jsonl  logs/  wandb/
      checkpoint-<step>/   samples.jsonl  checkpoint.json  eval_predictions.jsonl  weights, tokenizer, config.yaml
      state-<step>/        state.json  trainable.safetensors  optimizer.pt  rng-<rank>.pt  sharded/  COMPLETE
      .checkpoint-<step>.partial/  .state-<step>.partial/   (being written; never read as complete)
"""

# The run's own files.
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
LOCK_FILE = "run.lock"
REPORT_FILE = "report.md"
HTML_FILE = "report.html"
PLOT_FILE = "loss.png"
METRICS_PLOT_FILE = "metrics.png"
RECOMMENDATION_FILE = "recommendation.json"
DATA_REPORT_FILE = "data_report.json"
SKIPPED_LINES_FILE = "skipped_lines.jsonl"
LOG_DIR = "logs"  # TensorBoard
WANDB_DIR = "wandb"
SHARED_CHECK_FILE = ".shared-folder-check"  # written once at start: do all processes see the folder?

# A checkpoint: a standalone Hugging Face folder.
CHECKPOINT_PREFIX = "checkpoint-"
SAMPLES_FILE = "samples.jsonl"
CHECKPOINT_INFO_FILE = "checkpoint.json"
PREDICTIONS_FILE = "eval_predictions.jsonl"

# A resumable state.
STATE_PREFIX = "state-"
STATE_INFO_FILE = "state.json"
STATE_WEIGHTS_FILE = "trainable.safetensors"
STATE_OPTIMIZER_FILE = "optimizer.pt"
STATE_SHARDED_DIR = "sharded"  # FSDP: torch.distributed.checkpoint's files of every process
COMPLETE_MARKER = "COMPLETE"

#: What a fresh run clears (besides checkpoints, states and partial folders).
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    DATA_REPORT_FILE,
    SKIPPED_LINES_FILE,
    STATUS_FILE,
    HTML_FILE,
    PLOT_FILE,
    METRICS_PLOT_FILE,
    RECOMMENDATION_FILE,
    LOG_DIR,
    WANDB_DIR,
)
