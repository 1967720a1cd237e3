"""The VM guard: each VM can use only the address it leased, with real clients and raw frames.

Each attack is checked on both sides: what it tried to reach did not see it (a sniffer in
the victim's namespace, the node's neighbour table, the peer's replies) and the guard's drop
counter for its reason rose, so a frame that never left cannot pass for one that was dropped.
Where port isolation alone would already stop a frame between VMs, the test turns it off for
those ports (as a CNI bridge plugin that ignores `portIsolation` does), so only the guard is
left to stop it.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from cocoon_net.dhcp import effects
from cocoon_net.dhcp.leases import Change, LeaseTable
from cocoon_net.errors import HostSetupError
from cocoon_net.node import guard, watch
from cocoon_net.node.nft import Nft
from cocoon_net.sandbox import Sandbox, Udhcpc, Vm
from tests.support.daemon import NodeDaemon, node_with_daemon, wait_for
from tests.support.netns import Netns, is_root, netns
from tests.support.rawclient import mac_bytes

pytestmark = [
    pytest.mark.netns,
    pytest.mark.clients,
    pytest.mark.skipif(not is_root(), reason="needs root to create network namespaces"),
]

DROPS = "cocoon_net_guard_drops_total"

# Counts the frames on IFNAME that match KIND for SECONDS; prints "ready" once listening and
# the count at the end. KIND: echo:IP (ICMP echo requests to IP), udp67:MAC (DHCP server
# replies from MAC), ra:MAC (IPv6 router advertisements from MAC), ip6:MAC (any IPv6 from MAC).
_SNIFF = r"""
import socket, sys, time
ifname, seconds, kind = sys.argv[1], float(sys.argv[2]), sys.argv[3]
what, _, arg = kind.partition(":")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 3))
s.settimeout(0.1)
print("ready", flush=True)
count, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        f = s.recv(4096)
    except TimeoutError:
        continue
    src = f[6:12].hex(":")
    etype = int.from_bytes(f[12:14], "big")
    if what == "echo" and etype == 0x0800 and f[23] == 1 and f[34] == 8:
        count += socket.inet_ntoa(f[30:34]) == arg
    elif what == "udp67" and etype == 0x0800 and f[23] == 17 and src == arg:
        ihl = (f[14] & 15) * 4
        count += int.from_bytes(f[14 + ihl:16 + ihl], "big") == 67
    elif what == "ra" and etype == 0x86DD and f[20] == 58 and f[54] == 134 and src == arg:
        count += 1
    elif what == "ip6" and etype == 0x86DD and src == arg:
        count += 1
print(count, flush=True)
"""


class Sniffer:
    def __init__(self, sandbox: Sandbox, ns: str, ifname: str, kind: str, seconds: float):
        self.proc = sandbox.popen(
            ns,
            [sys.executable, "-c", _SNIFF, ifname, str(seconds), kind],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def count(self) -> int:
        out, _ = self.proc.communicate(timeout=60)
        return int(out.strip())


def send_frames(ifname: str, frames: list[bytes]) -> None:
    """Run inside a VM's namespace: put each frame on the wire as it is."""
    import socket

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for frame in frames:
            sock.send(frame)


