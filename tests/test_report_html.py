"""report.html: one self-contained page with the loss plot, the answers side by side, the best
checkpoint marked and the data warnings; it must survive whatever a running (or broken) run left."""

import base64
import html
import json
import math
import re

from trainer.atomic import file_mode
from trainer.config import TestPrompt
from trainer.metrics import read_losses
from trainer.report import CheckpointSummary
from trainer.report_html import write_html_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def embedded_png(page: str) -> bytes:
    [data] = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return base64.b64decode(data, validate=True)


def best_rows(page: str) -> list[str]:
    return re.findall(r'<tr class="best">(.*?)</tr>', page, flags=re.S)


def write_metrics(folder, lines):
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def step(n, loss, **extra):
    return json.dumps({"step": n, "loss": loss, "learning_rate": 1e-3, "grad_norm": 1.0, **extra})


def sample(completion, finish="eos"):
    return {"prompt": "p", "completion": completion, "finish_reason": finish, "parameters": {"seed": 0}}


def test_page_holds_every_answer_parameter_warning_the_best_checkpoint_and_the_plot(tmp_path):
    write_metrics(
        tmp_path,
        [step(n, 3.0 / n) for n in range(1, 7)]
        + [
            json.dumps({"step": 2, "epoch": 0.33, "eval_loss": 2.0}),
            json.dumps({"step": 4, "epoch": 0.67, "eval_loss": 1.5}),
            json.dumps({"step": 6, "epoch": 1.0, "eval_loss": 1.7}),
            '{"step": 7, "loss": 0.4, "learn',  # the line being written when the report is made
        ],
    )
    warnings = [
        {
            "kind": "leading_space",
            "message": "completion 'Paris' does not start with a space",
            "line": 3,
            "fix": "add a space",
        },
        {"kind": "duplicate", "message": "exact duplicate of line <b>1</b> & more", "line": 9, "fix": ""},
    ]
    (tmp_path / "data_report.json").write_text(
        json.dumps(
            [
                {
                    "file": "train.jsonl",
                    "format": "prompt_completion",
                    "ok": True,
                    "errors": [],
                    "warnings": warnings,
                    "warning_counts": {"leading_space": 1, "duplicate": 1},
                    "stats": {"examples": 9},
                    "notes": [],
                },
                {
                    "file": "valid.jsonl",
                    "format": "prompt_completion",
                    "ok": True,
                    "errors": [],
                    "warnings": [],
                    "warning_counts": {},
                    "stats": {"examples": 2},
                    "notes": [],
                },
            ]
        ),
        encoding="utf-8",
    )
    prompts = [
        TestPrompt(
            prompt="Text: a < b & c\nLocations:",
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            max_new_tokens=33,
            stop=["\n", "END"],
        ),
        TestPrompt(
            messages=[{"role": "system", "content": "be <brief>"}, {"role": "user", "content": "hi"}], max_new_tokens=5
        ),
    ]
    completions = {2: [" Paris\nLyon", ""], 4: [' <script>alert("x")</script>', " ok"], 6: [" x" * 3000, " fine"]}
    checkpoints = [
        CheckpointSummary(
            s, s / 6, 3.0 / s, eval_loss, [sample(completions[s][0], "length"), sample(completions[s][1], "stop")]
        )
        for s, eval_loss in ((2, 2.0), (4, 1.5), (6, 1.7))
    ]

    path = write_html_report(tmp_path, "Run <report> & co", prompts, checkpoints)

    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<script" not in page.lower()  # no JavaScript of ours, and the injected tag is escaped
    assert "Run &lt;report&gt; &amp; co" in page
    for texts in completions.values():
        for text in texts:
            if text:
                assert html.escape(text) in page, text[:40]  # escaped, in full, newlines kept
    assert "(empty completion)" in page
    assert "cut at max_new_tokens" in page and "ended at a stop sequence" in page
    assert "Text: a &lt; b &amp; c\nLocations:" in page
    assert "system: be &lt;brief&gt;\nuser: hi" in page
    for shown in (
        "temperature: 0.7",
        "top_p: 0.9",
        "top_k: 40",
        "max_new_tokens: 33",
        "max_new_tokens: 5",
        "<code>&quot;\\n&quot;</code>",
        "<code>&quot;END&quot;</code>",
        "seed: 0",
    ):
        assert shown in page, shown
    # No task metrics: the recommendation is the lowest eval loss, checkpoint-4 (not the last one);
    # its row is marked in both tables.
    marked = best_rows(page)
    assert len(marked) == 2 and all(re.search(r"checkpoint-4(?!\d)", row) and "recommended" in row for row in marked)
    assert page.count('class="badge">recommended') == 3  # the summary and the two rows
    assert re.search(r"checkpoint-4</strong>: eval loss 1\.5000, epoch 0\.67", page)
    assert "Why: lowest eval loss (1.5000) of 3 checkpoints, as no task metric was computed." in page
    assert "metrics.png" not in page and "got wrong" not in page  # no task metrics, no metrics plot
    for warning in warnings:
        assert html.escape(warning["message"]) in page
    assert "Fix: add a space" in page and "No warnings." in page
    png = embedded_png(page)
    assert png.startswith(PNG_SIGNATURE) and png == (tmp_path / "loss.png").read_bytes()
    for name in ("report.html", "loss.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data_report.json",
        "loss.png",
        "metrics.jsonl",
        "report.html",
    ]


