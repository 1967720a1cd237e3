"""Platform auto-detection against emulated metadata servers on 127.0.0.1.

Every endpoint is overridden in every test; a probe that must fail goes to a closed loopback
port, or runs inside an empty namespace where no route exists, so no packet ever leaves for
a real metadata address.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from cocoon_net.errors import UsageError
from cocoon_net.platform.detect import Outcome, decide, detect
from tests.emulators import Reply, Request, serve
from tests.emulators.gce import GceEmulator
from tests.emulators.imds import ImdsEmulator
from tests.support.netns import Netns


def _volcengine(req: Request) -> Reply:
    if req.path == "/latest/meta-data/instance-id":
        return Reply(200, "i-3tl2x9dj1xq2")
    return Reply(404, "not found")


@pytest.fixture
def closed_url() -> str:
    with serve(_volcengine) as srv:
        url = srv.url  # the port is closed again once the server stops
    return url


def test_gce_alone(gce: GceEmulator, closed_url: str) -> None:
    env = {
        "GCE_METADATA_HOST": gce.server.host,
        "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url + "/latest/meta-data",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": closed_url,
    }
    assert detect(env) == "gke"
    assert gce.server.log[0].path == "/computeMetadata/v1/instance/zone"
    assert gce.server.log[0].headers["metadata-flavor"] == "Google"


def test_volcengine_alone(closed_url: str) -> None:
    with serve(_volcengine) as volc:
        env = {
            "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
            "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url + "/latest/meta-data/",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": closed_url,
        }
        assert detect(env) == "volcengine"


def test_both_is_ambiguous(gce: GceEmulator, closed_url: str) -> None:
    with serve(_volcengine) as volc:
        env = {
            "GCE_METADATA_HOST": gce.server.host,
            "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url + "/latest/meta-data",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": closed_url,
        }
        with pytest.raises(UsageError, match="ambiguous: gke and volcengine"):
            detect(env)


def test_none_names_each_endpoint(closed_url: str) -> None:
    env = {
        "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
        "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url + "/latest/meta-data",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": closed_url,
    }
    with pytest.raises(UsageError) as info:
        detect(env)
    message = str(info.value)
    assert message.startswith("platform auto-detection failed: no metadata server answered")
    assert f"gke: {closed_url}/computeMetadata/v1/instance/zone" in message
    assert f"volcengine: {closed_url}/latest/meta-data/instance-id" in message
    assert f"aws: {closed_url}/latest/api/token" in message
    assert message.endswith("pass --platform gke, volcengine, aws or static")


def test_a_server_without_the_google_flavor_is_not_gce(closed_url: str) -> None:
    # e.g. a proxy or captive portal that answers 200 to any path
    with serve(lambda req: Reply(200, "hello")) as impostor:
        env = {
            "GCE_METADATA_HOST": impostor.host,
            "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": closed_url,
        }
        with pytest.raises(UsageError, match="not a metadata server"):
            detect(env)


def test_decide_is_pure() -> None:
    hit = Outcome("gke", "u", True, "")
    miss = Outcome("volcengine", "v", False, "timed out")
    assert decide([hit, miss]) == "gke"
    with pytest.raises(UsageError, match="volcengine: v: timed out"):
        decide([Outcome("gke", "u", False, "refused"), miss])


@pytest.mark.netns
def test_default_endpoints_in_an_empty_namespace_fail_without_traffic(
    make_netns: Callable[[str], Netns],
) -> None:
    """The real defaults (metadata.google.internal, 100.96.0.96, 169.254.169.254) where no
    route exists."""
    ns = make_netns("det")

    def probe() -> str:
        try:
            return detect({}, timeout=2.0)
        except UsageError as exc:
            return f"error: {exc}"

    result = ns.call(probe)
    assert result.startswith("error: platform auto-detection failed")
    assert "http://100.96.0.96/latest/meta-data/instance-id" in result
    assert "metadata.google.internal" in result
    assert "aws: http://169.254.169.254/latest/api/token" in result


def _imds() -> ImdsEmulator:
    return ImdsEmulator("i-0abc", "us-east-1", "us-east-1a", "0e:00:00:00:00:01", "vpc-1")


def test_aws_alone_by_the_imdsv2_token_put(closed_url: str) -> None:
    imds = _imds()
    with serve(imds.handle) as server:
        env = {
            "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
            "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url,
        }
        assert detect(env) == "aws"
        (probe,) = server.log
        assert (probe.method, probe.path) == ("PUT", "/latest/api/token")
        assert probe.headers["x-aws-ec2-metadata-token-ttl-seconds"].isdigit()


def test_a_server_that_only_answers_gets_is_not_ec2(closed_url: str) -> None:
    # GCE's and Volcengine's metadata servers (and most impostors) refuse the PUT
    with serve(_volcengine) as volc:
        env = {
            "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
            "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url + "/latest/meta-data",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": volc.url,
        }
        assert detect(env) == "volcengine"


def test_three_servers_that_never_answer_cost_one_timeout_not_three() -> None:
    release = threading.Event()

    def silent(req: Request) -> Reply:
        release.wait(30)
        return Reply(200, "late")

    try:
        with serve(silent) as gce, serve(silent) as volc, serve(silent) as ec2:
            env = {
                "GCE_METADATA_HOST": gce.host,
                "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": ec2.url,
            }
            start = time.monotonic()
            with pytest.raises(UsageError, match="no metadata server answered"):
                detect(env, timeout=2.0)
            # the 2 s budget, generously: one probe after the other would take 6 s
            assert time.monotonic() - start < 4.0
    finally:
        release.set()
