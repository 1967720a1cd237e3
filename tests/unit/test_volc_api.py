"""The Volcengine client against the emulator on loopback: signing, envelope, pagination."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import requests

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CloudTimeout,
)
from cocoon_net.platform import volcengine
from cocoon_net.platform.http import Retry, RetryPolicy
from cocoon_net.platform.volc_api import (
    ROLE_REFRESH_MARGIN,
    InstanceRole,
    PollPolicy,
    VpcApi,
    envelope_error,
    load_credentials,
    read_metadata,
    region_of,
    wait_for,
)
from cocoon_net.platform.volc_sign import Credentials, canonical_query, sign
from tests.emulators.volcengine import VolcEmulator, signer_v4

FAST = RetryPolicy(attempts=3, deadline=5.0, base_delay=0.01, max_delay=0.02)


@pytest.fixture
def emu() -> Iterator[VolcEmulator]:
    emulator = VolcEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


def _api(emu: VolcEmulator, secret: str | None = None) -> VpcApi:
    creds = Credentials(emu.access_key, secret or emu.secret_key, emu.region)
    return VpcApi(emu.base_url, creds, retry=FAST)


def test_signer_is_deterministic_and_covers_query_and_token() -> None:
    creds = Credentials("AK", "SK", "cn-beijing")
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    url = "https://open.volcengineapi.com:443/"
    a = sign("GET", url, {"Action": "X", "B": "1 2"}, {}, b"", creds, now)
    assert a == sign("GET", url, {"B": "1 2", "Action": "X"}, {}, b"", creds, now)
    assert a["Host"] == "open.volcengineapi.com" and a["X-Date"] == "20260102T030405Z"
    assert a["Authorization"].startswith(
        "HMAC-SHA256 Credential=AK/20260102/cn-beijing/vpc/request, "
        "SignedHeaders=host;x-content-sha256;x-date, Signature="
    )
    assert sign("GET", url, {"Action": "X", "B": "1 3"}, {}, b"", creds, now) != a
    sts = Credentials("AK", "SK", "cn-beijing", session_token="tok")
    with_token = sign("GET", url, {"Action": "X"}, {}, b"", sts, now)
    assert with_token["X-Security-Token"] == "tok"
    assert "x-security-token" in with_token["Authorization"]
    assert "SK" not in repr(creds) and "tok" not in repr(sts)


def test_canonical_query_quotes_like_the_sdk() -> None:
    assert canonical_query({"b": "a b", "a": ["2", "1"], "c": "x/y~"}) == "a=2&a=1&b=a%20b&c=x%2Fy~"


def test_signed_calls_are_accepted(emu: VolcEmulator) -> None:
    result = _api(emu).call("DescribeVpcAttributes", {"VpcId": emu.vpc_id})
    assert result["CidrBlock"] == str(emu.vpc_cidr)


def test_wrong_secret_is_rejected_with_the_api_signature_error(emu: VolcEmulator) -> None:
    with pytest.raises(CloudAuthError, match="SignatureDoesNotMatch"):
        _api(emu, secret="not-the-secret").call("DescribeVpcAttributes", {"VpcId": emu.vpc_id})
    assert emu.calls == []  # rejected before any action ran


def test_unknown_access_key_is_rejected(emu: VolcEmulator) -> None:
    creds = Credentials("AKLTnobody", emu.secret_key, emu.region)
    with pytest.raises(CloudAuthError, match="InvalidAccessKey"):
        VpcApi(emu.base_url, creds, retry=FAST).call("DescribeSubnets", {})


def test_a_tampered_query_is_rejected(emu: VolcEmulator) -> None:
    creds = Credentials(emu.access_key, emu.secret_key, emu.region)
    query = {"Action": "DescribeVpcAttributes", "Version": "2020-04-01", "VpcId": emu.vpc_id}
    headers = sign("GET", emu.base_url + "/", query, {}, b"", creds, datetime.now(UTC))
    ok = requests.get(emu.base_url + "/", params=query, headers=headers, timeout=5)
    assert ok.status_code == 200
    tampered = {**query, "VpcId": "vpc-other"}
    bad = requests.get(emu.base_url + "/", params=tampered, headers=headers, timeout=5)
    assert bad.status_code == 403
    assert bad.json()["ResponseMetadata"]["Error"]["Code"] == "SignatureDoesNotMatch"


def test_throttling_is_retried_and_persistent_errors_surface(emu: VolcEmulator) -> None:
    api = _api(emu)
    emu.inject("DescribeSubnets", "AccountFlowLimitExceeded", times=2)
    assert api.call("DescribeSubnets", {})["TotalCount"] == 1
    emu.inject("DescribeSubnets", "InternalError", times=5)
    with pytest.raises(CloudError, match="InternalError"):
        api.call("DescribeSubnets", {})


def test_client_token_makes_a_retried_create_idempotent(emu: VolcEmulator) -> None:
    emu.inject("CreateSubnet", "InternalError", after_commit=True)
    result = _api(emu).create(
        "CreateSubnet",
        {"VpcId": emu.vpc_id, "ZoneId": emu.zone, "CidrBlock": "172.20.9.0/24"},
    )
    assert [s.id for s in emu.subnets.values() if s.cidr == IPv4Network("172.20.9.0/24")] == [
        result["SubnetId"]
    ]
    assert emu.calls.count("CreateSubnet") == 2


def test_pages_follow_page_numbers_past_the_first_hundred(emu: VolcEmulator) -> None:
    for i in range(250):
        emu._add_subnet(f"s{i}", IPv4Network(f"10.{i}.0.0/24"), {}, ready=True)
    found = list(_api(emu).pages("DescribeSubnets", {"VpcId": emu.vpc_id}, "Subnets"))
    assert len({s["SubnetId"] for s in found}) == 251
    assert emu.calls.count("DescribeSubnets") == 3


def test_envelope_codes_map_to_error_kinds() -> None:
    assert isinstance(envelope_error("A", "AccountFlowLimitExceeded", ""), Retry)
    assert isinstance(envelope_error("A", "InternalError", "x"), Retry)
    assert isinstance(envelope_error("A", "SignatureDoesNotMatch", ""), CloudAuthError)
    assert isinstance(envelope_error("A", "InsufficientIpInSubnet", ""), CloudQuotaError)
    assert isinstance(envelope_error("A", "QuotaExceeded.NetworkInterface", ""), CloudQuotaError)
    assert isinstance(envelope_error("A", "InvalidEni.NotFound", ""), CloudNotFound)
    assert isinstance(envelope_error("A", "InvalidEni.InvalidStatus", ""), CloudConflict)
    plain = envelope_error("CreateSubnet", "InvalidParameter", "bad thing")
    assert type(plain) is CloudError
    assert str(plain) == "Volcengine VPC CreateSubnet: InvalidParameter: bad thing"


def test_credentials_from_env_then_file_and_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    assert load_credentials({}, config) is None  # no keys: the instance role is asked
    config.write_text(
        json.dumps({"access_key_id": "AKf", "secret_access_key": "SKf", "region": "cn-shanghai"})
    )
    assert load_credentials({}, config) == Credentials("AKf", "SKf", "cn-shanghai")
    env = {
        "VOLCENGINE_ACCESS_KEY_ID": "AKe",
        "VOLCENGINE_SECRET_ACCESS_KEY": "SKe",
        "VOLCENGINE_SESSION_TOKEN": "tok",
    }
    # The file's region still counts when the keys come from the environment (§9.7 #43).
    assert load_credentials(env, config) == Credentials("AKe", "SKe", "cn-shanghai", "tok")
    config.write_text("{not json")
    with pytest.raises(CloudAuthError, match="not valid JSON"):
        load_credentials({}, config)


def test_instance_role_keys_are_fetched_with_a_session_token_and_refreshed(
    emu: VolcEmulator,
) -> None:
    emu.use_instance_role("node-role")
    now = [1_000.0]
    role = InstanceRole(emu.metadata_url(), "cn-beijing", retry=FAST, clock=lambda: now[0])
    emu.role_lifetime = 3600.0
    creds = role()
    assert (creds.access_key_id, creds.session_token) == (emu.access_key, emu.session_token)
    assert role.role == "node-role" and emu.role_fetches == 1  # found by asking its name
    role()
    assert emu.role_fetches == 1  # cached
    emu.use_instance_role("node-role")  # the cloud rotated the keys
    now[0] = datetime.now(UTC).timestamp() + 3600.0 - ROLE_REFRESH_MARGIN + 1
    assert role().access_key_id == emu.access_key  # fetched again before the old expired
    assert emu.role_fetches == 2
    emu.imds_tokens.clear()  # without a session token the server refuses
    emu.require_imds_token = True
    assert InstanceRole(emu.metadata_url(), "cn-beijing", retry=FAST)().secret_access_key


def test_metadata_is_read_from_the_configured_url(emu: VolcEmulator) -> None:
    info = read_metadata(emu.metadata_url(), retry=FAST)
    assert (info.instance_id, info.vpc_id, info.zone) == (emu.instance_id, emu.vpc_id, emu.zone)
    assert info.region == "cn-beijing" and info.mac == emu.primary.mac
    with pytest.raises(CloudError):
        region_of("nodash")


def test_missing_credentials_fail_the_first_cloud_call_not_construction(
    emu: VolcEmulator, tmp_path: Path
) -> None:
    env = {**emu.environ(), "VOLCENGINE_ACCESS_KEY_ID": ""}
    platform = volcengine.create(env, retry=FAST)
    from cocoon_net.state import PoolState

    state = PoolState(
        platform="volcengine", node_name="n", subnet="172.20.100.0/24", gateway="172.20.100.1"
    )
    assert platform.plan_teardown(state)  # needs neither credentials nor network
    with pytest.raises(CloudAuthError, match="VOLCENGINE_ACCESS_KEY_ID"):
        platform.status(state)


def test_wait_for_polls_with_backoff_until_done_or_deadline() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    values = iter(["Attaching", "Attaching", "InUse"])
    policy = PollPolicy(timeout=10, first=0.5, interval=1.0, factor=2)
    got = wait_for(
        lambda: next(values),
        lambda v: v == "InUse",
        what="x",
        policy=policy,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert got == "InUse" and slept == [0.5, 1.0]
    with pytest.raises(CloudTimeout, match="still not done after 10 s"):
        wait_for(
            lambda: "Attaching",
            lambda v: v == "InUse",
            what="x",
            policy=policy,
            clock=lambda: now[0],
            sleep=sleep,
        )


def test_pure_decisions() -> None:
    assert volcengine.ip_targets(140) == [20] * 7
    assert volcengine.ip_targets(50) == [20, 20, 10]
    assert volcengine.ip_targets(1) == [1]
    for bad in (0, 141):
        with pytest.raises(Exception, match="pool-size"):
            volcengine.ip_targets(bad)
    assert volcengine.slot_of("n", "n-eni-3") == 3
    assert volcengine.slot_of("n", "n-eni-x") is None
    assert volcengine.slot_of("n", "m-eni-3") is None
    vpc = IPv4Network("172.20.0.0/16")
    rule = {
        "Direction": "ingress",
        "Protocol": "all",
        "CidrIp": "172.16.0.0/12",
        "Policy": "accept",
    }
    assert volcengine.rule_covers(rule, vpc)
    assert not volcengine.rule_covers({**rule, "Protocol": "tcp"}, vpc)
    assert not volcengine.rule_covers({**rule, "CidrIp": "172.20.1.0/24"}, vpc)
    assert not volcengine.rule_covers({**rule, "Policy": "drop"}, vpc)
    subnet = IPv4Network("172.20.100.0/24")
    eni = volcengine.Eni(
        "e",
        "n-eni-1",
        "InUse",
        "m",
        "i",
        "s",
        (
            IPv4Address("172.20.100.9"),
            IPv4Address("172.20.100.1"),
            IPv4Address("172.20.7.7"),
            IPv4Address("172.20.100.3"),
        ),
    )
    assert volcengine.pool_ips([eni], subnet, IPv4Address("172.20.100.1")) == [
        IPv4Address("172.20.100.3"),
        IPv4Address("172.20.100.9"),
    ]


def test_which_enis_the_go_tool_made_and_which_adopt_refuses() -> None:
    subnet = IPv4Network("172.20.100.0/24")
    go = volcengine.Eni("e", "n-eni-1", "InUse", "m", "i-me", "sn", (IPv4Address("172.20.100.9"),))
    assert volcengine.is_go_made(go, "n", "i-me", "sn")
    for not_go in (
        dataclasses.replace(go, name="n-eni-x"),
        dataclasses.replace(go, name="m-eni-1"),
        dataclasses.replace(go, device_id="i-other"),
        dataclasses.replace(go, device_id=""),
        dataclasses.replace(go, subnet_id="sn-other"),
        dataclasses.replace(go, tags={"owner": "ops"}),
        dataclasses.replace(go, primary=True),
    ):
        assert not volcengine.is_go_made(not_go, "n", "i-me", "sn"), not_go
    assert not volcengine.is_go_made(go, "n", "i-me", "")  # the node's subnet unknown

    assert volcengine.adopt_refusal(go, "n", "i-me", subnet) is None
    tagged_here = dataclasses.replace(go, tags={volcengine.TAG_NODE: "n"})
    assert volcengine.adopt_refusal(tagged_here, "n", "i-me", subnet) is None
    other_node = dataclasses.replace(go, tags={volcengine.TAG_NODE: "m"})
    assert volcengine.adopt_refusal(other_node, "n", "i-me", subnet) == (
        "ENI e (n-eni-1) holds addresses in 172.20.100.0/24 but is tagged cocoon-net:node=m: "
        "it belongs to node 'm', not 'n'"
    )
    elsewhere = dataclasses.replace(go, device_id="i-other")
    assert "is attached to i-other, not to this instance i-me" in str(
        volcengine.adopt_refusal(elsewhere, "n", "i-me", subnet)
    )


def test_the_emulator_verifies_with_its_own_signer_held_to_the_sdk_vectors() -> None:
    data = json.loads(
        (Path(__file__).parent.parent / "data" / "volc_sign_vectors.json").read_text()
    )
    for v in data["vectors"]:
        auth = v["expected"]["Authorization"]
        names = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        host = urlsplit(v["url"]).netloc
        given = {k.lower(): x for k, x in v["headers"].items()}
        wire = {
            "host": host,
            "x-date": v["expected"]["X-Date"],
            "x-content-sha256": v["expected"]["X-Content-Sha256"],
            "x-security-token": v["session_token"],
            **given,
        }
        raw_query = urlencode(v["query"], doseq=True)
        got = signer_v4(
            v["method"], urlsplit(v["url"]).path, raw_query, {n: wire[n] for n in names},
            v["body"].encode(), v["secret_access_key"], v["expected"]["X-Date"], v["region"],
        )  # fmt: skip
        assert got == auth.rsplit("Signature=", 1)[1], v["name"]


@pytest.mark.parametrize(
    ("region", "skew", "version", "code"),
    [
        ("cn-shanghai", 0, "2020-04-01", "InvalidCredential"),
        ("cn-beijing", 16 * 60, "2020-04-01", "InvalidTimestamp"),
        ("cn-beijing", -16 * 60, "2020-04-01", "InvalidTimestamp"),
        ("cn-beijing", 0, "2099-01-01", "InvalidActionOrVersion"),
    ],
)
def test_the_emulator_rejects_another_region_a_stale_date_and_an_unknown_version(
    emu: VolcEmulator, region: str, skew: int, version: str, code: str
) -> None:
    creds = Credentials(emu.access_key, emu.secret_key, region)
    query = {"Action": "DescribeVpcAttributes", "Version": version, "VpcId": emu.vpc_id}
    when = datetime.now(UTC) + timedelta(seconds=skew)
    headers = sign("GET", emu.base_url + "/", query, {}, b"", creds, when)
    bad = requests.get(emu.base_url + "/", params=query, headers=headers, timeout=5)
    assert bad.status_code >= 400
    assert bad.json()["ResponseMetadata"]["Error"]["Code"] == code
    assert emu.calls == []


def test_the_client_signs_with_its_clock_and_a_drifted_clock_is_refused(
    emu: VolcEmulator,
) -> None:
    creds = Credentials(emu.access_key, emu.secret_key, emu.region)
    stale = VpcApi(emu.base_url, creds, retry=FAST, clock=lambda: datetime(2001, 1, 1, tzinfo=UTC))
    with pytest.raises(CloudError, match="InvalidTimestamp"):
        stale.call("DescribeVpcAttributes", {"VpcId": emu.vpc_id})