def test_no_eval_loss_marks_no_checkpoint(tmp_path):
    write_metrics(tmp_path, [step(1, 2.0), step(2, 1.0)])
    checkpoints = [
        CheckpointSummary(1, 0.5, 2.0, None, [sample(" a")]),
        CheckpointSummary(2, 1.0, 1.0, None, [sample(" b")]),
    ]

    page = write_html_report(tmp_path, "run", ["prompt"], checkpoints).read_text(encoding="utf-8")

    assert best_rows(page) == [] and 'class="badge"' not in page
    assert "No eval loss" in page
    assert "data_report.json missing" in page
    assert embedded_png(page) == (tmp_path / "loss.png").read_bytes()


def test_odd_run_folders_still_give_a_page_and_a_plot(tmp_path):
    cases = {
        "empty": (None, None),
        "nothing-finite": (
            [
                step(1, None, skipped=True),
                step(2, float("nan")),
                "[1, 2]",
                "not json",
                json.dumps({"step": "x", "loss": 1.0}),
                json.dumps({"step": 3, "eval_loss": None}),
            ],
            '[{"file": "t.jsonl", "warnings": [{"kind": "dup',
        ),
        "one-step": ([step(1, 5.0)], '{"not": "a list"}'),
    }
    for name, (metrics, data_report) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if metrics is not None:
            write_metrics(folder, metrics)
        if data_report is not None:
            (folder / "data_report.json").write_text(data_report, encoding="utf-8")
        checkpoints = (
            []
            if name == "empty"
            else [
                CheckpointSummary(1, 0.5, math.nan, math.inf, []),  # no samples at all
                {"step": 2, "epoch": None, "train_loss": None, "eval_loss": None, "samples": [sample(None), "junk"]},
            ]
        )
        page = write_html_report(folder, name, ["<script>x</script>"] if name != "empty" else [], checkpoints)
        page = page.read_text(encoding="utf-8")
        assert "<script" not in page.lower(), name
        assert embedded_png(page).startswith(PNG_SIGNATURE), name
        assert embedded_png(page) == (folder / "loss.png").read_bytes(), name
        assert best_rows(page) == [], name
        if name == "empty":
            assert "No checkpoint yet" in page and "data_report.json missing" in page
        else:
            assert "&lt;script&gt;x&lt;/script&gt;" in page and "no sample" in page
    assert "data_report.json could not be read" in (tmp_path / "nothing-finite" / "report.html").read_text(
        encoding="utf-8"
    )


def test_losses_are_read_from_whole_lines_only(tmp_path):
    write_metrics(
        tmp_path,
        [
            step(1, 4.0),
            step(2, None, skipped=True),
            step(3, 3.0),
            step(3, 2.5),  # a replayed step: the last counts
            json.dumps({"step": 3, "epoch": 1.0, "eval_loss": 2.75}),
            step(4, 2.0)[:-9],
        ],
    )

    history = read_losses(tmp_path / "metrics.jsonl")

    assert history.train == {1: 4.0, 3: 2.5} and history.skipped == [2] and history.evals == {3: 2.75}
    assert read_losses(tmp_path / "missing.jsonl").train == {}


def test_task_metrics_get_a_plot_a_column_the_recommendation_and_wrong_answers_of_each_kind(tmp_path):
    from trainer.evaluation import EvalResult, EvalRow
    from trainer.task_metrics import score

    write_metrics(tmp_path, [step(n, 3.0 / n) for n in range(1, 5)])
    references = ["yes", "yes", "no", "no"]

    def scored(predictions):
        result = EvalResult(
            score(["accuracy"], predictions, references).values,
            4,
            [
                EvalRow(f"Q{i} <b>?</b>\nA:", r, p, p == r, "eos", "valid.jsonl", i + 1)
                for i, (p, r) in enumerate(zip(predictions, references))
            ],
            1.0,
            "accuracy",
            score(["accuracy"], predictions, references).details,
            classification=True,
        )
        return result.summary_fields()

    checkpoints = [
        CheckpointSummary(2, 0.5, 1.5, 0.9, [sample(" x")], **scored(["no", "yes", "no", "<i>maybe</i>"])),
        CheckpointSummary(4, 1.0, 0.7, 0.6, [sample(" y")], **scored(["yes", "yes", "no", "yes"])),
    ]
    page = write_html_report(tmp_path, "run", ["prompt"], checkpoints).read_text(encoding="utf-8")

    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and base64.b64decode(images[1]) == (tmp_path / "metrics.png").read_bytes()
    assert base64.b64decode(images[1]).startswith(PNG_SIGNATURE)
    assert (
        "<th>accuracy</th>" in page and '<td class="num">0.5000</td>' in page and '<td class="num">0.7500</td>' in page
    )
    marked = best_rows(page)
    assert len(marked) == 2 and all(re.search(r"checkpoint-4(?!\d)", row) for row in marked)
    assert "Why: highest accuracy (0.7500 on 4 validation examples) of 2 checkpoints." in page
    # Wrong answers, by kind, escaped; the recommended checkpoint's confusion matrix.
    assert "<h3>Confusion matrix of checkpoint-4 (recommended)</h3>" in page
    # Classes by support, then by name: no, yes; then the (other) column.
    assert '<tr><th>no</th><td class="num">1</td><td class="num">1</td><td class="num">0</td>' in page
    assert '<tr><th>yes</th><td class="num">0</td><td class="num">2</td><td class="num">0</td>' in page
    assert html.escape("expected 'yes', got 'no'") + " (1 of 4)" in page
    assert html.escape("expected 'no', got '<i>maybe</i>'") in page and "<i>maybe" not in page
    assert "Q0 &lt;b&gt;?&lt;/b&gt;\nA:" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl", "metrics.png", "report.html"]