def arp_frame(mac: str, ip: IPv4Address, *, op: int) -> bytes:
    """A gratuitous ARP (request or reply) saying `ip is at mac`, broadcast."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
    arp += mac_bytes(mac) + ip.packed + b"\xff" * 6 + ip.packed
    return b"\xff" * 6 + mac_bytes(mac) + b"\x08\x06" + arp


def ra_frame(mac: str, icmp_type: int = 134) -> bytes:
    """An IPv6 router advertisement (or another ICMPv6 type) from a link-local address to
    all nodes."""
    icmp = struct.pack("!BBHBBHII", icmp_type, 0, 0, 64, 0, 1800, 0, 0)
    src = bytes.fromhex("fe80000000000000") + bytes.fromhex("0000000000000001")
    dst = bytes.fromhex("ff020000000000000000000000000001")
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + src + dst
    return bytes.fromhex("333300000001") + mac_bytes(mac) + b"\x86\xdd" + ip6 + icmp


def drops(node: NodeDaemon, reason: str) -> float:
    return node.metric(DROPS, reason=reason)


def ping(
    sandbox: Sandbox, ns: str, target: IPv4Address, *args: str
) -> subprocess.CompletedProcess[str]:
    return sandbox.run(ns, ["ping", "-n", "-q", *args, str(target)], ok_codes=(0, 1))


def received(result: subprocess.CompletedProcess[str]) -> int:
    for line in result.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(f"no ping summary: {result.stdout!r}")


def isolation_off(sandbox: Sandbox, *vms: Vm) -> None:
    for vm in vms:
        sandbox.run(
            sandbox.node,
            ["ip", "link", "set", "dev", vm.port, "type", "bridge_slave", "isolated", "off"],
        )


def kernel_elements(sandbox: Sandbox) -> dict[IPv4Address, str] | None:
    """The guard's `MAC . address` elements in the node's kernel, None without its tables."""
    out = sandbox.run(sandbox.node, ["nft", "-j", "list", "tables"]).stdout
    names = {
        (t["table"]["family"], t["table"]["name"])
        for t in json.loads(out)["nftables"]
        if "table" in t
    }
    if ("bridge", "cocoon-net") not in names:
        return None
    raw = sandbox.run(
        sandbox.node, ["nft", "-j", "list", "set", "bridge", "cocoon-net", "leased"]
    ).stdout
    found: dict[IPv4Address, str] = {}
    for item in json.loads(raw)["nftables"]:
        for elem in item.get("set", {}).get("elem", ()):
            mac, ip = elem["concat"]
            found[IPv4Address(ip)] = mac
    return found


@pytest.fixture
def node3(tmp_path: Path) -> Iterator[tuple[Sandbox, NodeDaemon]]:
    with node_with_daemon(3, tmp_path) as pair:
        yield pair


def test_a_vm_cannot_take_another_vms_address(node3: tuple[Sandbox, NodeDaemon]) -> None:
    sandbox, node = node3
    vm_a, vm_b, _ = sandbox.vms
    a, b = Udhcpc(sandbox, vm_a), Udhcpc(sandbox, vm_b)
    ip_a, ip_b = a.start(), b.start()
    assert received(ping(sandbox, sandbox.peer, ip_a, "-c", "3", "-i", "0.2", "-W", "2")) == 3
    assert received(ping(sandbox, vm_b.netns, sandbox.peer_ip, "-c", "1", "-W", "2")) == 1
    before = {r: drops(node, r) for r in ("ip_spoof", "arp_spoof")}

    # B takes A's address by hand and tells the bridge with gratuitous ARP.
    sandbox.run(vm_b.netns, ["ip", "addr", "add", f"{ip_a}/24", "dev", vm_b.ifname])
    garps = [arp_frame(vm_b.mac, ip_a, op=op) for op in (1, 2, 1, 2)]
    Netns(vm_b.netns).call(send_frames, vm_b.ifname, garps)

    # The VPC peer's pings to A reach A only, and A answers every one.
    sniffer = Sniffer(sandbox, vm_b.netns, vm_b.ifname, f"echo:{ip_a}", seconds=4)
    result = ping(sandbox, sandbox.peer, ip_a, "-c", "10", "-i", "0.2", "-W", "2")
    assert sniffer.count() == 0, "B received the peer's pings to A"
    assert received(result) == 10, result.stdout
    neigh = sandbox.run(sandbox.node, ["ip", "-j", "neigh", "show", str(ip_a), "dev", "cni0"])
    assert [n["lladdr"] for n in json.loads(neigh.stdout)] == [vm_a.mac]

    # B's packets with A's source address are dropped and counted.
    spoofed = ping(sandbox, vm_b.netns, sandbox.peer_ip, "-I", str(ip_a), "-c", "3", "-W", "1")
    assert received(spoofed) == 0
    assert drops(node, "ip_spoof") >= before["ip_spoof"] + 3
    assert drops(node, "arp_spoof") >= before["arp_spoof"] + len(garps)

    # A kept working throughout; B with its own address still does too.
    assert sandbox.source_seen_by_peer(vm_a.netns) == ip_a
    assert a.renew() == ip_a
    assert received(ping(sandbox, vm_b.netns, sandbox.peer_ip, "-I", str(ip_b), "-c", "1")) == 1


def test_no_rogue_dhcp_server_no_router_advertisement(
    node3: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, node = node3
    _, vm_b, vm_c = sandbox.vms
    Udhcpc(sandbox, vm_b).start()
    isolation_off(sandbox, vm_b, vm_c)
    served_before = drops(node, "dhcp_server")

    # B runs a DHCP server of its own (dnsmasq); C's DISCOVER reaches it, its OFFER does not
    # reach C, and C gets its lease from the node.
    leases = vm_b.statedir / "rogue.leases"
    dnsmasq = [
        "dnsmasq", "--no-daemon", "--port=0", "--interface", vm_b.ifname, "--bind-interfaces",
        "--dhcp-range=172.20.100.200,172.20.100.250,1m", "--dhcp-authoritative", "--no-ping",
        f"--dhcp-leasefile={leases}", "--pid-file=", "--conf-file=/dev/null",
    ]  # fmt: skip
    rogue = sandbox.popen(
        vm_b.netns, dnsmasq, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert rogue.stderr is not None
        for line in rogue.stderr:  # ready once its DHCP socket is bound
            if "sockets bound" in line:
                break
        sniffer = Sniffer(sandbox, vm_c.netns, vm_c.ifname, f"udp67:{vm_b.mac}", seconds=4)
        ip_c = Udhcpc(sandbox, vm_c).start()
        assert sniffer.count() == 0, "C received a DHCP reply from B"
    finally:
        rogue.terminate()
        rogue.communicate(timeout=10)
    assert not IPv4Address("172.20.100.200") <= ip_c <= IPv4Address("172.20.100.250")
    assert drops(node, "dhcp_server") > served_before

    # B's router advertisements reach neither C nor the node.
    ra_before = drops(node, "router_advert")
    sniffer = Sniffer(sandbox, vm_c.netns, vm_c.ifname, f"ra:{vm_b.mac}", seconds=2)
    Netns(vm_b.netns).call(send_frames, vm_b.ifname, [ra_frame(vm_b.mac)] * 3)
    assert sniffer.count() == 0, "C received B's router advertisement"
    assert drops(node, "router_advert") == ra_before + 3

    # Nor any other IPv6: the node was not set up with --allow-ipv6.
    ipv6_before = drops(node, "ipv6")
    sniffer = Sniffer(sandbox, vm_c.netns, vm_c.ifname, f"ip6:{vm_b.mac}", seconds=2)
    Netns(vm_b.netns).call(send_frames, vm_b.ifname, [ra_frame(vm_b.mac, icmp_type=128)] * 2)
    assert sniffer.count() == 0, "C received B's IPv6"
    assert drops(node, "ipv6") >= ipv6_before + 2  # B's own router solicitations count too


def _via_gateway(
    sandbox: Sandbox, src: Vm, src_ip: IPv4Address, dst: Vm, dst_ip: IPv4Address
) -> subprocess.CompletedProcess[str]:
    """src pings dst, both ways routed through the node (port isolation stops layer 2)."""
    for vm, peer in ((src, dst_ip), (dst, src_ip)):
        sandbox.run(vm.netns, ["ip", "route", "replace", f"{peer}/32", "via", str(sandbox.gateway)])
    return ping(sandbox, src.netns, dst_ip, "-c", "3", "-i", "0.2", "-W", "1")


def test_vms_cannot_reach_each_other_through_the_gateway(
    node3: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, node = node3
    vm_a, vm_b, _ = sandbox.vms
    ip_a, ip_b = Udhcpc(sandbox, vm_a).start(), Udhcpc(sandbox, vm_b).start()
    before = drops(node, "vm_to_vm")
    assert received(_via_gateway(sandbox, vm_b, ip_b, vm_a, ip_a)) == 0
    assert drops(node, "vm_to_vm") >= before + 3
    conflist = json.loads((node.paths.cni_conf_dir / "30-cocoon-dhcp.conflist").read_text())
    assert conflist["plugins"][0]["portIsolation"] is True


def test_allow_vm_to_vm_and_ipv6(tmp_path: Path) -> None:
    flags = ["--allow-vm-to-vm", "--allow-ipv6"]
    with node_with_daemon(2, tmp_path, adopt_flags=flags) as (sandbox, node):
        vm_a, vm_b = sandbox.vms
        ip_a, ip_b = Udhcpc(sandbox, vm_a).start(), Udhcpc(sandbox, vm_b).start()
        assert received(_via_gateway(sandbox, vm_b, ip_b, vm_a, ip_a)) == 3
        pool = json.loads(node.paths.pool_file.read_text())
        assert pool["guard"]["allowVmToVm"] is True
        assert pool["guard"]["allowIPv6"] is True
        # IPv6 passes (seen on the bridge by the node), router advertisements still do not.
        ra_before = drops(node, "router_advert")
        sniffer = Sniffer(sandbox, sandbox.node, "cni0", f"ip6:{vm_b.mac}", seconds=2)
        frames = [ra_frame(vm_b.mac, icmp_type=128)] * 2 + [ra_frame(vm_b.mac)]
        Netns(vm_b.netns).call(send_frames, vm_b.ifname, frames)
        assert sniffer.count() >= 2
        assert drops(node, "router_advert") == ra_before + 1
        conflist = json.loads((node.paths.cni_conf_dir / "30-cocoon-dhcp.conflist").read_text())
        assert conflist["plugins"][0]["portIsolation"] is False


def test_release_and_expiry(tmp_path: Path) -> None:
    with node_with_daemon(3, tmp_path, lease_time="10") as (sandbox, node):
        vm_a, vm_b, vm_c = sandbox.vms
        a = Udhcpc(sandbox, vm_a)
        ip_a = a.start()
        a.release()
        # A's address is no longer A's: from A's port it is dropped.
        sandbox.run(vm_a.netns, ["ip", "addr", "add", f"{ip_a}/24", "dev", vm_a.ifname])
        with pytest.raises(HostSetupError):
            sandbox.source_seen_by_peer(vm_a.netns, timeout=2)
        # B leases through DHCP and its first datagram gets through.
        ip_b = Udhcpc(sandbox, vm_b).start()
        assert sandbox.source_seen_by_peer(vm_b.netns) == ip_b

        # C's lease expires (its client is gone, its address stays on eth0).
        c = Udhcpc(sandbox, vm_c)
        ip_c = c.start()
        c.stop()
        sandbox.run(vm_c.netns, ["ip", "addr", "replace", f"{ip_c}/24", "dev", vm_c.ifname])
        assert sandbox.source_seen_by_peer(vm_c.netns) == ip_c
        wait_for(lambda: ip_c not in node.routes() or None, "C's lease to expire", timeout=30)
        before = drops(node, "ip_spoof")
        with pytest.raises(HostSetupError):
            sandbox.source_seen_by_peer(vm_c.netns, timeout=2)
        assert drops(node, "ip_spoof") > before
        assert ip_c not in (kernel_elements(sandbox) or {})


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "tables-lost"])
def test_restart_with_live_vms(tmp_path: Path, how: str) -> None:
    with node_with_daemon(3, tmp_path) as (sandbox, node):
        vm_a, vm_b, _ = sandbox.vms
        ip_a, ip_b = Udhcpc(sandbox, vm_a).start(), Udhcpc(sandbox, vm_b).start()
        sandbox.run(vm_b.netns, ["ip", "addr", "add", f"{ip_a}/24", "dev", vm_b.ifname])
        wanted = {ip_a: vm_a.mac, ip_b: vm_b.mac}
        pings = {
            ip: sandbox.popen(
                sandbox.peer,
                ["ping", "-n", "-q", "-c", "40", "-i", "0.1", "-W", "2", str(ip)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for ip in (ip_a, ip_b)
        }
        node.stop(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        if how == "tables-lost":
            sandbox.run(sandbox.node, ["nft", "flush", "ruleset"])
        else:  # the guard stays in the kernel while no daemon runs
            assert kernel_elements(sandbox) == wanted
        node.start()
        # READY=1 has been sent: the guard must already hold every lease.
        assert kernel_elements(sandbox) == wanted
        spoofed = ping(sandbox, vm_b.netns, sandbox.peer_ip, "-I", str(ip_a), "-c", "2", "-W", "1")
        assert received(spoofed) == 0
        for ip, proc in pings.items():
            out, _ = proc.communicate(timeout=60)
            assert " 0% packet loss" in out, f"{ip}: {out}"


def test_flushed_ruleset_is_restored(node3: tuple[Sandbox, NodeDaemon]) -> None:
    sandbox, node = node3
    vm_a = sandbox.vms[0]
    ip_a = Udhcpc(sandbox, vm_a).start()
    sandbox.run(sandbox.node, ["nft", "flush", "ruleset"])
    found = wait_for(lambda: kernel_elements(sandbox), "the guard to come back", timeout=10)
    assert found == {ip_a: vm_a.mac}
    assert "VM guard: tables missing; restored" in node.log()


def test_status_and_teardown(node3: tuple[Sandbox, NodeDaemon]) -> None:
    sandbox, node = node3
    Udhcpc(sandbox, sandbox.vms[0]).start()
    Udhcpc(sandbox, sandbox.vms[1]).start()
    assert "Guard:      on: 2 VMs guarded on 3 bridge ports" in node.status()
    node.stop()
    assert json.loads(node.paths.pool_file.read_text())["guard"]["installed"] is True
    out = node.teardown()
    assert "removed nftables table bridge cocoon-net" in out
    assert "removed nftables table inet cocoon-net" in out
    tables = sandbox.run(sandbox.node, ["nft", "list", "tables"]).stdout
    assert "cocoon-net" not in tables
    assert "nothing to tear down" in node.teardown()


def test_no_guard_removes_the_tables(tmp_path: Path) -> None:
    with node_with_daemon(1, tmp_path) as (sandbox, node):
        assert kernel_elements(sandbox) == {}
        node.stop()
        node.start("--no-guard")
        assert kernel_elements(sandbox) is None
        assert "OFF (--no-guard)" in node.status()
        assert json.loads(node.paths.pool_file.read_text())["guard"]["installed"] is False


# ---------------------------------------------------------------- cost per lease change


def _one_vm_is_one_element(leases: int) -> dict[str, int]:
    """Run in a fresh namespace: a guard holding `leases` leases, then one VM's grant and its
    release, watched by `nft monitor`; what the kernel saw for each."""
    pool = [IPv4Address("10.0.0.0") + i for i in range(2, leases + 3)]
    table = LeaseTable(pool)
    now = time.time()
    for i, ip in enumerate(pool[:leases]):
        table.grant(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", ip, now, 3600)
    nft = Nft()
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")), nft)
    handle.install(effects.guarded(table, {}, now), ["veth0"])
    monitor = subprocess.Popen(["nft", "monitor"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # nft monitor subscribes before it prints anything
    counts: dict[str, int] = {}
    vm, ip = "02:aa:00:00:00:01", pool[leases]
    steps: dict[str, Callable[[], list[Change]]] = {
        "grant": lambda: table.grant(vm, ip, now, 3600),
        "release": lambda: table.release(vm, ip, now),
    }
    for step, change in steps.items():
        sent = handle.writer.transactions
        touched = effects.touched(change())
        handle.update(effects.guard_elements(table, handle.elements, touched, now))
        counts[f"{step}_transactions"] = handle.writer.transactions - sent
    nft.run("add table inet cocoon-end\n")  # a marker: everything before it was printed
    lines: list[str] = []
    assert monitor.stdout is not None
    for line in monitor.stdout:
        if "cocoon-end" in line:
            break
        lines.append(line)
    monitor.kill()
    monitor.wait()
    counts["element_adds"] = sum(line.startswith("add element") for line in lines)
    counts["element_deletes"] = sum(line.startswith("delete element") for line in lines)
    counts["generations"] = sum(line.startswith("# new generation") for line in lines)
    return counts


def test_one_vm_is_one_set_update_among_1000() -> None:
    with netns("guard") as ns:
        counts = ns.call(_one_vm_is_one_element, 1000)
    assert counts == {
        "grant_transactions": 1,
        "release_transactions": 1,
        "element_adds": 1,
        "element_deletes": 1,
        "generations": 2,
    }


class _CountingReads:
    """The element writer's netlink socket, counting the reads of its answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reads = sock, 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)


