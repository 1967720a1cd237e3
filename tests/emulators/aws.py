"""EC2 for tests: moto in server mode behind a proxy of ours that adds what moto lacks.

    moto = MotoServer().start()             # once per test session, on 127.0.0.1
    proxy = Ec2Proxy(moto.url, netns="cnt-x", hotplug=True).start()
    proxy.inject("AttachNetworkInterface", "lost")        # done, but the answer is lost
    proxy.inject("DescribeSubnets", "RequestLimitExceeded", times=2)
    proxy.hide_new("CreateNetworkInterface", describes=2)  # eventual consistency

moto 5 keeps the EC2 state (VPCs, subnets, instances, ENIs, security groups, instance types
and their limits); the proxy, listening inside the node's network namespace, forwards the
query API to it and adds:

- prefix delegation as EC2 documents it: `Ipv4PrefixCount` / `Ipv4Prefix.N` on
  CreateNetworkInterface, AssignPrivateIpAddresses and UnassignPrivateIpAddresses, and
  `ipv4PrefixSet` in the answers (moto ignores them), only on Nitro instance types;
- the instance type's limits: ENIs per instance (AttachmentLimitExceeded) and addresses per
  ENI (PrivateIpAddressLimitExceeded);
- addresses handed out lowest-first and never twice (moto draws them at random, unchecked);
- ClientToken idempotency: a repeated token gets the first answer back, or
  IdempotentParameterMismatch when its other parameters differ;
- CreateSubnet one at a time across every proxy in front of one moto, so that its
  InvalidSubnet.Conflict settles a race between nodes as EC2's does;
- hot-plug: an attach creates a veth link with the ENI's MAC in the namespace, a detach
  removes it, as the hypervisor would;
- faults: throttling and errors answered before moto sees the call, lost answers (moto does
  the work, the connection closes unanswered), and new resources hidden from a few
  Describe answers.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from tests.emulators import in_netns

NS = "http://ec2.amazonaws.com/doc/2016-11-15"  # as moto writes it
ET.register_namespace("", NS)
_THROTTLE_STATUS = 503
MOTO_AUTH = (
    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, "
    "SignedHeaders=host, Signature=0"
)


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's server in a child process on 127.0.0.1 (never elsewhere)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).close()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def instance_type_limits(name: str) -> tuple[int, int, bool]:
    """(max ENIs, addresses per ENI, Nitro) from the instance type data moto serves."""
    import moto

    data = Path(moto.__file__).parent / "ec2" / "resources" / "instance_types.json.gz"
    raw = json.loads(gzip.decompress(data.read_bytes()))[name]
    info = raw["NetworkInfo"]
    nitro = raw.get("Hypervisor") == "nitro" or bool(raw.get("BareMetal"))
    return int(info["MaximumNetworkInterfaces"]), int(info["Ipv4AddressesPerInterface"]), nitro


@dataclass
class Fault:
    action: str
    kind: str  # an error code answered instead of moto, or "lost"
    times: int


_ACCOUNT_LOCKS: dict[str, threading.Lock] = {}


def _account_lock(moto_url: str) -> threading.Lock:
    return _ACCOUNT_LOCKS.setdefault(moto_url, threading.Lock())


class ProxyError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def error_xml(code: str, message: str) -> bytes:
    return (
        f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}</Code>"
        f"<Message>{message}</Message></Error></Errors><RequestID>proxy</RequestID></Response>"
    ).encode()


class Ec2Proxy:
    def __init__(self, moto_url: str, *, netns: str | None = None, hotplug: bool = False):
        self.moto_url = moto_url
        self.netns = netns
        self.hotplug = hotplug
        self.calls: list[str] = []
        self.faults: list[Fault] = []
        self.prefixes: dict[str, list[IPv4Network]] = {}  # ENI id -> delegated /28s
        # (action, token) -> the parameters and the answer of the first call
        self._tokens: dict[tuple[str, str], tuple[dict[str, str], int, bytes]] = {}
        self._hidden: dict[str, list[Any]] = {}  # describe action -> [[id, answers left]]
        self._hide_next: dict[str, int] = {}
        self._lock = threading.RLock()  # one mutation at a time, as allocation needs
        self._httpd: ThreadingHTTPServer | None = None

    # --- control ---------------------------------------------------------------------------

    def inject(self, action: str, kind: str, *, times: int = 1) -> None:
        self.faults.append(Fault(action, kind, times))

    def hide_new(self, create: str, *, describes: int) -> None:
        """The next resource `create` makes stays out of `describes` Describe answers."""
        self._hide_next[create] = describes

    def hide(self, describe: str, resource_id: str, *, describes: int) -> None:
        """A resource made elsewhere a moment ago: out of the next `describes` answers."""
        self._hidden.setdefault(describe, []).append([resource_id, describes])

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> Ec2Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = in_netns(self.netns, lambda: ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # --- moto, directly --------------------------------------------------------------------

    def moto(self, action: str, params: dict[str, str]) -> ET.Element:
        status, body = self._forward({"Action": action, "Version": "2016-11-15", **params}, {})
        root = ET.fromstring(body)
        if status != 200:
            code = root.findtext(".//Code") or "Unknown"
            raise ProxyError(code, root.findtext(".//Message") or "", status)
        return root

    def _forward(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(
            self.moto_url + "/",
            data=urlencode(form).encode(),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                # moto routes by the service and region of the signature's scope
                "Authorization": MOTO_AUTH,
                **headers,
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def enis(self, **filters: str) -> list[ET.Element]:
        params: dict[str, str] = {}
        for n, (name, value) in enumerate(filters.items(), start=1):
            params[f"Filter.{n}.Name"] = name.replace("_", "-")
            params[f"Filter.{n}.Value.1"] = value
        found = self.moto("DescribeNetworkInterfaces", params).find(_q("networkInterfaceSet"))
        return [] if found is None else list(found)

    def _eni(self, eni_id: str) -> ET.Element:
        found = self.enis(network_interface_id=eni_id)
        if not found:
            raise ProxyError(
                "InvalidNetworkInterfaceID.NotFound",
                f"The networkInterface ID '{eni_id}' does not exist",
            )
        return found[0]

    def _used(self, subnet_id: str) -> set[IPv4Address]:
        used = {
            IPv4Address(ip.text or "")
            for eni in self.enis(subnet_id=subnet_id)
            for ip in eni.iter(_q("privateIpAddress"))
        }
        for nets in self.prefixes.values():
            for net in nets:
                used.update(net)
        return used

    def _subnet_cidr(self, subnet_id: str) -> IPv4Network:
        root = self.moto("DescribeSubnets", {"SubnetId.1": subnet_id})
        return IPv4Network(root.findtext(f".//{_q('cidrBlock')}") or "")

    def _free_ips(self, subnet_id: str, count: int) -> list[str]:
        net = self._subnet_cidr(subnet_id)
        used = self._used(subnet_id)
        # EC2 keeps the first four addresses and the last of every subnet.
        hosts = [ip for ip in list(net)[4:-1] if ip not in used]
        if len(hosts) < count:
            raise ProxyError("InsufficientFreeAddressesInSubnet", f"{net} is full")
        return [str(ip) for ip in hosts[:count]]

    def _free_prefixes(self, subnet_id: str, count: int) -> list[IPv4Network]:
        net = self._subnet_cidr(subnet_id)
        used = self._used(subnet_id)
        reserved = set(list(net)[:4]) | {net.broadcast_address}
        free = [p for p in net.subnets(new_prefix=28) if not (set(p) & (used | reserved))]
        if len(free) < count:
            raise ProxyError("InsufficientCidrBlocks", f"no free /28 left in {net}")
        return free[:count]

    def _limits_of(self, eni: ET.Element) -> tuple[int, bool] | None:
        instance_id = eni.findtext(f"{_q('attachment')}/{_q('instanceId')}")
        if not instance_id:
            return None
        root = self.moto("DescribeInstances", {"InstanceId.1": instance_id})
        _, per_eni, nitro = instance_type_limits(root.findtext(f".//{_q('instanceType')}") or "")
        return per_eni, nitro

    # --- serving ---------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        form = dict(parse_qsl(handler.rfile.read(length).decode(), keep_blank_values=True))
        action = form.get("Action", "")
        self.calls.append(action)
        fault = next((f for f in self.faults if f.action == action and f.times > 0), None)
        if fault is not None:
            fault.times -= 1
        if fault is not None and fault.kind != "lost":
            status = _THROTTLE_STATUS if fault.kind == "RequestLimitExceeded" else 400
            status = 500 if fault.kind in ("InternalError", "Unavailable") else status
            self._answer(handler, status, error_xml(fault.kind, "injected"))
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() == "authorization"}
        try:
            with self._lock:
                status, body = self._handle(action, form, headers)
        except ProxyError as exc:
            status, body = exc.status, error_xml(exc.code, exc.message)
        if fault is not None:  # lost: done, but no answer comes back
            handler.close_connection = True
            return
        self._answer(handler, status, body)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "text/xml")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _handle(
        self, action: str, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        token = form.get("ClientToken")
        if token and (action, token) in self._tokens:
            first, status, body = self._tokens[(action, token)]
            if first != form:
                raise ProxyError(
                    "IdempotentParameterMismatch",
                    "the client token was used with other parameters",
                )
            return status, body
        special = getattr(self, f"_a_{action}", None)
        status, body = special(form, headers) if special else self._forward(form, headers)
        if status == 200:
            body = self._after(action, form, body)
        if token and status == 200:
            self._tokens[(action, token)] = (dict(form), status, body)
        return status, body

    def _after(self, action: str, form: dict[str, str], body: bytes) -> bytes:
        root = ET.fromstring(body)
        created = (
            root.findtext(f".//{_q('networkInterfaceId')}")
            if action == "CreateNetworkInterface"
            else None
        )
        if action == "CreateSubnet":
            created = root.findtext(f".//{_q('subnetId')}")
        if created and action in self._hide_next:
            describe = (
                "DescribeSubnets" if action == "CreateSubnet" else "DescribeNetworkInterfaces"
            )
            self.hide(describe, created, describes=self._hide_next.pop(action))
        if action.startswith("Describe"):
            self._hide(action, root)
        for item in root.iter():
            if item.tag in (_q("item"), _q("networkInterface")):
                eni_id = item.findtext(_q("networkInterfaceId"))
                if eni_id and item.find(_q("macAddress")) is not None:
                    self._add_prefix_set(item, eni_id)
        out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return out

    def _hide(self, action: str, root: ET.Element) -> None:
        hidden = self._hidden.get(action) or []
        for entry in hidden:
            for parent in root.iter():
                for item in list(parent):
                    if item.tag == _q("item") and entry[0] in (
                        item.findtext(_q("networkInterfaceId")),
                        item.findtext(_q("subnetId")),
                    ):
                        parent.remove(item)
            entry[1] -= 1
        self._hidden[action] = [e for e in hidden if e[1] > 0]

    def _add_prefix_set(self, item: ET.Element, eni_id: str) -> None:
        for old in item.findall(_q("ipv4PrefixSet")):
            item.remove(old)
        prefix_set = ET.SubElement(item, _q("ipv4PrefixSet"))
        for net in self.prefixes.get(eni_id, []):
            ET.SubElement(ET.SubElement(prefix_set, _q("item")), _q("ipv4Prefix")).text = str(net)

    # --- actions moto gets wrong or leaves out ---------------------------------------------

    def _a_CreateSubnet(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        # moto checks for an overlapping subnet, then adds the new one, with nothing held
        # between: two proxies of one account could both pass the check. EC2 decides one
        # CreateSubnet at a time, and so does every proxy in front of this moto.
        with _account_lock(self.moto_url):
            return self._forward(form, headers)

    def _a_CreateNetworkInterface(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        form = dict(form)
        subnet_id = form.get("SubnetId", "")
        prefixes = int(form.pop("Ipv4PrefixCount", "0") or 0)
        ips = int(form.pop("SecondaryPrivateIpAddressCount", "0") or 0)
        if "PrivateIpAddress" not in form:
            form["PrivateIpAddress"] = self._free_ips(subnet_id, 1)[0]
        nets = self._free_prefixes(subnet_id, prefixes) if prefixes else []
        status, body = self._forward(form, headers)
        if status != 200:
            return status, body
        eni_id = ET.fromstring(body).findtext(f".//{_q('networkInterfaceId')}") or ""
        self.prefixes[eni_id] = nets
        if ips:
            addrs = self._free_ips(subnet_id, ips)
            self.moto("AssignPrivateIpAddresses", {
                "NetworkInterfaceId": eni_id,
                **{f"PrivateIpAddress.{n}": ip for n, ip in enumerate(addrs, start=1)},
            })  # fmt: skip
        return status, body

    def _a_AssignPrivateIpAddresses(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        eni_id = form.get("NetworkInterfaceId", "")
        eni = self._eni(eni_id)
        subnet_id = eni.findtext(_q("subnetId")) or ""
        prefixes = int(form.get("Ipv4PrefixCount", "0") or 0)
        ips = int(form.get("SecondaryPrivateIpAddressCount", "0") or 0)
        addresses = eni.findall(f"{_q('privateIpAddressesSet')}/{_q('item')}")
        have = len(addresses) + len(self.prefixes.get(eni_id, []))
        limits = self._limits_of(eni)
        if limits is not None:
            per_eni, nitro = limits
            if prefixes and not nitro:
                raise ProxyError(
                    "InvalidParameterValue", "prefix delegation needs a Nitro instance type"
                )
            if have + prefixes + ips > per_eni:
                raise ProxyError(
                    "PrivateIpAddressLimitExceeded",
                    f"Number of private addresses will exceed limit {per_eni}",
                )
        reply = ET.Element(_q("AssignPrivateIpAddressesResponse"))
        ET.SubElement(reply, _q("requestId")).text = "proxy"
        ET.SubElement(reply, _q("networkInterfaceId")).text = eni_id
        if prefixes:
            nets = self._free_prefixes(subnet_id, prefixes)
            self.prefixes.setdefault(eni_id, []).extend(nets)
            assigned = ET.SubElement(reply, _q("assignedIpv4PrefixSet"))
            for net in nets:
                ET.SubElement(ET.SubElement(assigned, _q("item")), _q("ipv4Prefix")).text = str(net)
        if ips:
            addrs = self._free_ips(subnet_id, ips)
            self.moto("AssignPrivateIpAddresses", {
                "NetworkInterfaceId": eni_id,
                **{f"PrivateIpAddress.{n}": ip for n, ip in enumerate(addrs, start=1)},
            })  # fmt: skip
            assigned = ET.SubElement(reply, _q("assignedPrivateIpAddressesSet"))
            for ip in addrs:
                ET.SubElement(ET.SubElement(assigned, _q("item")), _q("privateIpAddress")).text = ip
        ET.SubElement(reply, _q("return")).text = "true"
        return 200, ET.tostring(reply, encoding="utf-8", xml_declaration=True)

    def _a_UnassignPrivateIpAddresses(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        eni_id = form.get("NetworkInterfaceId", "")
        gone = [v for k, v in form.items() if re.fullmatch(r"Ipv4Prefix\.\d+", k)]
        if gone:
            self._eni(eni_id)
            have = self.prefixes.get(eni_id, [])
            missing = [p for p in gone if IPv4Network(p) not in have]
            if missing:
                raise ProxyError("InvalidParameterValue", f"prefix {missing[0]} not assigned")
            self.prefixes[eni_id] = [p for p in have if str(p) not in gone]
            form = {k: v for k, v in form.items() if not k.startswith("Ipv4Prefix.")}
        if any(k.startswith("PrivateIpAddress.") for k in form):
            return self._forward(form, headers)
        reply = (
            f"<UnassignPrivateIpAddressesResponse xmlns='{NS}'><requestId>proxy</requestId>"
            "<return>true</return></UnassignPrivateIpAddressesResponse>"
        )
        return 200, reply.encode()

    def _a_AttachNetworkInterface(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        instance_id = form.get("InstanceId", "")
        root = self.moto("DescribeInstances", {"InstanceId.1": instance_id})
        max_enis, _, _ = instance_type_limits(root.findtext(f".//{_q('instanceType')}") or "")
        if len(self.enis(**{"attachment.instance-id": instance_id})) >= max_enis:
            raise ProxyError(
                "AttachmentLimitExceeded", f"instance {instance_id} takes {max_enis} ENIs"
            )
        status, body = self._forward(form, headers)
        if status == 200 and self.hotplug and self.netns:
            eni_id = form.get("NetworkInterfaceId", "")
            mac = self._eni(eni_id).findtext(_q("macAddress")) or ""
            self._ip("link", "add", link_name(eni_id), "address", mac, "type", "veth",
                     "peer", "name", "p" + eni_id[-10:])  # fmt: skip
        return status, body

    def _a_DetachNetworkInterface(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        attachment = form.get("AttachmentId", "")
        found = [
            eni
            for eni in self.enis()
            if eni.findtext(f"{_q('attachment')}/{_q('attachmentId')}") == attachment
        ]
        status, body = self._forward(form, headers)
        if status == 200 and found and self.hotplug and self.netns:
            self._ip("link", "del", link_name(found[0].findtext(_q("networkInterfaceId")) or ""))
        return status, body

    def _a_DeleteNetworkInterface(
        self, form: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        status, body = self._forward(form, headers)
        if status == 200:
            self.prefixes.pop(form.get("NetworkInterfaceId", ""), None)
        return status, body

    def _ip(self, *argv: str) -> None:
        assert self.netns is not None
        subprocess.run(["ip", "-n", self.netns, *argv], capture_output=True, check=False)


def link_name(eni_id: str) -> str:
    """The OS name hot-plug gives an ENI's link: any name, the platform finds it by MAC."""
    return "en" + eni_id[-12:]


