"""report.html: the run report with pictures, one self-contained file (and loss.png beside it).

One page a person opens in a browser (or prints) to pick a checkpoint: the train loss of every
step and the eval loss of every checkpoint in one plot (embedded as a PNG data URI, also written as
loss.png), beside it each task metric per checkpoint (metrics.png, when the run computes them), the
recommended checkpoint (trainer/recommend.py: best task metric, else lowest eval loss) marked with
why, every checkpoint's answer to every test prompt side by side with the prompt's sampling
parameters, a few validation answers each checkpoint got wrong (of each kind of mistake, with the
confusion matrix of a classification task), and the data report's warnings.

The recipe rewrites it at each checkpoint, beside report.md. It reads metrics.jsonl (through
trainer/metrics.py's reader) and data_report.json, so a half-written last line, a missing file or a null loss only leave
something out of the page; they never stop a run. Plain HTML with inline CSS: no JavaScript, no
external resources.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.atomic import write_bytes_atomically
from trainer.layout import DATA_REPORT_FILE, HTML_FILE, METRICS_FILE, METRICS_PLOT_FILE, PLOT_FILE, STATUS_FILE
from trainer.metrics import LossHistory, finite, read_losses, whole_number
from trainer.recommend import Recommendation, recommend

PROMPTS_PER_TABLE = 5  # more prompts than this are split over several tables (readable, printable)
FINDINGS_PER_KIND = 10  # data-report messages listed per warning kind (the JSON file has all)
LINES_PER_KIND = 30  # line numbers listed per warning kind
PARAMETER_NAMES = ("temperature", "top_p", "top_k", "max_new_tokens", "stop")
BEST_CLASS = ' class="best"'  # the row of the recommended checkpoint
BADGE = '<span class="badge">recommended</span>'
FINISH_NOTES = {"length": "cut at max_new_tokens", "stop": "ended at a stop sequence"}


# ---------------------------------------------------------------------------------------------
# Reading what the run wrote (every reader tolerates missing files and malformed content)


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(content, None), or (None, why it could not be read)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8", errors="replace")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as error:
        return None, f"could not be read ({type(error).__name__})"


# ---------------------------------------------------------------------------------------------
# Checkpoints, prompts and samples, taken as they come (dataclasses, pydantic models or dicts)


def _get(thing: Any, name: str, default: Any = None) -> Any:
    if isinstance(thing, dict):
        return thing.get(name, default)
    return getattr(thing, name, default)


@dataclass
class Row:
    step: int | None
    epoch: float | None
    train_loss: float | None
    eval_loss: float | None
    samples: list
    metrics: dict = field(default_factory=dict)  # name -> finite value
    eval_examples: int | None = None
    wrong: list = field(default_factory=list)
    metric_details: dict = field(default_factory=dict)


def _rows(checkpoints: list) -> list[Row]:
    rows = []
    for checkpoint in checkpoints or []:
        samples = _get(checkpoint, "samples")
        metrics = _get(checkpoint, "metrics")
        metrics = {str(k): finite(v) for k, v in metrics.items()} if isinstance(metrics, dict) else {}
        wrong = _get(checkpoint, "wrong")
        details = _get(checkpoint, "metric_details")
        rows.append(
            Row(
                whole_number(_get(checkpoint, "step")),
                finite(_get(checkpoint, "epoch")),
                finite(_get(checkpoint, "train_loss")),
                finite(_get(checkpoint, "eval_loss")),
                list(samples) if isinstance(samples, (list, tuple)) else [],
                {k: v for k, v in metrics.items() if v is not None},
                whole_number(_get(checkpoint, "eval_examples")),
                [w for w in wrong if isinstance(w, dict)] if isinstance(wrong, (list, tuple)) else [],
                details if isinstance(details, dict) else {},
            )
        )
    return rows


def _metric_names(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [name for name in row.metrics if name not in names]
    return names


def best_checkpoint(rows: list[Row], recommendation: Recommendation | None = None) -> int | None:
    """Index of the recommended checkpoint (`recommendation`, else `recommend(rows)`: the best task
    metric, else the lowest eval loss, the earliest of equals); None without one."""
    recommendation = recommendation or recommend(rows)
    if recommendation is None:
        return None
    return next((index for index, row in enumerate(rows) if _checkpoint_name(row) == recommendation.checkpoint), None)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    messages = _get(prompt, "messages")
    if isinstance(messages, (list, tuple)):  # a chat prompt: one message a line
        return "\n".join(f"{_get(m, 'role', '?')}: {_get(m, 'content', '')}" for m in messages)
    label = _get(prompt, "label")
    if isinstance(label, str):
        return label
    text = _get(prompt, "prompt")
    if isinstance(text, str):
        return text
    return ""


def _parameters(prompt: Any, samples: list) -> dict:
    """The prompt's sampling parameters: from the config's test prompt, else from its samples (which
    also carry the seed)."""
    parameters = {}
    for sample in samples:
        recorded = _get(sample, "parameters")
        if isinstance(recorded, dict):
            parameters = dict(recorded)
            break
    if not isinstance(prompt, str):
        for name in PARAMETER_NAMES:
            value = _get(prompt, name)
            if value is not None:
                parameters[name] = value
    return parameters


def _completion(sample: Any) -> tuple[str | None, str | None]:
    """(completion, finish_reason); None when the checkpoint has no sample for this prompt."""
    if sample is None:
        return None, None
    completion = _get(sample, "completion")
    finish = _get(sample, "finish_reason")
    return ("" if completion is None else str(completion)), (None if finish is None else str(finish))


# ---------------------------------------------------------------------------------------------
# The plot


def _star(axes, x, y, label: str) -> None:
    """The recommended checkpoint's mark in a plot."""
    axes.plot(
        [x],
        [y],
        linestyle="none",
        marker="*",
        markersize=20,
        color="#f2b701",
        markeredgecolor="#5a4500",
        markeredgewidth=1.2,
        zorder=4,
        label=label,
    )