def _element_answers() -> list[tuple[str, int, str]]:
    """Run in a fresh namespace: element transactions that succeed and fail; for each, the
    answers read and the error; then what @leased holds."""
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")))
    handle.install({}, ["veth0"])
    writer = handle.writer
    counting = _CountingReads(writer._sock)
    writer._sock = counting  # type: ignore[assignment]
    a, b, c = (IPv4Address(f"10.0.0.{i}") for i in (2, 3, 4))
    mac = "02:00:00:00:00:0{}".format
    key = guard.element_key
    steps: dict[str, Callable[[], None]] = {
        "add": lambda: writer.apply([], [key(a, mac(2)), key(b, mac(3))]),
        # The delete fails (no such element) and the add after it asks for the only ACK.
        "delete absent, add": lambda: writer.apply([key(c, mac(4))], [key(c, mac(4))]),
        "delete, add": lambda: writer.apply([key(a, mac(2))], [key(c, mac(4))]),
        "delete only": lambda: writer.apply([key(b, mac(3))], []),
    }
    seen = []
    for step, change in steps.items():
        counting.reads = 0
        try:
            change()
            error = ""
        except HostSetupError as exc:
            error = str(exc)
        seen.append((step, counting.reads, error))
    elements = guard.read_kernel(handle.nft)
    assert elements is not None
    seen.append(("left", len(elements.elements), str(sorted(elements.elements))))
    writer._sock = counting.sock
    handle.close()
    return seen


