"""The GCE metadata server: who this instance is, and an access token for Compute calls.

The host comes from GCE_METADATA_HOST (then the older GCE_METADATA_ROOT), as Google's own
client libraries read it, so the same binary talks to an emulator on 127.0.0.1:PORT in tests.
Every request carries `Metadata-Flavor: Google`; timeouts are short because the server is
link-local and either answers at once or is not there.

Credentials: GOOGLE_APPLICATION_CREDENTIALS (a service-account JSON, loaded by google-auth)
when set, else the instance's default service account token from the metadata server. Either
token is cached and refreshed a minute before it expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cocoon_net.errors import CloudAuthError, CloudError
from cocoon_net.platform.http import HttpClient, Retry, RetryPolicy

if TYPE_CHECKING:
    import requests

ENV_METADATA_HOST = "GCE_METADATA_HOST"
ENV_METADATA_ROOT = "GCE_METADATA_ROOT"  # the legacy name google-auth still honours
ENV_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS"
DEFAULT_METADATA_HOST = "metadata.google.internal"
FLAVOR = {"Metadata-Flavor": "Google"}
COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
_REFRESH_MARGIN = 60.0  # seconds before expiry at which a cached token is replaced


def metadata_host(environ: Mapping[str, str]) -> str:
    return environ.get(ENV_METADATA_HOST) or environ.get(ENV_METADATA_ROOT) or DEFAULT_METADATA_HOST


def metadata_url(environ: Mapping[str, str], path: str = "") -> str:
    return f"http://{metadata_host(environ)}/computeMetadata/v1/{path}"


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    zone: str
    project: str  # the textual project id (the number in the zone path is not accepted)
    mac: str  # nic0's MAC, to find the host interface
    mtu: int | None  # nic0's MTU (1460 on most GCE networks)

    @property
    def region(self) -> str:
        return region_of(self.zone)


def region_of(zone: str) -> str:
    """us-central1-a → us-central1."""
    region, dash, suffix = zone.rpartition("-")
    if not dash or not region or not suffix:
        raise CloudError(f"malformed GCE zone {zone!r}: expected <region>-<letter>")
    return region


class Metadata:
    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        timeout: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = metadata_url(environ)
        self._clock = clock
        self.http = HttpClient(
            service="GCE metadata",
            timeout=timeout,
            retry=RetryPolicy(attempts=3, deadline=10.0, base_delay=0.2, max_delay=1.0),
            sleep=sleep,
            clock=clock,
        )
        self._token: tuple[str, float] | None = None

    def get(self, path: str) -> str:
        response = self.http.request("GET", self.base + path, headers=FLAVOR)
        return response.text.strip()

    def instance(self) -> InstanceInfo:
        zone = self.get("instance/zone").rsplit("/", 1)[-1]  # projects/<num>/zones/<zone>
        mtu = self.get("instance/network-interfaces/0/mtu")
        return InstanceInfo(
            name=self.get("instance/name"),
            zone=zone,
            project=self.get("project/project-id"),
            mac=self.get("instance/network-interfaces/0/mac").lower(),
            mtu=int(mtu) if mtu.isdigit() else None,
        )

    def token(self) -> str:
        """The default service account's access token, cached until a minute before expiry."""
        now = self._clock()
        if self._token is not None and now < self._token[1] - _REFRESH_MARGIN:
            return self._token[0]
        body = self.http.request_json(
            "GET", self.base + "instance/service-accounts/default/token", headers=FLAVOR
        )
        token, expires_in = _parse_token(body)
        self._token = (token, now + expires_in)
        return token

    def forget(self) -> None:
        """Drop the cached token: the server refused it before its announced expiry."""
        self._token = None


def _parse_token(body: Any) -> tuple[str, float]:
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise CloudAuthError(
            "GCE metadata: the service-account token answer has no access_token "
            "(is a service account attached to this VM?)"
        )
    return body["access_token"], float(body.get("expires_in") or 0)


class FileCredentials:
    """A service-account JSON key (GOOGLE_APPLICATION_CREDENTIALS) as a token source.

    Only the service_account type is accepted: it is what a node uses off the metadata path,
    and loading by explicit type keeps an unexpected credential configuration from running.
    """

    def __init__(self, path: str) -> None:
        from google.auth import exceptions
        from google.oauth2 import service_account

        try:
            creds = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                path, scopes=[COMPUTE_SCOPE]
            )
        except (exceptions.GoogleAuthError, OSError, ValueError, KeyError) as exc:
            raise CloudAuthError(
                f"{ENV_CREDENTIALS}={path}: not a usable service-account key ({exc})"
            ) from None
        self._creds = creds

    def token(self) -> str:
        import google.auth.transport.requests
        from google.auth import exceptions

        creds = self._creds
        if not creds.valid:  # google-auth treats a token near expiry as invalid
            try:
                creds.refresh(google.auth.transport.requests.Request())
            except exceptions.GoogleAuthError as exc:
                raise CloudAuthError(f"refresh credentials from {ENV_CREDENTIALS}: {exc}") from None
        return str(creds.token)

    def forget(self) -> None:
        self._creds.token = None  # not valid any more: the next token() refreshes


class TokenSource(Protocol):
    def token(self) -> str: ...

    def forget(self) -> None: ...


def token_source(environ: Mapping[str, str], metadata: Metadata) -> TokenSource:
    """Application default credentials in the order that matters on a node: an explicit
    credentials file first, then the instance's own service account."""
    path = environ.get(ENV_CREDENTIALS, "")
    if path:
        return FileCredentials(path)
    return metadata


class BearerAuth:
    """Signs every attempt with a current token. A 401 means the server no longer takes the
    cached one (revoked, or expired early): it is dropped and the request tried once more
    with a fresh one; a second 401 in a row is reported as it is."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source
        self._refreshed = False

    def sign(self, *_: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._source.token()}"}

    def classify(self, response: requests.Response) -> CloudError | Retry | None:
        if response.status_code != 401:
            self._refreshed = False
            return None
        if self._refreshed:
            return None  # the status mapping reports it (CloudAuthError)
        self._refreshed = True
        self._source.forget()
        return Retry(CloudAuthError("the access token was refused; fetching a new one"))
