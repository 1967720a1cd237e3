"""How long Volcengine init takes with slow attaches, and how many API calls it makes, against
the Go tool's fixed sleeps; and, next to it, how long an AWS init takes against moto and how many
EC2 calls it makes.

The Go tool slept 2 s after each create and 4 s after each attach, one ENI after the other:
7 x (2 s + 4 s) = 42 s before any API latency. Here the emulator takes ATTACH seconds per
attach and CREATE seconds per create; init works on the 7 ENIs at once and polls all of them
with one describe per round. The call count is every VPC OpenAPI call of the one init
(metadata reads not included); the target is under 30.

    sudo .venv/bin/python bench/volc_init_bench.py [ATTACH [CREATE]]

Needs root: the platform runs in a throw-away network namespace where the emulator's
"hot-plug" creates a link per attached ENI. The AWS part runs the same 140-address pool on a
c5.metal (/28 prefixes) and an m4.16xlarge (secondary IPs) in moto behind the test proxy,
whose answers take no emulated time: it measures the calls, not EC2's latency.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from ipaddress import IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.emulators.volcengine import VolcEmulator
from tests.support.netns import netns

from cocoon_net.platform import volcengine
from cocoon_net.platform.base import NodeRequest, ProvisionResult

GO_FIXED_SLEEP = 7 * (2.0 + 4.0)
SUBNET = IPv4Network("172.20.100.0/24")
AWS_SUBNET = IPv4Network("10.0.100.0/24")  # inside the emulated VPC


def request_of(pool_size: int, subnet: IPv4Network = SUBNET) -> NodeRequest:
    return NodeRequest(
        node_name="bench",
        subnet=subnet,
        gateway=subnet.network_address + 1,
        pool_size=pool_size,
        primary_nic="eth0",
    )


def provision(environ: dict[str, str]) -> tuple[ProvisionResult, float]:
    start = time.monotonic()
    result = volcengine.create(environ).provision(request_of(140), lambda _mapping: None)
    return result, time.monotonic() - start


def aws_init(instance_type: str) -> tuple[ProvisionResult, float, int]:
    """One AWS init of 140 addresses: (result, seconds, EC2 calls sent)."""
    from tests.emulators.aws import AwsWorld, MotoServer

    from cocoon_net.platform import aws

    moto = MotoServer().start()
    try:
        with netns("bench") as ns:
            world = AwsWorld(moto, ns.name, instance_type)
            ns.ip("link", "add", "eth0", "address", world.mac, "type", "veth", "peer", "name", "e0")
            try:

                def run() -> tuple[ProvisionResult, float]:
                    start = time.monotonic()
                    result = aws.create(world.environ()).provision(
                        request_of(140, AWS_SUBNET), lambda _mapping: None
                    )
                    return result, time.monotonic() - start

                result, seconds = ns.call(run)
                return result, seconds, len(world.proxy.calls)
            finally:
                world.stop()
    finally:
        moto.stop()


def aws_report() -> None:
    for instance_type in ("c5.metal", "m4.16xlarge"):
        result, seconds, calls = aws_init(instance_type)
        print(
            f"aws init ({instance_type}): {len(result.eni_ids)} ENIs, {len(result.ips)} IPs "
            f"in {seconds:.1f} s, {calls} EC2 calls"
        )


def main() -> None:
    attach = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    create = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    with netns("bench") as ns, tempfile.TemporaryDirectory():
        emu = VolcEmulator()
        emu.attach_delay, emu.create_delay = attach, create
        emu.hotplug_into(ns.name)
        emu.start(netns=ns.name)
        try:
            result, seconds = ns.call(provision, emu.environ())
        finally:
            emu.stop()
        calls = Counter(emu.calls)
    print(f"emulated create {create:.1f} s, attach {attach:.1f} s per ENI")
    print(f"init: {len(result.eni_ids)} ENIs, {len(result.ips)} IPs in {seconds:.1f} s")
    print(f"VPC API calls: {sum(calls.values())} (target < 30)")
    for action, count in sorted(calls.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {count:3d} {action}")
    print(f"Go tool fixed sleeps alone: {GO_FIXED_SLEEP:.0f} s")
    print(f"ratio: {seconds / GO_FIXED_SLEEP:.2f} ({GO_FIXED_SLEEP / seconds:.1f}x faster)")
    aws_report()


if __name__ == "__main__":
    main()