def test_an_element_transaction_is_read_once_and_its_errors_all_reported() -> None:
    # Only the last message of a transaction asks for an ACK; a failure of any message still
    # comes back (and undoes the whole transaction), and a success is one read.
    with netns("guard") as ns:
        assert ns.call(_element_answers) == [
            ("add", 1, ""),
            (
                "delete absent, add",
                2,
                "nftables: set element update refused: No such file or directory",
            ),
            ("delete, add", 1, ""),
            ("delete only", 1, ""),
            ("left", 1, str([IPv4Address("10.0.0.4")])),
        ]


def _ruleset_echoes() -> list[tuple[str, bool, bool]]:
    """Run in a fresh namespace: the guard's own element changes, then someone else's, watched
    by the daemon's ruleset event socket; for each, whether anything reached the socket and
    whether it read as a change that needs a reconcile."""
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")))
    handle.install({}, ["veth0"])
    events = watch.RulesetEvents(quiet=handle.writer.portid)
    other = Nft()
    steps: dict[str, Callable[[], object]] = {
        "grant": lambda: handle.update({IPv4Address("10.0.0.2"): "02:00:00:00:00:02"}),
        "release": lambda: handle.update({IPv4Address("10.0.0.2"): None}),
        "foreign element": lambda: other.run(
            "add element bridge cocoon-net leased { 02:00:00:00:00:09 . 10.0.0.9 }\n"
        ),
        "foreign rule": lambda: other.run("flush chain bridge cocoon-net vm_ipv4\n"),
    }
    seen = []
    for step, change in steps.items():
        change()
        queued = bool(select.select([events], [], [], 0.2)[0])
        seen.append((step, queued, events.drain()))
    events.close()
    handle.close()
    return seen


