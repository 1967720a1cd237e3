"""The gke platform against the GCE emulator, called as the CLI calls it.

Provisioning reads and changes the local routing table, so every test runs in a network
namespace of its own (the emulator listens there too): nothing here touches the host's.

Each test gets a fresh emulated project (instance node-1 in us-central1-a, subnetwork
`default` 10.128.0.0/20) and reaches it only through GCE_METADATA_HOST and
COCOON_NET_GCE_COMPUTE_URL. Sleeps are recorded instead of slept, so retries cost nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cocoon_net.errors import (
    CloudAuthError,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CocoonError,
    StateError,
    UsageError,
)
from cocoon_net.platform import get_platform
from cocoon_net.platform.base import NodeRequest
from cocoon_net.platform.gke import GkePlatform
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.state import PoolState
from tests.emulators import Fault
from tests.emulators.gce import GceEmulator
from tests.support.netns import Netns, joined

SUBNET = IPv4Network("172.20.100.0/24")
OPERATOR_ALIAS = {"ipCidrRange": "10.128.0.64/28"}  # from the primary range, operator-owned
OTHER_RANGE = {"rangeName": "gke-pods", "ipCidrRange": "10.40.0.0/14"}
OTHER_ALIAS = {"subnetworkRangeName": "gke-pods", "ipCidrRange": "10.40.1.0/24"}


@pytest.fixture
def gce(make_netns: Callable[[str], Netns]) -> Iterator[GceEmulator]:
    with joined(make_netns("gke")):
        emulator = GceEmulator().start()
        try:
            yield emulator
        finally:
            emulator.stop()


class Node:
    """One node's pool.json "cloud" record, as the CLI keeps it between commands."""

    def __init__(self, gce: GceEmulator, tmp_path: Path, subnet: IPv4Network = SUBNET) -> None:
        self.subnet = subnet
        self.cloud: dict[str, Any] = {}
        self.alias_range_name = "cocoon-pods"  # pool.json's top-level key, as init writes it
        self.sleeps: list[float] = []
        self.environ = gce.environ(COCOON_NET_GCE_AGENT_CONFIG=str(tmp_path / "agent.cfg"))

    def platform(self, **kwargs: Any) -> GkePlatform:
        opts: dict[str, Any] = {
            "timeout": 0.3,
            "retry": RetryPolicy(attempts=4, deadline=60),
            "sleep": self.sleeps.append,
            # time passes for real and, in recorded sleeps, instantly
            "clock": lambda: time.monotonic() + sum(self.sleeps),
        }
        opts.update(kwargs)
        return GkePlatform(self.environ, **opts)

    def record(self, mapping: Any) -> None:
        # pool.json must be able to hold it: JSON round trip, as the CLI's recorder does
        self.cloud.update(json.loads(json.dumps(dict(mapping))))

    def request(self) -> NodeRequest:
        return NodeRequest(
            node_name="node-1",
            subnet=self.subnet,
            gateway=self.subnet.network_address + 1,
            pool_size=10,
            primary_nic="cnt-nonic0",  # no such link here: the route step finds nothing
            cloud=dict(self.cloud),
        )

    def state(self) -> PoolState:
        return PoolState(
            platform="gke",
            node_name="node-1",
            subnet=str(self.subnet),
            gateway=str(self.subnet.network_address + 1),
            alias_range_name=self.alias_range_name,
            cloud=dict(self.cloud),
        )

    def init(self, **kwargs: Any) -> Any:
        result = self.platform(**kwargs).provision(self.request(), self.record)
        self.alias_range_name = result.alias_range_name
        return result

    def adopt(self) -> Any:
        """adopt as the CLI runs it: the result's cloud record merged into pool.json."""
        result = self.platform().adopt(self.request())
        self.record(result.cloud)
        self.alias_range_name = result.alias_range_name
        return result

    def teardown(self, **kwargs: Any) -> None:
        self.platform(**kwargs).teardown(self.state(), self.record)


def ours(subnet: IPv4Network = SUBNET) -> dict[str, str]:
    return {"subnetworkRangeName": "cocoon-pods", "ipCidrRange": str(subnet)}


