"""The one HTTP client the cloud platforms use: timeouts, retries, signing, error mapping.

    client = HttpClient(service="Compute Engine", sign=bearer_headers, auth_hint="...")
    body = client.request_json("GET", url)

Every attempt gets a per-call timeout. Throttling (429), server errors (5xx), timeouts and
dropped connections are retried with exponential backoff and full jitter, bounded by a number
of attempts and by an overall deadline. A cloud plugs in two hooks: `sign` is called for every
attempt afresh (signatures carry timestamps, tokens expire), and `classify` reads clouds that
report errors inside a 200 response's JSON envelope. HTTP statuses and transport failures
become errors.py's CloudError subclasses in one place, `status_error` and `_transport_error`;
messages name the method and the URL's path (and action) only, so even several of them fit
one line; the full URL, secret-looking query values redacted, goes to the debug log. Every
retry is logged at info: a wait is never silent.

Mutations are retried like reads, so callers must make them idempotent (GCE `requestId`,
Volcengine `ClientToken`). requests is imported lazily so `--help` and `status` stay fast.
"""

from __future__ import annotations

import json as jsonlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CloudTimeout,
)

if TYPE_CHECKING:
    import requests


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: at most `attempts` tries within `deadline` seconds in all."""

    attempts: int = 6
    deadline: float = 120.0
    base_delay: float = 0.5  # the first backoff is drawn from [0, base_delay]
    max_delay: float = 16.0


@dataclass(frozen=True)
class Retry:
    """A classifier's verdict that an error is transient (throttled, backend busy)."""

    error: CloudError


# sign(method, url, params, headers, body) -> headers to add to this attempt.
Signer = Callable[[str, str, Mapping[str, str], Mapping[str, str], bytes], Mapping[str, str]]
# classify(response) -> None when the response is a success.
Classifier = Callable[["requests.Response"], "CloudError | Retry | None"]

log = logging.getLogger("cocoon_net.platform.http")

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A parameter whose value is a secret. "Key" alone is not one: Tags.1.Key names a tag.
_SECRET_PARAM = re.compile(
    r"sig|token|secret|access_?key|api_?key|credential|password|auth", re.IGNORECASE
)
# Google's "the resource is busy with another change" reasons: waited out like a 503.
_NOT_READY = re.compile(r"resourceNotReady|resourceInUseByAnotherResource.*operation")


def redact_url(url: str, params: Mapping[str, str] | None = None) -> str:
    """url with params appended and secret-looking query values replaced by '***'."""
    parts = urlsplit(url)
    pairs = [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in parts.query.split("&") if p]
    pairs += list((params or {}).items())
    safe = [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(safe, safe="/:*")))


def short_url(url: str, params: Mapping[str, str]) -> str:
    """A call as messages name it: the URL's path (the last four segments at most) and, for
    action-style APIs, the action; never a query value."""
    segments = urlsplit(url).path.strip("/").split("/")
    path = "/".join(segments[-4:])
    action = params.get("Action", "")
    return f"{path} {action}".strip() if action else path


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff and Jitter"): uniform in
    [0, min(max_delay, base_delay * 2**attempt)], so retrying clients spread out."""
    return rng.uniform(0.0, min(policy.max_delay, policy.base_delay * (2**attempt)))


@dataclass
class Backoff:
    """When a client tries a call again: full-jitter waits, at most `attempts` tries, and no
    wait that would end at or past the call's deadline. Clock, sleep and the random source
    are seams for tests."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def deadline(self, policy: RetryPolicy | None = None) -> float:
        """When a call starting now must give up."""
        return self.clock() + (policy or self.policy).deadline

    def delay(
        self, attempt: int, deadline: float, policy: RetryPolicy | None = None, hint: float = 0.0
    ) -> float | None:
        """The wait before try `attempt + 1` (at least `hint`, a server's Retry-After), or
        None when the budget is spent."""
        policy = policy or self.policy
        if attempt >= policy.attempts:
            return None
        wait = max(backoff_delay(attempt - 1, policy, self.rng), hint)
        return None if self.clock() + wait >= deadline else wait