def test_the_kernel_drops_the_echo_of_the_guards_own_changes() -> None:
    # One set-element transaction per grant: its notifications never wake the daemon. Anyone
    # else's change still arrives, and a changed rule brings a reconcile.
    with netns("guard") as ns:
        assert ns.call(_ruleset_echoes) == [
            ("grant", False, False),
            ("release", False, False),
            ("foreign element", True, False),
            ("foreign rule", True, True),
        ]


def _in_line_steps() -> list[tuple[str, bool]]:
    """Run in a fresh namespace: whether the guard can tell, without listing its tables, that
    the kernel holds what it wants, after each of its own changes and of someone else's."""
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")))
    reader = guard.GuardReader()
    other = Nft()
    a, b = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")
    wanted: dict[IPv4Address, str] = {a: "02:00:00:00:00:02"}
    steps: dict[str, Callable[[], object]] = {
        "installed": lambda: handle.install(wanted, ["veth0"]),
        "compared": lambda: handle.reconcile(wanted, handle.ports, reader.snapshot()),
        "granted": lambda: handle.update({b: "02:00:00:00:00:03"}),
        "foreign table": lambda: other.run("add table inet other\n"),
        "released after it": lambda: handle.update({b: None}),
        "port added after it": lambda: handle.set_ports(["veth0", "veth1"]),
        "compared again": lambda: handle.reconcile(wanted, handle.ports, reader.snapshot()),
        "port removed": lambda: handle.set_ports(["veth0"]),
        "foreign element": lambda: other.run(
            "delete element bridge cocoon-net leased { 02:00:00:00:00:02 . 10.0.0.2 }\n"
        ),
        "installed after it": lambda: handle.install(wanted, ["veth0"]),
        "foreign table again": lambda: other.run("delete table inet other\n"),
    }
    seen = []
    for step, change in steps.items():
        change()
        wanted = dict(handle.elements)
        seen.append((step, handle.in_line(wanted, handle.ports)))
    seen.append(("other ports wanted", handle.in_line(wanted, ["veth1"])))
    kernel = reader.snapshot()
    assert kernel is not None and kernel.elements == wanted  # restored by the install
    handle.close()
    return seen