def test_fresh_project_creates_range_and_alias(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    result = node.init()
    assert gce.subnet["secondaryIpRanges"] == [
        {"rangeName": "cocoon-pods", "ipCidrRange": str(SUBNET)}
    ]
    assert gce.nic0["aliasIpRanges"] == [ours()]
    assert result.alias_range_name == "cocoon-pods"
    assert result.mtu == 1460
    assert result.ips[0] == IPv4Address("172.20.100.2") and len(result.ips) == 10
    assert IPv4Network("10.128.0.0/20") in result.vpc_cidrs
    assert node.cloud["instance"] == "node-1"
    assert node.cloud["zone"] == "us-central1-a"
    assert node.cloud["project"] == "proj-a"
    assert node.cloud["aliasCidr"] == str(SUBNET)


def test_get_platform_builds_gke_from_environ(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    platform = get_platform("gke", node.environ)
    assert platform.name == "gke"
    lines = platform.status(node.state())
    assert lines[0].value == "(none)"
    assert "MISSING" in lines[1].value


def test_second_node_inside_the_range_reuses_it(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}])
    node = Node(gce, tmp_path, IPv4Network("172.20.7.0/24"))
    before = gce.subnet["fingerprint"]
    node.init()
    assert gce.subnet["fingerprint"] == before  # subnetwork untouched
    assert gce.nic0["aliasIpRanges"] == [ours(IPv4Network("172.20.7.0/24"))]


def test_subnet_outside_the_range_fails_before_any_change(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/24"}])
    before = gce.snapshot()
    node = Node(gce, tmp_path, IPv4Network("172.21.0.0/24"))
    with pytest.raises(UsageError) as info:
        node.init()
    assert str(info.value) == (
        'secondary range "cocoon-pods" on subnet default is 172.20.0.0/24, which does not cover '
        "--subnet 172.21.0.0/24; expand the range or choose a --subnet inside it"
    )
    assert gce.snapshot() == before
    assert gce.state.mutations_applied == 0
    assert not (tmp_path / "agent.cfg").exists()


def test_init_twice_changes_nothing(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    node.init()
    applied = gce.state.mutations_applied
    after_first = gce.snapshot()
    config_after_first = (tmp_path / "agent.cfg").read_text()
    node.init()
    assert gce.state.mutations_applied == applied
    assert gce.snapshot() == after_first
    assert (tmp_path / "agent.cfg").read_text() == config_after_first


def test_operator_aliases_survive_init_and_teardown(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([OTHER_RANGE])
    gce.set_aliases([OPERATOR_ALIAS, OTHER_ALIAS])
    before = gce.snapshot()
    node = Node(gce, tmp_path)
    node.init()
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, OTHER_ALIAS, ours()]
    assert gce.subnet["secondaryIpRanges"][0] == OTHER_RANGE
    node.teardown()
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, OTHER_ALIAS]
    # the shared range stays: other nodes' aliases live in it
    assert gce.snapshot()["subnets"] != before["subnets"]
    assert gce.subnet["secondaryIpRanges"][1]["rangeName"] == "cocoon-pods"


def test_stale_alias_of_our_range_is_replaced(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}])
    gce.set_aliases([OPERATOR_ALIAS, ours(IPv4Network("172.20.9.0/24"))])
    node = Node(gce, tmp_path, IPv4Network("172.20.7.0/24"))
    node.init()
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, ours(IPv4Network("172.20.7.0/24"))]


def test_teardown_is_safe_to_rerun_and_status_reports(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_aliases([OPERATOR_ALIAS])
    cfg = tmp_path / "agent.cfg"
    cfg.write_text("[IpForwarding]\nip_aliases = true\n")
    node = Node(gce, tmp_path)
    node.init()
    assert cfg.read_text() == "[IpForwarding]\nip_aliases = false\n"
    lines = node.platform().status(node.state())
    assert lines[0].value == f"10.128.0.64/28, cocoon-pods:{SUBNET}"
    assert lines[1].value == f"cocoon-pods:{SUBNET} present (ours)"
    node.teardown()
    applied = gce.state.mutations_applied
    node.teardown()
    assert gce.state.mutations_applied == applied
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS]
    assert "MISSING" in node.platform().status(node.state())[1].value
    assert cfg.read_text() == "[IpForwarding]\nip_aliases = true\n"  # restored once, kept
    assert node.platform().plan_teardown(node.state())[1:] == [
        "keep range cocoon-pods (not claimed with --subnet auto; --remove-range removes it "
        "once no instance uses it)"
    ]
    # init after teardown takes the restored value as the original again
    node.init()
    node.teardown()
    assert cfg.read_text() == "[IpForwarding]\nip_aliases = true\n"


