"""Scoring a checkpoint on the validation data: the examples chosen, their prompts and references,
the answers (equal to `trainer.generate`'s greedy completions), the metrics, and the same result
when two processes share the work."""

import json
import os
import signal
import time

import pytest
import torch

from tests.helpers import fruit_rows, write_jsonl
from trainer.config import EvalConfig, TestPrompt
from trainer.data.examples import read_examples
from trainer.data.tokenize import encode_chat_prompt, tokenize_examples
from trainer.evaluation import (
    EvalResult,
    EvalRow,
    choose_evaluation,
    common_ending,
    detected_task,
    eval_examples,
    pick_examples,
    score_checkpoint,
)
from trainer.generate import complete
from trainer.loading import inspect_checkpoint, load_checkpoint_model, load_checkpoint_tokenizer
from trainer.task_metrics import normalize


def tokenized(path, tokenizer):
    data, _ = tokenize_examples(read_examples(path), tokenizer, max_seq_len=256, too_long="error")
    return data


@pytest.fixture(scope="module")
def fruit_checkpoint(trained_checkpoints):
    """The tiny LoRA fruit run's checkpoint, loaded as trainer.generate loads it."""
    info = inspect_checkpoint(trained_checkpoints("gpt2", "lora"))
    tokenizer = load_checkpoint_tokenizer(info)
    return load_checkpoint_model(info, torch.float32), tokenizer


def test_the_examples_are_the_first_n_of_a_seeded_order_in_file_order():
    chosen = pick_examples(100, 10, seed=3)
    assert chosen == sorted(chosen) and len(set(chosen)) == 10 and chosen != list(range(10))
    assert pick_examples(100, 10, seed=3) == chosen  # the same at every checkpoint and after a resume
    assert pick_examples(100, 10, seed=4) != chosen
    assert pick_examples(5, 10, seed=3) == [0, 1, 2, 3, 4] and pick_examples(5, None, seed=3) == [0, 1, 2, 3, 4]