def test_the_guard_knows_its_tables_are_untouched_from_the_ruleset_generation() -> None:
    # The periodic comparison lists every element (about a second of CPU with 60,000 VMs);
    # it is needed only once someone else has committed to the ruleset.
    with netns("guard") as ns:
        assert ns.call(_in_line_steps) == [
            ("installed", True),  # the ruleset moved by one commit around it: ours
            ("compared", True),
            ("granted", True),
            ("foreign table", False),
            ("released after it", False),  # applied all the same, unchecked
            ("port added after it", False),  # one commit, but the foreign one is before it
            ("compared again", True),
            ("port removed", True),
            ("foreign element", False),
            ("installed after it", True),  # the tables replaced whole
            ("foreign table again", False),
            ("other ports wanted", False),
        ]


def test_the_periodic_comparison_is_skipped_until_someone_else_commits(
    node3: tuple[Sandbox, NodeDaemon],
) -> None:
    sandbox, node = node3
    vm_a, vm_b, _ = sandbox.vms
    ip_a = Udhcpc(sandbox, vm_a).start()
    daemon = node.proc
    assert daemon is not None

    def reconcile_until(line: str) -> None:
        before = node.log().count(line)
        daemon.send_signal(signal.SIGHUP)  # a full reconcile round, the guard's included
        wait_for(lambda: node.log().count(line) > before or None, line)

    # The install at start-up moved the ruleset by one commit: the guard knows it is its own.
    reconcile_until("as the guard left it; not listed")
    assert "VM guard: compared with the kernel" not in node.log()
    ip_b = Udhcpc(sandbox, vm_b).start()  # one more transaction of the guard's own
    reconcile_until("as the guard left it; not listed")
    sandbox.run(
        sandbox.node,
        [
            "nft",
            "delete",
            "element",
            "bridge",
            "cocoon-net",
            "leased",
            f"{{ {vm_a.mac} . {ip_a} }}",
        ],
    )
    reconcile_until("VM guard: leased addresses differ; restored")
    assert kernel_elements(sandbox) == {ip_a: vm_a.mac, ip_b: vm_b.mac}
    listed = node.log().count("VM guard: compared with the kernel")
    reconcile_until("as the guard left it; not listed")  # the tables were replaced whole
    assert node.log().count("VM guard: compared with the kernel") == listed