def test_shared_vpc_uses_the_subnetworks_own_project(tmp_path: Path) -> None:
    gce = GceEmulator(subnet_project="host-proj").start()
    try:
        node = Node(gce, tmp_path)
        result = node.init()
        assert gce.subnet_path.startswith("projects/host-proj/")
        assert gce.subnet["secondaryIpRanges"][0]["rangeName"] == "cocoon-pods"
        assert result.subnet_id == gce.subnet_path
        assert any("/projects/host-proj/" in r.path for r in gce.server.log if r.method == "PATCH")
    finally:
        gce.stop()


def test_adopt_records_the_existing_alias_as_adopted(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "pods-legacy", "ipCidrRange": "172.20.0.0/16"}])
    gce.set_aliases([{"subnetworkRangeName": "pods-legacy", "ipCidrRange": str(SUBNET)}])
    before = gce.snapshot()
    node = Node(gce, tmp_path)
    result = node.adopt()
    assert gce.snapshot() == before
    assert gce.state.mutations_applied == 0
    # pool.json's top-level key stays empty, as the Go tool's adopt left it
    assert result.alias_range_name == ""
    assert result.cloud["aliasRangeName"] == "pods-legacy"
    assert result.cloud["aliasOwned"] is False
    lines = node.platform().status(node.state())
    assert lines[1].value == f"pods-legacy:{SUBNET} present (adopted: teardown leaves it)"
    assert node.platform().plan_teardown(node.state()) == [
        f"keep alias pods-legacy:{SUBNET} on nic0: adopted, not ours",
        "keep range cocoon-pods (not claimed with --subnet auto; --remove-range removes it "
        "once no instance uses it)",
    ]


@pytest.mark.parametrize(
    ("alias", "subnet"),
    [
        # an operator's own secondary range, not named cocoon-pods
        ({"subnetworkRangeName": "operator-pods", "ipCidrRange": "10.64.1.0/24"}, "10.64.1.0/24"),
        # an alias taken from the subnetwork's primary range (no range name at all)
        ({"ipCidrRange": "10.128.0.64/28"}, "10.128.0.64/28"),
        # adopting a node whose alias carries our own range name still adopts it
        ({"subnetworkRangeName": "cocoon-pods", "ipCidrRange": str(SUBNET)}, str(SUBNET)),
    ],
)
def test_an_adopted_alias_survives_teardown(
    gce: GceEmulator, tmp_path: Path, alias: dict[str, str], subnet: str
) -> None:
    gce.set_aliases([alias, OTHER_ALIAS])
    before = gce.snapshot()
    node = Node(gce, tmp_path, IPv4Network(subnet))
    node.adopt()
    node.teardown()
    node.teardown()  # and again: still nothing
    assert gce.snapshot() == before
    assert gce.state.mutations_applied == 0


def test_go_tool_init_pool_json_teardown_removes_its_alias_only(
    gce: GceEmulator, tmp_path: Path
) -> None:
    """A pool.json the Go tool's init wrote: aliasRangeName cocoon-pods, no cloud record."""
    gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}])
    gce.set_aliases([OPERATOR_ALIAS, ours(), ours(IPv4Network("172.20.9.0/24"))])
    node = Node(gce, tmp_path)
    assert node.platform().plan_teardown(node.state()) == [
        f"remove alias cocoon-pods:{SUBNET} from nic0 of this instance (other aliases kept)",
        "keep range cocoon-pods (not claimed with --subnet auto; --remove-range removes it "
        "once no instance uses it)",
    ]
    node.teardown()
    # exactly `cocoon-pods:<pool subnet>`: another node-sized cocoon-pods alias is not the
    # pool's, and the shared range stays
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, ours(IPv4Network("172.20.9.0/24"))]
    assert gce.subnet["secondaryIpRanges"][0]["rangeName"] == "cocoon-pods"


