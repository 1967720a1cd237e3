"""Talking to Volcengine without the `ve` CLI: credentials, instance metadata, the VPC OpenAPI.

Every VPC action is `GET <endpoint>/?Action=<A>&Version=2020-04-01&<params>`, signed with
volc_sign.sign on every attempt. Answers come in one envelope::

    {"ResponseMetadata": {"RequestId": "...", "Action": "CreateSubnet",
                          "Error": {"Code": "InsufficientIpInSubnet", "Message": "..."}},
     "Result": {...}}

`classify` turns the envelope's error code into the matching CloudError (or a retry for
throttling and server trouble); platform/http.py does the retrying. Creates carry a
`ClientToken` chosen once per logical create, so a retry after a lost answer returns the
resource the first attempt made instead of making a second one.

Endpoints come from configuration only: tests point all of them at an
emulator on loopback.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CloudTimeout,
)
from cocoon_net.platform.http import HttpClient, Retry, RetryPolicy
from cocoon_net.platform.volc_sign import Credentials, sign

if TYPE_CHECKING:
    import requests

API_VERSION = "2020-04-01"
DEFAULT_ENDPOINT = "https://open.volcengineapi.com"
DEFAULT_METADATA_URL = "http://100.96.0.96/latest/meta-data"

ENV_ACCESS_KEY = "VOLCENGINE_ACCESS_KEY_ID"
ENV_SECRET_KEY = "VOLCENGINE_SECRET_ACCESS_KEY"
ENV_SESSION_TOKEN = "VOLCENGINE_SESSION_TOKEN"
ENV_REGION = "VOLCENGINE_REGION"
ENV_CONFIG = "COCOON_NET_VOLCENGINE_CONFIG"
ENV_ENDPOINT = "COCOON_NET_VOLCENGINE_ENDPOINT"
ENV_METADATA_URL = "COCOON_NET_VOLCENGINE_METADATA_URL"
ENV_ROLE = "VOLCENGINE_ECS_METADATA"  # the instance role's name, as Volcengine's SDKs read it

# Instance-role credentials on the metadata server, as Volcengine's SDKs fetch them: a
# session token first (IMDSv2-style; servers without it answer without one), the role's
# name when not configured, then its temporary keys, replaced this long before they expire.
IMDS_TOKEN_PATH = "/latest/api/token"
IMDS_TOKEN_TTL_HEADER = "X-volc-ecs-metadata-token-ttl-seconds"
IMDS_TOKEN_HEADER = "X-volc-ecs-metadata-token"
IMDS_ROLE_PATH = "/volcstack/latest/iam/security_credentials"
ROLE_REFRESH_MARGIN = 300.0
# The metadata server is on the instance's own link: it answers at once or not at all.
METADATA_RETRY = RetryPolicy(attempts=3, deadline=10.0, base_delay=0.2)

_AUTH_HINT = (
    "check VOLCENGINE_ACCESS_KEY_ID / VOLCENGINE_SECRET_ACCESS_KEY or ~/.volcengine/config.json, "
    "and that the key may use the VPC API"
)

# Error codes by what the caller can do about them. Volcengine names codes "<Kind>" or
# "<Kind>.<Resource>" (e.g. "QuotaExceeded.NetworkInterface"), so prefixes are matched too.
_RETRY_CODES = (
    "AccountFlowLimitExceeded",
    "FlowLimitExceeded",
    "Throttling",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
    "InternalServiceError",
    "InternalServiceTimeout",
)
_AUTH_CODES = (
    "InvalidAccessKey",
    "SignatureDoesNotMatch",
    "InvalidAuthorization",
    "MissingAuthenticationToken",
    "InvalidSecurityToken",
    "InvalidCredential",
    "AccessDenied",
    "Forbidden",
)
_QUOTA_CODES = ("QuotaExceeded", "LimitExceeded", "InsufficientIpInSubnet", "InsufficientBalance")
_CONFLICT_MARKS = ("Conflict", "InvalidStatus", "InUse", "DependencyViolation", "OperationDenied")

T = TypeVar("T")


# --- credentials and settings -------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    endpoint: str
    metadata_url: str
    config_path: Path


def settings(environ: Mapping[str, str]) -> Settings:
    config = environ.get(ENV_CONFIG) or str(Path.home() / ".volcengine" / "config.json")
    return Settings(
        endpoint=(environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/"),
        metadata_url=(environ.get(ENV_METADATA_URL) or DEFAULT_METADATA_URL).rstrip("/"),
        config_path=Path(config),
    )


def load_credentials(environ: Mapping[str, str], config_path: Path) -> Credentials | None:
    """Each field from the environment first, then from config.json (keys access_key_id,
    secret_access_key, session_token, region). A region in the file still counts when the
    keys come from the environment. region may stay empty: the caller then takes it from
    instance metadata. None when neither holds keys: the instance role is asked then."""
    file_values: dict[str, Any] = {}
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise CloudAuthError(f"cannot read {config_path}: {exc.strerror}") from None
    if text.strip():
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CloudAuthError(
                f"{config_path} is not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        if not isinstance(loaded, dict):
            raise CloudAuthError(f"{config_path}: expected a JSON object")
        file_values = loaded

    def pick(env_name: str, key: str) -> str:
        return (environ.get(env_name) or str(file_values.get(key) or "")).strip()

    access_key = pick(ENV_ACCESS_KEY, "access_key_id")
    secret_key = pick(ENV_SECRET_KEY, "secret_access_key")
    if not access_key or not secret_key:
        return None
    return Credentials(
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=pick(ENV_REGION, "region"),
        session_token=pick(ENV_SESSION_TOKEN, "session_token"),
    )


class InstanceRole:
    """The instance role's temporary keys from the metadata server, cached and fetched
    again ROLE_REFRESH_MARGIN seconds before they expire (and once more when refused)."""

    def __init__(
        self,
        metadata_url: str,
        region: str,
        role: str = "",
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # metadata_url ends in /latest/meta-data; the role's paths hang off its root
        self.root = metadata_url.removesuffix("/latest/meta-data")
        self.region = region
        self.role = role
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[Credentials, float] | None = None
        self._http = HttpClient(
            service="Volcengine metadata",
            timeout=2.0,
            retry=retry or METADATA_RETRY,
        )

    def __call__(self) -> Credentials:
        with self._lock:  # ENI threads sign concurrently: one fetch serves them all
            now = self._clock()
            if self._cached is None or now >= self._cached[1] - ROLE_REFRESH_MARGIN:
                self._cached = self._fetch(now)
            return self._cached[0]

    def _fetch(self, now: float) -> tuple[Credentials, float]:
        headers = imds_session(self._http, self.root)
        if not self.role:
            try:
                names = self._http.request_json(
                    "GET", self.root + IMDS_ROLE_PATH, params={"type": "user", "format": "json"},
                    headers=headers,
                )  # fmt: skip
            except CloudNotFound:
                names = []
            found = names if isinstance(names, list) else [(names or {}).get("RoleName")]
            if not found or not found[0]:
                raise CloudAuthError(
                    f"no Volcengine credentials: set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
                    f"(or write them to the config file), or attach an instance role"
                )
            self.role = str(found[0])
        body = self._http.request_json(
            "GET", f"{self.root}{IMDS_ROLE_PATH}/{self.role}", headers=headers
        )
        try:
            creds = Credentials(
                access_key_id=str(body["AccessKeyId"]),
                secret_access_key=str(body["SecretAccessKey"]),
                region=self.region,
                session_token=str(body["SessionToken"]),
            )
            expires = datetime.strptime(str(body["ExpiredTime"]), "%Y-%m-%dT%H:%M:%S%z")
        except (KeyError, TypeError, ValueError):
            raise CloudAuthError(
                f"Volcengine metadata: the keys of instance role {self.role} are incomplete"
            ) from None
        return creds, expires.timestamp()


def imds_session(http: HttpClient, root: str) -> dict[str, str]:
    """The IMDSv2-style session header, or none where the server has no tokens."""
    try:
        response = http.request(
            "PUT",
            root + IMDS_TOKEN_PATH,
            headers={IMDS_TOKEN_TTL_HEADER: "21600"},
            retry=RetryPolicy(attempts=2, deadline=5.0, base_delay=0.2),
        )
    except (CloudNotFound, CloudAuthError):
        return {}
    except CloudError as exc:
        if "HTTP 405" in str(exc) or "HTTP 400" in str(exc):
            return {}
        raise
    return {IMDS_TOKEN_HEADER: response.text.strip()}


# --- instance metadata --------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    vpc_id: str
    zone: str
    region: str  # the zone without its last "-x" (cn-beijing-a -> cn-beijing)
    mac: str  # the primary NIC's; "" when the metadata server does not publish it


def region_of(zone: str) -> str:
    # The Go tool panicked on a zone without a dash (commit 13d603f); here it is an error.
    region, dash, _ = zone.rpartition("-")
    if not dash or not region:
        raise CloudError(f"Volcengine metadata: cannot derive a region from zone {zone!r}")
    return region


def read_metadata(base_url: str, *, retry: RetryPolicy | None = None) -> InstanceInfo:
    """The instance's identity from 100.96.0.96. A non-200 answer or an empty body is an
    error, never a value (the Go tool once accepted error pages)."""
    http = HttpClient(
        service="Volcengine metadata",
        timeout=2.0,
        retry=retry or METADATA_RETRY,
    )
    # a server that wants a session token wants it here too
    headers = imds_session(http, base_url.removesuffix("/latest/meta-data"))
    try:

        def get(path: str) -> str:
            text = http.request("GET", f"{base_url}/{path}", headers=headers).text.strip()
            if not text:
                raise CloudError(f"Volcengine metadata: {base_url}/{path} answered an empty body")
            return text

        zone = get("placement/availability-zone")
        try:
            mac = get("mac").lower()
        except CloudNotFound:
            mac = ""  # only shown by status; ENIs are told apart by their Type
        return InstanceInfo(
            instance_id=get("instance-id"),
            vpc_id=get("vpc-id"),
            zone=zone,
            region=region_of(zone),
            mac=mac,
        )
    finally:
        http.close()


# --- the envelope -------------------------------------------------------------------------


def _matches(code: str, names: Sequence[str]) -> bool:
    return any(code == name or code.startswith(name + ".") for name in names)


def envelope_error(action: str, code: str, message: str) -> CloudError | Retry:
    """The one mapping from a Volcengine error code to what we raise or retry."""
    text = f"Volcengine VPC {action}: {code}: {message}".rstrip(": ")
    if _matches(code, _RETRY_CODES):
        return Retry(CloudError(text))
    if _matches(code, _AUTH_CODES):
        return CloudAuthError(f"{text} ({_AUTH_HINT})")
    if code == "InsufficientIpInSubnet":
        return CloudQuotaError(
            f"{text} (the subnet is full: free addresses or delete orphaned ENIs in it)"
        )
    if _matches(code, _QUOTA_CODES):
        return CloudQuotaError(f"{text} (raise the quota or free resources)")
    if "NotFound" in code:
        return CloudNotFound(text)
    if any(mark in code for mark in _CONFLICT_MARKS):
        return CloudConflict(text)
    return CloudError(text)


def classify(response: requests.Response) -> CloudError | Retry | None:
    """Read the envelope of any answer; None for a success."""
    try:
        body = response.json()
    except ValueError:
        body = None
    meta = body.get("ResponseMetadata") if isinstance(body, dict) else None
    error = meta.get("Error") if isinstance(meta, dict) else None
    action = str(meta.get("Action", "")) if isinstance(meta, dict) else ""
    if isinstance(error, dict) and error.get("Code"):
        return envelope_error(action, str(error["Code"]), str(error.get("Message", "")))
    if response.status_code >= 400:
        return None  # not an envelope: http.py's status mapping applies
    if not isinstance(body, dict) or not isinstance(body.get("Result"), dict | None):
        return CloudError(f"Volcengine VPC {action}: the answer is not an OpenAPI envelope")
    return None


# --- parameters ---------------------------------------------------------------------------


def indexed(name: str, values: Sequence[str]) -> dict[str, str]:
    """A list parameter as OpenAPI query keys: Name.1, Name.2, ..."""
    return {f"{name}.{i}": value for i, value in enumerate(values, start=1)}


def tag_params(tags: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, (key, value) in enumerate(sorted(tags.items()), start=1):
        out[f"Tags.{i}.Key"] = key
        out[f"Tags.{i}.Value"] = value
    return out


def tag_filter_params(tags: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, (key, value) in enumerate(sorted(tags.items()), start=1):
        out[f"TagFilters.{i}.Key"] = key
        out[f"TagFilters.{i}.Values.1"] = value
    return out


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(tag.get("Key")): str(tag.get("Value", ""))
        for tag in resource.get("Tags") or ()
        if isinstance(tag, dict)
    }


# --- the client ---------------------------------------------------------------------------


class VpcApi:
    """Signed calls to the VPC OpenAPI; each returns the envelope's Result."""

    PAGE_SIZE = 100  # the API's maximum for Describe* actions

    def __init__(
        self,
        endpoint: str,
        creds: Credentials | Callable[[], Credentials],
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.endpoint = endpoint
        # fixed keys, or a source of temporary ones asked at every signature
        self._creds = creds if callable(creds) else (lambda: creds)
        self._clock = clock
        self._http = HttpClient(
            service="Volcengine VPC",
            retry=retry,
            sign=self._sign,
            classify=classify,
            auth_hint=_AUTH_HINT,
        )

    def _sign(
        self,
        method: str,
        url: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Mapping[str, str]:
        return sign(method, url, params, headers, body, self._creds(), self._clock())

    def close(self) -> None:
        self._http.close()

    def call(self, action: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        query = {"Action": action, "Version": API_VERSION, **(params or {})}
        body = self._http.request_json("GET", self.endpoint + "/", params=query)
        result = body.get("Result") if isinstance(body, dict) else None
        return result if isinstance(result, dict) else {}

    def create(self, action: str, params: Mapping[str, str]) -> dict[str, Any]:
        """A create: one ClientToken for all retries of this call, so a retried create whose
        first answer was lost returns the same resource (Volcengine idempotence contract)."""
        return self.call(action, {**params, "ClientToken": str(uuid.uuid4())})

    def pages(self, action: str, params: Mapping[str, str], key: str) -> Iterator[dict[str, Any]]:
        """Every item of a listing, following NextToken when the API gives one and
        PageNumber/TotalCount otherwise (the Go tool read only the first 100)."""
        page = 1
        token = ""
        seen = 0
        while True:
            query = {**params, "PageSize": str(self.PAGE_SIZE)}
            if token:
                query["NextToken"] = token
            else:
                query["PageNumber"] = str(page)
            result = self.call(action, query)
            items = [item for item in result.get(key) or () if isinstance(item, dict)]
            yield from items
            seen += len(items)
            token = str(result.get("NextToken") or "")
            if token:
                continue
            total = int(result.get("TotalCount") or 0)
            if not items or seen >= total:
                return
            page += 1


# --- waiting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollPolicy:
    """How to wait for an asynchronous change: first look after `first`, then back off by
    `factor` up to `interval`, giving up after `timeout` seconds."""

    timeout: float = 180.0
    first: float = 0.2
    interval: float = 2.0
    factor: float = 1.5
    typical_scale: float = 1.0  # multiplies the cloud's typical times (tests shrink them)


def wait_for(
    fetch: Callable[[], T],
    done: Callable[[T], bool],
    *,
    what: str,
    policy: PollPolicy,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """fetch() until done(value), polling instead of the Go tool's fixed sleeps (§9.7 #39).
    done may raise to stop early (an attach that fell back to Available)."""
    deadline = clock() + policy.timeout
    delay = policy.first
    while True:
        value = fetch()
        if done(value):
            return value
        if clock() + delay > deadline:
            raise CloudTimeout(f"{what}: still not done after {policy.timeout:.0f} s")
        sleep(delay)
        delay = min(policy.interval, delay * policy.factor)
