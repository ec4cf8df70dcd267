"""`cmrp data build` end to end against a local OpenAI-compatible server started here (127.0.0.1).

The server answers each request from its prompt (the `# task:` line and the counts asked for) and, by the
order in which request keys first arrive, misbehaves once per key: fenced JSON with chatter, truncated
JSON, a wrong schema, HTTP 500, HTTP 429, or an answer slower than the client's timeout. It counts requests
per request key (SHA-256 of model + the initial system and user messages, as the build's cache names them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

CMRP = str(Path(sys.executable).parent / "cmrp")
SECRET = "sk-test-SECRET-8f3a91"
MODES = ("ok", "fenced", "truncated", "wrong_schema", "http500", "http429", "too_slow")


def key_of(model: str, messages: list) -> str:
    canonical = json.dumps({"model": model, "messages": messages}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def answer_for(prompt: str, salt: str) -> dict:
    task = re.search(r"# task: (\w+)", prompt).group(1)
    if task == "dialogues":
        n = int(re.search(r"Write (\d+) new", prompt).group(1))
        return {"dialogues": [{"turns": [{"role": "user", "text": f"Question {salt}-{i}?"},
                                         {"role": "character", "text": f"Answer {salt}-{i}."}]} for i in range(n)]}
    if task == "scene":
        return {"user": f"Show me {salt}", "character": "Here I am.", "thinking": f"Thinking {salt}.",
                "generation_instruction": f"A picture {salt}."}
    if task == "knowledge_open":
        n = int(re.search(r"Write (\d+) question-answer", prompt).group(1))
        return {"open": [{"question": f"Q{i} {salt}?", "answer": f"A{i}"} for i in range(n)]}
    mcq_n = int(re.search(r"(\d+) multiple-choice", prompt).group(1))
    mcq = [{"question": f"M{i} {salt}?", "options": [f"o{i}a", f"o{i}b", f"o{i}c", f"o{i}d"], "answer": i % 4}
           for i in range(mcq_n)]
    if task == "knowledge_mcq":
        return {"mcq": mcq}
    n = int(re.search(r"Write (\d+) open questions", prompt).group(1))
    return {"open": [{"question": f"V{i} {salt}?", "answer": f"It shows {i}."} for i in range(n)], "mcq": mcq}


class FakeLLM:
    """A threaded chat-completions server; `misbehave` picks the first-answer failure mode per key."""

    def __init__(self, *, misbehave: bool = True, delay: float = 0.0, always_bad: bool = False, slow: float = 2.0):
        self.counts: Counter[str] = Counter()
        self.late: Counter[str] = Counter()  # answers of a good mode that took long enough for a client to give up
        self.modes: dict[str, str] = {}
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        self.misbehave, self.delay, self.always_bad, self.slow = misbehave, delay, always_bad, slow
        self.max_requests = 400  # a runaway client cannot loop for ever
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                start = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.auth.add(self.headers.get("Authorization", ""))
                mode = fake.respond(self, body)
                if mode in ("ok", "fenced") and time.monotonic() - start > LATE_S:
                    with fake.lock:
                        fake.late[key_of(body["model"], body["messages"][:2])] += 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def respond(self, handler: BaseHTTPRequestHandler, body: dict) -> str:
        messages = body["messages"]
        key = key_of(body["model"], messages[:2])
        content = messages[1]["content"]
        prompt = content if isinstance(content, str) else content[0]["text"]
        with self.lock:
            first = self.counts[key] == 0
            self.counts[key] += 1
            if key not in self.modes:
                self.modes[key] = MODES[len(self.modes) % len(MODES)] if self.misbehave else "ok"
            mode = self.modes[key] if first else "ok"
            if sum(self.counts.values()) > self.max_requests:
                mode = "http500"
        if self.delay:
            time.sleep(self.delay)
        value = answer_for(prompt, key[:6])
        text = json.dumps(value)
        if self.always_bad:
            text = json.dumps({"unexpected": True})
        elif mode == "fenced":
            text = f"Sure! Here is the JSON:\n```json\n{json.dumps(value, indent=2)}\n```\nHope this helps."
        elif mode == "truncated":
            text = text[: len(text) // 2]
        elif mode == "wrong_schema":
            text = json.dumps({"result": value})
        elif mode in ("http500", "http429"):
            code = 500 if mode == "http500" else 429
            payload = b'{"error": {"message": "try again"}}'
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            if code == 429:
                handler.send_header("Retry-After", "0")
            handler.end_headers()
            handler.wfile.write(payload)
            return mode
        elif mode == "too_slow":
            time.sleep(self.slow)
        reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}]}).encode()
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(reply)))
            handler.end_headers()
            handler.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass
        return mode

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw(tmp_path) -> Path:
    """Raw material: a profile, 3 tiny images (one with a caption file) and 2 seed dialogues."""
    folder = tmp_path / "raw"
    (folder / "images").mkdir(parents=True)
    (folder / "profile.txt").write_text("Pip is a small brave robot who repairs lighthouses and hums sea shanties.\n")
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (16, 16), colour).save(folder / "images" / f"{i}.png")
    (folder / "images" / "0.txt").write_text("Pip on a rock, holding a wrench.")
    seeds = [[{"role": "user", "text": "Hello Pip!"}, {"role": "character", "text": "Beep! Ahoy there."}],
             {"turns": [{"role": "user", "text": "Fixed anything today?"},
                        {"role": "character", "text": "Two lamps and a very grumpy foghorn."}]}]
    (folder / "seeds.json").write_text(json.dumps(seeds))
    return folder


def build_cmd(raw: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [CMRP, "data", "build", "--profile", str(raw / "profile.txt"), "--images", str(raw / "images"),
            "--dialogues", str(raw / "seeds.json"), "--out", str(out), "--name", "Pip", "--base-url", url,
            "--model", "fake-model", "--new-dialogues", "6", "--per-request", "3", "--knowledge-open", "4",
            "--knowledge-mcq", "5", "--vqa-open", "2", "--vqa-mcq", "2", "--test-fraction", "0.25",
            "--retry-wait", "0.01", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": SECRET}


# a good answer slower than this may have been given up on by a client with `--timeout 1` (its wait starts
# before the server reads the request, so the margin is wide)
LATE_S = 0.3
ITEMS = 2 + 3 + 1 + 3 + 3  # dialogue batches, scenes, knowledge open, MCQ easy/medium/hard, VQA


def test_build_retries_bad_answers_and_validates(raw, tmp_path):
    out = tmp_path / "pip"
    with FakeLLM() as llm:
        proc = subprocess.run(build_cmd(raw, out, llm.url, "--concurrency", "3", "--timeout", "1", "--vision"),
                              capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert len(llm.counts) == ITEMS
    assert set(llm.modes.values()) == set(MODES)  # every kind of bad answer happened
    for key, mode in llm.modes.items():
        # a fenced answer is repaired locally; every other bad first answer costs exactly one more request. On a
        # loaded machine a good answer can be slow enough (LATE_S) for the client's 1 s timeout: one more each
        expected = 1 if mode in ("ok", "fenced") else 2
        assert expected <= llm.counts[key] <= expected + llm.late[key], (mode, llm.counts[key], llm.late[key])
    assert llm.auth == {f"Bearer {SECRET}"}
    assert proc.stderr.count(": done") == ITEMS and f"[{ITEMS}/{ITEMS}]" in proc.stderr
    assert proc.stdout.startswith("OK: Pip: ")
    check = subprocess.run([CMRP, "data", "validate", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.splitlines()[-1].startswith(
        "OK: Pip: 2 images, 10 scenes, 8 knowledge QA, 8 VQA, 2 T2I; test: 1 images, 1 scenes, 1 knowledge QA, "
        "4 VQA, 1 T2I; 0 warning(s)"), check.stdout
    data = json.loads((out / "train" / "data.json").read_text())
    assert [m["difficulty"] for m in data["knowledge_qa"]["mcq"]] == ["easy", "easy", "medium", "hard"]
    test_mcq = json.loads((out / "test" / "data.json").read_text())["knowledge_qa"]["mcq"]
    assert [m["difficulty"] for m in test_mcq] == ["medium"]  # every 4th MCQ is held out
    assert all(t.get("thinking") for s in data["scenes"] if s["id"].startswith("image/") for t in s["turns"][1:])
    for path in out.rglob("*"):  # the key is in no output file, cache included, nor in any output
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in proc.stdout + proc.stderr
    assert len(list((out / ".build-cache").glob("*.json"))) == ITEMS


def test_killed_build_resumes_without_repeating_finished_items(raw, tmp_path):
    out = tmp_path / "pip"
    cache = out / ".build-cache"
    with FakeLLM(misbehave=False, delay=0.25) as llm:
        proc = subprocess.Popen(build_cmd(raw, out, llm.url, "--concurrency", "1"), env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 25
        while len(list(cache.glob("*.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        finished = {p.stem for p in cache.glob("*.json")}
        assert 4 <= len(finished) < ITEMS
        before = Counter(llm.counts)
        again = subprocess.run(build_cmd(raw, out, llm.url, "--concurrency", "4"), env=env(),
                               capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"{ITEMS} items: {len(finished)} cached, {ITEMS - len(finished)} to request" in again.stderr
    second = llm.counts - before
    assert not finished & set(second), "a finished item was requested again"
    assert set(second) | finished == set(llm.counts) and len(llm.counts) == ITEMS
    check = subprocess.run([CMRP, "data", "validate", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout


def test_hopeless_answers_fail_clearly(raw, tmp_path):
    with FakeLLM(misbehave=False, always_bad=True) as llm:
        proc = subprocess.run(build_cmd(raw, tmp_path / "pip", llm.url, "--max-attempts", "2", "--concurrency", "4"),
                              capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 2
    assert "no usable answer after 2 attempts" in proc.stderr and "run the same command again" in proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr
    assert max(llm.counts.values()) == 2  # bounded retries
    assert not (tmp_path / "pip" / "character.json").exists()
