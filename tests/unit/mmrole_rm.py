"""Shared by the judge tests: MMRole's released reviews (fixture) and a local OpenAI-compatible chat server
(127.0.0.1, a port the OS picks) that answers as the test says, e.g. in MMRole's reward model's format."""

from __future__ import annotations

import csv
import json
import lzma
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mmrole"
MODEL = "internvl-chat-v1-5"
KINDS = ("comment", "human-role", "inter-role")
CSV_KEYS = ("Instruction Adherence", "Fluency", "Coherency", "Image-Text Relevance", "Response Accuracy",
            "Personality Consistency", "Knowledge Consistency", "Tone Consistency")

__all__ = ["CSV_KEYS", "FIXTURE", "KINDS", "MODEL", "FakeChatServer", "published", "request_parts", "reviews"]


def reviews(kind: str) -> list[dict]:
    """MMRole's released review file of the fixture model (test records, answers and "rm_review")."""
    path = FIXTURE / "eval" / "in-test_reviews" / MODEL / f"{kind}_test.json.xz"
    return json.loads(lzma.decompress(path.read_bytes()))


def published(kind: str) -> tuple[int, dict[str, float]]:
    """MMRole's published CSV for that file: (count, {metric name: score})."""
    with open(FIXTURE / "eval" / "in-test_results" / MODEL / f"{kind}_test.csv", newline="") as fh:
        head, row = list(csv.reader(fh))
    return int(row[0]), {k: float(v) for k, v in zip(head[1:], row[1:], strict=True)}


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i:text.index(end, i)]


def request_parts(body: dict) -> tuple[str, str, str, list[dict]]:
    """(question, model A's answer, metric name, image parts) of one reward-model request, read as a reader of
    MMRole's request layout would (independently of cmrp's code that builds it)."""
    content = body["messages"][1]["content"]
    text = next(part["text"] for part in content if part["type"] == "text")
    question = _between(text, "## **[Question Start]**\n\n", "\n\n## **[Question End]**")
    answer = _between(text, "## **[Model A's Response Start]**\n\n", "\n\n## **[Model A's Response End]**")
    metric = _between(text, "Please evaluate the following aspect of each model's response:\n", ":")
    return question, answer, metric, [part for part in content if part["type"] == "image_url"]


class FakeChatServer:
    """A chat-completions server on 127.0.0.1 (port chosen by the OS): `reply(body)` gives the answer's text, or
    (HTTP status, text). Every request body and Authorization header is recorded."""

    def __init__(self, reply: Callable[[dict], str | tuple[int, str]]):
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                answer = reply(body)
                status, content = (200, answer) if isinstance(answer, str) else answer
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b"server error")
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