@pytest.mark.parametrize(
    ("text", "removed"),
    [
        # what the Go tool's init writes (its --subnet raw, its NIC)
        ("@reboot root ip route del local 172.20.100.0/24 dev ens4 table local "
         "2>/dev/null || true\n", True),
        ("@reboot root ip route del local 172.20.100.7/24 dev eth0 table local "
         "2>/dev/null || true", True),
        # another pool's, or edited by someone: not ours
        ("@reboot root ip route del local 172.20.9.0/24 dev ens4 table local "
         "2>/dev/null || true\n", False),
        ("MAILTO=ops\n@reboot root ip route del local 172.20.100.0/24 dev ens4 table local "
         "2>/dev/null || true\n", False),
    ],
)  # fmt: skip
def test_teardown_removes_the_go_tools_cron_file_only_as_it_wrote_it(
    gce: GceEmulator, tmp_path: Path, text: str, removed: bool
) -> None:
    cron = tmp_path / "cocoon-net-fix-alias"
    cron.write_text(text)
    node = Node(gce, tmp_path)
    node.environ["COCOON_NET_GCE_GO_CRON_FILE"] = str(cron)
    gce.set_aliases([ours()])
    planned = node.platform().plan_teardown(node.state())
    assert (f"remove {cron}, the Go tool's reboot fix for this pool" in planned) is removed
    node.teardown()
    assert cron.exists() is not removed
    assert gce.nic0["aliasIpRanges"] == []


def test_go_tool_adopt_pool_json_teardown_removes_nothing(gce: GceEmulator, tmp_path: Path) -> None:
    """The Go tool's adopt wrote no aliasRangeName: whatever it adopted is not ours."""
    gce.set_aliases([OPERATOR_ALIAS, ours()])
    before = gce.snapshot()
    node = Node(gce, tmp_path)
    node.alias_range_name = ""
    assert node.platform().status(node.state())[1].value == (
        f"cocoon-pods:{SUBNET} present (adopted: teardown leaves it)"
    )
    node.teardown()
    assert gce.snapshot() == before


def test_adopt_after_init_keeps_our_alias_ours(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_aliases([OPERATOR_ALIAS])
    node = Node(gce, tmp_path)
    node.init()
    assert node.adopt().alias_range_name == "cocoon-pods"
    assert node.cloud["aliasOwned"] is True
    node.teardown()
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS]


def test_adopt_refuses_to_forget_an_alias_init_added(gce: GceEmulator, tmp_path: Path) -> None:
    gce.set_secondary([{"rangeName": "operator-pods", "ipCidrRange": "10.64.1.0/24"}])
    gce.set_aliases([{"subnetworkRangeName": "operator-pods", "ipCidrRange": "10.64.1.0/24"}])
    node = Node(gce, tmp_path)
    node.init()
    recorded = dict(node.cloud)
    node.subnet = IPv4Network("10.64.1.0/24")
    with pytest.raises(StateError, match=r"records alias cocoon-pods:172\.20\.100\.0/24"):
        node.adopt()
    assert node.cloud == recorded


