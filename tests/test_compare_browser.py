"""python -m trainer.compare in a real headless browser (Chromium, driven over its DevTools protocol
with the small WebSocket client below; nothing is downloaded): the page shows every checkpoint of a
real tiny run, a typed prompt gets each checkpoint's completion equal to trainer.generate's, and a
checkpoint saved while the page is open appears without a reload. Skipped, saying what to install,
where no Chromium is installed."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tests.test_compare import train_compare_run
from trainer.compare.app import create_app
from trainer.compare.folder import RunReader
from trainer.compare.models import CheckpointModels
from trainer.generate import main as generate_main
from trainer.serve import serving_in_thread

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
KEY = "browser-key-0123456789"
INSTALL = (
    "no Chromium here: install it to run the browser test (Debian/Ubuntu: apt-get install -y chromium), "
    "or set TRAINER_TEST_CHROMIUM=/path/to/chrome"
)


def find_browser() -> str | None:
    given = os.environ.get("TRAINER_TEST_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevTools:
    """A minimal WebSocket (RFC 6455) client for one DevTools page target: send a command, wait for
    its answer; events are read and dropped."""

    def __init__(self, url: str, timeout: float = 30.0):
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)
        handshake_key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {handshake_key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            response += chunk
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"101", head
        self.next_id = 0

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        length = len(payload)
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", length)
        mask = os.urandom(4)  # a client masks every frame
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive_message(self) -> dict:
        parts = []
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the connection")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    return json.loads(b"".join(parts))

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send_frame(0x1, json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            message = self._receive_message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        """The first truthy value of `expression`; an exception (a page still loading) counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value, problem = self.evaluate(expression), None
            except AssertionError as err:
                value, problem = None, err
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression} ({problem or 'never true'})")
            time.sleep(0.1)

    def screenshot(self, path: Path, width: int = 1400, height: int | None = None) -> None:
        height = height or int(self.evaluate("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.sock.close()


@contextmanager
def chromium_page(browser: str, profile: Path):
    """A headless Chromium with one blank page; yields its DevTools client. Chromium writes the port
    it took into DevToolsActivePort in its profile folder."""
    profile.mkdir(parents=True, exist_ok=True)
    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1400,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    client = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"Chromium did not start: {(profile.parent / 'chromium.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            target = next(t for t in json.load(response) if t["type"] == "page")
        client = DevTools(target["webSocketDebuggerUrl"])
        yield client
    finally:
        if client is not None:
            client.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def generate_reference(checkpoint: Path, prompt: str, capsys, *options: str) -> str:
    """What `python -m trainer.generate CHECKPOINT --prompt ... --jsonl` prints, in-process."""
    capsys.readouterr()
    assert generate_main([str(checkpoint), "--prompt", prompt, "--jsonl", *options]) == 0
    return json.loads(capsys.readouterr().out)["completion"]


ROWS = "Array.from(document.querySelectorAll('#checkpoints tbody tr')).map(r => r.dataset.checkpoint)"
RESULTS = (
    "Array.from(document.querySelectorAll('#results .result')).map(r => [r.dataset.checkpoint, r.dataset.state, "
    "r.querySelector('.completion').textContent])"
)


def ask(page: DevTools, prompt: str, **fields) -> dict[str, str]:
    """Type `prompt` and the sampling fields into the page, press Ask, and return each
    checkpoint's completion as the page shows it."""
    values = {"max_new_tokens": "", "temperature": "", "top_p": "", "top_k": "", "seed": "", **fields}
    script = [f"document.getElementById('prompt').value = {json.dumps(prompt)};"]
    script += [
        f"document.getElementById({json.dumps(name)}).value = {json.dumps(str(value))};"
        for name, value in values.items()
    ]
    script.append("document.getElementById('results').replaceChildren(); document.getElementById('ask').click(); true")
    page.evaluate("\n".join(script))
    page.wait_for(f"(() => {{ const r = {RESULTS}; return r.length > 0 && r.every(x => x[1] !== 'running'); }})()")
    results = page.evaluate(RESULTS)
    assert all(state == "done" for _, state, _ in results), results
    return {name: text for name, _, text in results}


@pytest.fixture(scope="module")
def browser():
    path = find_browser()
    if path is None:
        pytest.skip(INSTALL)
    return path


def test_the_page_compares_checkpoints_live_in_a_real_browser(browser, tmp_path, tiny_model_dirs, capsys):
    run = train_compare_run(tmp_path / "train", tiny_model_dirs["gpt2"])
    names = ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    models = CheckpointModels(torch.device("cpu"), torch.float32)
    app = create_app(RunReader(run), models, poll_seconds=0.3)
    with serving_in_thread(app) as url, chromium_page(browser, tmp_path / "chromium") as page:
        page.send("Page.navigate", url=url + "/")
        assert page.wait_for(f"(() => {{ const r = {ROWS}; return r.length === 3 && r; }})()") == names
        page.wait_for("document.querySelectorAll('#answers tbody tr').length === 3")
        page.evaluate("window.notReloaded = true")
        # Every checkpoint's answers to the test prompts, as its samples.jsonl has them.
        shown = page.evaluate(
            "Array.from(document.querySelectorAll('#answers tbody tr')).map(r => [r.dataset.checkpoint, "
            "Array.from(r.querySelectorAll('td')).map(td => td.textContent)])"
        )
        assert [name for name, _ in shown] == names
        headers = page.evaluate(
            "Array.from(document.querySelectorAll('#answers thead th .prompt-tail')).map(d => d.textContent)"
        )
        assert headers == ["banana ->", "kiwi ->", "tomato ->"]
        for name, cells in shown:
            samples = [
                json.loads(line) for line in (run / name / "samples.jsonl").read_text(encoding="utf-8").splitlines()
            ]
            expected = [s["completion"] or "(empty completion)" for s in samples]
            assert [cell.split("ended: ")[0] for cell in cells] == expected, name

        # A test prompt fills the prompt box with its text and parameters.
        page.evaluate(
            "const f = document.getElementById('fill'); f.value = '1'; f.dispatchEvent(new Event('change')); true"
        )
        filled = page.evaluate(
            "['prompt', 'max_new_tokens', 'temperature', 'top_k', 'stop'].map(id => document.getElementById(id).value)"
        )
        assert filled == ["kiwi ->", "6", "0", "0", "\\n"]

        # A typed prompt: each checkpoint's completion is trainer.generate's, greedy and seeded sampling.
        greedy = ask(page, "kiwi ->", max_new_tokens=8, temperature=0)
        assert greedy == {
            name: generate_reference(run / name, "kiwi ->", capsys, "--max-new-tokens", "8") for name in names
        }
        sampled = ask(page, "tomato ->", max_new_tokens=8, temperature=0.9, top_k=20, seed=7)
        assert sampled == {
            name: generate_reference(
                run / name,
                "tomato ->",
                capsys,
                "--max-new-tokens",
                "8",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--seed",
                "7",
            )
            for name in names
        }
        assert (models.stats.bases, models.stats.adapters) == (1, 3)  # one base model shared by the three adapters

        # A checkpoint being written is not shown; once renamed into place it appears without a reload.
        partial = run / ".checkpoint-8.partial"
        shutil.copytree(run / "checkpoint-6", partial)
        time.sleep(1.0)  # three polls
        assert page.evaluate(ROWS) == names
        os.rename(partial, run / "checkpoint-8")
        assert page.wait_for(f"(() => {{ const r = {ROWS}; return r.length === 4 && r; }})()", timeout=20) == names + [
            "checkpoint-8"
        ]
        assert page.wait_for("document.querySelectorAll('#choices input').length === 4")
        assert page.evaluate("window.notReloaded === true")
        assert not (run / "run.lock").exists()

        # With a key the page asks for it, then sends it with every request.
        with serving_in_thread(create_app(RunReader(run), models, token=KEY, poll_seconds=0.3)) as keyed:
            page.send("Page.navigate", url=keyed + "/")
            page.wait_for("!document.getElementById('key-box').classList.contains('hidden')")
            assert page.evaluate(ROWS) == []
            page.evaluate(
                f"document.getElementById('key').value = {json.dumps(KEY)}; "
                "document.querySelector('#key-form button').click(); true"
            )
            assert page.wait_for(f"(() => {{ const r = {ROWS}; return r.length === 4 && r; }})()") == names + [
                "checkpoint-8"
            ]
            assert ask(page, "kiwi ->", max_new_tokens=8, temperature=0) == greedy | {
                "checkpoint-8": greedy["checkpoint-6"]
            }