class AwsInstance:
    """One instance of the account: its primary ENI's MAC, its IMDS emulator and its proxy,
    both listening inside its node's namespace, as every instance reaches only its own."""

    def __init__(self, world: AwsWorld, netns: str, instance_type: str) -> None:
        from tests.emulators import EmulatorServer
        from tests.emulators.imds import ImdsEmulator

        self.instance = world.client.run_instances(
            ImageId="ami-12345678",
            MinCount=1,
            MaxCount=1,
            InstanceType=instance_type,
            SubnetId=world.node_subnet,
        )["Instances"][0]
        self.instance_id = str(self.instance["InstanceId"])
        primary = self.instance["NetworkInterfaces"][0]
        self.mac = str(primary["MacAddress"])
        self.sg = str(primary["Groups"][0]["GroupId"])
        self.imds = ImdsEmulator(self.instance_id, world.REGION, world.ZONE, self.mac, world.vpc_id)
        self.imds_server = EmulatorServer(self.imds.handle, netns=netns).start()
        self.proxy = Ec2Proxy(world.moto.url, netns=netns, hotplug=True).start()

    def environ(self) -> dict[str, str]:
        """Everything the platform needs to reach this account and nothing real."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL_EC2": self.proxy.url,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_server.url,
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }

    def stop(self) -> None:
        self.proxy.stop()
        self.imds.hung.set()
        self.imds_server.stop()


class AwsWorld(AwsInstance):
    """One account as a test needs it: a VPC with the node's subnet and the instance (its
    primary ENI's MAC on the namespace's eth0); `add_instance` puts more in the same VPC."""

    REGION = "us-east-1"
    ZONE = "us-east-1a"
    VPC_CIDR = "10.0.0.0/16"

    def __init__(self, moto: MotoServer, netns: str, instance_type: str = "c5.metal") -> None:
        moto.reset()
        self.moto = moto
        self.netns = netns
        self.client = self.sdk(moto.url)
        self.vpc_id = self.client.create_vpc(CidrBlock=self.VPC_CIDR)["Vpc"]["VpcId"]
        self.node_subnet = self.client.create_subnet(
            VpcId=self.vpc_id, CidrBlock="10.0.0.0/24", AvailabilityZone=self.ZONE
        )["Subnet"]["SubnetId"]
        super().__init__(self, netns, instance_type)

    def add_instance(self, netns: str, instance_type: str = "c5.metal") -> AwsInstance:
        return AwsInstance(self, netns, instance_type)

    @staticmethod
    def sdk(url: str) -> Any:
        import botocore.session

        return botocore.session.get_session().create_client(
            "ec2",
            region_name=AwsWorld.REGION,
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def add_foreign_eni(self, *, attach: bool = True, tags: dict[str, str] | None = None) -> str:
        """Someone else's ENI in the node's subnet, attached here unless told otherwise."""
        spec = [{"ResourceType": "network-interface", "Tags": [
            {"Key": k, "Value": v} for k, v in (tags or {"owner": "ops"}).items()
        ]}]  # fmt: skip
        eni = self.client.create_network_interface(
            SubnetId=self.node_subnet, TagSpecifications=spec, PrivateIpAddress="10.0.0.200"
        )["NetworkInterface"]["NetworkInterfaceId"]
        self.client.assign_private_ip_addresses(
            NetworkInterfaceId=eni, PrivateIpAddresses=["10.0.0.201", "10.0.0.202"]
        )
        if attach:
            self.client.attach_network_interface(
                NetworkInterfaceId=eni, InstanceId=self.instance_id, DeviceIndex=1
            )
        return str(eni)

    def snapshot(self) -> dict[str, Any]:
        """The account as teardown must leave it: every ENI with its addresses and prefixes,
        every subnet, every security group rule."""
        enis = {}
        for raw in self.client.describe_network_interfaces()["NetworkInterfaces"]:
            att = raw.get("Attachment") or {}
            enis[raw["NetworkInterfaceId"]] = {
                "status": raw["Status"],
                "instance": att.get("InstanceId"),
                "index": att.get("DeviceIndex"),
                "ips": sorted(i["PrivateIpAddress"] for i in raw["PrivateIpAddresses"]),
                "prefixes": sorted(
                    map(str, self.proxy.prefixes.get(raw["NetworkInterfaceId"], []))
                ),
                "tags": sorted((t["Key"], t["Value"]) for t in raw.get("TagSet") or ()),
                "sourceDestCheck": raw.get("SourceDestCheck"),
            }
        subnets = {
            s["SubnetId"]: (
                s["CidrBlock"],
                sorted((t["Key"], t["Value"]) for t in s.get("Tags") or ()),
            )
            for s in self.client.describe_subnets()["Subnets"]
        }
        groups = {
            g["GroupId"]: json.dumps(g["IpPermissions"], sort_keys=True, default=str)
            for g in self.client.describe_security_groups()["SecurityGroups"]
        }
        return {"enis": enis, "subnets": subnets, "groups": groups}

    def ours(self, node: str) -> list[dict[str, Any]]:
        answer = self.client.describe_network_interfaces(
            Filters=[{"Name": "tag:cocoon-net:node", "Values": [node]}]
        )
        return list(answer["NetworkInterfaces"])
