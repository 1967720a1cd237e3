"""HttpClient against a real local HTTP server with injected faults; sleeps are recorded."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping

import pytest

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CloudTimeout,
)
from cocoon_net.platform.http import (
    Backoff,
    HttpClient,
    Retry,
    RetryPolicy,
    backoff_delay,
    redact_url,
)
from tests.emulators import EmulatorServer, Fault, Reply, Request, serve


def _echo(req: Request) -> Reply:
    return Reply(200, {"method": req.method, "path": req.path, "query": req.query})


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    with serve(_echo) as srv:
        yield srv


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(**kwargs: object) -> tuple[HttpClient, Sleeps]:
    sleeps = Sleeps()
    opts: dict[str, object] = {
        "service": "Test API",
        # Generous: a loaded machine must not turn a normal answer into a timeout (and an
        # extra attempt); the timeout tests pass their own, far below their fault's delay.
        "timeout": 10.0,
        "retry": RetryPolicy(attempts=4, deadline=30, base_delay=0.5, max_delay=4),
        "sleep": sleeps,
        "rng": random.Random(7),
    }
    opts.update(kwargs)
    return HttpClient(**opts), sleeps  # type: ignore[arg-type]


def test_success_returns_json(server: EmulatorServer) -> None:
    http, sleeps = client()
    body = http.request_json("GET", server.url + "/a/b", params={"x": "1"})
    assert body == {"method": "GET", "path": "/a/b", "query": {"x": "1"}}
    assert sleeps == []


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(server: EmulatorServer, status: int) -> None:
    server.inject(Fault(status=status, count=2))
    http, sleeps = client()
    assert http.request_json("GET", server.url + "/x")["path"] == "/x"
    assert len(server.log) == 3
    assert len(sleeps) == 2
    # full jitter: each delay lies within its exponential cap
    assert 0 <= sleeps[0] <= 0.5
    assert 0 <= sleeps[1] <= 1.0


def test_retries_stop_after_attempts_with_last_error(server: EmulatorServer) -> None:
    server.inject(Fault(status=503, count=10, body={"error": {"message": "backend busy"}}))
    http, sleeps = client()
    with pytest.raises(CloudError, match=r"^Test API: GET x: HTTP 503: backend busy$"):
        http.request("GET", server.url + "/x")
    assert len(server.log) == 4
    assert len(sleeps) == 3


def test_retries_stop_at_the_deadline(server: EmulatorServer) -> None:
    server.inject(Fault(status=500, count=10))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    policy = RetryPolicy(attempts=100, deadline=5.0, base_delay=1.0, max_delay=4.0)
    http, _ = client(sleep=sleep, clock=lambda: now[0], retry=policy)
    with pytest.raises(CloudError, match="HTTP 500"):
        http.request("GET", server.url + "/x")
    assert now[0] < 5.0
    assert 2 <= len(server.log) < 100


def test_retry_after_is_honoured(server: EmulatorServer) -> None:
    server.inject(Fault(status=429, headers={"Retry-After": "3"}))
    http, sleeps = client()
    http.request("GET", server.url + "/x")
    assert sleeps == [3.0]


@pytest.mark.parametrize(
    ("status", "kind", "text"),
    [
        (401, CloudAuthError, "missing role or scope"),
        (403, CloudAuthError, "missing role or scope"),
        (404, CloudNotFound, "HTTP 404"),
        (409, CloudConflict, "HTTP 409"),
        (412, CloudConflict, "HTTP 412"),
        (400, CloudError, "HTTP 400"),
    ],
)
def test_client_errors_are_mapped_and_not_retried(
    server: EmulatorServer, status: int, kind: type[CloudError], text: str
) -> None:
    server.inject(Fault(status=status, body={"error": {"message": "nope"}}))
    http, sleeps = client(auth_hint="grant roles/compute.networkAdmin")
    with pytest.raises(kind, match=text) as info:
        http.request("PATCH", server.url + "/thing", json={"a": 1})
    assert "nope" in str(info.value)
    assert "PATCH" in str(info.value)
    assert len(server.log) == 1
    assert sleeps == []


def test_auth_hint_is_in_the_message(server: EmulatorServer) -> None:
    server.inject(Fault(status=403, body={"error": {"message": "Required 'compute.x'"}}))
    http, _ = client(auth_hint="grant roles/compute.networkAdmin")
    with pytest.raises(CloudAuthError, match=r"grant roles/compute\.networkAdmin"):
        http.request("GET", server.url + "/x")


def test_quota_errors_are_recognised(server: EmulatorServer) -> None:
    body = {"error": {"message": "Quota 'X' exceeded", "errors": [{"reason": "quotaExceeded"}]}}
    server.inject(Fault(status=403, body=body))
    http, _ = client()
    with pytest.raises(CloudQuotaError, match="quotaExceeded"):
        http.request("GET", server.url + "/x")


def test_timeouts_are_retried_then_reported(server: EmulatorServer) -> None:
    server.inject(Fault(delay=5.0, count=1))
    http, sleeps = client(timeout=0.5)
    assert http.request_json("GET", server.url + "/x")["path"] == "/x"
    assert len(sleeps) == 1

    server.inject(Fault(delay=5.0, count=2))
    http, _ = client(timeout=0.5, retry=RetryPolicy(attempts=2, deadline=30))
    with pytest.raises(CloudTimeout, match=r"GET x: no answer within"):
        http.request("GET", server.url + "/x")


def test_dropped_connection_is_retried(server: EmulatorServer) -> None:
    server.inject(Fault(drop=True))
    http, sleeps = client()
    assert http.request_json("GET", server.url + "/x")["path"] == "/x"
    assert len(sleeps) == 1


def test_connection_refused_is_a_cloud_error() -> None:
    with serve(_echo) as srv:
        url = srv.url
    http, sleeps = client(retry=RetryPolicy(attempts=2, deadline=30))
    with pytest.raises(CloudError, match="cannot connect"):
        http.request("GET", url + "/x")
    assert len(sleeps) == 1


def test_sign_is_called_for_every_attempt(server: EmulatorServer) -> None:
    server.inject(Fault(status=500))
    calls: list[tuple[str, str, dict[str, str], bytes]] = []

    def sign(
        method: str, url: str, params: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> Mapping[str, str]:
        calls.append((method, url, dict(params), body))
        return {"Authorization": f"Sig n={len(calls)}"}

    http, _ = client(sign=sign)
    http.request("POST", server.url + "/s", params={"Action": "X"}, json={"k": "v"})
    assert [c[0] for c in calls] == ["POST", "POST"]
    assert calls[0][2] == {"Action": "X"}
    assert calls[0][3] == b'{"k":"v"}'
    assert [r.headers["authorization"] for r in server.log] == ["Sig n=1", "Sig n=2"]
    assert server.log[-1].body == b'{"k":"v"}'


def test_classifier_reads_a_json_envelope(server: EmulatorServer) -> None:
    answers = iter(
        [
            Reply(200, {"Error": {"Code": "Throttling"}}),
            Reply(200, {"Error": {"Code": "InvalidParameter"}}),
            Reply(200, {"Result": "ok"}),
        ]
    )

    def classify(response: object) -> CloudError | Retry | None:
        err = response.json().get("Error")  # type: ignore[attr-defined]
        if err is None:
            return None
        if err["Code"] == "Throttling":
            return Retry(CloudQuotaError("throttled"))
        return CloudError(err["Code"])

    with serve(lambda req: next(answers)) as srv:
        http, sleeps = client(classify=classify)
        with pytest.raises(CloudError, match="InvalidParameter"):
            http.request("GET", srv.url + "/e")
        assert len(sleeps) == 1
        assert http.request_json("GET", srv.url + "/e") == {"Result": "ok"}


def test_non_json_answer_is_a_clear_error() -> None:
    with serve(lambda req: Reply(200, "<html>")) as srv:
        http, _ = client()
        with pytest.raises(CloudError, match="not JSON"):
            http.request_json("GET", srv.url + "/x")


def test_query_secrets_are_redacted(server: EmulatorServer) -> None:
    server.inject(Fault(status=404))
    http, _ = client()
    with pytest.raises(CloudNotFound) as info:
        http.request("GET", server.url + "/x", params={"Action": "Go", "X-Signature": "abc123"})
    assert "abc123" not in str(info.value)
    assert str(info.value) == "Test API: GET x Go: HTTP 404"  # the call, never its query
    assert redact_url("http://h/p?access_token=t0k&a=1") == "http://h/p?access_token=***&a=1"
    # Tag keys are names, not secrets: the debug log shows them.
    tags = {"Tags.1.Key": "cocoon-net:node", "X-Security-Token": "s3"}
    assert redact_url("http://h/", tags) == (
        "http://h/?Tags.1.Key=cocoon-net:node&X-Security-Token=***"
    )


def test_retries_are_logged_at_info(
    server: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.inject(Fault(status=503, count=2, body={"error": {"message": "backend busy"}}))
    http, _ = client()
    with caplog.at_level(logging.INFO, logger="cocoon_net.platform.http"):
        http.request("GET", server.url + "/x")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2
    assert lines[0].startswith("retrying (attempt 2/4) in ")
    assert lines[0].endswith(" s: Test API: GET x: HTTP 503: backend busy")


def test_resource_not_ready_is_waited_out(server: EmulatorServer) -> None:
    busy = {
        "error": {
            "message": "The resource is not ready",
            "errors": [{"reason": "resourceNotReady"}],
        }
    }
    server.inject(Fault(status=400, count=2, body=busy))
    http, _ = client()
    assert http.request("GET", server.url + "/x").status_code == 200
    assert len(server.log) == 3


def test_backoff_caps() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    rng = random.Random(1)
    for attempt in range(10):
        cap = min(5.0, 2.0**attempt)
        assert all(0 <= backoff_delay(attempt, policy, rng) <= cap for _ in range(50))


def test_one_line_keeps_the_cause_and_the_advice() -> None:
    from cocoon_net.errors import MAX_LINE, one_line

    text = "first cause: " + "x" * 500 + "\n more " + "y" * 200 + " run teardown again"
    line = one_line(text)
    assert len(line) == MAX_LINE and "\n" not in line
    assert line.startswith("first cause: ") and line.endswith("run teardown again")
    assert one_line("short\n  one") == "short one"


class Highest(random.Random):
    """Draws the top of every jitter range, so a delay shows its exponential cap."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_from_the_base_until_its_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=100.0)
    assert [backoff_delay(n, policy, Highest()) for n in range(5)] == [1, 2, 4, 8, 16]
    assert backoff_delay(10, policy, Highest()) == 100.0


