"""The gke platform's pure decisions: ranges, alias lists, agent config, routes, operations."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoon_net.errors import CloudAuthError, CloudConflict, CloudError, CloudQuotaError, UsageError
from cocoon_net.platform.gce_compute import (
    SubnetRef,
    Subnetwork,
    find_alias,
    plan_alias_add,
    plan_alias_remove,
    plan_range,
    raise_operation_error,
    with_range,
)
from cocoon_net.platform.gce_metadata import metadata_url, region_of
from cocoon_net.platform.localroute import LocalRoute, edit_ini, plan_route_removal

NET = IPv4Network("172.20.100.0/24")
REF = SubnetRef("host", "us-central1", "default")


def subnetwork(*ranges: tuple[str, str]) -> Subnetwork:
    return Subnetwork(
        REF,
        "10.128.0.0/20",
        tuple({"rangeName": n, "ipCidrRange": c} for n, c in ranges),
        "fp",
    )


def test_range_absent_is_created_with_every_other_range_kept() -> None:
    sub = subnetwork(("gke-pods", "10.40.0.0/14"))
    assert plan_range(sub, "cocoon-pods", NET) is True
    assert with_range(sub, "cocoon-pods", NET) == [
        {"rangeName": "gke-pods", "ipCidrRange": "10.40.0.0/14"},
        {"rangeName": "cocoon-pods", "ipCidrRange": "172.20.100.0/24"},
    ]


def test_range_covering_is_reused_and_not_covering_is_refused() -> None:
    assert plan_range(subnetwork(("cocoon-pods", "172.20.0.0/16")), "cocoon-pods", NET) is False
    assert plan_range(subnetwork(("cocoon-pods", str(NET))), "cocoon-pods", NET) is False
    with pytest.raises(UsageError, match=r"is 172\.20\.100\.0/25, which does not cover"):
        plan_range(subnetwork(("cocoon-pods", "172.20.100.0/25")), "cocoon-pods", NET)


ALIASES = st.lists(
    st.builds(
        lambda name, third: {"subnetworkRangeName": name, "ipCidrRange": f"10.9.{third}.0/24"},
        st.sampled_from(["cocoon-pods", "gke-pods", "other"]),
        st.integers(0, 255),
    ),
    max_size=6,
)


@given(ALIASES)
def test_add_keeps_others_and_remove_undoes_it(aliases: list[dict[str, Any]]) -> None:
    net = IPv4Network("10.9.7.0/24")
    added = plan_alias_add(aliases, "cocoon-pods", net)
    others = [a for a in aliases if a["subnetworkRangeName"] != "cocoon-pods"]
    ours = {"subnetworkRangeName": "cocoon-pods", "ipCidrRange": str(net)}
    if added is None:
        assert ours in aliases
    else:
        assert added == [*others, ours]  # every alias we do not own, in order, then ours
    final = added if added is not None else aliases
    assert plan_alias_add(final, "cocoon-pods", net) is None  # idempotent
    removed = plan_alias_remove(final, "cocoon-pods", net)
    assert removed is not None and ours not in removed
    assert [a for a in removed if a["subnetworkRangeName"] != "cocoon-pods"] == others


def test_remove_matches_name_and_cidr_only() -> None:
    aliases = [
        {"subnetworkRangeName": "gke-pods", "ipCidrRange": str(NET)},
        {"ipCidrRange": "10.128.0.64/28"},
    ]
    assert plan_alias_remove(aliases, "cocoon-pods", NET) is None


def test_find_alias_accepts_any_range_name_covering_the_subnet() -> None:
    aliases = [
        {"ipCidrRange": "10.128.0.64/28"},
        {"subnetworkRangeName": "p", "ipCidrRange": "172.20.0.0/16"},
    ]
    alias = find_alias(aliases, NET)
    assert alias is not None and str(alias) == "p:172.20.0.0/16"
    assert find_alias(aliases[:1], NET) is None


def test_subnet_ref_from_url_uses_the_urls_project() -> None:
    url = "https://www.googleapis.com/compute/v1/projects/host-proj/regions/europe-west4/subnetworks/shared"
    assert SubnetRef.from_url(url) == SubnetRef("host-proj", "europe-west4", "shared")
    with pytest.raises(CloudError, match="unrecognised subnetwork"):
        SubnetRef.from_url("global/networks/default")


def test_region_and_metadata_host() -> None:
    assert region_of("us-central1-a") == "us-central1"
    with pytest.raises(CloudError, match="malformed GCE zone"):
        region_of("nodash")
    assert metadata_url({}) == "http://metadata.google.internal/computeMetadata/v1/"
    assert metadata_url({"GCE_METADATA_ROOT": "a:1"}, "x") == "http://a:1/computeMetadata/v1/x"
    env = {"GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_ROOT": "a:1"}
    assert metadata_url(env) == "http://127.0.0.1:9/computeMetadata/v1/"


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("QUOTA_EXCEEDED", 403, CloudQuotaError),
        ("CONDITION_NOT_MET", 412, CloudConflict),
        ("PERMISSION_DENIED", 403, CloudAuthError),
        ("RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", 400, CloudError),
    ],
)
def test_operation_errors_are_surfaced(code: str, status: int, kind: type[CloudError]) -> None:
    op = {
        "name": "operation-1",
        "status": "DONE",
        "error": {"errors": [{"code": code, "message": "boom"}]},
        "httpErrorStatusCode": status,
    }
    with pytest.raises(kind, match=f"operation-1.*{code}: boom"):
        raise_operation_error(op)
    raise_operation_error({"name": "operation-2", "status": "DONE"})  # no error: no raise


# ---------------------------------------------------------------- agent config (INI)

CASES = [
    # (before, after setting false)
    ("", "[IpForwarding]\nip_aliases = false\n"),
    ("[Daemons]\na = 1\n", "[Daemons]\na = 1\n\n[IpForwarding]\nip_aliases = false\n"),
    (
        "# mine\n[ipforwarding]\nIP_ALIASES=true\ntarget_instance_ips = true\n[X]\nk = v\n",
        "# mine\n[ipforwarding]\nip_aliases = false\ntarget_instance_ips = true\n[X]\nk = v\n",
    ),
    (
        "[IpForwarding]\ntarget_instance_ips = false\n",
        "[IpForwarding]\nip_aliases = false\ntarget_instance_ips = false\n",
    ),
]


@pytest.mark.parametrize(("before", "after"), CASES)
def test_edit_ini_sets_and_restores(before: str, after: str) -> None:
    text, previous = edit_ini(before, "IpForwarding", "ip_aliases", "false")
    assert text == after
    restored, ours = edit_ini(text, "IpForwarding", "ip_aliases", previous)
    assert ours == "false"
    assert restored.lower() == before.lower().replace("ip_aliases=true", "ip_aliases = true")


def test_plan_route_removal_matches_only_our_range() -> None:
    routes = [
        {"type": "local", "dst": "172.20.100.0/24", "dev": "ens4", "table": "local"},
        {"type": "local", "dst": "172.20.100.1", "dev": "cni0"},
        {"type": "local", "dst": "172.20.0.0/16", "dev": "ens4"},
        {"type": "broadcast", "dst": "172.20.100.0/24", "dev": "ens4"},
        {"type": "local", "dst": "bogus", "dev": "ens4"},
    ]
    assert plan_route_removal(routes, NET) == [LocalRoute("172.20.100.0/24", "ens4")]
