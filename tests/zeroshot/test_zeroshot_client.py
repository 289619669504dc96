"""The chat client against a fake OpenAI-compatible server: requests, retries, errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from fake_openai import fake_server  # noqa: F401  (fixture)
from scdrugmap.errors import UserError
from scdrugmap.zeroshot.client import ChatClient, host_of

MESSAGES = [{"role": "user", "content": "Cell 1: EGFR, KRT18\nCell 2: MALAT1"}]


def client(server, **kw):
    return ChatClient("gpt-4o-mini", base_url=server.url, api_key="sk-test", **{"retry_delay": 0.01, **kw})


def test_request_is_a_chat_completion_at_temperature_zero(fake_server):
    answer = client(fake_server).complete(MESSAGES)
    assert answer.startswith("{res:") and answer.count(",") == 1
    [request] = fake_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test"
    assert request["body"]["model"] == "gpt-4o-mini" and request["body"]["temperature"] == 0
    assert request["body"]["messages"] == MESSAGES


@pytest.mark.parametrize("failures", [[429, 429], [500, 503], [429, 502, 429]])
def test_transient_errors_are_retried_with_backoff(fake_server, failures):
    fake_server.fail = list(failures)
    c = client(fake_server, retries=3)
    waits = []

    class Recorded(threading.Event):                        # the back-off's waits, recorded, not slept
        def wait(self, timeout=None):
            waits.append(timeout)
            return False

    c.stop = Recorded()
    assert c.complete(MESSAGES).startswith("{res:")
    assert len(fake_server.requests) == len(failures) + 1
    assert waits == [0.01 * 2 ** i for i in range(len(failures))]      # 0.01 s, 0.02 s, 0.04 s


def test_retries_run_out_with_one_line_error(fake_server):
    fake_server.fail = [429] * 5
    with pytest.raises(UserError, match="answered 429 after 3 tries") as e:
        client(fake_server, retries=2).complete(MESSAGES)
    assert "\n" not in str(e.value) and len(fake_server.requests) == 3


@pytest.mark.parametrize("status, match", [(401, "refused the API key"), (403, "refused the API key"),
                                           (404, "--model"), (400, "answered 400")])
def test_client_errors_are_not_retried(fake_server, status, match):
    fake_server.status = status
    with pytest.raises(UserError, match=match) as e:
        client(fake_server).complete(MESSAGES)
    assert len(fake_server.requests) == 1 and "\n" not in str(e.value) and "sk-test" not in str(e.value)


def test_unreachable_server_after_retries():
    with socket.socket() as s:                              # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ChatClient("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", retries=2, retry_delay=0.01)
    with pytest.raises(UserError, match=f"cannot reach 127.0.0.1:{port}.*after 3 tries"):
        c.complete(MESSAGES)


def test_missing_key_and_missing_package(monkeypatch, fake_server):
    with pytest.raises(UserError, match="no API key"):
        ChatClient("m", base_url=fake_server.url, api_key=None)
    monkeypatch.setitem(sys.modules, "openai", None)        # as if not installed
    with pytest.raises(UserError, match=r"pip install 'scdrugmap\[zeroshot\]'"):
        ChatClient("m", base_url=fake_server.url, api_key="k")


def test_host_never_shows_credentials_or_path():
    assert host_of(None) == "api.openai.com"
    assert host_of("http://user:secret@10.0.0.5:8000/v1") == "10.0.0.5:8000"
    assert host_of("https://api.example.org/openai/v1") == "api.example.org"


def test_core_commands_do_not_import_openai():
    code = ("import sys; import scdrugmap.cli, scdrugmap.zeroshot, scdrugmap.probe.run; "
            "assert 'openai' not in sys.modules, 'openai imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