def render_loss_plot(history: LossHistory, rows: list[Row], best: int | None) -> bytes:
    """The PNG: train loss per step and eval loss per checkpoint in one plot, the best checkpoint
    starred. Drawn on matplotlib's Agg canvas directly: no display, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(10, 4.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train_steps = sorted(history.train)
    train_losses = [history.train[s] for s in train_steps]
    # Eval losses: the checkpoints' own (what the tables show), then any other evaluation logged.
    evals = dict(history.evals)
    evals.update({row.step: row.eval_loss for row in rows if row.step is not None and row.eval_loss is not None})
    eval_steps = sorted(evals)
    checkpoint_steps = sorted({row.step for row in rows if row.step is not None})

    for index, step in enumerate(checkpoint_steps):
        axes.axvline(
            step, color="#b8b8b8", linewidth=0.8, linestyle=":", zorder=0, label="checkpoints" if index == 0 else None
        )
    if train_steps:
        few = len(train_steps) <= 60
        axes.plot(
            train_steps,
            train_losses,
            color="#4c78a8",
            linewidth=1.0,
            alpha=0.45 if not few else 0.9,
            marker="o" if few else None,
            markersize=3,
            label="train loss (each step)",
        )
        if not few:
            window = max(5, len(train_steps) // 40) | 1  # odd: centred
            smoothed = _running_mean(train_losses, window)
            axes.plot(
                train_steps, smoothed, color="#1f4e79", linewidth=1.8, label=f"train loss (mean of {window} steps)"
            )
    if history.skipped:
        low = min(train_losses + [evals[s] for s in eval_steps], default=0.0)
        axes.plot(
            history.skipped,
            [low] * len(history.skipped),
            linestyle="none",
            marker="x",
            color="#c0392b",
            markersize=6,
            label=f"skipped steps (loss not finite): {len(history.skipped)}",
        )
    if eval_steps:
        axes.plot(
            eval_steps,
            [evals[s] for s in eval_steps],
            color="#e45756",
            linewidth=1.8,
            marker="o",
            markersize=6,
            label="eval loss (each checkpoint)",
            zorder=3,
        )
    if best is not None and rows[best].eval_loss is not None:
        row = rows[best]
        x = row.step if row.step is not None else (eval_steps[0] if eval_steps else 0)
        _star(axes, x, row.eval_loss, f"recommended: {_checkpoint_name(row)} (eval loss {row.eval_loss:.4f})")
    if not (train_steps or eval_steps or history.skipped):
        axes.text(
            0.5,
            0.5,
            "no losses recorded yet",
            transform=axes.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            color="#777777",
        )
        axes.set_yticks([])
    axes.set_xlabel("optimizer step")
    shown = train_losses + [evals[s] for s in eval_steps]
    # Losses that fall by more than 10x (most runs) are read on a log scale: the differences between
    # late checkpoints, which decide the pick, would otherwise be flattened against zero.
    if shown and min(shown) > 0 and max(shown) / min(shown) > 10:
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.05, not 5x10^-2
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_ylabel("loss (log scale)")
    else:
        axes.set_ylabel("loss")
    axes.set_title("Train and eval loss")
    return _png(figure, axes, legend="upper right")


def _png(figure, axes, legend: str) -> bytes:
    """The plots' common finish (integer steps, a light grid, the legend) as PNG bytes."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, color="#e6e6e6", linewidth=0.8)
    axes.set_axisbelow(True)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc=legend, fontsize=9, framealpha=0.92)
    figure.tight_layout()
    buffer = io.BytesIO()
    # No matplotlib version in the file: the same losses give the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