def test_adopt_without_an_alias_says_so(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    with pytest.raises(CloudNotFound, match="no alias IP range on nic0 of instance node-1 covers"):
        node.platform().adopt(node.request())


def service_account_file(gce: GceEmulator, tmp_path: Path) -> Path:
    """A service-account key whose token_uri is the emulator's, as ADC reads it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    sa = {
        "type": "service_account",
        "project_id": "proj-a",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "deployer@proj-a.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": f"{gce.url}/token",
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(sa))
    return path


def test_service_account_json_credentials(gce: GceEmulator, tmp_path: Path) -> None:
    path = service_account_file(gce, tmp_path)
    node = Node(gce, tmp_path)
    node.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(path)
    node.init()
    assert gce.nic0["aliasIpRanges"] == [ours()]
    assert gce.state.token_grants == ["jwt:deployer@proj-a.iam.gserviceaccount.com"]


def test_metadata_token_is_cached(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    node.init()
    assert gce.state.token_grants == ["metadata"]


def test_short_lived_token_is_refreshed(tmp_path: Path) -> None:
    gce = GceEmulator(token_lifetime=30).start()  # inside the refresh margin
    try:
        node = Node(gce, tmp_path)
        node.init()
        assert len(gce.state.token_grants) > 1
    finally:
        gce.stop()


@pytest.mark.parametrize("credentials", ["metadata", "service-account file"])
def test_a_token_the_server_stopped_taking_is_replaced_once(
    gce: GceEmulator, tmp_path: Path, credentials: str
) -> None:
    node = Node(gce, tmp_path)
    if credentials != "metadata":
        path = service_account_file(gce, tmp_path)
        node.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(path)
    platform = node.platform()
    platform.provision(node.request(), node.record)
    granted = len(gce.state.token_grants)
    gce.state.tokens.clear()  # revoked, or expired early: the next call gets a 401
    assert platform.status(node.state())  # still answers: one refresh, then success
    assert len(gce.state.token_grants) == granted + 1


def test_missing_nic0_subnetwork_is_clear(gce: GceEmulator, tmp_path: Path) -> None:
    gce.nic0["name"] = "nic1"
    with pytest.raises(CloudNotFound, match="nic0 not found on instance node-1"):
        Node(gce, tmp_path).init()


def test_permission_denied_names_the_role(gce: GceEmulator, tmp_path: Path) -> None:
    gce.server.inject(
        Fault(
            status=403,
            method="GET",
            path="/instances/",
            body={"error": {"message": "Required 'compute.instances.get' permission"}},
        )
    )
    with pytest.raises(CloudAuthError, match=r"roles/compute\.networkAdmin"):
        Node(gce, tmp_path).init()


# ---------------------------------------------------------------- faults at every mutation

MUTATIONS = {
    "subnetworks.patch": ("PATCH", "/subnetworks/"),
    "updateNetworkInterface": ("PATCH", "/updateNetworkInterface"),
}
RETRIED = {
    "429": Fault(status=429),
    "500": Fault(status=500, count=2),
    "timeout": Fault(delay=0.6),  # applied late: the retry must not apply twice
    "dropped": Fault(drop=True),
    # Compute's "another operation on this resource is still running": waited out
    "resourceNotReady": Fault(
        status=400,
        count=2,
        body={
            "error": {
                "message": "The resource 'projects/p/zones/z/instances/node-1' is not ready",
                "errors": [{"reason": "resourceNotReady"}],
            }
        },
    ),
}


def _inject(gce: GceEmulator, step: str, fault: Fault) -> None:
    method, path = MUTATIONS[step]
    gce.server.inject(Fault(**{**fault.__dict__, "method": method, "path": path}))


@pytest.mark.parametrize("step", MUTATIONS)
@pytest.mark.parametrize("fault", RETRIED)
def test_transient_faults_are_retried(
    gce: GceEmulator, tmp_path: Path, step: str, fault: str
) -> None:
    gce.set_aliases([OPERATOR_ALIAS])
    _inject(gce, step, RETRIED[fault])
    node = Node(gce, tmp_path)
    node.init()
    assert gce.server.pending_faults() == 0
    assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, ours()]
    assert gce.state.mutations_applied == 2  # each change applied exactly once
    assert node.sleeps  # the retry backed off


@pytest.mark.parametrize("step", MUTATIONS)
def test_fingerprint_conflict_rereads_and_keeps_the_concurrent_change(
    gce: GceEmulator, tmp_path: Path, step: str
) -> None:
    def operator_edit(emulator: GceEmulator) -> None:
        if step == "subnetworks.patch":
            emulator.set_secondary([OTHER_RANGE])
        else:
            emulator.set_aliases([OPERATOR_ALIAS])

    if step == "updateNetworkInterface":
        gce.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": str(SUBNET)}])
    gce.before_next_mutation(operator_edit)
    Node(gce, tmp_path).init()
    if step == "subnetworks.patch":
        assert gce.subnet["secondaryIpRanges"] == [
            OTHER_RANGE,
            {"rangeName": "cocoon-pods", "ipCidrRange": str(SUBNET)},
        ]
    else:
        assert gce.nic0["aliasIpRanges"] == [OPERATOR_ALIAS, ours()]


def test_concurrent_first_init_reuses_the_range_the_other_node_created(
    gce: GceEmulator, tmp_path: Path
) -> None:
    gce.before_next_mutation(
        lambda e: e.set_secondary([{"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}])
    )
    Node(gce, tmp_path).init()
    assert gce.subnet["secondaryIpRanges"] == [
        {"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}
    ]
    assert gce.nic0["aliasIpRanges"] == [ours()]


FAILING: dict[str, tuple[type[CocoonError], str]] = {
    "403": (CloudAuthError, "missing role or scope"),
    "412-forever": (CloudError, "HTTP 412"),
    "503-forever": (CloudError, "HTTP 503"),
    "timeout-forever": (CloudError, "no answer within"),
    "operation-error": (CloudQuotaError, "QUOTA_EXCEEDED"),
    "slow-operation": (CloudError, "still RUNNING"),
}


def _fail(gce: GceEmulator, step: str, kind: str) -> None:
    if kind == "403":
        _inject(gce, step, Fault(status=403, body={"error": {"message": "Required permission"}}))
    elif kind == "412-forever":
        _inject(gce, step, Fault(status=412, count=50))
    elif kind == "503-forever":
        _inject(gce, step, Fault(status=503, count=50))
    elif kind == "timeout-forever":
        _inject(gce, step, Fault(delay=0.5, count=4))
    elif kind == "operation-error":
        gce.fail_next_operation("QUOTA_EXCEEDED", 403)
    else:
        gce.state.operation_polls = 10_000


@pytest.mark.parametrize("step", MUTATIONS)
@pytest.mark.parametrize("kind", FAILING)
def test_failures_are_clear_then_rerun_succeeds_and_teardown_restores(
    gce: GceEmulator, tmp_path: Path, step: str, kind: str
) -> None:
    gce.set_secondary([OTHER_RANGE])
    gce.set_aliases([OPERATOR_ALIAS, OTHER_ALIAS])
    if step == "updateNetworkInterface":
        # the range exists (earlier node), so the alias update is the first mutation
        gce.set_secondary(
            [OTHER_RANGE, {"rangeName": "cocoon-pods", "ipCidrRange": "172.20.0.0/16"}]
        )
    before = gce.snapshot()
    config_before = "[IpForwarding]\nip_aliases = true\n"
    (tmp_path / "agent.cfg").write_text(config_before)
    node = Node(gce, tmp_path)
    _fail(gce, step, kind)
    error_type, text = FAILING[kind]
    with pytest.raises(error_type, match=text) as info:
        node.init(operation_deadline=30.0)
    assert "\n" not in str(info.value)
    gce.server.clear_faults()
    gce.state.operation_polls = 1

    # a crashed or failed init leaves a record teardown can act on ...
    failed_cloud = dict(node.cloud)
    node.teardown()
    snap = gce.snapshot()
    assert snap["aliases"] == before["aliases"]
    assert [r for r in snap["subnets"][gce.subnet_path] if r["rangeName"] != "cocoon-pods"] == [
        r for r in before["subnets"][gce.subnet_path] if r["rangeName"] != "cocoon-pods"
    ]
    assert (tmp_path / "agent.cfg").read_text() == config_before

    # ... and a rerun of init completes from the failed state
    node.cloud = failed_cloud
    node.init()
    assert gce.nic0["aliasIpRanges"][-1] == ours()
    assert gce.nic0["aliasIpRanges"][:2] == [OPERATOR_ALIAS, OTHER_ALIAS]
    assert "ip_aliases = false" in (tmp_path / "agent.cfg").read_text()
    node.teardown()
    assert gce.snapshot()["aliases"] == before["aliases"]
    assert (tmp_path / "agent.cfg").read_text() == config_before


def test_agent_config_original_survives_a_rerun(gce: GceEmulator, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.cfg"
    cfg.write_text("# operator settings\n[Daemons]\naccounts_daemon = true\n")
    node = Node(gce, tmp_path)
    node.init()
    node.init()  # finds our own "false": must not take it for the original
    assert node.cloud["agentIpAliasesBefore"] is None
    assert "ip_aliases = false" in cfg.read_text()
    node.teardown()
    assert cfg.read_text() == "# operator settings\n[Daemons]\naccounts_daemon = true\n"


def test_plan_teardown_lists_the_changes(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    node.init()
    lines = node.platform().plan_teardown(node.state())
    assert lines[0] == f"remove alias cocoon-pods:{SUBNET} from nic0 of node-1 (other aliases kept)"
    assert "ip_aliases" in lines[1]
    assert gce.nic0["aliasIpRanges"] == [ours()]  # planning changes nothing


def test_teardown_reports_every_failure_in_one_line(gce: GceEmulator, tmp_path: Path) -> None:
    node = Node(gce, tmp_path)
    node.init()
    gce.server.inject(Fault(status=403, count=10, path="/updateNetworkInterface"))
    (tmp_path / "agent.cfg").unlink()
    (tmp_path / "agent.cfg").mkdir()  # unreadable as a file
    with pytest.raises(CloudError, match=r"gke teardown incomplete: .*403.* \| .*agent\.cfg"):
        node.teardown()