class HttpClient:
    """A requests.Session with the retry, signing and error rules above."""

    def __init__(
        self,
        *,
        service: str,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        sign: Signer | None = None,
        classify: Classifier | None = None,
        auth_hint: str = "",
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        session: requests.Session | None = None,
    ) -> None:
        self.service = service  # names the cloud API in messages, e.g. "Compute Engine"
        self.timeout = timeout
        self.backoff = Backoff(retry or RetryPolicy(), sleep, clock, rng or random.Random())
        self.sign = sign
        self.classify = classify
        self.auth_hint = auth_hint  # what role or scope to check after a 401/403
        if session is None:
            import requests

            session = requests.Session()
            session.trust_env = False  # no proxy variables between us and a metadata server
        self.session = session

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> requests.Response:
        """Send the request until it succeeds or the retry budget is spent; raise a CloudError.

        json is encoded once, so every attempt (and its signature) carries the same bytes.
        """
        import requests

        policy = retry or self.backoff.policy
        body = data if json is None else jsonlib.dumps(json, separators=(",", ":")).encode()
        base_headers = dict(headers or {})
        if json is not None:
            base_headers.setdefault("Content-Type", "application/json")
        query = dict(params or {})
        # Messages name the call briefly (one line each, even when combined); the full URL
        # goes to the debug log.
        where = f"{self.service}: {method} {short_url(url, query)}"
        deadline = self.backoff.deadline(policy)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self.backoff.clock()
            per_call = max(0.1, min(timeout or self.timeout, remaining))
            attempt_headers = dict(base_headers)
            if self.sign is not None:
                attempt_headers.update(self.sign(method, url, query, attempt_headers, body or b""))
            error: CloudError | None
            retryable: bool
            delay_hint = 0.0
            try:
                response = self.session.request(
                    method,
                    url,
                    params=query or None,
                    data=body,
                    headers=attempt_headers,
                    timeout=per_call,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                error, retryable = _transport_error(where, exc, per_call)
            else:
                error, retryable = self._judge(where, response)
                if error is None:
                    return response
                delay_hint = _retry_after(response)
            log.debug("%s %s: %s", method, redact_url(url, query), error)
            delay = self.backoff.delay(attempt, deadline, policy, delay_hint) if retryable else None
            if delay is None:
                raise error
            log.info(
                "retrying (attempt %d/%d) in %.1f s: %s",
                attempt + 1,
                policy.attempts,
                delay,
                error,
            )
            self.backoff.sleep(delay)

    def request_json(self, method: str, url: str, **kwargs: Any) -> Any:
        """request(), then the body decoded as JSON (an empty body is None)."""
        response = self.request(method, url, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            where = f"{self.service}: {method} {short_url(url, kwargs.get('params') or {})}"
            raise CloudError(f"{where}: the answer is not JSON") from None

    def _judge(self, where: str, response: requests.Response) -> tuple[CloudError | None, bool]:
        # The cloud's own verdict first, whatever the status: an error envelope says more
        # than the status (Volcengine sends its code with 400, 429 and 500 alike).
        if self.classify is not None:
            verdict = self.classify(response)
            if isinstance(verdict, Retry):
                return verdict.error, True
            if verdict is not None:
                return verdict, False
        if response.status_code >= 400:
            error = self._status_error(where, response)
            retry = response.status_code in _RETRY_STATUSES or bool(_NOT_READY.search(str(error)))
            return error, retry
        return None, False

    def _status_error(self, where: str, response: requests.Response) -> CloudError:
        return status_error(where, response.status_code, error_detail(response), self.auth_hint)


def status_error(where: str, status: int, detail: str, auth_hint: str = "") -> CloudError:
    """The one mapping from an HTTP error status (of a response, or of a failed long-running
    operation) to the CloudError an operator sees."""
    text = f"{where}: HTTP {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        if _is_quota(detail):
            return CloudQuotaError(f"{text} (raise the quota or free resources)")
        hint = auth_hint or "check the credentials' roles and scopes"
        return CloudAuthError(f"{text} (missing role or scope? {hint})")
    if status == 404:
        return CloudNotFound(text)
    if status in (409, 412):
        return CloudConflict(text)
    if status == 429 or _is_quota(detail):
        return CloudQuotaError(f"{text} (throttled or over quota; retry later)")
    return CloudError(text)


def _is_quota(detail: str) -> bool:
    return bool(re.search(r"quota|rate ?limit|limit exceeded", detail, re.IGNORECASE))


def error_detail(response: requests.Response) -> str:
    """The cloud's own one-line reason: Google's error.message (and reason), else body text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message", "")).strip()
        reasons = [
            str(e.get("reason"))
            for e in err.get("errors") or []
            if isinstance(e, dict) and e.get("reason")
        ]
        if reasons and not any(r in message for r in reasons):
            message = f"{message} [{', '.join(reasons)}]" if message else ", ".join(reasons)
        return message
    text = " ".join(response.text.split())
    return text[:200]


def _retry_after(response: requests.Response) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "0")), 60.0)
    except ValueError:
        return 0.0  # an HTTP-date: the backoff alone is fine


def _transport_error(where: str, exc: Exception, timeout: float) -> tuple[CloudError, bool]:
    """The one mapping from a requests transport failure to a CloudError; all are retryable."""
    import requests

    if isinstance(exc, requests.Timeout):
        return CloudTimeout(f"{where}: no answer within {timeout:.1f} s"), True
    if isinstance(exc, requests.ConnectionError):
        reason = str(exc.args[0]) if exc.args else type(exc).__name__
        reason = reason.split("Caused by ")[-1].strip("()")
        return CloudError(f"{where}: cannot connect ({reason[:160]})"), True
    return CloudError(f"{where}: {type(exc).__name__}: {exc}"), False
