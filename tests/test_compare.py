"""python -m trainer.compare without a browser: the JSON endpoints on a real tiny run (its
checkpoints, answers, plots, task metrics and predictions), completions equal to trainer.generate's
with one base model shared by the LoRA adapters and an LRU of full models, a run folder read while
it changes and never written, and trainer.serve's token rules."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import TEST_PROMPTS, read_jsonl, write_config
from trainer.compare.__main__ import main as compare_main
from trainer.compare.app import create_app
from trainer.compare.folder import RunReader
from trainer.compare.models import CheckpointModels
from trainer.generate import main as generate_main

KEY = "compare-key-0123456789"
NAMES = ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
PNG = b"\x89PNG\r\n\x1a\n"


def train_compare_run(folder: Path, model_dir: Path, method: str = "lora") -> Path:
    """A real tiny run: one epoch of the fruit task (6 steps) with validation data, three
    checkpoints (steps 2, 4, 6) and tests/helpers.py's three test prompts; returns its folder.
    Without task metrics (`eval.metrics=none`): the tests that show them write their own."""
    from trainer.train import main

    folder.mkdir(parents=True, exist_ok=True)
    assert main([str(write_config(folder, model_dir, method, training={"epochs": 1})), "eval.metrics=none"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dirs) -> Path:
    return train_compare_run(tmp_path_factory.mktemp("compare"), tiny_model_dirs["gpt2"])


@pytest.fixture(scope="module")
def models() -> CheckpointModels:
    """Shared by the tests on `run`: its adapters are loaded once."""
    return CheckpointModels(torch.device("cpu"), torch.float32)


def client(run: Path, models: CheckpointModels | None = None, token: str | None = None, **headers) -> TestClient:
    models = models or CheckpointModels(torch.device("cpu"), torch.float32)
    return TestClient(create_app(RunReader(run), models, token=token), base_url="http://127.0.0.1", headers=headers)


def reference(checkpoint: Path, capsys, *args: str) -> dict:
    """`python -m trainer.generate CHECKPOINT ARGS --jsonl`'s record, in-process."""
    capsys.readouterr()
    assert generate_main([str(checkpoint), *args, "--jsonl"]) == 0
    return json.loads(capsys.readouterr().out)


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_state_lists_the_checkpoints_with_their_losses(run, models):
    with client(run, models) as http:
        state = http.get("/api/state").json()
    infos = {name: json.loads((run / name / "checkpoint.json").read_text()) for name in NAMES}
    assert [c["name"] for c in state["checkpoints"]] == NAMES
    assert [c["step"] for c in state["checkpoints"]] == [2, 4, 6]
    assert [c["eval_loss"] for c in state["checkpoints"]] == [infos[n]["eval_loss"] for n in NAMES]
    assert [c["train_loss"] for c in state["checkpoints"]] == [infos[n]["train_loss"] for n in NAMES]
    assert {c["kind"] for c in state["checkpoints"]} == {"adapter"}
    assert state["best"] == min(NAMES, key=lambda n: infos[n]["eval_loss"])  # no task metric: the lowest eval loss
    assert state["why"].startswith("lowest eval loss")
    assert (state["metric_names"], state["predictions"]) == ([], False)
    assert state["status"]["status"] == "complete" and state["run"] == str(run)


def test_answers_are_each_checkpoints_samples(run, models):
    with client(run, models) as http:
        answers = http.get("/api/answers").json()
    assert [p["label"] for p in answers["prompts"]] == [p["prompt"] for p in TEST_PROMPTS]
    assert answers["prompts"][1]["parameters"]["stop"] == ["\n"]
    assert answers["prompts"][2]["parameters"]["temperature"] == 0.8
    for name in NAMES:
        samples = read_jsonl(run / name / "samples.jsonl")
        assert answers["answers"][name] == [
            {"completion": s["completion"], "finish_reason": s["finish_reason"]} for s in samples
        ]


def test_the_loss_plot_is_a_png_and_no_metric_plot_without_metrics(run, models):
    with client(run, models) as http:
        plots = http.get("/api/plots").json()
    assert plots["loss"].startswith("data:image/png;base64,")
    assert base64.b64decode(plots["loss"].split(",", 1)[1]).startswith(PNG)
    assert (plots["metrics"], plots["error"]) == (None, None)