def test_prompt_and_reference_are_cut_where_training_supervises(tmp_path, tokenizer):
    rows = [
        {"prompt": "kiwi ->", "completion": " green<|endoftext|>"},
        {
            "messages": [
                {"role": "system", "content": "Marv."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye."},
            ]
        },
    ]
    write_jsonl(tmp_path / "a.jsonl", rows[:1])
    write_jsonl(tmp_path / "b.jsonl", rows[1:])
    [plain] = eval_examples(tokenized(tmp_path / "a.jsonl", tokenizer), tokenizer, [0])
    assert plain.prompt_ids == tokenizer("kiwi ->")["input_ids"] and plain.prompt == "kiwi ->"
    assert plain.reference == " green" and plain.line == 1
    assert plain.reference_tokens == len(tokenizer(" green", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    [chat] = eval_examples(tokenized(tmp_path / "b.jsonl", tokenizer), tokenizer, [0])
    # The context of the LAST reply, encoded as a chat test prompt is encoded at every checkpoint.
    context = [("system", "Marv."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "Bye?")]
    assert chat.prompt_ids == encode_chat_prompt(tokenizer, context)
    assert chat.reference == " Bye."


def test_common_ending_is_whitespace_or_a_special_token_found_nowhere_else():
    assert common_ending([" yes\n", " no\n"]) == "\n"
    assert common_ending([" a\nb\n", " c\n"]) is None  # a newline inside an answer: not a stop
    assert common_ending([" Paris.", " Rome."]) is None  # "." would cut "St. Louis."
    assert common_ending([" yes<|im_end|>\n", " no<|im_end|>\n"], ["<|im_end|>"]) == "<|im_end|>"
    assert common_ending([" Tokyo, Berlin", " Lisbon"]) is None
    assert common_ending([]) is None


def test_plan_settles_metrics_stop_and_budget(tmp_path, tokenizer):
    valid = tokenized(write_jsonl(tmp_path / "valid.jsonl", fruit_rows(12)), tokenizer)
    examples, settings = choose_evaluation(
        EvalConfig(max_examples=5), valid, tokenizer, seed=1, task="classification", classes=3
    )
    assert [e.line for e in examples] == [i + 1 for i in pick_examples(12, 5, 1)]
    assert [e.reference for e in examples] == [fruit_rows(12)[e.line - 1]["completion"][:-13] for e in examples]
    assert settings.metrics == ("accuracy",) and settings.stop == ()
    longest = max(e.reference_tokens for e in examples)
    assert settings.max_new_tokens == longest + max(4, longest // 4)
    _, explicit = choose_evaluation(
        EvalConfig(metrics=["exact_match"], stop=["e"], max_new_tokens=3), valid, tokenizer, seed=1
    )
    assert explicit.metrics == ("exact_match",) and explicit.stop == ("e",) and explicit.max_new_tokens == 3
    assert explicit.why == "eval.metrics lists them"
    references = [e.reference for e in choose_evaluation(EvalConfig(stop=["e"]), valid, tokenizer, seed=1)[0]]
    assert " y" in references and " gr" in references  # cut before the stop, as the answers are


def test_answers_equal_trainer_generates_greedy_completions(tmp_path, fruit_checkpoint):
    model, tokenizer = fruit_checkpoint
    valid_rows = fruit_rows(12)
    valid = tokenized(write_jsonl(tmp_path / "valid.jsonl", valid_rows), tokenizer)
    examples, settings = choose_evaluation(EvalConfig(), valid, tokenizer, seed=1, task="classification", classes=3)
    model.train()  # as in training: scoring switches to eval mode and back

    result = score_checkpoint(model, tokenizer, examples, settings)

    assert model.training
    assert result.n == 12 and len(result.rows) == 12 and result.seconds > 0
    expected = [
        complete(
            model.eval(), tokenizer, TestPrompt(prompt=row["prompt"], max_new_tokens=settings.max_new_tokens), seed=0
        )["completion"]
        for row in valid_rows
    ]
    assert [r.prediction for r in result.rows] == expected
    assert [r.prompt for r in result.rows] == [row["prompt"] for row in valid_rows]
    right = [normalize(p) == normalize(row["completion"][:-13]) for p, row in zip(expected, valid_rows)]
    assert [r.correct for r in result.rows] == right
    assert result.metrics == {"accuracy": sum(right) / 12}
    assert result.details["classification"]["labels"] == ["green", "red", "yellow"]
    fields = result.summary_fields()
    assert fields["metrics"] == result.metrics and fields["eval_examples"] == 12
    assert sum(1 for w in fields["wrong"]) == min(sum(not r for r in right), len(fields["wrong"]))
    assert json.loads(json.dumps(result.prediction_records()))[0]["prediction"] == expected[0]


def test_wrong_examples_keep_a_few_of_each_kind_most_common_first():
    rows = [
        EvalRow(f"p{i}", "Tokyo, Berlin", prediction, prediction == "Tokyo, Berlin", "eos", "v.jsonl", i + 1)
        for i, prediction in enumerate(["Tokyo", "Tokyo, Berlin", "Berlin", "Paris, Rome", "Tokyo", ""])
    ]
    result = EvalResult({"exact_match": 1 / 6}, 6, rows, 0.1)
    wrong = result.wrong_examples(per_kind=2)
    assert [(w["kind"], w["count"], w["line"]) for w in wrong] == [
        ("missed items", 3, 1),
        ("missed items", 3, 3),
        ("wrong items", 1, 4),
        ("empty answer", 1, 6),
    ]


def _score_in_process(rank, port, out, model, tokenizer, examples, settings):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state()
    PartialState._reset_state()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    accelerator = Accelerator(cpu=True)
    result = score_checkpoint(model, tokenizer, examples, settings, accelerator)
    out.write_text(json.dumps({"predictions": [r.prediction for r in result.rows], "metrics": result.metrics}))
    torch.distributed.destroy_process_group()


def test_two_processes_share_the_work_and_both_get_the_whole_result(tmp_path, fruit_checkpoint):
    import socket
    import traceback

    model, tokenizer = fruit_checkpoint
    valid = tokenized(write_jsonl(tmp_path / "valid.jsonl", fruit_rows(12)), tokenizer)
    examples, settings = choose_evaluation(EvalConfig(), valid, tokenizer, seed=1, task="classification", classes=3)
    alone = score_checkpoint(model, tokenizer, examples, settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 1
            try:
                _score_in_process(rank, port, tmp_path / f"rank{rank}.json", model, tokenizer, examples, settings)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    deadline, codes = time.time() + 120, {}
    while len(codes) < 2 and time.time() < deadline:
        for pid in pids:
            if pid not in codes and os.waitpid(pid, os.WNOHANG)[0]:
                codes[pid] = 0
        time.sleep(0.05)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert len(codes) == 2, "the two processes did not finish"
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]
    assert results[0]["predictions"] == [r.prediction for r in alone.rows]
    assert results[0]["metrics"] == alone.metrics


def test_detected_task_reads_the_preflight_reports():
    assert detected_task([{"stats": {"task": "classification", "classes": {"a": 3, "b": 4}}}]) == ("classification", 2)
    assert detected_task([]) == ("conditional", 0)


def test_a_run_scores_every_checkpoint_and_recommends_one(tmp_path, tiny_model_dirs):
    """The recipe end to end: task metrics at each checkpoint in checkpoint.json, metrics.jsonl,
    eval_predictions.jsonl, report.md and recommendation.json, the same on a resumed run."""
    import json

    from tests.helpers import read_jsonl, write_config
    from tests.stop_helpers import signal_after_step
    from trainer.recommend import recommend
    from trainer.report import CheckpointSummary
    from trainer.train import main

    config = write_config(tmp_path, tiny_model_dirs["gpt2"], "full", training={"epochs": 1})
    assert main([str(config)]) == 0
    run = tmp_path / "run"
    evals = [m for m in read_jsonl(run / "metrics.jsonl") if "eval_loss" in m]
    infos = {
        int(p.name.split("-")[1]): json.loads((p / "checkpoint.json").read_text()) for p in run.glob("checkpoint-*")
    }
    assert [m["step"] for m in evals] == sorted(infos) == [2, 4, 6]
    for row in evals:
        metrics = infos[row["step"]]["metrics"]
        # The fruit colours are classes: the preflight says so, and `auto` picks accuracy.
        assert infos[row["step"]]["eval_examples"] == 12 and list(metrics) == ["accuracy"]
        assert row["eval_accuracy"] == metrics["accuracy"]
        predictions = read_jsonl(run / f"checkpoint-{row['step']}" / "eval_predictions.jsonl")
        assert len(predictions) == 12
        assert sum(
            p["prediction"].strip().casefold() == p["reference"].strip().casefold() for p in predictions
        ) / 12 == pytest.approx(metrics["accuracy"])
    recommended = json.loads((run / "recommendation.json").read_text())
    summaries = [
        CheckpointSummary(s, 0.0, None, infos[s]["eval_loss"], [], metrics=infos[s]["metrics"]) for s in sorted(infos)
    ]
    expected = recommend(summaries, "accuracy")
    assert (recommended["checkpoint"], recommended["metric"]) == (expected.checkpoint, "accuracy")
    assert f"Recommended: **{expected.checkpoint}**" in (run / "report.md").read_text()

    # A resumed run recommends exactly what the uninterrupted one does.
    with pytest.MonkeyPatch.context() as monkeypatch:
        signal_after_step(monkeypatch, 3)
        assert main([str(config), f"output_dir={tmp_path / 'resumed'}"]) == 75
    assert main([str(config), f"output_dir={tmp_path / 'resumed'}"]) == 0
    assert json.loads((tmp_path / "resumed" / "recommendation.json").read_text()) == recommended
