"""python -m trainer.serve over real HTTP on loopback: the seed's API and OpenAI's give the
checkpoint's own completions, the token guards every route but /health, bad requests are refused
with the field and its range, and concurrent requests are batched by one worker."""

import asyncio
import importlib.util
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO
from tests.trained_runs import SEED, TEST_PROMPTS, read_samples
from trainer.serve import build_parser, build_server, main, serving_in_thread

KEY = "test-key-0123456789"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "scripts" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


bench_serve = _load_bench()


@dataclass
class Served:
    url: str
    name: str
    app: object
    checkpoint: Path

    def client(self, key: str | None = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)

    @property
    def samples(self) -> list[dict]:
        return read_samples(self.checkpoint)


@pytest.fixture(scope="module")
def served(trained_checkpoints):
    checkpoint = trained_checkpoints("gpt2", "lora")
    app, name = build_server(build_parser().parse_args([str(checkpoint), "--max-batch-size", "8"]), KEY)
    with serving_in_thread(app) as url:
        yield Served(url, name, app, checkpoint)


def test_health_is_open_and_every_other_route_needs_the_token(served):
    with served.client(key=None) as anonymous, served.client(key="wrong") as wrong, served.client() as right:
        assert anonymous.get("/health").json() == {"status": "ok"}
        for client in (anonymous, wrong):
            for method, path in [
                ("POST", "/completions"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("GET", "/no-such-route"),
            ]:
                response = client.request(method, path, json={"text": "banana ->"})
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert right.get("/v1/models").json()["data"][0]["id"] == served.name == f"run/{served.checkpoint.name}"
        lower_case = right.post("/completions", json={"text": "banana ->"}, headers={"Authorization": f"bearer {KEY}"})
        assert lower_case.status_code == 200


def test_the_seeds_request_gets_the_seeds_response_shape(served):
    # The body from the seed document's classification example, on this checkpoint's prompt format.
    body = {"text": "banana ->", "top_p": 1, "top_k": 40, "temperature": 0.01, "length": 1, "stop_sequences": ["\n"]}
    with served.client() as client:
        started = int(time.time())
        response = client.post("/completions", json=body)
    answer = response.json()
    assert response.status_code == 200 and set(answer) == {"result", "timestamp", "model"}
    assert answer["model"] == served.name and started <= answer["timestamp"] <= int(time.time())
    [result] = answer["result"]
    assert set(result) == {"completion"} and isinstance(result["completion"], str)


def text_samples(served) -> list[tuple[dict, dict]]:
    return [(p, s) for p, s in zip(TEST_PROMPTS, served.samples) if "prompt" in p]


def test_completions_equal_the_checkpoint_samples_on_both_apis(served):
    with served.client() as client:
        for prompt, sample in text_samples(served):
            sampling = {k: prompt[k] for k in ("temperature", "top_k") if k in prompt}
            seed_api = client.post(
                "/completions",
                json={
                    "text": prompt["prompt"],
                    "length": prompt["max_new_tokens"],
                    "stop_sequences": prompt.get("stop", []),
                    "seed": SEED,
                    **sampling,
                },
            ).json()
            assert seed_api["result"] == [{"completion": sample["completion"]}], prompt
            openai_api = client.post(
                "/v1/completions",
                json={
                    "model": served.name,
                    "prompt": prompt["prompt"],
                    "max_tokens": prompt["max_new_tokens"],
                    "stop": prompt.get("stop"),
                    "temperature": 0,
                    "seed": SEED,
                    **sampling,
                },
            ).json()
            [choice] = openai_api["choices"]
            assert choice["text"] == sample["completion"], prompt
            assert (
                choice["finish_reason"] == {"eos": "stop", "stop": "stop", "length": "length"}[sample["finish_reason"]]
            )
        # A list of prompts, n samples each: choices in prompt-major order; the prompt counted once.
        both = client.post(
            "/v1/completions",
            json={
                "model": served.name,
                "prompt": ["banana ->", "kiwi ->"],
                "max_tokens": 16,
                "temperature": 0,
                "n": 2,
                "stop": "e",
            },
        ).json()
    banana, kiwi = served.samples[0]["completion"], served.samples[1]["completion"]  # kiwi's was cut before "e"
    assert "e" not in banana and [c["text"] for c in both["choices"]] == [banana, banana, kiwi, kiwi]
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert (
        both["usage"]["prompt_tokens"] == 4 and both["object"] == "text_completion" and both["id"].startswith("cmpl-")
    )


def test_the_openai_client_works_unchanged(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
    samples = served.samples
    assert [model.id for model in client.models.list()] == [served.name]
    completion = client.completions.create(model=served.name, prompt="banana ->", max_tokens=16, temperature=0)
    assert completion.choices[0].text == samples[0]["completion"]
    assert completion.usage.prompt_tokens == 2
    chat = client.chat.completions.create(
        model=served.name, messages=TEST_PROMPTS[3]["messages"], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == samples[3]["completion"] and chat.choices[0].message.role == "assistant"
    sampled = client.completions.create(
        model=served.name, prompt="tomato ->", max_tokens=8, temperature=0.8, seed=SEED, extra_body={"top_k": 20}
    )
    assert sampled.choices[0].text == samples[2]["completion"]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="top_p"):
        client.completions.create(model=served.name, prompt="x", top_p=1.5)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.completions.create(model="gpt-4", prompt="x")


@pytest.mark.parametrize(
    "path, body, status, expected",
    [
        (
            "/completions",
            {"text": "a", "temperature": -1},
            422,
            "temperature: Input should be greater than or equal to 0 (got -1); allowed: a number >= 0",
        ),
        (
            "/completions",
            {"text": "a", "top_p": 0},
            422,
            "top_p: Input should be greater than 0 (got 0); allowed: a number in (0, 1]",
        ),
        ("/completions", {"text": "a", "top_p": 1.01}, 422, "allowed: a number in (0, 1]"),
        (
            "/completions",
            {"text": "a", "length": 65},
            422,
            "length: 65 is too large; allowed: an integer from 1 to 64 (the model's context)",
        ),
        ("/completions", {"text": "a", "length": 0}, 422, "allowed: an integer from 1 to 64"),
        (
            "/completions",
            {"text": "a", "temprature": 0.5},
            422,
            "unknown field 'temprature'; allowed fields: text, length, temperature",
        ),
        ("/completions", {"text": "a", "temperature": "0.5"}, 422, "temperature: Input should be a valid number"),
        (
            "/completions",
            {"text": "a", "n": 17},
            422,
            "n: Input should be less than or equal to 16 (got 17); allowed: an integer from 1 to 16",
        ),
        ("/completions", {"length": 5}, 422, "text is required"),
        ("/completions", {"text": "banana " * 40}, 400, "text is 80 tokens, but the model's context is 64 tokens"),
        ("/completions", b"{not json", 400, "the body is not valid JSON"),
        ("/completions", b"[1, 2]", 422, "the body must be a JSON object"),
        ("/completions", b"HUGE", 413, "the body is larger than 1048576 bytes"),
        (
            "/v1/completions",
            {"model": "NAME", "prompt": []},
            422,
            "prompt: an empty list holds no prompt (got []); allowed: a string or a non-empty list of strings",
        ),
        (
            "/v1/completions",
            {"model": "NAME", "prompt": ["a"] * 65},
            422,
            "prompt: this request asks for 65 completions (65 prompts x n=1), "
            "more than this server's limit of 64 per request (--max-rows-per-request)",
        ),
        (
            "/v1/completions",
            {"model": "NAME", "prompt": ["a"] * 5, "n": 13},
            422,
            "asks for 65 completions (5 prompts x n=13)",
        ),
        (
            "/v1/completions",
            {"model": "NAME", "prompt": "a", "presence_penalty": 0.5},
            422,
            "presence_penalty: not supported by this server",
        ),
        (
            "/completions",
            {"text": "a", "stop_tokens": ["x"], "stop_sequences": ["y"]},
            422,
            "give stop_sequences or stop_tokens (the same field), not both",
        ),
        (
            "/completions",
            {"text": "a", "stop_tokens": 5},
            422,
            "stop_tokens: invalid value (got 5); "
            "allowed: a string or a list of at most 16 strings (an alias of stop_sequences)",
        ),
        ("/completions", b'{"text": "\\ud800 ->"}', 400, "text: holds a lone UTF-16 surrogate"),
        (
            "/v1/chat/completions",
            b'{"model": "NAME", "messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\udfff"]}',
            400,
            "stop[1]: holds a lone UTF-16 surrogate",
        ),
        (
            "/completions",
            b'{"text": "a", "stop_sequences": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            "the body is nested too deeply to read",
        ),
        (
            "/v1/embeddings",
            {"model": "NAME", "input": "banana", "dimensions": 8},
            422,
            "dimensions: 8 is not supported; allowed: 32 (the model's hidden size",
        ),
        (
            "/v1/embeddings",
            {"model": "NAME", "input": ["banana", ""]},
            400,
            "input[1] is empty: there is no token to embed",
        ),
        ("/v1/embeddings", {"model": "NAME", "input": [1, 10**9]}, 400, "input holds token ids outside 0.."),
        (
            "/v1/embeddings",
            {"model": "NAME", "input": ["a"] * 65},
            422,
            "input: this request asks for 65 embeddings, more than this server's limit of 64",
        ),
        (
            "/v1/completions",
            {"model": "NAME", "prompt": "a", "stop": ["x"] * 17},
            422,
            "stop: at most 16 stop sequences",
        ),
        ("/v1/completions", {"model": "other", "prompt": "a"}, 404, "model 'other' is not served here"),
        (
            "/v1/chat/completions",
            {"model": "NAME", "messages": [{"role": "bot", "content": "x"}]},
            422,
            "messages[0].role: Input should be 'system', 'user' or 'assistant'",
        ),
        ("/v1/chat/completions", {"model": "NAME", "messages": []}, 422, "messages: List should have at least 1 item"),
    ],
)
def test_bad_requests_name_the_field_and_the_allowed_range(served, path, body, status, expected):
    with served.client() as client:
        if body == b"HUGE":
            body = b'{"text": "' + b"a" * (1 << 20) + b'"}'
        if isinstance(body, bytes):
            body = body.replace(b"NAME", served.name.encode())
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json={k: served.name if v == "NAME" else v for k, v in body.items()})
        assert response.status_code == status
        error = response.json()["error"]
        assert expected in error["message"] and error["type"] == "invalid_request_error"
        assert client.post("/completions", json={"text": "banana ->", "length": 16}).json()["result"] == [
            {"completion": served.samples[0]["completion"]}
        ]  # still serving


def test_64_concurrent_requests_are_all_answered_in_batches_one_generation_at_a_time(served):
    worker = served.app.state.worker
    running, most, batch_sizes = 0, 0, []
    generate_batch, lock = worker.generate_batch, threading.Lock()

    def counting(rows):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        batch_sizes.append(len(rows))
        try:
            return generate_batch(rows)
        finally:
            with lock:
                running -= 1

    expected = {
        s["prompt"]: s["completion"] for p, s in text_samples(served) if "temperature" not in p and "stop" not in p
    }
    prompts = sorted(expected)
    bodies = [
        {"model": served.name, "prompt": prompts[i % len(prompts)], "max_tokens": 16, "temperature": 0}
        for i in range(64)
    ]
    worker.generate_batch = counting
    try:
        answers = asyncio.run(bench_serve.send_all(served.url, KEY, bodies, concurrency=64))
    finally:
        worker.generate_batch = generate_batch
    assert [a.status for a in answers] == [200] * 64
    assert [a.body["choices"][0]["text"] for a in answers] == [expected[b["prompt"]] for b in bodies]
    assert most == 1 and max(batch_sizes) == 8 and sum(batch_sizes) == 64 and len(batch_sizes) < 64


def test_a_client_that_disconnects_frees_its_slot(served):
    worker = served.app.state.worker
    release, started, seen = threading.Event(), threading.Event(), []
    generate_batch = worker.generate_batch

    def blocking(rows):
        seen.extend(row.prompt_text for row in rows)
        started.set()
        release.wait(30)
        return generate_batch(rows)

    worker.generate_batch = blocking
    dropped = worker.stats.dropped_rows
    try:
        with served.client() as client:
            holder = threading.Thread(
                target=lambda: seen.append(client.post("/completions", json={"text": "banana ->"}).status_code)
            )
            holder.start()
            assert started.wait(30)  # the worker is busy with the first request
            host, port = served.url.removeprefix("http://").split(":")
            body = json.dumps({"text": "kiwi -> gone"}).encode()
            with socket.create_connection((host, int(port))) as gone:
                gone.sendall(
                    b"POST /completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                deadline = time.monotonic() + 30
                while worker.queued == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
            # The connection is closed while its row waits; the server notices and cancels it.
            deadline = time.monotonic() + 30
            while not all(job.cancelled for job in worker.waiting_jobs()) and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
            holder.join(30)
            assert client.post("/completions", json={"text": "lime ->", "length": 2}).status_code == 200
    finally:
        worker.generate_batch = generate_batch
        release.set()
    assert 200 in seen and "kiwi -> gone" not in seen and worker.stats.dropped_rows == dropped + 1


def test_a_failing_generation_answers_500_and_the_server_goes_on(served):
    worker = served.app.state.worker
    generate_batch = worker.generate_batch

    def failing(rows):
        worker.generate_batch = generate_batch  # once
        raise RuntimeError("CUDA out of memory (simulated)")

    worker.generate_batch = failing
    try:
        with served.client() as client:
            response = client.post("/completions", json={"text": "banana ->"})
            assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
            assert client.post("/completions", json={"text": "banana ->", "length": 16}).json()["result"] == [
                {"completion": served.samples[0]["completion"]}
            ]
    finally:
        worker.generate_batch = generate_batch


def test_refuses_to_listen_beyond_loopback_without_a_key(tmp_path, capsys, monkeypatch, trained_checkpoints):
    monkeypatch.delenv("TRAINER_API_KEY", raising=False)
    checkpoint = trained_checkpoints("gpt2", "lora")
    capsys.readouterr()
    assert main([str(checkpoint), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to listen on 0.0.0.0 without an API key") and err.count("\n") == 1
    (tmp_path / "empty").write_text("\n")
    assert main([str(checkpoint), "--api-key-file", str(tmp_path / "empty")]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main([str(tmp_path), "--port", "0"]) == 1 and "is not a checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("TRAINER_API_KEY", " ")
    assert main([str(checkpoint)]) == 1 and "TRAINER_API_KEY is set but empty" in capsys.readouterr().err


def test_serve_command_end_to_end_never_logs_the_key(tmp_path, capfd, monkeypatch, trained_checkpoints):
    """`main` as the command runs it, on a thread; only uvicorn's run is wrapped so the test can stop it."""
    import uvicorn

    from trainer import serve

    checkpoint = trained_checkpoints("gpt2", "lora")
    (tmp_path / "key").write_text(KEY + "\n")
    monkeypatch.delenv("TRAINER_API_KEY", raising=False)
    servers, codes = [], []

    def serve_until_stopped(app, sock, log_level):
        servers.append(uvicorn.Server(uvicorn.Config(app, log_level=log_level)))
        servers[0].run(sockets=[sock])

    monkeypatch.setattr(serve, "serve_forever", serve_until_stopped)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    capfd.readouterr()
    thread = threading.Thread(
        target=lambda: codes.append(
            main([str(checkpoint), "--port", str(port), "--api-key-file", str(tmp_path / "key")])
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (servers and servers[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
        answer = httpx.post(f"{url}/completions", json={"text": "banana ->", "length": 16}, headers=headers).json()
        assert answer["result"] == [{"completion": read_samples(checkpoint)[0]["completion"]}]
        assert (
            httpx.post(f"{url}/completions", json={"text": "x"}, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        # A client that puts its key in the query string: the access log must not keep it.
        assert (
            httpx.post(
                f"{url}/completions?api_key=SECRET-IN-QUERY&x=1",
                json={"text": "banana ->", "length": 2},
                headers=headers,
            ).status_code
            == 200
        )
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    output = "".join(capfd.readouterr())
    assert codes == [0]
    assert f"serving run/{checkpoint.name} at http://127.0.0.1:{port} (API key required)" in output
    assert '"POST /completions HTTP/1.1" 200' in output and '"POST /completions HTTP/1.1" 401' in output
    assert KEY not in output
    assert "SECRET-IN-QUERY" not in output and '"POST /completions?<redacted> HTTP/1.1" 200' in output


def test_stop_tokens_from_the_seed_documents_example_is_stop_sequences(served):
    # The seed document's example body names the stop sequences "stop_tokens".
    seed_example = {
        "text": "banana ->",
        "top_p": 1,
        "top_k": 40,
        "temperature": 0,
        "length": 16,
        "stop_tokens": ["> -"],
    }
    with served.client() as client:
        aliased = client.post("/completions", json=seed_example)
        named = client.post(
            "/completions",
            json={**{k: v for k, v in seed_example.items() if k != "stop_tokens"}, "stop_sequences": ["> -"]},
        )
    assert served.samples[0]["completion"].startswith(" -> ->")
    assert aliased.status_code == 200 and aliased.json()["result"] == named.json()["result"] == [{"completion": " -"}]


STREAM_CASES = [
    {"prompt": "banana ->", "max_tokens": 16, "temperature": 0},
    {"prompt": "banana ->", "max_tokens": 16, "temperature": 0, "stop": ["> -"]},  # cut mid-stream
    {
        "prompt": "tomato ->",
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": SEED,
        "extra_body": {"top_k": 20},
    },  # U+FFFD inside
    {"prompt": "", "max_tokens": 16, "temperature": 0},  # ends at EOS at once
]


@pytest.mark.parametrize("case", STREAM_CASES, ids=["greedy", "stop", "seeded-sampling", "eos"])
def test_streamed_completions_add_up_to_the_non_streamed_ones(served, case):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
    [whole] = client.completions.create(model=served.name, **case).choices
    chunks = list(client.completions.create(model=served.name, stream=True, **case))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.text
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + [whole.finish_reason]
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].object == "text_completion"
    sample = {"banana ->": served.samples[0], "tomato ->": served.samples[2], "": served.samples[4]}[case["prompt"]]
    if "stop" not in case:
        assert whole.text == sample["completion"]
    if case == STREAM_CASES[0]:  # sent as generated: one chunk per token, the last one with the finish reason
        assert [chunk.choices[0].text for chunk in chunks] == [" ->"] * 16 + [""]


def test_streamed_chat_and_several_prompts_follow_openais_chunk_format(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
    messages = TEST_PROMPTS[3]["messages"]
    whole = client.chat.completions.create(model=served.name, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=served.name,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.choices[0].message.content == served.samples[3]["completion"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump() | {
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }

    # Two prompts, two samples each, on the wire: every choice's chunks in order, then [DONE].
    body = {
        "model": served.name,
        "prompt": ["banana ->", "kiwi ->"],
        "max_tokens": 4,
        "temperature": 0,
        "n": 2,
        "stream": True,
    }
    with served.client() as http:
        whole = http.post("/v1/completions", json={**body, "stream": False}).json()
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    texts = ["", "", "", ""]
    for line in lines[:-1]:
        [choice] = json.loads(line.removeprefix("data: "))["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]] == [" -> -> -> ->"] * 4


def test_embeddings_are_the_pooled_last_hidden_states_of_plain_transformers(served):
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(served.checkpoint).eval()  # the adapter folder: base + LoRA
    tokenizer = AutoTokenizer.from_pretrained(served.checkpoint)
    texts = ["banana -> yellow", "kiwi", "a longer input: tomatoes, limes and a kiwi ->"]

    def expected(text: str, pooling: str) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
        return hidden.float().mean(dim=0) if pooling == "mean" else hidden[-1].float()

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
    mean = client.embeddings.create(model=served.name, input=texts)  # the client asks for base64
    assert mean.object == "list" and mean.model == served.name and [d.index for d in mean.data] == [0, 1, 2]
    assert mean.usage.prompt_tokens == mean.usage.total_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    last = client.embeddings.create(
        model=served.name, input=texts, encoding_format="float", extra_body={"pooling": "last"}
    )
    for i, text in enumerate(texts):
        assert len(mean.data[i].embedding) == model.config.hidden_size
        torch.testing.assert_close(torch.tensor(mean.data[i].embedding), expected(text, "mean"), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(last.data[i].embedding), expected(text, "last"), atol=1e-6, rtol=0)
    ids = tokenizer(texts[0])["input_ids"]
    by_ids = client.embeddings.create(model=served.name, input=ids, encoding_format="float")
    assert (
        by_ids.data[0].embedding
        == client.embeddings.create(model=served.name, input=texts[0], encoding_format="float").data[0].embedding
    )
    same_size = client.embeddings.create(model=served.name, input="kiwi", dimensions=model.config.hidden_size)
    torch.testing.assert_close(torch.tensor(same_size.data[0].embedding), expected("kiwi", "mean"), atol=1e-6, rtol=0)


def test_a_small_request_is_not_stuck_behind_a_big_one(served):
    """24 prompts and then 1: the small one gets into the very next batch and is answered first."""
    worker = served.app.state.worker
    generate_batch, batches = worker.generate_batch, []
    first_started, release = threading.Event(), threading.Event()

    def holding_the_first_batch(rows):
        batches.append([row.prompt_text for row in rows])
        if len(batches) == 1:
            first_started.set()
            release.wait(30)
        return generate_batch(rows)

    finished: list[str] = []

    def send(name: str, prompts: list[str]):
        with served.client() as client:
            response = client.post(
                "/v1/completions", json={"model": served.name, "prompt": prompts, "max_tokens": 2, "temperature": 0}
            )
        assert response.status_code == 200 and len(response.json()["choices"]) == len(prompts)
        finished.append(name)

    worker.generate_batch = holding_the_first_batch
    try:
        big = threading.Thread(target=send, args=("big", [f"big {i} ->" for i in range(24)]))
        big.start()
        assert first_started.wait(30)
        small = threading.Thread(target=send, args=("small", ["small ->"]))
        small.start()
        deadline = time.monotonic() + 30
        while worker.queued < 17 and time.monotonic() < deadline:  # big's other 16 rows and small's one
            time.sleep(0.01)
        release.set()
        small.join(30)
        big.join(30)
    finally:
        worker.generate_batch = generate_batch
        release.set()
    assert finished == ["small", "big"]
    assert [len(batch) for batch in batches] == [8, 8, 8, 1] and batches[1][1] == "small ->"


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_that_sends_half_a_body_costs_one_log_line(served):
    handler, loggers = (
        ListHandler(),
        [logging.getLogger(name) for name in ("trainer.serve", "uvicorn.error", "uvicorn")],
    )
    for logger in loggers:
        logger.addHandler(handler)
    try:
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as half:
            half.sendall(
                b"POST /completions?api_key=SECRET-9 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                + b'{"text": "ba'
            )
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while not handler.records and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # anything logged after the first line arrives too
        with served.client() as client:
            assert client.post("/completions", json={"text": "banana ->", "length": 2}).status_code == 200
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [(r.levelname, r.getMessage()) for r in handler.records] == [
        ("WARNING", "POST /completions: the client disconnected before sending the whole body")
    ]
    assert handler.records[0].exc_info is None


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "a"}'),
        ("/v1/completions", b'{"model": "NAME", "prompt": "a", "\\udc00": 1}'),
        ("/v1/embeddings", b'{"model": "NAME", "input": ["ok", "\\ud83d"]}'),
        ("/v1/embeddings", b'{"model": "NAME", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/v1/chat/completions", b'{"model": "NAME", "messages": ' + b"[" * 900 + b"]" * 900 + b"}"),
        ("/completions", b'{"text": "a", "temperature": Infinity}'),
        ("/completions", b'{"text": "a", "temperature": NaN, "n": 1e400}'),
        ("/completions", b'{"text": "a", "seed": 100000000000000000000}'),
        ("/completions", b'{"text": "a", "stop_sequences": [' + b'"x", ' * 20_000 + b'"y"]}'),
        ("/completions", b'"\\ud800"'),
    ],
)
def test_nothing_a_client_sends_is_a_500(served, path, body):
    with served.client() as client:
        response = client.post(
            path, content=body.replace(b"NAME", served.name.encode()), headers={"Content-Type": "application/json"}
        )
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/completions", json={"text": "banana ->", "length": 2}).status_code == 200