@pytest.mark.parametrize(
    "body, options",
    [
        ({"prompt": "kiwi ->", "max_new_tokens": 8}, ["--prompt", "kiwi ->", "--max-new-tokens", "8"]),
        (
            {"prompt": "lemon ->", "max_new_tokens": 8, "stop": ["e"]},
            ["--prompt", "lemon ->", "--max-new-tokens", "8", "--stop", "e"],
        ),
        (
            {"prompt": "tomato ->", "max_new_tokens": 8, "temperature": 0.9, "top_k": 20, "top_p": 0.95},
            [
                "--prompt",
                "tomato ->",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--top-p",
                "0.95",
            ],
        ),
        (
            {"prompt": "tomato ->", "max_new_tokens": 8, "temperature": 1.2, "seed": 42},
            ["--prompt", "tomato ->", "--max-new-tokens", "8", "--temperature", "1.2", "--seed", "42"],
        ),
        (
            {
                "messages": [{"role": "system", "content": "Marv."}, {"role": "user", "content": "Hi?"}],
                "max_new_tokens": 6,
            },
            [
                "--messages",
                '[{"role": "system", "content": "Marv."}, {"role": "user", "content": "Hi?"}]',
                "--max-new-tokens",
                "6",
            ],
        ),
    ],
)
def test_a_completion_equals_trainer_generates(run, models, capsys, body, options):
    with client(run, models) as http:
        for name in NAMES:
            answer = http.post("/api/generate", json={"checkpoint": name, **body}).json()
            expected = reference(run / name, capsys, *options)
            assert (answer["completion"], answer["finish_reason"]) == (
                expected["completion"],
                expected["finish_reason"],
            ), name
            assert answer["seed"] == expected["parameters"]["seed"] == body.get("seed", 1)  # default: training.seed
    assert models.stats.bases == 1 and models.stats.adapters == 3  # one base model; set_adapter switches


def test_the_samples_are_reproduced_by_the_prompt_box(run, models):
    """A test prompt asked with its own parameters gives the checkpoint's sample (sampled one included)."""
    with client(run, models) as http:
        for name in NAMES:
            for sample, prompt in zip(read_jsonl(run / name / "samples.jsonl"), TEST_PROMPTS):
                parameters = {k: v for k, v in sample["parameters"].items()}
                answer = http.post(
                    "/api/generate", json={"checkpoint": name, "prompt": prompt["prompt"], **parameters}
                ).json()
                assert answer["completion"] == sample["completion"], (name, prompt)


def test_full_checkpoints_are_loaded_on_demand_and_at_most_max_loaded_are_held(tmp_path, tiny_model_dirs, capsys):
    run = tmp_path / "run"
    run.mkdir()
    sources = {1: tiny_model_dirs["gpt2"], 2: tiny_model_dirs["gpt_neox"], 3: tiny_model_dirs["gpt2"]}
    for step, source in sources.items():
        shutil.copytree(source, run / f"checkpoint-{step}")
    models = CheckpointModels(torch.device("cpu"), torch.float32, max_loaded=2)
    folder = lambda step: str(run / f"checkpoint-{step}")
    with client(run, models) as http:

        def ask(step: int) -> str:
            return http.post(
                "/api/generate", json={"checkpoint": f"checkpoint-{step}", "prompt": "kiwi ->", "max_new_tokens": 6}
            ).json()["completion"]

        assert [c["kind"] for c in http.get("/api/state").json()["checkpoints"]] == ["full"] * 3
        expected = {
            step: reference(run / f"checkpoint-{step}", capsys, "--prompt", "kiwi ->", "--max-new-tokens", "6")[
                "completion"
            ]
            for step in sources
        }
        assert [ask(step) for step in (1, 2, 3)] == [expected[1], expected[2], expected[3]]
        assert models.loaded_full == [folder(2), folder(3)] and models.stats.evicted == [folder(1)]
        assert ask(2) == expected[2] and models.stats.full_models == 3  # held: not loaded again
        assert ask(1) == expected[1]  # the least recently used (3) goes
        assert models.loaded_full == [folder(2), folder(1)] and models.stats.evicted == [folder(1), folder(3)]
    assert models.stats.bases == 0


