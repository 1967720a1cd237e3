"""Platform auto-detection against emulated metadata servers on 127.0.0.1.

Every endpoint is overridden in every test; a probe that must fail goes to a closed loopback
port, or runs inside an empty namespace where no route exists, so no packet ever leaves for
a real metadata address.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cocoon_net.errors import UsageError
from cocoon_net.platform.detect import Outcome, decide, detect
from tests.emulators import Reply, Request, serve
from tests.emulators.gce import GceEmulator
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
    }
    assert detect(env) == "gke"
    assert gce.server.log[0].path == "/computeMetadata/v1/instance/zone"
    assert gce.server.log[0].headers["metadata-flavor"] == "Google"


def test_volcengine_alone(closed_url: str) -> None:
    with serve(_volcengine) as volc:
        env = {
            "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
            "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url + "/latest/meta-data/",
        }
        assert detect(env) == "volcengine"


def test_both_is_ambiguous(gce: GceEmulator) -> None:
    with serve(_volcengine) as volc:
        env = {
            "GCE_METADATA_HOST": gce.server.host,
            "COCOON_NET_VOLCENGINE_METADATA_URL": volc.url + "/latest/meta-data",
        }
        with pytest.raises(UsageError, match="ambiguous: gke and volcengine"):
            detect(env)


def test_none_names_each_endpoint(closed_url: str) -> None:
    env = {
        "GCE_METADATA_HOST": closed_url.removeprefix("http://"),
        "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url + "/latest/meta-data",
    }
    with pytest.raises(UsageError) as info:
        detect(env)
    message = str(info.value)
    assert message.startswith("platform auto-detection failed: no metadata server answered")
    assert f"gke: {closed_url}/computeMetadata/v1/instance/zone" in message
    assert f"volcengine: {closed_url}/latest/meta-data/instance-id" in message
    assert message.endswith("pass --platform gke, volcengine or static")


def test_a_server_without_the_google_flavor_is_not_gce(closed_url: str) -> None:
    # e.g. a proxy or captive portal that answers 200 to any path
    with serve(lambda req: Reply(200, "hello")) as impostor:
        env = {
            "GCE_METADATA_HOST": impostor.host,
            "COCOON_NET_VOLCENGINE_METADATA_URL": closed_url,
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
    """The real defaults (metadata.google.internal, 100.96.0.96) where no route exists."""
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