@pytest.mark.parametrize("tables", ["kept", "lost"])
def test_lost_lease_file(tmp_path: Path, tables: str) -> None:
    """The daemon recovers leased addresses from its routes, without their MAC: the VM that
    answers ARP for one at start (or, failing that, the MAC the guard in the kernel still
    allows) keeps it and keeps working; no other VM may use it."""
    with node_with_daemon(2, tmp_path) as (sandbox, node):
        vm_a, vm_b = sandbox.vms
        a = Udhcpc(sandbox, vm_a)
        ip_a, ip_b = a.start(), Udhcpc(sandbox, vm_b).start()
        node.stop()
        for path in node.paths.state_dir.glob("leases.json*"):
            path.unlink()
        if tables == "lost":
            sandbox.run(sandbox.node, ["nft", "flush", "ruleset"])
        node.start()
        assert node.leases() == {}  # held from the routes only
        sandbox.run(vm_b.netns, ["ip", "addr", "add", f"{ip_a}/24", "dev", vm_b.ifname])
        spoofed = ping(sandbox, vm_b.netns, sandbox.peer_ip, "-I", str(ip_a), "-c", "2", "-W", "1")
        assert received(spoofed) == 0
        assert kernel_elements(sandbox) == {ip_a: vm_a.mac, ip_b: vm_b.mac}
        assert sandbox.source_seen_by_peer(vm_a.netns) == ip_a
        assert a.renew() == ip_a  # A speaks DHCP: its lease, and its element, stay
        assert sandbox.source_seen_by_peer(vm_a.netns) == ip_a
        assert kernel_elements(sandbox) == {ip_a: vm_a.mac, ip_b: vm_b.mac}


