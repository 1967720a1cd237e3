"""A Volcengine VPC OpenAPI and metadata server for tests, on 127.0.0.1:0 in a thread.

It speaks `GET /?Action=...&Version=2020-04-01` with the OpenAPI envelope; rejects requests
whose HMAC-SHA256 signature does not verify (wrong key, tampered query or body), signed for
another region, with an X-Date more than 15 minutes from its clock, or for an unknown
Version; keeps state (one VPC with its instance, subnets, security groups and rules, ENIs
whose status changes over time), honours ClientToken, tags ENIs (TagResources), and injects
faults on any action. Metadata lives under /latest/meta-data/.

    emu = VolcEmulator()
    base = emu.start()                       # or emu.start(netns="cnt-x"): listen in a netns
    emu.inject("AttachNetworkInterface", "InternalError", times=2)
    emu.attach_delay = 3.0                   # a slow attach
    emu.on_attach = lambda mac, eni: ...     # hot-plug: create the OS interface
    instance_id, environ = emu.add_node(netns="cnt-y")   # another instance, its own metadata
    emu.use_instance_role("node-role")       # only the role's temporary keys are taken
    emu.stop()

Error codes are those the real API documents where known (SignatureDoesNotMatch,
InvalidAccessKey, InvalidCredential, InvalidTimestamp, InvalidActionOrVersion,
AccountFlowLimitExceeded, InternalError, InsufficientIpInSubnet); the others follow its
"<Kind>.<Resource>" pattern.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import re
import secrets
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

from tests.emulators import in_netns

_STATUS = {
    "AccountFlowLimitExceeded": 429,
    "InternalError": 500,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "InvalidAccessKey": 401,
    "MissingAuthenticationToken": 401,
    "InvalidCredential": 401,
    "InvalidTimestamp": 400,
    "InvalidActionOrVersion": 404,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(code)
        self.code, self.message, self.status = code, message, _STATUS.get(code, status)


API_VERSION = "2020-04-01"
MAX_SKEW_S = 15 * 60  # how far X-Date may be from the server's clock


def signer_v4(
    method: str,
    path: str,
    raw_query: str,
    headers: dict[str, str],
    body: bytes,
    secret: str,
    x_date: str,
    region: str,
    service: str = "vpc",
) -> str:
    """The hex signature SignerV4 gives a request, rebuilt from what came over the wire.

    Written apart from cocoon-net's signer on purpose, so that a wrong signer cannot agree
    with itself; the unit tests hold it to the vectors made with the official SDK.
    """
    pairs = sorted(parse_qsl(raw_query, keep_blank_values=True), key=lambda kv: kv[0])
    query = "&".join(quote(k, safe="-_.~") + "=" + quote(v, safe="-_.~") for k, v in pairs)
    host = headers.get("host", "")
    if host.rpartition(":")[2] in ("80", "443"):
        headers = {**headers, "host": host.rpartition(":")[0]}
    names = sorted(headers)
    request = "\n".join([
        method,
        quote(path or "/", safe="/-_.~"),
        query,
        "".join(name + ":" + headers[name] + "\n" for name in names),
        ";".join(names),
        hashlib.sha256(body).hexdigest(),
    ])  # fmt: skip
    scope = "/".join([x_date[:8], region, service, "request"])
    key = secret.encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    digest = hashlib.sha256(request.encode()).hexdigest()
    text = "HMAC-SHA256\n" + x_date + "\n" + scope + "\n" + digest
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


@dataclass
class Fault:
    action: str  # "*" matches every action
    code: str
    times: int
    after_commit: bool  # do the work, then answer with the error (a lost answer)


@dataclass
class Subnet:
    id: str
    name: str
    cidr: IPv4Network
    zone: str
    tags: dict[str, str]
    status: str = "Pending"
    used: set[IPv4Address] = field(default_factory=set)

    def free(self) -> list[IPv4Address]:
        # The API keeps the network, the first host (gateway) and the last three addresses.
        hosts = list(self.cidr.hosts())[1:-2]
        return [ip for ip in hosts if ip not in self.used]


@dataclass
class Eni:
    id: str
    name: str
    subnet_id: str
    mac: str
    primary_ip: IPv4Address
    security_groups: list[str]
    tags: dict[str, str]
    type: str = "secondary"
    status: str = "Creating"
    device_id: str = ""
    secondary: list[IPv4Address] = field(default_factory=list)


@dataclass
class Instance:
    """Another instance of the VPC (add_node): its primary ENI and its hot-plug hooks."""

    id: str
    primary: Eni
    on_attach: Callable[[str, str], None] | None = None
    on_detach: Callable[[str, str], None] | None = None


def eni_link_name(eni_id: str) -> str:
    """The OS interface a hot-plugged ENI shows up as in the tests (15 characters at most)."""
    return "e" + eni_id[-10:]


class VolcEmulator:
    def __init__(
        self,
        *,
        access_key: str = "AKLTtest",
        secret_key: str = "secret-test-key",
        region: str = "cn-beijing",
        zone: str = "cn-beijing-a",
        vpc_cidr: str = "172.20.0.0/16",
        eni_limit: int = 8,  # per instance, the primary included (EBM: 1 + 7)
        ip_limit: int = 20,  # secondary IPs per ENI
    ) -> None:
        self.access_key, self.secret_key, self.region, self.zone = (
            access_key,
            secret_key,
            region,
            zone,
        )
        self.vpc_id = "vpc-" + secrets.token_hex(6)
        self.vpc_cidr = IPv4Network(vpc_cidr)
        self.instance_id = "i-" + secrets.token_hex(6)
        self.eni_limit, self.ip_limit = eni_limit, ip_limit
        self.create_delay = 0.05  # Creating -> Available
        self.attach_delay = 0.1  # Attaching -> InUse
        self.detach_delay = 0.1  # Detaching -> Available
        self.subnet_delay = 0.05  # Pending -> Available
        self.on_attach: Callable[[str, str], None] | None = None  # (mac, eni_id)
        self.on_detach: Callable[[str, str], None] | None = None
        self.calls: list[str] = []
        self.faults: list[Fault] = []
        self.failing_attaches = 0  # attaches that end back in Available
        self.lock = threading.RLock()
        self.subnets: dict[str, Subnet] = {}
        self.enis: dict[str, Eni] = {}
        self.rules: dict[str, list[dict[str, Any]]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self._timers: list[threading.Timer] = []
        self._macs = (
            f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            for i in itertools.count(secrets.randbelow(1 << 20))
        )
        # The instance's own world: a default subnet, its security group, its primary ENI.
        self.default_sg = "sg-" + secrets.token_hex(6)
        self.other_sg = "sg-" + secrets.token_hex(6)
        self.rules = {self.default_sg: [], self.other_sg: []}
        base = self._add_subnet("default", IPv4Network("172.20.0.0/24"), {}, ready=True)
        self.primary = self._add_eni("primary", base, [self.default_sg], {}, status="InUse")
        self.primary.type, self.primary.device_id = "primary", self.instance_id
        self._server: ThreadingHTTPServer | None = None
        self._node_servers: list[ThreadingHTTPServer] = []
        self.nodes: dict[str, Instance] = {}
        # Instance-role credentials (use_instance_role): the API then takes only these.
        self.role = ""
        self.session_token = ""
        self.role_lifetime = 3600.0
        self.role_fetches = 0
        self.imds_tokens: set[str] = set()
        self.require_imds_token = False
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # the gateway's time

    # --- test controls -------------------------------------------------------------------

    def inject(self, action: str, code: str, *, times: int = 1, after_commit: bool = False) -> None:
        with self.lock:
            self.faults.append(Fault(action, code, times, after_commit))

    def add_foreign_eni(
        self,
        *,
        attach: bool = True,
        name: str = "",
        subnet_id: str = "",
        device_id: str = "",
        tags: dict[str, str] | None = None,
    ) -> Eni:
        """An ENI someone else made, untagged unless tags are given, with 3 secondary IPs: in
        the default subnet unless subnet_id is given, attached to this instance unless
        device_id names another one (or attach is False)."""
        with self.lock:
            subnet = (
                self.subnets[subnet_id]
                if subnet_id
                else next(s for s in self.subnets.values() if s.name == "default")
            )
            eni = self._add_eni(
                name or "foreign", subnet, [self.default_sg], dict(tags or {}), status="Available"
            )
            if attach:
                eni.status, eni.device_id = "InUse", device_id or self.instance_id
            eni.secondary = subnet.free()[:3]
            subnet.used.update(eni.secondary)
            return eni

    def add_subnet(self, name: str, cidr: str) -> Subnet:
        """A subnet someone made before us: untagged and Available."""
        with self.lock:
            return self._add_subnet(name, IPv4Network(cidr), {}, ready=True)

    def add_go_enis(self, node: str, subnet_id: str, count: int = 7) -> list[Eni]:
        """What the Go tool's init leaves: `<node>-eni-<i>` for i = 1..count, untagged, in
        subnet_id, attached here and hot-plugged, each holding ip_limit secondary IPs."""
        with self.lock:
            subnet = self.subnets[subnet_id]
            made = []
            for i in range(1, count + 1):
                eni = self._add_eni(
                    f"{node}-eni-{i}", subnet, [self.default_sg], {}, status="InUse"
                )
                eni.device_id = self.instance_id
                eni.secondary = subnet.free()[: self.ip_limit]
                subnet.used.update(eni.secondary)
                if self.on_attach:
                    self.on_attach(eni.mac, eni.id)
                made.append(eni)
            return made

    def add_node(self, netns: str | None = None) -> tuple[str, dict[str, str]]:
        """Another instance in the VPC, with its primary ENI in the default subnet, reached
        through its own metadata path (and, given netns, a listener in that namespace whose
        hot-plug happens there): returns its id and its environ."""
        with self.lock:
            instance_id = "i-" + secrets.token_hex(6)
            base = next(s for s in self.subnets.values() if s.name == "default")
            primary = self._add_eni("primary", base, [self.default_sg], {}, status="InUse")
            primary.type, primary.device_id = "primary", instance_id
            node = self.nodes[instance_id] = Instance(instance_id, primary)
        url = self.base_url
        if netns is not None:
            node.on_attach, node.on_detach = self._hotplug(netns)
            server = self._listen(netns)
            self._node_servers.append(server)
            url = f"http://127.0.0.1:{server.server_address[1]}"
        return instance_id, {
            **self.environ(),
            "COCOON_NET_VOLCENGINE_ENDPOINT": url,
            "COCOON_NET_VOLCENGINE_METADATA_URL": f"{url}/{instance_id}/latest/meta-data",
        }

    def use_instance_role(self, role: str = "cocoon-node", *, imds_token: bool = True) -> None:
        """From now on the API accepts only the temporary keys of role, which the metadata
        server hands out (after a PUT /latest/api/token when imds_token)."""
        with self.lock:
            self.role, self.require_imds_token = role, imds_token
            self.access_key = "AKTP" + secrets.token_hex(8)
            self.secret_key = secrets.token_urlsafe(24)
            self.session_token = "STS" + secrets.token_urlsafe(32)

    def snapshot(self) -> dict[str, Any]:
        """Every resource and its state, to compare before init and after teardown."""
        with self.lock:
            return {
                "subnets": {
                    s.id: (str(s.cidr), s.status, len(s.used)) for s in self.subnets.values()
                },
                "enis": {
                    e.id: (e.status, e.device_id, sorted(map(str, e.secondary)), dict(e.tags))
                    for e in self.enis.values()
                },
                "rules": {k: sorted(map(json.dumps, v)) for k, v in self.rules.items()},
            }

    def metadata_url(self) -> str:
        return self.base_url + "/latest/meta-data"

    def hotplug_into(self, netns: str) -> None:
        """Make attach and detach add and remove an interface with the ENI's MAC inside netns,
        as the hypervisor's hot-plug would. A veth end stands in for the NIC (this kernel has
        no dummy driver); its name is eni_link_name(eni_id)."""
        self.on_attach, self.on_detach = self._hotplug(netns)

    @staticmethod
    def _hotplug(netns: str) -> tuple[Callable[[str, str], None], Callable[[str, str], None]]:
        def ip(*argv: str) -> None:
            subprocess.run(["ip", "-n", netns, *argv], capture_output=True, check=False)

        def attach(mac: str, eni: str) -> None:
            ip(
                "link", "add", eni_link_name(eni), "address", mac, "type", "veth",
                "peer", "name", "p" + eni[-10:],
            )  # fmt: skip

        return attach, lambda mac, eni: ip("link", "del", eni_link_name(eni))

    def _hooks(self, instance_id: str) -> tuple[Any, Any]:
        node = self.nodes.get(instance_id)
        return (node.on_attach, node.on_detach) if node else (self.on_attach, self.on_detach)

    def environ(self) -> dict[str, str]:
        """Everything the platform needs to talk to this emulator and nothing real."""
        return {
            "VOLCENGINE_ACCESS_KEY_ID": self.access_key,
            "VOLCENGINE_SECRET_ACCESS_KEY": self.secret_key,
            "COCOON_NET_VOLCENGINE_ENDPOINT": self.base_url,
            "COCOON_NET_VOLCENGINE_METADATA_URL": self.metadata_url(),
            "COCOON_NET_VOLCENGINE_CONFIG": "/nonexistent/volcengine-config.json",
        }

    # --- server --------------------------------------------------------------------------

    def start(self, netns: str | None = None) -> str:
        """Serve on 127.0.0.1:0, inside network namespace netns when given (the socket is
        made by a thread that joined it, and stays there)."""
        self._server = self._listen(netns)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.base_url

    def _listen(self, netns: str | None) -> ThreadingHTTPServer:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                emulator._handle(self)

            def do_PUT(self) -> None:
                emulator._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = in_netns(netns, lambda: ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        server.daemon_threads = True
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return server

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for server in self._node_servers:
            server.shutdown()
            server.server_close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        # /<instance-id>/... is what add_node's instance sees at its metadata address
        who = re.fullmatch(r"/(i-[0-9a-f]+)(/.*)", parts.path)
        identity, path = (who.group(1), who.group(2)) if who else ("", parts.path)
        if path.startswith(("/latest/", "/volcstack/")):
            self._metadata(req, path, parts.query, identity)
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        action = query.get("Action", "")
        meta: dict[str, Any] = {
            "RequestId": secrets.token_hex(8),
            "Action": action,
            "Version": query.get("Version", ""),
            "Service": "vpc",
            "Region": self.region,
        }
        try:
            self._verify(req, parts.path, parts.query)
            if self.session_token and req.headers.get("X-Security-Token") != self.session_token:
                raise ApiError("InvalidSecurityToken", "the security token is not valid", 401)
            with self.lock:
                self.calls.append(action)
                result = self._dispatch(action, query)
            status, body = 200, {"ResponseMetadata": meta, "Result": result}
        except ApiError as exc:
            meta["Error"] = {"Code": exc.code, "Message": exc.message}
            status, body = exc.status, {"ResponseMetadata": meta}
        self._send(req, status, json.dumps(body).encode(), "application/json")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str) -> None:
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _metadata(self, req: BaseHTTPRequestHandler, path: str, query: str, who: str) -> None:
        """Instance metadata, and the instance role's temporary keys: a session token from
        PUT /latest/api/token (X-volc-ecs-metadata-token-ttl-seconds), then
        /volcstack/latest/iam/security_credentials?type=user (the role's name) and
        /volcstack/latest/iam/security_credentials/<role> with X-volc-ecs-metadata-token."""
        if path == "/latest/api/token":
            if req.command != "PUT" or not req.headers.get("X-volc-ecs-metadata-token-ttl-seconds"):
                self._send(req, 400, b"bad token request", "text/plain")
                return
            token = secrets.token_urlsafe(16)
            with self.lock:
                self.imds_tokens.add(token)
            self._send(req, 200, token.encode(), "text/plain")
            return
        if self.require_imds_token and req.headers.get("X-volc-ecs-metadata-token") not in (
            self.imds_tokens
        ):
            self._send(req, 401, b"metadata token required", "text/plain")
            return
        node = self.nodes.get(who)
        values = {
            "/latest/meta-data/instance-id": who or self.instance_id,
            "/latest/meta-data/vpc-id": self.vpc_id,
            "/latest/meta-data/placement/availability-zone": self.zone,
            "/latest/meta-data/mac": (node.primary if node else self.primary).mac,
        }
        creds = "/volcstack/latest/iam/security_credentials"
        if self.role and path == creds and "type=user" in query:
            self._send(req, 200, json.dumps([self.role]).encode(), "application/json")
        elif self.role and path == f"{creds}/{self.role}":
            with self.lock:
                self.role_fetches += 1
                expires = datetime.now(UTC).timestamp() + self.role_lifetime
                body = {
                    "AccessKeyId": self.access_key,
                    "SecretAccessKey": self.secret_key,
                    "SessionToken": self.session_token,
                    "ExpiredTime": datetime.fromtimestamp(expires, UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                }
            self._send(req, 200, json.dumps(body).encode(), "application/json")
        elif path in values:
            self._send(req, 200, values[path].encode(), "text/plain")
        else:
            self._send(req, 404, b"not found", "text/plain")

    def _verify(self, req: BaseHTTPRequestHandler, path: str, raw_query: str) -> None:
        """Check the request as the API gateway does: signed, by a known key, for this region,
        recently, for an API version that exists; the signature recomputed from the wire with
        this module's own SignerV4 (never the product's signer)."""
        auth = req.headers.get("Authorization", "")
        match = re.fullmatch(
            r"HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/vpc/request, "
            r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
            auth,
        )
        if not match:
            raise ApiError("MissingAuthenticationToken", "the request is not signed")
        access_key, date, region, signed_names, signature = match.groups()
        if access_key != self.access_key:
            raise ApiError("InvalidAccessKey", f"access key {access_key} does not exist")
        if region != self.region:
            raise ApiError(
                "InvalidCredential", f"credential scope region {region} is not {self.region}"
            )
        x_date = req.headers.get("X-Date", "")
        try:
            when = datetime.strptime(x_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise ApiError("InvalidTimestamp", f"bad X-Date {x_date!r}") from None
        if abs((self.clock() - when).total_seconds()) > MAX_SKEW_S or date != x_date[:8]:
            raise ApiError("InvalidTimestamp", f"X-Date {x_date} is too far from the server time")
        version = parse_qs(raw_query).get("Version", [""])[-1]
        if version != API_VERSION:
            raise ApiError("InvalidActionOrVersion", f"unknown Version {version!r}")
        names = signed_names.split(";")
        if not {"host", "x-date", "x-content-sha256"} <= set(names):
            raise ApiError(
                "SignatureDoesNotMatch", "Host, X-Date and X-Content-Sha256 must be signed"
            )
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        headers = {name: req.headers.get(name, "") for name in names}
        if headers["x-content-sha256"] != hashlib.sha256(body).hexdigest():
            raise ApiError("SignatureDoesNotMatch", "X-Content-Sha256 is not the body's hash")
        expected = signer_v4(
            req.command, path, raw_query, headers, body, self.secret_key, x_date, region
        )
        if not hmac.compare_digest(expected, signature):
            raise ApiError(
                "SignatureDoesNotMatch",
                "the request signature we calculated does not match the signature you provided",
            )

    # --- actions -------------------------------------------------------------------------

    def _dispatch(self, action: str, q: dict[str, str]) -> dict[str, Any]:
        fault = next((f for f in self.faults if f.action in (action, "*") and f.times > 0), None)
        if fault is not None:
            fault.times -= 1
            if not fault.after_commit:
                raise ApiError(fault.code, f"injected {fault.code}")
        handler = getattr(self, "_a_" + action, None)
        if handler is None:
            raise ApiError("InvalidAction", f"unknown action {action!r}", 404)
        token = q.get("ClientToken", "")
        if token and token in self.tokens:
            result: dict[str, Any] = self.tokens[token]  # the same answer, nothing made twice
        else:
            result = handler(q)
            if token:
                self.tokens[token] = result
        if fault is not None:
            raise ApiError(fault.code, f"injected {fault.code} after the work was done")
        return result

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            with self.lock:
                fn()

        timer = threading.Timer(delay, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _add_subnet(
        self, name: str, cidr: IPv4Network, tags: dict[str, str], *, ready: bool = False
    ) -> Subnet:
        subnet = Subnet("subnet-" + secrets.token_hex(6), name, cidr, self.zone, tags)
        self.subnets[subnet.id] = subnet
        if ready:
            subnet.status = "Available"
        else:
            self._later(self.subnet_delay, lambda: setattr(subnet, "status", "Available"))
        return subnet

    def _add_eni(
        self, name: str, subnet: Subnet, sgs: list[str], tags: dict[str, str], *, status: str
    ) -> Eni:
        free = subnet.free()
        if not free:
            raise ApiError("InsufficientIpInSubnet", f"no free address in {subnet.id}")
        eni = Eni(
            "eni-" + secrets.token_hex(6), name, subnet.id, next(self._macs), free[0], sgs, tags
        )
        subnet.used.add(free[0])
        eni.status = status
        self.enis[eni.id] = eni
        return eni

    @staticmethod
    def _list(q: dict[str, str], name: str) -> list[str]:
        keys = [k for k in q if re.fullmatch(re.escape(name) + r"\.\d+", k)]
        return [q[k] for k in sorted(keys, key=lambda k: int(k.rsplit(".", 1)[1]))]

    @staticmethod
    def _tags(q: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, value in q.items():
            if m := re.fullmatch(r"Tags\.(\d+)\.Key", key):
                out[value] = q.get(f"Tags.{m.group(1)}.Value", "")
        return out

    @staticmethod
    def _page(q: dict[str, str], items: list[dict[str, Any]], key: str) -> dict[str, Any]:
        size = min(int(q.get("PageSize", "20")), 100)
        number = int(q.get("PageNumber", "1"))
        chunk = items[(number - 1) * size : number * size]
        return {key: chunk, "TotalCount": len(items), "PageNumber": number, "PageSize": size}

    def _subnet(self, q: dict[str, str]) -> Subnet:
        subnet = self.subnets.get(q.get("SubnetId", ""))
        if subnet is None:
            raise ApiError("InvalidSubnet.NotFound", f"subnet {q.get('SubnetId')} not found", 404)
        return subnet

    def _eni(self, q: dict[str, str]) -> Eni:
        eni = self.enis.get(q.get("NetworkInterfaceId", ""))
        if eni is None:
            raise ApiError(
                "InvalidEni.NotFound", f"ENI {q.get('NetworkInterfaceId')} not found", 404
            )
        return eni

    def _a_DescribeVpcAttributes(self, q: dict[str, str]) -> dict[str, Any]:
        if q.get("VpcId") != self.vpc_id:
            raise ApiError("InvalidVpc.NotFound", f"VPC {q.get('VpcId')} not found", 404)
        return {"VpcId": self.vpc_id, "CidrBlock": str(self.vpc_cidr), "Status": "Available"}

    def _a_DescribeSubnets(self, q: dict[str, str]) -> dict[str, Any]:
        ids = self._list(q, "SubnetIds")
        items = [
            {
                "SubnetId": s.id,
                "SubnetName": s.name,
                "CidrBlock": str(s.cidr),
                "ZoneId": s.zone,
                "VpcId": self.vpc_id,
                "Status": s.status,
                "AvailableIpAddressCount": len(s.free()),
                "Tags": [{"Key": k, "Value": v} for k, v in s.tags.items()],
            }
            for s in self.subnets.values()
            if (not ids or s.id in ids) and q.get("VpcId", self.vpc_id) == self.vpc_id
        ]
        return self._page(q, items, "Subnets")

    def _a_CreateSubnet(self, q: dict[str, str]) -> dict[str, Any]:
        try:
            cidr = IPv4Network(q.get("CidrBlock", ""))
        except ValueError:
            raise ApiError("InvalidParameter.CidrBlock", "bad CidrBlock") from None
        if not cidr.subnet_of(self.vpc_cidr):
            raise ApiError("InvalidSubnet.CidrBlock", f"{cidr} is not inside {self.vpc_cidr}")
        if any(cidr.overlaps(s.cidr) for s in self.subnets.values()):
            raise ApiError("InvalidSubnet.Conflict", f"{cidr} overlaps an existing subnet")
        if q.get("ZoneId") != self.zone:
            raise ApiError("InvalidZone.NotFound", f"zone {q.get('ZoneId')} not found", 404)
        return {"SubnetId": self._add_subnet(q.get("SubnetName", ""), cidr, self._tags(q)).id}

    def _a_DeleteSubnet(self, q: dict[str, str]) -> dict[str, Any]:
        subnet = self._subnet(q)
        if any(e.subnet_id == subnet.id for e in self.enis.values()):
            raise ApiError("DependencyViolation.NetworkInterface", f"{subnet.id} has ENIs")
        del self.subnets[subnet.id]
        return {}

    def _a_DescribeSecurityGroups(self, q: dict[str, str]) -> dict[str, Any]:
        items = [{"SecurityGroupId": sg, "VpcId": self.vpc_id} for sg in self.rules]
        return self._page(q, items, "SecurityGroups")

    def _sg(self, q: dict[str, str]) -> list[dict[str, Any]]:
        rules = self.rules.get(q.get("SecurityGroupId", ""))
        if rules is None:
            raise ApiError("InvalidSecurityGroup.NotFound", "security group not found", 404)
        return rules

    def _a_DescribeSecurityGroupAttributes(self, q: dict[str, str]) -> dict[str, Any]:
        return {"SecurityGroupId": q["SecurityGroupId"], "Permissions": list(self._sg(q))}

    @staticmethod
    def _rule(q: dict[str, str]) -> dict[str, Any]:
        return {
            "Direction": "ingress",
            "Protocol": q.get("Protocol", ""),
            "PortStart": int(q.get("PortStart", "-1")),
            "PortEnd": int(q.get("PortEnd", "-1")),
            "CidrIp": q.get("CidrIp", ""),
            "Policy": q.get("Policy", "accept"),
            "Priority": int(q.get("Priority", "1")),
        }

    def _a_AuthorizeSecurityGroupIngress(self, q: dict[str, str]) -> dict[str, Any]:
        rules, rule = self._sg(q), self._rule(q)
        if any({k: r[k] for k in rule} == rule for r in rules):
            raise ApiError("InvalidSecurityRule.Conflict", "the rule already exists")
        rules.append({**rule, "Description": q.get("Description", "")})
        return {}

    def _a_RevokeSecurityGroupIngress(self, q: dict[str, str]) -> dict[str, Any]:
        rules, rule = self._sg(q), self._rule(q)
        rules[:] = [r for r in rules if {k: r[k] for k in rule} != rule]
        return {}

    def _eni_json(self, e: Eni) -> dict[str, Any]:
        ips = [{"PrivateIpAddress": str(e.primary_ip), "Primary": True}]
        ips += [{"PrivateIpAddress": str(ip), "Primary": False} for ip in e.secondary]
        return {
            "NetworkInterfaceId": e.id,
            "NetworkInterfaceName": e.name,
            "Type": e.type,
            "Status": e.status,
            "MacAddress": e.mac,
            "DeviceId": e.device_id,
            "SubnetId": e.subnet_id,
            "VpcId": self.vpc_id,
            "ZoneId": self.zone,
            "PrimaryIpAddress": str(e.primary_ip),
            "PrivateIpSets": {"PrivateIpSet": ips},
            "SecurityGroupIds": list(e.security_groups),
            "Tags": [{"Key": k, "Value": v} for k, v in e.tags.items()],
        }

    def _a_DescribeNetworkInterfaces(self, q: dict[str, str]) -> dict[str, Any]:
        ids = self._list(q, "NetworkInterfaceIds")
        filters = {}
        for key, value in q.items():
            if m := re.fullmatch(r"TagFilters\.(\d+)\.Key", key):
                filters[value] = q.get(f"TagFilters.{m.group(1)}.Values.1", "")
        items = [
            self._eni_json(e)
            for e in self.enis.values()
            if (not ids or e.id in ids)
            and q.get("InstanceId", e.device_id) == e.device_id
            and q.get("SubnetId", e.subnet_id) == e.subnet_id
            and all(e.tags.get(k) == v for k, v in filters.items())
        ]
        return self._page(q, items, "NetworkInterfaceSets")

    def _a_CreateNetworkInterface(self, q: dict[str, str]) -> dict[str, Any]:
        subnet = self._subnet(q)
        sgs = self._list(q, "SecurityGroupIds")
        if not sgs or any(sg not in self.rules for sg in sgs):
            raise ApiError("InvalidSecurityGroup.NotFound", "security group not found", 404)
        count = int(q.get("SecondaryPrivateIpAddressCount", "0"))
        if count > self.ip_limit:
            raise ApiError(
                "QuotaExceeded.PrivateIpAddress",
                f"an ENI takes at most {self.ip_limit} secondary addresses",
            )
        if len(subnet.free()) < count + 1:
            raise ApiError("InsufficientIpInSubnet", f"not enough free addresses in {subnet.id}")
        eni = self._add_eni(
            q.get("NetworkInterfaceName", ""), subnet, sgs, self._tags(q), status="Creating"
        )
        eni.secondary = subnet.free()[:count]
        subnet.used.update(eni.secondary)
        self._later(self.create_delay, lambda: setattr(eni, "status", "Available"))
        return {"NetworkInterfaceId": eni.id}

    def _a_AttachNetworkInterface(self, q: dict[str, str]) -> dict[str, Any]:
        eni, instance_id = self._eni(q), q.get("InstanceId", "")
        if instance_id != self.instance_id and instance_id not in self.nodes:
            raise ApiError("InvalidInstance.NotFound", "instance not found", 404)
        if eni.status != "Available":
            raise ApiError("InvalidEni.InvalidStatus", f"{eni.id} is {eni.status}")
        attached = [e for e in self.enis.values() if e.device_id == instance_id]
        if len(attached) >= self.eni_limit:
            raise ApiError(
                "LimitExceeded.NetworkInterfacesPerInstance",
                f"an instance takes at most {self.eni_limit} ENIs",
            )
        eni.status, eni.device_id = "Attaching", instance_id
        failing = self.failing_attaches > 0
        self.failing_attaches -= failing
        on_attach, _ = self._hooks(instance_id)

        def finish() -> None:
            if failing:
                eni.status, eni.device_id = "Available", ""
                return
            eni.status = "InUse"
            if on_attach:
                on_attach(eni.mac, eni.id)

        self._later(self.attach_delay, finish)
        return {}

    def _a_DetachNetworkInterface(self, q: dict[str, str]) -> dict[str, Any]:
        eni = self._eni(q)
        if eni.type == "primary":
            raise ApiError("OperationDenied.PrimaryNetworkInterface", "cannot detach a primary ENI")
        if eni.status != "InUse" or eni.device_id != q.get("InstanceId"):
            raise ApiError("InvalidEni.InvalidStatus", f"{eni.id} is {eni.status}")
        eni.status = "Detaching"
        _, on_detach = self._hooks(eni.device_id)
        if on_detach:
            on_detach(eni.mac, eni.id)

        def finish() -> None:
            eni.status, eni.device_id = "Available", ""

        self._later(self.detach_delay, finish)
        return {}

    def _a_DeleteNetworkInterface(self, q: dict[str, str]) -> dict[str, Any]:
        eni = self._eni(q)
        if eni.status != "Available":
            raise ApiError("InvalidEni.InvalidStatus", f"{eni.id} is {eni.status}")
        subnet = self.subnets[eni.subnet_id]
        subnet.used.difference_update([eni.primary_ip, *eni.secondary])
        del self.enis[eni.id]
        return {}

    def _a_AssignPrivateIpAddresses(self, q: dict[str, str]) -> dict[str, Any]:
        eni = self._eni(q)
        if eni.status not in ("Available", "InUse"):
            raise ApiError("InvalidEni.InvalidStatus", f"{eni.id} is {eni.status}")
        subnet = self.subnets[eni.subnet_id]
        wanted = [IPv4Address(ip) for ip in self._list(q, "PrivateIpAddress")]
        count = int(q.get("SecondaryPrivateIpAddressCount", "0")) or len(wanted)
        if len(eni.secondary) + count > self.ip_limit:
            raise ApiError(
                "QuotaExceeded.PrivateIpAddress",
                f"an ENI takes at most {self.ip_limit} secondary addresses",
            )
        free = subnet.free()
        picked = wanted or free[:count]
        if len(picked) < count or any(ip not in free for ip in picked):
            raise ApiError("InsufficientIpInSubnet", f"not enough free addresses in {subnet.id}")
        eni.secondary.extend(picked)
        subnet.used.update(picked)
        return {"NetworkInterfaceId": eni.id, "PrivateIpSet": [str(ip) for ip in picked]}

    def _a_TagResources(self, q: dict[str, str]) -> dict[str, Any]:
        """Adds or overwrites tags; the VPC API takes ENIs with ResourceType "eni" (the SDK's
        enum also has vpc, securitygroup, eip and others this emulator does not keep)."""
        if q.get("ResourceType") != "eni":
            raise ApiError(
                "InvalidParameter.ResourceType", f"ResourceType {q.get('ResourceType')!r}"
            )
        ids, tags = self._list(q, "ResourceIds"), self._tags(q)
        if not ids or not tags:
            raise ApiError("MissingParameter", "ResourceIds and Tags are required")
        enis = [self._eni({"NetworkInterfaceId": eni_id}) for eni_id in ids]
        for eni in enis:
            eni.tags.update(tags)
        return {}

    def _a_UnassignPrivateIpAddresses(self, q: dict[str, str]) -> dict[str, Any]:
        eni = self._eni(q)
        drop = {ipaddress.IPv4Address(ip) for ip in self._list(q, "PrivateIpAddress")}
        eni.secondary = [ip for ip in eni.secondary if ip not in drop]
        self.subnets[eni.subnet_id].used.difference_update(drop)
        return {}