def test_the_first_retry_waits_at_most_the_base_delay(server: EmulatorServer) -> None:
    server.inject(Fault(drop=True, count=2))
    http, sleeps = client(rng=Highest())
    http.request("GET", server.url + "/x")
    assert sleeps == [0.5, 1.0]  # no Retry-After from a dropped connection: backoff alone


@pytest.mark.parametrize(
    ("header", "slept"), [("3600", 60.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.5)]
)
def test_retry_after_is_capped_and_a_date_leaves_the_backoff(
    server: EmulatorServer, header: str, slept: float
) -> None:
    server.inject(Fault(status=503, headers={"Retry-After": header}))
    http, sleeps = client(rng=Highest(), retry=RetryPolicy(attempts=3, deadline=600))
    http.request("GET", server.url + "/x")
    assert sleeps == [slept]


def test_a_retry_that_would_end_at_the_deadline_is_not_made(server: EmulatorServer) -> None:
    server.inject(Fault(status=503, headers={"Retry-After": "5"}))
    http, sleeps = client(clock=lambda: 100.0, retry=RetryPolicy(attempts=3, deadline=5))
    with pytest.raises(CloudError, match="HTTP 503"):
        http.request("GET", server.url + "/x")
    assert sleeps == []


def test_each_attempt_waits_no_longer_than_the_time_left(server: EmulatorServer) -> None:
    # A slow answer past the deadline is a timeout even though the per-call timeout is long.
    server.inject(Fault(delay=3.0))
    # No time passes on this clock: the one attempt has the whole 0.5 s left, no more.
    policy = RetryPolicy(attempts=1, deadline=0.5)
    http, _ = client(timeout=30.0, clock=lambda: 100.0, retry=policy)
    with pytest.raises(CloudTimeout, match=r"no answer within 0\.5 s$"):
        http.request("GET", server.url + "/x")