def _tampered(change: str) -> tuple[str, bool]:
    """Run in a fresh namespace: install a guard, let someone change it by hand, reconcile;
    what reconcile found and whether the kernel holds the whole guard again."""
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")))
    elements = {IPv4Address("10.0.0.2"): "02:00:00:00:00:02"}
    handle.install(elements, ["veth0"])
    handle.nft.run(change + "\n")
    reader = guard.GuardReader()
    problem = handle.reconcile(elements, ["veth0"], reader.snapshot())
    after = reader.snapshot()
    whole = (
        after is not None
        and after.elements == elements
        and after.ports == {"veth0"}
        and after.rules == guard.expected_rules(handle.policy)
    )
    return problem, whole


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ("delete element bridge cocoon-net leased { 02:00:00:00:00:02 . 10.0.0.2 }",
         "leased addresses differ"),
        ("add element bridge cocoon-net leased { 02:00:00:00:00:09 . 10.0.0.9 }",
         "leased addresses differ"),
        ("flush chain bridge cocoon-net vm_ipv4", "rules changed"),
        ("delete element bridge cocoon-net ports { \"veth0\" }", "ports differ"),
        ("delete table inet cocoon-net", "tables missing"),
    ],
)  # fmt: skip
def test_reconcile_rebuilds_a_changed_guard(change: str, found: str) -> None:
    with netns("guard") as ns:
        assert ns.call(_tampered, change) == (found, True)


def _listed_while_the_guard_commits(leases: int) -> tuple[str, bool]:
    """Run in a fresh namespace: a guard of `leases` elements listed while the guard commits
    an element change after another (as under load, one per grant); what the listing said,
    and whether it came back while the commits still went on (they stop after 20 s)."""
    handle = guard.Guard(guard.GuardPolicy("cni0", IPv4Address("10.0.0.1")))
    base = IPv4Address("10.1.0.0")
    handle.install({base + i: f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(leases)},
                   ["veth0"])  # fmt: skip
    listed = threading.Event()
    vm = IPv4Address("10.2.0.1")

    def churn() -> None:
        deadline = time.monotonic() + 20
        while not listed.is_set() and time.monotonic() < deadline:
            handle.update({vm: "02:aa:00:00:00:01"})
            handle.update({vm: None})

    committing = threading.Thread(target=churn)
    committing.start()
    try:
        guard.GuardReader().snapshot()
        said = "listed"
    except guard.Outdated as exc:
        said = str(exc)
    during = committing.is_alive()
    listed.set()
    committing.join()
    handle.close()
    return said, during


def test_a_listing_outdated_by_commits_stops_instead_of_starting_over() -> None:
    # A listing takes a fraction of a second with thousands of elements; under load the guard
    # commits every millisecond. nft starts a listing again whenever the ruleset moves under
    # it, so it would run (and burn CPU) for as long as the load lasts.
    with netns("guard") as ns:
        said, during = ns.call(_listed_while_the_guard_commits, 5000)
    assert said.startswith("the ruleset moved past generation") and during
