"""A chat-completions client for any OpenAI-compatible endpoint, with retries.

The ``openai`` SDK is imported only when a request has to be sent, so the core install (and
a zero-shot rerun answered entirely from the cache) works without it. Retries are our own
loop (the SDK's are switched off) so that the back-off is a parameter: 429, 408, 409, 5xx
and connection errors are retried after ``retry_delay * 2**attempt`` seconds (or the
server's ``Retry-After``, when it asks for longer, up to a minute); anything else, or the
last failure, becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

from ..errors import UserError

DEFAULT_HOST = "api.openai.com"
RETRYABLE = {408, 409, 429}
MAX_RETRY_AFTER = 60.0
INSTALL_HINT = "pip install 'scdrugmap[zeroshot]'"


def import_openai():
    try:
        import openai
    except ImportError:
        raise UserError(f"zero-shot needs the openai package: {INSTALL_HINT}") from None
    return openai


def host_of(base_url: str | None) -> str:
    """Host (and port) of the endpoint, for records and messages: never the path or credentials."""
    if not base_url:
        return DEFAULT_HOST
    parts = urlsplit(base_url)
    host = parts.hostname or base_url
    return f"{host}:{parts.port}" if parts.port else host


class ChatClient:
    """``complete(messages)`` returns the answer text; thread-safe (one SDK client, shared)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, retries: int = 5,
                 retry_delay: float = 1.0, timeout: float = 120.0):
        openai = import_openai()
        if not api_key:
            raise UserError("no API key: pass --api-key or set OPENAI_API_KEY (an endpoint that needs no key "
                            "accepts any value, e.g. --api-key none)")
        self.openai = openai
        self.model = model
        self.host = host_of(base_url)
        self.retries = retries
        self.retry_delay = retry_delay
        self.stop = threading.Event()          # set on a fatal error: other threads give up at once
        self._client = openai.OpenAI(base_url=base_url or None, api_key=api_key, max_retries=0, timeout=timeout)

    def complete(self, messages: list[dict]) -> str:
        openai = self.openai
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise UserError("cancelled after another request failed")
            try:
                response = self._client.chat.completions.create(model=self.model, messages=messages,
                                                                temperature=0)
            except openai.APIStatusError as e:
                if not (e.status_code in RETRYABLE or e.status_code >= 500) or attempt == self.retries:
                    raise self._status_error(e, attempt) from None
                wait = max(self.retry_delay * 2 ** attempt, _retry_after(e.response))
            except openai.APIConnectionError as e:
                if attempt == self.retries:
                    raise UserError(f"cannot reach {self.host} ({_first_line(e)}) after {attempt + 1} tries: "
                                    "check --base-url and the network") from None
                wait = self.retry_delay * 2 ** attempt
            except openai.OpenAIError as e:
                raise UserError(f"{self.host} did not answer with a chat completion ({_first_line(e)}): "
                                "check --base-url (it should end in /v1 for most servers)") from None
            else:
                return _content(response, self.host)
            if self.stop.wait(wait):
                raise UserError("cancelled after another request failed")
        raise AssertionError("unreachable")

    def _status_error(self, e, attempt: int) -> UserError:
        code, what = e.status_code, _first_line(e)
        if code in (401, 403):
            return UserError(f"{self.host} refused the API key ({code}: {what}): check --api-key or OPENAI_API_KEY")
        if code == 404:
            return UserError(f"{self.host} answered 404 ({what}): check --model {self.model!r} and --base-url "
                             "(it should end in /v1 for most servers)")
        tries = f" after {attempt + 1} tries" if attempt else ""
        return UserError(f"{self.host} answered {code}{tries} ({what}): check --model and --base-url, "
                         "or retry later")


def _content(response, host: str) -> str:
    choices = getattr(response, "choices", None)
    if choices is None:
        raise UserError(f"{host} did not answer with a chat completion: check --base-url "
                        "(it should end in /v1 for most servers)")
    if not choices:
        return ""
    return choices[0].message.content or ""


def _retry_after(response) -> float:
    try:
        value = float(response.headers.get("retry-after", "0"))
    except (AttributeError, TypeError, ValueError):
        return 0.0
    return min(max(value, 0.0), MAX_RETRY_AFTER)


def _first_line(err: Exception) -> str:
    text = " ".join(str(err).split()).strip()
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)
