"""The EC2 instance metadata service, IMDSv2 first.

    PUT  /latest/api/token   X-aws-ec2-metadata-token-ttl-seconds: 21600  -> token
    GET  /latest/meta-data/instance-id   X-aws-ec2-metadata-token: <token>

The token's answer leaves the instance with an IP hop limit (1 by default on older
instances): a process one hop further, in a container's own network namespace, never gets it.
So a token PUT that times out is retried as IMDSv1 (no token); an instance that requires
IMDSv2 then answers 401, and the error names the hop limit. Plain urllib without proxies: no
cloud library is loaded to read metadata. The endpoint is the SDK's own setting,
AWS_EC2_METADATA_SERVICE_ENDPOINT.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from cocoon_net.errors import CloudError

log = logging.getLogger("cocoon_net.platform.aws")

ENV_ENDPOINT = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TIMEOUT = 2.0

HOP_LIMIT_HINT = (
    "if cocoon-net runs in a container, the token's answer is dropped by the instance's "
    "metadata hop limit: raise it (aws ec2 modify-instance-metadata-options "
    "--http-put-response-hop-limit 2) or run in the host's network namespace"
)


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str
    zone: str
    mac: str  # the primary ENI's
    vpc_id: str


def endpoint(environ: Mapping[str, str]) -> str:
    return (environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")


def _open(request: urllib.request.Request, timeout: float) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        data: bytes = response.read(65536)
        return data


def token(base: str, timeout: float = TIMEOUT) -> str:
    """An IMDSv2 session token; raises OSError/URLError when none comes back."""
    request = urllib.request.Request(
        base + TOKEN_PATH, method="PUT", headers={TOKEN_TTL_HEADER: "21600"}
    )
    return _open(request, timeout).decode().strip()


class Metadata:
    """Reads metadata paths with one token (or none, after the IMDSv1 fallback)."""

    def __init__(self, base: str, *, timeout: float = TIMEOUT) -> None:
        self.base = base
        self.timeout = timeout
        self._token: str | None = None
        self._token_failure = ""

    def _headers(self) -> dict[str, str]:
        if self._token is None and not self._token_failure:
            try:
                self._token = token(self.base, self.timeout)
            except urllib.error.HTTPError as exc:
                self._token_failure = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                self._token_failure = str(getattr(exc, "reason", exc)) or type(exc).__name__
            if self._token_failure:
                log.warning(
                    "IMDSv2 token request to %s failed (%s); trying IMDSv1",
                    self.base,
                    self._token_failure,
                )
        return {TOKEN_HEADER: self._token} if self._token else {}

    def get(self, path: str) -> str:
        url = f"{self.base}/latest/meta-data/{path}"
        request = urllib.request.Request(url, headers=self._headers())
        try:
            return _open(request, self.timeout).decode().strip()
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and self._token_failure:
                raise CloudError(
                    f"instance metadata {url}: IMDSv2 is required but the token request "
                    f"failed ({self._token_failure}); {HOP_LIMIT_HINT}"
                ) from None
            raise CloudError(f"instance metadata {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CloudError(
                f"instance metadata {url}: {reason} (is this an EC2 instance? "
                f"{ENV_ENDPOINT} overrides the endpoint)"
            ) from None


def read_identity(base: str, *, timeout: float = TIMEOUT) -> Identity:
    md = Metadata(base, timeout=timeout)
    mac = md.get("mac").lower()
    return Identity(
        instance_id=md.get("instance-id"),
        region=md.get("placement/region"),
        zone=md.get("placement/availability-zone"),
        mac=mac,
        vpc_id=md.get(f"network/interfaces/macs/{mac}/vpc-id"),
    )