METRIC_COLOURS = ("#54a24b", "#b279a2", "#f58518", "#4c78a8", "#9d755d")


def render_metrics_plot(rows: list[Row], best: int | None) -> bytes:
    """The PNG: each task metric per checkpoint (0 to 1, higher is better), the recommended
    checkpoint starred on the primary (first) metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = _metric_names(rows)
    for number, name in enumerate(names):
        points = sorted((row.step, row.metrics[name]) for row in rows if row.step is not None and name in row.metrics)
        if points:
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                markersize=5,
                linewidth=1.8,
                color=METRIC_COLOURS[number % len(METRIC_COLOURS)],
                label=f"{name}{' (ranks the checkpoints)' if number == 0 else ''}",
            )
    if best is not None and names and names[0] in rows[best].metrics and rows[best].step is not None:
        row = rows[best]
        value = row.metrics[names[0]]
        _star(axes, row.step, value, f"recommended: {_checkpoint_name(row)} ({value:.4f})")
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("on the validation data")
    axes.set_title("Task metrics per checkpoint")
    return _png(figure, axes, legend="lower right")


def _running_mean(values: list[float], window: int) -> list[float]:
    """Centred moving mean over `window` values (fewer at the ends): it follows the curve without
    the lag of a trailing mean."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    half = window // 2
    out = []
    for index in range(len(values)):
        low, high = max(0, index - half), min(len(values), index + half + 1)
        out.append((sums[high] - sums[low]) / (high - low))
    return out