def test_a_calls_own_policy_replaces_the_clients_attempts_and_deadline(
    server: EmulatorServer,
) -> None:
    # The client allows 4 attempts within 30 s; a call that asks for less gets less.
    server.inject(Fault(status=503, count=10, path="/x"))
    http, sleeps = client()
    with pytest.raises(CloudError, match="HTTP 503"):
        http.request("GET", server.url + "/x", retry=RetryPolicy(attempts=2, deadline=30))
    assert len(server.log) == 2 and len(sleeps) == 1

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    server.inject(Fault(status=503, count=10, headers={"Retry-After": "1"}, path="/y"))
    http, _ = client(sleep=sleep, clock=lambda: now[0])
    own = RetryPolicy(attempts=10, deadline=2.5, base_delay=0.01)
    with pytest.raises(CloudError, match="HTTP 503"):
        http.request("GET", server.url + "/y", retry=own)
    # Tries at 0 s, 1 s and 2 s; a fourth at 3 s would be past the call's 2.5 s.
    assert [r.path for r in server.log].count("/y") == 3 and now[0] == 2.0


def test_a_backoff_without_a_call_policy_keeps_to_its_own() -> None:
    # The EC2 client's way: one policy for every call.
    now = [100.0]
    backoff = Backoff(
        RetryPolicy(attempts=3, deadline=10.0, base_delay=0.5, max_delay=8.0),
        clock=lambda: now[0],
        rng=Highest(),
    )
    deadline = backoff.deadline()
    assert deadline == 110.0
    assert [backoff.delay(n, deadline) for n in (1, 2, 3)] == [0.5, 1.0, None]
    assert backoff.delay(1, deadline, hint=5.0) == 5.0  # a server's Retry-After, if longer
    now[0] = 109.5
    assert backoff.delay(1, deadline) is None  # the wait would end at the deadline
    assert backoff.delay(1, deadline + 0.25) == 0.5


