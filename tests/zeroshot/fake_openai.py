"""A fake OpenAI-compatible chat-completions server for the zero-shot tests.

``POST /v1/chat/completions`` answers with a proper ``chat.completion`` object. The answer is
computed from the prompt itself: the gene lists of the cells (``Cell i: G1, G2, ...``) are
parsed back and each cell is called sensitive (1) or resistant (0) by a deterministic rule.
Knobs: ``fail`` (statuses answered first, one per request), ``status`` (answer every request
with it, e.g. 401), ``answer`` (a function of the gene lists giving the reply text).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

CELL_LINE = re.compile(r"^Cell (\d+): (.*)$", re.MULTILINE)


def gene_lists(prompt: str) -> list[list[str]]:
    """The cells' gene lists, in order, as the fake server reads them from a prompt."""
    return [[] if genes == "(no genes detected)" else genes.split(", ") for _, genes in CELL_LINE.findall(prompt)]


def call(genes: list[str]) -> int:
    """The fake model's deterministic call for one cell: 1 (sensitive) or 0 (resistant)."""
    return int(hashlib.md5(",".join(genes).encode()).hexdigest(), 16) % 2


def good_answer(lists: list[list[str]]) -> str:
    return "{res:" + ",".join(str(call(g)) for g in lists) + "}"


class FakeOpenAI:
    def __init__(self):
        self.requests: list[dict] = []          # every request received: path, headers, body
        self.fail: list[int] = []               # statuses to answer first, one per request
        self.status: int | None = None          # answer every request with this status
        self.answer = good_answer               # gene lists -> reply text
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                    status = fake.fail.pop(0) if fake.fail else fake.status
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if status:
                    return self.reply(status, {"error": {"message": f"fake error {status}", "type": "fake",
                                                         "code": str(status)}})
                prompt = body["messages"][-1]["content"]
                text = fake.answer(gene_lists(prompt))
                self.reply(200, {
                    "id": f"chatcmpl-{len(fake.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                              "total_tokens": (len(prompt) + len(text)) // 4}})

            def reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests if r["path"] == "/v1/chat/completions"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server(monkeypatch):
    # a proxy from the environment must not sit between the client and 127.0.0.1
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = FakeOpenAI()
    yield server
    server.close()