# ---------------------------------------------------------------------------------------------
# The page


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       margin: 24px auto; max-width: 1400px; padding: 0 20px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 24px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 30px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 18px 0 6px; overflow-wrap: anywhere; }
.meta { color: #666; font-size: 13px; margin: 0 0 14px; }
.summary { background: #fff8dc; border: 1px solid #e8cf6b; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.summary.none { background: #f4f4f4; border-color: #ccc; }
.plot { display: block; width: 100%; max-width: 1100px; height: auto; border: 1px solid #e3e3e3; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.plots .plot { flex: 1 1 560px; width: auto; min-width: 0; }
.plots .plot.metrics { flex: 1 1 360px; max-width: 700px; }
.why { font-size: 13px; color: #333; margin-top: 3px; }
.wrong-kind { font-weight: 600; margin: 8px 0 2px; }
table.wrong td { max-width: 420px; }
table { border-collapse: collapse; margin: 8px 0 18px; }
th, td { border: 1px solid #d0d0d0; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #f2f4f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.grid { width: 100%; table-layout: fixed; }
table.grid th.ckpt, table.grid td.ckpt { width: 190px; }
tr.best td, tr.best th { background: #fff3b0; }
tr.best td.ckpt, tr.best th.ckpt { border-left: 4px solid #e0a800; }
.badge { display: inline-block; background: #e0a800; color: #fff; font-size: 11px; font-weight: 700;
         border-radius: 10px; padding: 1px 8px; margin-left: 4px; white-space: nowrap; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
        font-size: 13px; margin: 0; max-height: 22em; overflow: auto; }
.prompt-text { background: #f7f7f9; border: 1px solid #e3e3e8; border-radius: 4px; padding: 6px 8px; }
.prompt-tail { color: #555; font-weight: 400; font-size: 12px; max-height: none; }
.params { font-size: 12px; color: #333; font-weight: 400; margin-top: 4px; }
.params code, .param code { background: #eef1f5; border-radius: 3px; padding: 0 3px; white-space: pre-wrap; }
.param { display: inline-block; margin-right: 10px; }
.muted { color: #777; font-size: 12px; }
.empty { color: #999; font-style: italic; }
.finish { color: #888; font-size: 11px; margin-top: 3px; }
.finish.length { color: #b35900; }
.warn-kind { margin: 10px 0 2px; font-weight: 600; }
.warn-list { margin: 2px 0 6px 0; padding-left: 22px; }
.warn-list li { overflow-wrap: anywhere; }
.fix { color: #225f2b; font-size: 13px; }
.error-kind { color: #a61b1b; }
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  .text { max-height: none; overflow: visible; }
  tr { break-inside: avoid; }
  h2 { break-after: avoid; }
  .plot { max-width: 100%; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _checkpoint_name(row: Row) -> str:
    return f"checkpoint-{row.step}" if row.step is not None else "checkpoint-?"


def _format_parameter(name: str, value: Any) -> str:
    if name == "stop":
        stops = value if isinstance(value, (list, tuple)) else [value]
        shown = ", ".join(f"<code>{_e(json.dumps(str(s), ensure_ascii=False))}</code>" for s in stops)
        return shown or "none"
    if name == "temperature" and finite(value) == 0.0:
        return f"{_e(value)} (greedy)"
    if name == "top_k" and value == 0:
        return "0 (off)"
    return _e(value)


def _parameters_html(parameters: dict) -> str:
    names = [n for n in PARAMETER_NAMES if n in parameters] + [n for n in parameters if n not in PARAMETER_NAMES]
    if not names:
        return '<span class="muted">parameters not recorded</span>'
    return " ".join(f'<span class="param">{_e(n)}: {_format_parameter(n, parameters[n])}</span>' for n in names)


def _tail(text: str, limit: int = 90) -> str:
    """The end of a prompt, where prompts usually differ (the input before the separator)."""
    return text if len(text) <= limit else "\u2026" + text[-limit:]


def _status_line(output_dir: Path) -> str:
    status, _ = _read_json(output_dir / STATUS_FILE)
    if not isinstance(status, dict):
        return ""
    state, step, total = status.get("status"), whole_number(status.get("step")), whole_number(status.get("total_steps"))
    parts = []
    if isinstance(state, str):
        parts.append(f"status: {_e(state)}")
    if step is not None:
        parts.append(f"step {step}" + (f" of {total}" if total is not None else ""))
    return ", ".join(parts)


def _summary_html(rows: list[Row], best: int | None, recommendation: Recommendation | None) -> str:
    if best is not None and recommendation is not None:
        row = rows[best]
        epoch = f", epoch {row.epoch:.2f}" if row.epoch is not None else ""
        shown = [f"{name} {value:.4f}" for name, value in row.metrics.items()]
        shown += [f"eval loss {row.eval_loss:.4f}"] if row.eval_loss is not None else []
        return (
            f'<div class="summary">{BADGE} <strong>{_e(_checkpoint_name(row))}</strong>: {_e(", ".join(shown))}{epoch}'
            f'<div class="why">Why: {_e(recommendation.why)}.</div></div>'
        )
    if not rows:
        why = "No checkpoint yet."
    else:
        why = "No eval loss (no validation data): compare the checkpoints by their answers below."
    return f'<div class="summary none">{why}</div>'


def _checkpoints_table(rows: list[Row], best: int | None) -> str:
    if not rows:
        return '<p class="empty">No checkpoint yet: the first one appears here when it is saved.</p>'
    names = _metric_names(rows)
    out = [
        '<table class="losses"><thead><tr><th class="ckpt">checkpoint</th><th>step</th><th>epoch</th>'
        "<th>train loss</th><th>eval loss</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr></thead><tbody>"
    ]
    for index, row in enumerate(rows):
        best_row = index == best
        badge = f" {BADGE}" if best_row else ""
        out.append(
            f'<tr{BEST_CLASS if best_row else ""}><td class="ckpt">{_e(_checkpoint_name(row))}{badge}</td>'
            f'<td class="num">{"&ndash;" if row.step is None else row.step}</td>'
            f'<td class="num">{_number(row.epoch, 2)}</td><td class="num">{_number(row.train_loss)}</td>'
            f'<td class="num">{_number(row.eval_loss)}</td>'
            + "".join(f'<td class="num">{_number(row.metrics.get(n))}</td>' for n in names)
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def _confusion_html(details: dict) -> str:
    """A classification's confusion matrix: rows are the expected classes, columns the answers."""
    labels, matrix = details.get("labels"), details.get("confusion")
    if not isinstance(labels, list) or not isinstance(matrix, list) or len(matrix) != len(labels):
        return ""
    columns = labels + [str(details.get("other_label", "(other)"))]
    per_class = details.get("per_class") if isinstance(details.get("per_class"), dict) else {}
    out = [
        '<table class="confusion"><thead><tr><th>expected \\ answered</th>'
        + "".join(f"<th>{_e(c)}</th>" for c in columns)
        + "<th>precision</th><th>recall</th><th>F1</th></tr></thead><tbody>"
    ]
    for label, counts in zip(labels, matrix):
        stats = per_class.get(label) if isinstance(per_class.get(label), dict) else {}
        cells = "".join(f'<td class="num">{_e(n)}</td>' for n in counts) if isinstance(counts, list) else ""
        out.append(
            f"<tr><th>{_e(label)}</th>{cells}"
            + "".join(f'<td class="num">{_number(finite(stats.get(k)))}</td>' for k in ("precision", "recall", "f1"))
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def _wrong_answers_section(rows: list[Row], best: int | None) -> str:
    """Per checkpoint, a few validation answers it got wrong, grouped by kind of mistake."""
    scored = [row for row in rows if row.metrics]
    if not scored:
        return '<p class="empty">No task metrics (eval.metrics=none, or no validation data).</p>'
    out = []
    if best is not None and isinstance(rows[best].metric_details.get("classification"), dict):
        out.append(f"<h3>Confusion matrix of {_e(_checkpoint_name(rows[best]))} (recommended)</h3>")
        out.append(_confusion_html(rows[best].metric_details["classification"]))
    for row in scored:
        over = f" of {row.eval_examples}" if row.eval_examples else ""
        out.append(f"<h3>{_e(_checkpoint_name(row))}</h3>")
        if not row.wrong:
            out.append(f'<p class="empty">Every answer{_e(over)} right.</p>')
            continue
        kinds: dict[str, list[dict]] = {}
        for example in row.wrong:
            kinds.setdefault(str(example.get("kind", "wrong answer")), []).append(example)
        for kind, group in kinds.items():
            count = whole_number(group[0].get("count"))
            counted = f" ({count}{_e(over)})" if count is not None else ""
            out.append(f'<div class="wrong-kind">{_e(kind)}{counted}</div>')
            out.append(
                '<table class="wrong"><thead>'
                "<tr><th>prompt (end)</th><th>expected</th><th>answered</th></tr>"
                "</thead><tbody>"
            )
            for example in group:
                prompt, expected, answered = (str(example.get(k, "")) for k in ("prompt", "reference", "prediction"))
                answered_html = (
                    f'<div class="text">{_e(answered)}</div>' if answered else '<span class="empty">(empty)</span>'
                )
                out.append(
                    f'<tr><td><div class="text">{_e(_tail(prompt))}</div></td>'
                    f'<td><div class="text">{_e(expected)}</div></td>'
                    f"<td>{answered_html}</td></tr>"
                )
            out.append("</tbody></table>")
    return "\n".join(out)


def _prompts_section(prompts: list[str], parameters: list[dict]) -> str:
    if not prompts:
        return '<p class="empty">No test prompts.</p>'
    out = []
    for number, (text, params) in enumerate(zip(prompts, parameters), start=1):
        out.append(f'<h3 id="prompt-{number}">Prompt {number}</h3>')
        out.append(f'<div class="params">{_parameters_html(params)}</div>')
        shown = _e(text) if text else '<span class="empty">(empty prompt)</span>'
        out.append(f'<pre class="text prompt-text">{shown}</pre>')
    return "\n".join(out)


def _answers_tables(rows: list[Row], prompts: list[str], parameters: list[dict], best: int | None) -> str:
    if not rows:
        return '<p class="empty">No checkpoint yet.</p>'
    if not prompts:
        return '<p class="empty">No test prompts.</p>'
    tables = math.ceil(len(prompts) / PROMPTS_PER_TABLE)
    per_table = math.ceil(len(prompts) / tables)  # balanced: 6 prompts are 3 + 3, not 5 + 1
    out = []
    for first in range(0, len(prompts), per_table):
        numbers = range(first, min(first + per_table, len(prompts)))
        out.append('<table class="grid"><thead><tr><th class="ckpt">checkpoint</th>')
        for i in numbers:
            out.append(
                f'<th><a href="#prompt-{i + 1}">Prompt {i + 1}</a>'
                f'<div class="text prompt-tail">{_e(_tail(prompts[i]))}</div>'
                f'<div class="params">{_parameters_html(parameters[i])}</div></th>'
            )
        out.append("</tr></thead><tbody>")
        for index, row in enumerate(rows):
            best_row = index == best
            badge = f"<br>{BADGE}" if best_row else ""
            out.append(
                f'<tr{BEST_CLASS if best_row else ""}><th class="ckpt">{_e(_checkpoint_name(row))}{badge}'
                f'<div class="muted">eval loss {_number(row.eval_loss)}'
                f"<br>train loss {_number(row.train_loss)}</div></th>"
            )
            for i in numbers:
                completion, finish = _completion(row.samples[i] if i < len(row.samples) else None)
                if completion is None:
                    cell = '<span class="empty">no sample</span>'
                elif completion == "":
                    cell = '<span class="empty">(empty completion)</span>'
                else:
                    cell = f'<div class="text">{_e(completion)}</div>'
                if finish in FINISH_NOTES:  # "eos", the usual end, goes unsaid
                    cell += f'<div class="finish {_e(finish)}">{FINISH_NOTES[finish]}</div>'
                elif finish and finish != "eos":
                    cell += f'<div class="finish">ended: {_e(finish)}</div>'
                out.append(f"<td>{cell}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
    return "\n".join(out)


def _findings_html(findings: list, unit: str, css_class: str) -> str:
    groups: dict[str, list[dict]] = {}
    for finding in findings:
        if isinstance(finding, dict):
            groups.setdefault(str(finding.get("kind") or "other"), []).append(finding)
        elif finding is not None:
            groups.setdefault("other", []).append({"message": finding})
    from trainer.data.validate import WARNING_TITLES

    out = []
    for kind, group in groups.items():
        lines = [whole_number(f.get("line")) for f in group]
        lines = [n for n in lines if n is not None]
        where = ""
        if lines:
            listed = ", ".join(str(n) for n in lines[:LINES_PER_KIND]) + (
                ", \u2026" if len(lines) > LINES_PER_KIND else ""
            )
            where = f' <span class="muted">({len(lines)} {unit}{"s" if len(lines) != 1 else ""}: {_e(listed)})</span>'
        title = WARNING_TITLES.get(kind, kind)
        out.append(f'<div class="warn-kind {css_class}">[{_e(kind)}] {_e(title)}{where}</div><ul class="warn-list">')
        for finding in group[:FINDINGS_PER_KIND]:
            line = whole_number(finding.get("line"))
            prefix = f"{unit} {line}: " if line is not None else ""
            out.append(f"<li>{_e(prefix)}{_e(finding.get('message', ''))}</li>")
        if len(group) > FINDINGS_PER_KIND:
            out.append(
                f'<li class="muted">\u2026 and {len(group) - FINDINGS_PER_KIND} more (all in data_report.json)</li>'
            )
        out.append("</ul>")
        fix = group[0].get("fix")
        if fix:
            out.append(f'<div class="fix">Fix: {_e(fix)}</div>')
    return "\n".join(out)


def _data_section(output_dir: Path) -> str:
    reports, problem = _read_json(output_dir / DATA_REPORT_FILE)
    if problem:
        return f'<p class="empty">{DATA_REPORT_FILE} {_e(problem)}.</p>'
    if isinstance(reports, dict):
        reports = [reports]
    if not isinstance(reports, list) or not reports:
        return f'<p class="empty">{DATA_REPORT_FILE} lists no data file.</p>'
    out = []
    for report in reports:
        if not isinstance(report, dict):
            continue
        name = str(report.get("file", "?"))
        warnings = report.get("warnings") if isinstance(report.get("warnings"), list) else []
        errors = report.get("errors") if isinstance(report.get("errors"), list) else []
        notes = report.get("notes") if isinstance(report.get("notes"), list) else []
        stats = report.get("stats") if isinstance(report.get("stats"), dict) else {}
        unit = "row" if name.endswith((".parquet", ".arrow")) else "line"
        facts = []
        if report.get("format"):
            facts.append(f"{_e(report['format'])} format")
        if whole_number(stats.get("examples")) is not None:
            facts.append(f"{stats['examples']} examples")
        facts.append(f"{len(errors)} error{'s' if len(errors) != 1 else ''}")
        facts.append(f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
        out.append(f'<h3>{_e(name)}</h3><div class="muted">{", ".join(facts)}</div>')
        if errors:
            out.append("<p><strong>Errors</strong> (these lines were skipped):</p>")
            out.append(_findings_html(errors, unit, "error-kind"))
        if warnings:
            out.append(_findings_html(warnings, unit, ""))
        elif not errors:
            out.append('<p class="empty">No warnings.</p>')
        if notes:
            out.append('<ul class="warn-list">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(out) or f'<p class="empty">{DATA_REPORT_FILE} lists no data file.</p>'


def render_html_report(
    output_dir: Path,
    title: str,
    test_prompts: list,
    checkpoints: list,
    plot_png: bytes | None = None,
    history: LossHistory | None = None,
    plot_error: str | None = None,
    recommendation: Recommendation | None = None,
    metrics_png: bytes | None = None,
) -> str:
    """The page as text (`write_html_report` writes it). `recommendation` defaults to
    `recommend(checkpoints)`; the metrics plot is drawn when a checkpoint has task metrics."""
    output_dir = Path(output_dir)
    history = read_losses(output_dir / METRICS_FILE) if history is None else history
    rows = _rows(checkpoints)
    recommendation = recommendation or recommend(rows)
    best = best_checkpoint(rows, recommendation)
    count = max([len(test_prompts or [])] + [len(row.samples) for row in rows])
    prompts, parameters = [], []
    for index in range(count):
        prompt = test_prompts[index] if index < len(test_prompts or []) else None
        samples = [row.samples[index] for row in rows if index < len(row.samples)]
        text = _prompt_text(prompt) if prompt is not None else ""
        if not text:  # no prompt in the config (or an empty one): the rendered one from the samples
            text = next((str(s.get("prompt")) for s in samples if isinstance(s, dict) and s.get("prompt")), "")
        prompts.append(text)
        parameters.append(_parameters(prompt if prompt is not None else "", samples))
    if plot_png is None:
        plot_png = render_loss_plot(history, rows, best)

    train_steps = len(history.train) + len(history.skipped)
    facts = [
        f"{len(rows)} checkpoint{'s' if len(rows) != 1 else ''}",
        f"{train_steps} logged step{'s' if train_steps != 1 else ''}",
    ]
    if history.skipped:
        facts.append(f"{len(history.skipped)} skipped (loss not finite)")
    status = _status_line(output_dir)
    if status:
        facts.append(status)
    facts.append("updated " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if plot_png:
        image = base64.b64encode(plot_png).decode("ascii")
        plot = (
            '<img class="plot" alt="train loss per step and eval loss per checkpoint" '
            f'src="data:image/png;base64,{image}">'
        )
    else:
        plot = f'<p class="empty">The plot could not be drawn ({_e(plot_error or "no image")}).</p>'
    if metrics_png is None and _metric_names(rows):
        metrics_png = render_metrics_plot(rows, best)
    if metrics_png:
        image = base64.b64encode(metrics_png).decode("ascii")
        plot = (
            f'<div class="plots">{plot}<img class="plot metrics" alt="task metrics per checkpoint" '
            f'src="data:image/png;base64,{image}"></div>'
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{" &middot; ".join(facts)}</p>',
        _summary_html(rows, best, recommendation),
        "<h2>Loss and task metrics</h2>" if _metric_names(rows) else "<h2>Loss</h2>",
        plot,
        _checkpoints_table(rows, best),
        "<h2>Answers to the test prompts</h2>",
        _answers_tables(rows, prompts, parameters, best),
        *(
            ["<h2>Validation answers each checkpoint got wrong</h2>", _wrong_answers_section(rows, best)]
            if _metric_names(rows)
            else []
        ),
        "<h2>Test prompts</h2>",
        _prompts_section(prompts, parameters),
        "<h2>Data report</h2>",
        _data_section(output_dir),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html_report(
    output_dir: Path, title: str, test_prompts: list, checkpoints: list, recommendation: Recommendation | None = None
) -> Path:
    """Write `loss.png`, `metrics.png` (when a checkpoint has task metrics) and `report.html` into
    `output_dir` (each atomically, with the umask's permissions) from its metrics.jsonl and
    data_report.json and the checkpoints so far; returns the path of report.html. `test_prompts`
    are the config's TestPrompt entries (or plain strings); `checkpoints` are the report's
    CheckpointSummary entries; `recommendation` defaults to `recommend(checkpoints)`."""
    output_dir = Path(output_dir)
    history = read_losses(output_dir / METRICS_FILE)
    rows = _rows(checkpoints)
    recommendation = recommendation or recommend(rows)
    best = best_checkpoint(rows, recommendation)
    try:
        plot_png = render_loss_plot(history, rows, best)
        metrics_png = render_metrics_plot(rows, best) if _metric_names(rows) else b""
    except Exception as error:  # a picture is not worth a training run: the page goes out without it
        plot_png, metrics_png, plot_error = b"", b"", f"{type(error).__name__}: {error}"
    else:
        plot_error = None
    page = render_html_report(
        output_dir,
        title,
        list(test_prompts or []),
        list(checkpoints or []),
        plot_png=plot_png,
        history=history,
        plot_error=plot_error,
        recommendation=recommendation,
        metrics_png=metrics_png,
    )
    if plot_png:
        write_bytes_atomically(output_dir / PLOT_FILE, plot_png)
    if metrics_png:
        write_bytes_atomically(output_dir / METRICS_PLOT_FILE, metrics_png)
    path = output_dir / HTML_FILE
    # "replace": a lone surrogate (possible in JSON text) must not stop the report.
    write_bytes_atomically(path, page.encode("utf-8", errors="replace"))
    return path