def _mirror(req: Request) -> Reply:
    return Reply(200, {"body": req.body.decode(), "type": req.headers.get("content-type", "")})


def test_a_json_body_is_sent_compact_and_typed() -> None:
    with serve(_mirror) as srv:
        http, _ = client()
        got = http.request_json("POST", srv.url + "/x", json={"a": [1, 2], "b": "c"})
        assert got == {"body": '{"a":[1,2],"b":"c"}', "type": "application/json"}
        own = http.request_json(
            "POST", srv.url + "/x", json={}, headers={"Content-Type": "application/merge"}
        )
        assert own["type"] == "application/merge"
        raw = http.request_json("POST", srv.url + "/x", data=b"plain")
        assert raw == {"body": "plain", "type": ""}


@pytest.mark.parametrize(
    ("status", "detail", "kind"),
    [
        (429, "slow down", CloudQuotaError),
        (400, "QUOTA_EXCEEDED for instances", CloudQuotaError),
        (403, "Rate Limit Exceeded", CloudQuotaError),
        (400, "bad request", CloudError),
    ],
)
def test_throttling_and_quota_are_told_apart_from_other_errors(
    server: EmulatorServer, status: int, detail: str, kind: type[CloudError]
) -> None:
    server.inject(Fault(status=status, body={"error": {"message": detail}}))
    http, _ = client(retry=RetryPolicy(attempts=1))
    with pytest.raises(CloudError) as info:
        http.request("GET", server.url + "/x")
    assert type(info.value) is kind
    assert str(info.value).startswith(f"Test API: GET x: HTTP {status}: {detail}")


def test_an_error_without_detail_says_only_its_status(server: EmulatorServer) -> None:
    server.inject(Fault(status=404, body=b""))
    http, _ = client()
    with pytest.raises(CloudNotFound) as info:
        http.request("GET", server.url + "/x")
    assert str(info.value) == "Test API: GET x: HTTP 404"


def test_a_refused_connection_names_its_reason() -> None:
    http, _ = client(retry=RetryPolicy(attempts=1))
    with pytest.raises(CloudError) as info:
        http.request("GET", "http://127.0.0.1:9/x")
    assert "cannot connect (" in str(info.value) and "Connection refused" in str(info.value)
    assert "Caused by" not in str(info.value)


def test_a_request_that_cannot_be_sent_is_not_retried() -> None:
    http, sleeps = client()
    with pytest.raises(CloudError, match=r"Test API: GET x: InvalidSchema: ") as info:
        http.request("GET", "ftp://127.0.0.1/x")
    assert sleeps == []
    assert type(info.value) is CloudError


def test_redirects_are_not_followed() -> None:
    def moved(req: Request) -> Reply:
        if req.path == "/old":
            return Reply(302, b"", headers={"Location": "/new"})
        return Reply(200, {"path": req.path})

    with serve(moved) as srv:
        http, _ = client()
        assert http.request("GET", srv.url + "/old").status_code == 302


def test_without_an_auth_hint_the_generic_one_is_given(server: EmulatorServer) -> None:
    server.inject(Fault(status=401))
    http, _ = client()
    with pytest.raises(CloudAuthError, match=r"check the credentials' roles and scopes\)$"):
        http.request("GET", server.url + "/x")


def test_a_connection_error_without_detail_is_named_by_its_type() -> None:
    import requests

    class Refusing(requests.Session):
        def request(self, *args: object, **kwargs: object) -> requests.Response:
            raise requests.ConnectionError()

    http, _ = client(session=Refusing(), retry=RetryPolicy(attempts=1))
    with pytest.raises(CloudError, match=r"cannot connect \(ConnectionError\)$"):
        http.request("GET", "http://127.0.0.1:9/x")
