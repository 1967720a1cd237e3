"""Which cloud is this node on? Ask each metadata server at once, briefly.

Only init and adopt detect, and only without --platform; status, teardown and the daemon use
the platform recorded in pool.json. A probe is a hit only when the server answers 200 and, for
GCE, echoes `Metadata-Flavor: Google` (a captive portal or proxy answering any URL is not
GCE). EC2's probe is IMDSv2's token PUT, which an instance answers even when it refuses plain
IMDSv1 GETs. The probes run in parallel threads with a 2 s timeout, so a node on no cloud
waits 2 s, not 6. Plain urllib without proxies: no cloud library is loaded to find out.

Endpoints follow configuration only: GCE_METADATA_HOST (as Google's libraries read it),
COCOON_NET_VOLCENGINE_METADATA_URL and AWS_EC2_METADATA_SERVICE_ENDPOINT (as the AWS SDK
reads it).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cocoon_net.errors import UsageError
from cocoon_net.platform.aws import imds
from cocoon_net.platform.gce_metadata import FLAVOR, metadata_url

ENV_VOLCENGINE_METADATA_URL = "COCOON_NET_VOLCENGINE_METADATA_URL"
DEFAULT_VOLCENGINE_METADATA_URL = "http://100.96.0.96/latest/meta-data"
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Probe:
    platform: str
    url: str
    headers: Mapping[str, str]
    accept: Callable[[Mapping[str, str]], bool]  # judges the answer's headers
    method: str = "GET"


@dataclass(frozen=True)
class Outcome:
    platform: str
    url: str
    hit: bool
    detail: str  # why not, for the error message


def probes(environ: Mapping[str, str]) -> list[Probe]:
    volc = environ.get(ENV_VOLCENGINE_METADATA_URL) or DEFAULT_VOLCENGINE_METADATA_URL
    return [
        Probe(
            "gke",
            metadata_url(environ, "instance/zone"),
            FLAVOR,
            lambda headers: headers.get("Metadata-Flavor") == "Google",
        ),
        Probe("volcengine", volc.rstrip("/") + "/instance-id", {}, lambda headers: True),
        Probe(
            "aws",
            imds.endpoint(environ) + imds.TOKEN_PATH,
            {imds.TOKEN_TTL_HEADER: "60"},
            lambda headers: True,
            method="PUT",
        ),
    ]


def run_probe(probe: Probe, timeout: float = PROBE_TIMEOUT) -> Outcome:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(probe.url, headers=dict(probe.headers), method=probe.method)
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(4096)
            if response.status != 200:
                return Outcome(probe.platform, probe.url, False, f"HTTP {response.status}")
            if not probe.accept(response.headers):
                return Outcome(probe.platform, probe.url, False, "not a metadata server")
            return Outcome(probe.platform, probe.url, True, "")
    except urllib.error.HTTPError as exc:
        return Outcome(probe.platform, probe.url, False, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Outcome(probe.platform, probe.url, False, str(reason) or type(exc).__name__)


def decide(outcomes: list[Outcome]) -> str:
    """The one platform that answered; otherwise an error naming what was asked and why."""
    hits = [o.platform for o in outcomes if o.hit]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        misses = "; ".join(f"{o.platform}: {o.url}: {o.detail}" for o in outcomes)
        raise UsageError(
            f"platform auto-detection failed: no metadata server answered ({misses}); "
            "pass --platform gke, volcengine, aws or static"
        )
    raise UsageError(
        f"platform auto-detection ambiguous: {' and '.join(hits)} metadata servers both "
        "answered; pass --platform to choose"
    )


def detect(environ: Mapping[str, str], timeout: float = PROBE_TIMEOUT) -> str:
    """The platform name for --platform, from the metadata servers that answer."""
    todo = probes(environ)
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        outcomes = list(pool.map(lambda p: run_probe(p, timeout), todo))
    return decide(outcomes)