def test_a_new_checkpoint_appears_and_a_partial_one_never_does(run, models, tmp_path):
    run = copy_run(run, tmp_path)
    with client(run, models) as http:
        before = http.get("/api/state").json()
        shutil.copytree(run / "checkpoint-6", run / ".checkpoint-8.partial")
        during = http.get("/api/state").json()
        assert during == before  # nothing shown changed: the same signature too
        (run / ".checkpoint-8.partial").rename(run / "checkpoint-8")
        after = http.get("/api/state").json()
        assert [c["name"] for c in after["checkpoints"]] == NAMES + ["checkpoint-8"]
        assert after["signature"] != before["signature"]
        assert list(http.get("/api/answers").json()["answers"]) == NAMES + ["checkpoint-8"]
        answer = http.post(
            "/api/generate", json={"checkpoint": "checkpoint-8", "prompt": "kiwi ->", "max_new_tokens": 6}
        )
        assert answer.status_code == 200
        with (run / "metrics.jsonl").open("a") as metrics:  # the run logs another step
            metrics.write(json.dumps({"step": 7, "loss": 1.5}) + "\n" + '{"step": 8, "lo')  # and half a line
        assert http.get("/api/state").json()["signature"] != after["signature"]
        assert http.get("/api/plots").json()["loss"].startswith("data:image/png;base64,")
        shutil.rmtree(run / "checkpoint-2")  # a resume rewinds, or a rerun overwrites
        assert [c["name"] for c in http.get("/api/state").json()["checkpoints"]] == NAMES[1:] + ["checkpoint-8"]


def test_the_run_folder_is_only_read(run, models, tmp_path):
    run = copy_run(run, tmp_path)
    before = files_of(run)
    with client(run, models) as http:
        for path in ("/", "/api/state", "/api/answers", "/api/plots", "/api/predictions"):
            assert http.get(path).status_code == 200, path
        assert http.post("/api/generate", json={"checkpoint": "checkpoint-4", "prompt": "kiwi ->"}).status_code == 200
    assert files_of(run) == before  # nothing written, no run.lock taken


def add_task_metrics(run: Path, layout: str = "predictions") -> dict[str, list[dict]]:
    """What the task-metrics change will write: checkpoint.json["metrics"] with "examples", and
    predictions.jsonl; or (layout "evaluation", trainer/evaluation.py's) "eval_examples" beside
    "metrics", and eval_predictions.jsonl with more fields per row."""
    predictions = {
        "checkpoint-2": [("banana ->", "yellow", "red"), ("kiwi ->", "green", "green"), ("kiwi ->", "green", "red")],
        "checkpoint-4": [("banana ->", "yellow", "yellow"), ("kiwi ->", "green", "green"), ("kiwi ->", "green", "red")],
    }
    rows = {}
    for name, triples in predictions.items():
        rows[name] = [{"prompt": p, "reference": r, "prediction": x, "correct": r == x} for p, r, x in triples]
        info = json.loads((run / name / "checkpoint.json").read_text())
        correct = sum(row["correct"] for row in rows[name])
        info["metrics"] = {"accuracy": correct / 3, "exact_match": correct / 3}
        if layout == "evaluation":
            info["eval_examples"] = 3
            records = [
                row | {"finish_reason": "eos", "source": "valid.jsonl", "line": i}
                for i, row in enumerate(rows[name], 1)
            ]
            (run / name / "eval_predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in records))
        else:
            info["metrics"]["examples"] = 3
            (run / name / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
        (run / name / "checkpoint.json").write_text(json.dumps(info))
    return rows


@pytest.mark.parametrize("layout", ["predictions", "evaluation"])
def test_task_metrics_and_predictions_are_shown_and_filtered(run, models, tmp_path, layout):
    run = copy_run(run, tmp_path)
    add_task_metrics(run, layout)
    with client(run, models) as http:
        state = http.get("/api/state").json()
        assert state["metric_names"] == ["accuracy", "exact_match"] and state["predictions"] is True
        assert state["best"] == "checkpoint-4"  # report.html's rule: the highest primary metric, not the eval loss
        assert state["why"] == "highest accuracy (0.6667 on 3 validation examples) of 2 checkpoints"
        by_name = {c["name"]: c for c in state["checkpoints"]}
        assert by_name["checkpoint-2"]["metrics"] == {"accuracy": 1 / 3, "exact_match": 1 / 3}
        assert by_name["checkpoint-4"]["metrics"] == {"accuracy": 2 / 3, "exact_match": 2 / 3}
        assert by_name["checkpoint-2"]["metric_examples"] == 3
        assert (by_name["checkpoint-6"]["metrics"], by_name["checkpoint-6"]["predictions"]) == ({}, False)
        plots = http.get("/api/plots").json()
        assert base64.b64decode(plots["metrics"].split(",", 1)[1]).startswith(PNG)

        def rows(**query) -> list[tuple]:
            answer = http.get("/api/predictions", params=query).json()
            assert answer["checkpoints"] == ["checkpoint-2", "checkpoint-4"] and answer["total"] == 3
            return [
                (r["index"], r["prompt"], {n: p["prediction"] for n, p in r["predictions"].items()})
                for r in answer["rows"]
            ]

        everything = [
            (1, "banana ->", {"checkpoint-2": "red", "checkpoint-4": "yellow"}),
            (2, "kiwi ->", {"checkpoint-2": "green", "checkpoint-4": "green"}),
            (3, "kiwi ->", {"checkpoint-2": "red", "checkpoint-4": "red"}),
        ]  # a repeated example stays apart
        assert rows() == everything
        assert rows(filter="wrong") == [everything[0], everything[2]]
        assert rows(filter="wrong", checkpoint="checkpoint-4") == [everything[2]]
        assert rows(filter="disagree") == [everything[0]]
        assert rows(offset=1, limit=1) == [everything[1]]
        answer = http.get("/api/predictions", params={"filter": "disagree"}).json()
        assert answer["rows"][0]["predictions"]["checkpoint-2"]["correct"] is False
        assert answer["rows"][0]["reference"] == "yellow" and answer["matching"] == 1


@pytest.mark.parametrize(
    "query, param, message",
    [
        ({"filter": "bad"}, "filter", "filter: 'bad' is not a filter; allowed: all, wrong, disagree"),
        (
            {"checkpoint": "checkpoint-6"},
            "checkpoint",
            "checkpoint: 'checkpoint-6' has no predictions; allowed: checkpoint-2, checkpoint-4",
        ),
        ({"limit": "0"}, "limit", "limit: '0' is not allowed; allowed: an integer from 1 to 500"),
        ({"offset": "x"}, "offset", "offset: 'x' is not allowed; allowed: an integer from 0 to 1000000000"),
    ],
)
def test_bad_prediction_queries_name_the_parameter(run, models, tmp_path, query, param, message):
    run = copy_run(run, tmp_path)
    add_task_metrics(run)
    with client(run, models) as http:
        response = http.get("/api/predictions", params=query)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param and response.json()["error"]["message"] == message


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        (
            {"checkpoint": "checkpoint-4", "prompt": "x", "temperature": -1},
            422,
            "temperature",
            "temperature: Input should be greater than or equal to 0 (got -1); allowed: a number >= 0 (0 is greedy)",
        ),
        (
            {"checkpoint": "checkpoint-4", "prompt": "x", "colour": 1},
            422,
            "colour",
            "unknown field 'colour'; allowed fields: "
            "checkpoint, prompt, messages, max_new_tokens, temperature, top_p, top_k, stop, seed",
        ),
        (
            {"checkpoint": "checkpoint-4"},
            422,
            None,
            "give either prompt (text) or messages (a chat), exactly one of them",
        ),
        (
            {"checkpoint": "checkpoint-4", "prompt": "x", "top_p": 0},
            422,
            "top_p",
            "top_p: Input should be greater than 0 (got 0); allowed: a number in (0, 1]",
        ),
        (
            {"checkpoint": "checkpoint-4", "messages": [{"role": "robot", "content": "hi"}]},
            422,
            "messages",
            "messages[0].role: Input should be 'system', 'user' or 'assistant' (got 'robot'); "
            'allowed: "system", "user" or "assistant"',
        ),
        (
            {"prompt": "x"},
            422,
            "checkpoint",
            "checkpoint is required: a checkpoint's name, such as checkpoint-100 (GET /api/state lists them)",
        ),
        ({"checkpoint": "checkpoint-9", "prompt": "x"}, 404, "checkpoint", None),
        (
            {"checkpoint": "checkpoint-4", "prompt": "kiwi -> " * 40},
            400,
            "prompt",
            "prompt: 120 tokens, but the model's context is 64 tokens: at most 63 leave room for a completion. "
            "Fix: shorten the prompt",
        ),
    ],
)
def test_bad_generate_requests_name_the_field(run, models, body, status, param, message):
    with client(run, models) as http:
        response = http.post("/api/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if message is not None:
        assert error["message"] == message
    else:
        assert error["message"] == (
            f"checkpoint: there is no 'checkpoint-9' in {run}; there are: checkpoint-2, checkpoint-4, checkpoint-6"
        )


def test_a_body_that_is_not_json_is_refused(run, models):
    with client(run, models) as http:
        form = http.post(
            "/api/generate",
            content=b'{"checkpoint": "checkpoint-4", "prompt": "x"}',
            headers={"Content-Type": "text/plain"},
        )
        broken = http.post("/api/generate", content=b'{"checkpoint": ', headers={"Content-Type": "application/json"})
    assert form.status_code == 415 and form.json()["error"]["message"] == (
        "send the body as JSON with the header 'Content-Type: application/json'"
    )
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("the body is not valid JSON")


def test_the_page_is_one_self_contained_file_without_run_data(run, models):
    with client(run, models) as http:
        response = http.get("/")
    page = response.text
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert page.count("<script>") == 1 and "<script src" not in page and '<link rel="stylesheet"' not in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert str(run) not in page and "checkpoint-2" not in page  # the data comes from /api/*, behind the token


def test_the_token_guards_every_data_route_and_not_the_page(run, models):
    with (
        client(run, models, token=KEY) as anonymous,
        client(run, models, token=KEY, authorization="Bearer wrong") as wrong,
        client(run, models, token=KEY, authorization=f"Bearer {KEY}") as right,
    ):
        assert anonymous.get("/").status_code == 200 and anonymous.get("/health").json() == {"status": "ok"}
        for http in (anonymous, wrong):
            for method, path in [
                ("GET", "/api/state"),
                ("GET", "/api/answers"),
                ("GET", "/api/plots"),
                ("GET", "/api/predictions"),
                ("POST", "/api/generate"),
            ]:
                response = http.request(method, path, json={"checkpoint": "checkpoint-2", "prompt": "x"})
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
        assert [c["name"] for c in right.get("/api/state").json()["checkpoints"]] == NAMES


def test_without_a_token_only_loopback_host_names_are_answered(run, models):
    with client(run, models) as loopback, client(run, models, host="attacker.example:8100") as rebound:
        assert loopback.get("/api/state").status_code == 200
        assert loopback.get("/api/state", headers={"host": "localhost:8100"}).status_code == 200
        assert loopback.get("/api/state", headers={"host": "[::1]:8100"}).status_code == 200
        response = rebound.get("/api/state")
    assert response.status_code == 421 and response.json()["error"]["code"] == "not_loopback"


def test_the_command_line_refuses_bad_input_in_one_line(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAINER_API_KEY", raising=False)
    cases = [
        (
            [str(tmp_path / "missing")],
            1,
            f"error: {tmp_path / 'missing'} does not exist. Fix: give a run's output_dir "
            "(the folder that holds metrics.jsonl, status.json and checkpoint-<step>/)",
        ),
        (
            [str(run / "checkpoint-2")],
            1,
            f"error: {run / 'checkpoint-2'} is a checkpoint, not a run folder. Fix: give the "
            f"run folder that holds it, {run}",
        ),
        (
            [str(run.parent)],
            1,
            f"error: {run.parent} is not a run folder: it has no metrics.jsonl, status.json or "
            "checkpoint-<step>/. It holds these runs: run. Fix: give a run's output_dir (the folder that "
            "holds metrics.jsonl, status.json and checkpoint-<step>/)",
        ),
        (
            [str(run), "--host", "0.0.0.0"],
            1,
            "error: refusing to listen on 0.0.0.0 without an API key: anyone who can "
            "reach it could use the model. Fix: set TRAINER_API_KEY (or pass "
            "--api-key-file FILE), or listen on 127.0.0.1",
        ),
        ([str(run), "--max-loaded", "0"], 2, "error: --max-loaded must be at least 1, got 0"),
    ]
    for argv, code, message in cases:
        capsys.readouterr()
        assert compare_main(argv) == code, argv
        assert capsys.readouterr().err.strip() == message
