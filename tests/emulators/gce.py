"""A GCE metadata server and Compute Engine v1 API on 127.0.0.1, with state and faults.

Served paths (the shapes of cloud.google.com/compute/docs/reference/rest/v1):
    /computeMetadata/v1/...                       needs and echoes `Metadata-Flavor: Google`
    GET   /compute/v1/projects/P/regions/R/subnetworks/S
    PATCH /compute/v1/projects/P/regions/R/subnetworks/S?requestId=        (fingerprint)
    GET   /compute/v1/projects/P/zones/Z/instances/I
    PATCH /compute/v1/projects/P/zones/Z/instances/I/updateNetworkInterface
            ?networkInterface=nic0&requestId=                                 (nic fingerprint)
    GET|POST /compute/v1/projects/P/{zones/Z|regions/R}/operations/OP[/wait]
    POST  /token                                  OAuth2 JWT-bearer grant (service-account JSON)

A mutation is applied when it is accepted and its Operation then reports PENDING/RUNNING for
`operation_polls` wait calls before DONE. A stale or missing fingerprint is a 412/400, a
repeated requestId returns the first Operation without applying anything again, and Compute
calls need a Bearer token the emulator issued. Faults beyond HTTP-level ones (see
tests.emulators.Fault): `fail_next_operation(code)` makes the next mutation's Operation end
DONE with that error and nothing applied; `before_next_mutation(fn)` runs fn (e.g. an
operator's concurrent edit) just before the next mutation is checked.

Several instances: `add_node(name, mac, netns=...)` adds an instance on the same subnetwork
with its own metadata server (in that namespace), as each VM reaches only its own. All
servers share one state under one lock: an alias block one instance holds is refused to
another with the operation error IP_IN_USE_BY_ANOTHER_RESOURCE, and a secondary range an
alias uses cannot be removed (resourceInUseByAnotherResource).
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import itertools
import json
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from tests.emulators import EmulatorServer, Reply, Request

GOOGLE_URL = "https://www.googleapis.com/compute/v1"


def _fingerprint() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


def _error(status: int, reason: str, message: str) -> Reply:
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"reason": reason, "message": message, "domain": "global"}],
        }
    }
    return Reply(status, body)


@dataclass
class GceState:
    project: str = "proj-a"
    numeric_project: str = "123456789012"
    zone: str = "us-central1-a"
    instance: str = "node-1"
    mac: str = "42:01:0a:80:00:02"
    mtu: int = 1460
    subnet_project: str = ""  # Shared VPC host project; "" = the instance's project
    subnetwork: str = "default"
    subnet_cidr: str = "10.128.0.0/20"
    token_lifetime: int = 3599
    operation_polls: int = 1  # wait calls that still see RUNNING before DONE
    subnetworks: dict[str, dict[str, Any]] = field(default_factory=dict)  # by path
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # by path
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    op_polls_left: dict[str, int] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    token_grants: list[str] = field(default_factory=list)  # "metadata" or "jwt:<client_email>"
    mutations_applied: int = 0
    list_calls: int = 0  # instances.aggregatedList pages served


class OperationFailed(Exception):
    """Raised by a mutation that the cloud accepts, then fails as an operation:
    "<status>:<code>:<message>"."""


class GceEmulator:
    def __init__(self, *, netns: str | None = None, **state: Any) -> None:
        self.state = GceState(**state)
        self.lock = threading.RLock()
        self._op_ids = itertools.count(1)
        self._fail_next: str | None = None
        self._before_next: Callable[[GceEmulator], None] | None = None
        self._identities: dict[str, str] = {}  # instance name -> nic0 MAC, of add_node
        self._node_servers: list[EmulatorServer] = []
        s = self.state
        host_project = s.subnet_project or s.project
        self.subnet_path = (
            f"projects/{host_project}/regions/{s.zone.rsplit('-', 1)[0]}/subnetworks/{s.subnetwork}"
        )
        self.add_subnetwork(self.subnet_path, s.subnet_cidr)
        self.instance_path = f"projects/{s.project}/zones/{s.zone}/instances/{s.instance}"
        self.add_instance(self.instance_path, self.subnet_path)
        self.server = EmulatorServer(self.handle, netns=netns)

    # ------------------------------------------------------------------ set-up and views

    def add_subnetwork(
        self, path: str, cidr: str, secondary: list[dict[str, str]] | None = None
    ) -> None:
        self.state.subnetworks[path] = {
            "kind": "compute#subnetwork",
            "name": path.rsplit("/", 1)[-1],
            "ipCidrRange": cidr,
            "gatewayAddress": str(ipaddress.ip_network(cidr).network_address + 1),
            "network": f"{GOOGLE_URL}/projects/{path.split('/')[1]}/global/networks/default",
            "secondaryIpRanges": list(secondary or []),
            "fingerprint": _fingerprint(),
            "selfLink": f"{GOOGLE_URL}/{path}",
        }

    def add_instance(
        self, path: str, subnet_path: str, aliases: list[dict[str, str]] | None = None
    ) -> None:
        self.state.instances[path] = {
            "kind": "compute#instance",
            "name": path.rsplit("/", 1)[-1],
            "canIpForward": True,
            "networkInterfaces": [
                {
                    "name": "nic0",
                    "network": self.state.subnetworks[subnet_path]["network"],
                    "subnetwork": f"{GOOGLE_URL}/{subnet_path}",
                    "networkIP": "10.128.0.2",
                    "aliasIpRanges": list(aliases or []),
                    "fingerprint": _fingerprint(),
                }
            ],
        }

    @property
    def subnet(self) -> dict[str, Any]:
        return self.state.subnetworks[self.subnet_path]

    @property
    def nic0(self) -> dict[str, Any]:
        nic: dict[str, Any] = self.state.instances[self.instance_path]["networkInterfaces"][0]
        return nic

    def snapshot(self) -> dict[str, Any]:
        """The cloud-visible state without fingerprints (they change on every write)."""
        with self.lock:
            subnets = {p: s["secondaryIpRanges"] for p, s in self.state.subnetworks.items()}
            aliases = {
                p: [n["aliasIpRanges"] for n in i["networkInterfaces"]]
                for p, i in self.state.instances.items()
            }
            return copy.deepcopy({"subnets": subnets, "aliases": aliases})

    def set_secondary(self, ranges: list[dict[str, str]]) -> None:
        with self.lock:
            self.subnet["secondaryIpRanges"] = list(ranges)
            self.subnet["fingerprint"] = _fingerprint()

    def set_aliases(self, aliases: list[dict[str, str]]) -> None:
        with self.lock:
            self.nic0["aliasIpRanges"] = list(aliases)
            self.nic0["fingerprint"] = _fingerprint()

    def fail_next_operation(self, code: str = "QUOTA_EXCEEDED", status: int = 403) -> None:
        self._fail_next = f"{status}:{code}"

    def before_next_mutation(self, fn: Callable[[GceEmulator], None]) -> None:
        self._before_next = fn

    # ------------------------------------------------------------------ server

    def start(self) -> GceEmulator:
        self.server.start()
        return self

    def stop(self) -> None:
        for server in self._node_servers:
            server.stop()
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def environ(self, **extra: str) -> dict[str, str]:
        """The configuration that points cocoon-net at this emulator (and the Go tool's cron
        file away from the host's /etc/cron.d, unless a test names its own)."""
        return {
            "GCE_METADATA_HOST": self.server.host,
            "COCOON_NET_GCE_COMPUTE_URL": f"{self.url}/compute/v1",
            "COCOON_NET_GCE_GO_CRON_FILE": "/nonexistent/cocoon-net-fix-alias",
            **extra,
        }

    def add_node(self, name: str, mac: str, *, netns: str | None = None) -> dict[str, str]:
        """Another instance on the same subnetwork, with its own metadata server (in netns
        when given), as each VM reaches only its own: returns the environ of that node. The
        Compute API behind every server is the same cloud, under one lock."""
        path = f"projects/{self.state.project}/zones/{self.state.zone}/instances/{name}"
        with self.lock:
            self.add_instance(path, self.subnet_path)
            self._identities[name] = mac
        server = EmulatorServer(lambda req: self.handle(req, name), netns=netns).start()
        self._node_servers.append(server)
        return {
            "GCE_METADATA_HOST": server.host,
            "COCOON_NET_GCE_COMPUTE_URL": f"{server.url}/compute/v1",
            "COCOON_NET_GCE_GO_CRON_FILE": "/nonexistent/cocoon-net-fix-alias",
        }

    def handle(self, req: Request, identity: str = "") -> Reply:
        with self.lock:
            if req.path.startswith("/computeMetadata/v1/"):
                reply = self._metadata(req, req.path.removeprefix("/computeMetadata/v1/"), identity)
                return Reply(
                    reply.status, reply.body, {"Metadata-Flavor": "Google", **reply.headers}
                )
            if req.path == "/token" and req.method == "POST":
                return self._oauth(req)
            if req.path.startswith("/compute/v1/"):
                auth = req.headers.get("authorization", "")
                if not auth.startswith("Bearer ") or auth[7:] not in self.state.tokens:
                    return _error(
                        401, "authError", "Request had invalid authentication credentials."
                    )
                return self._compute(req, req.path.removeprefix("/compute/v1/"))
            return _error(404, "notFound", f"no such path {req.path}")

    # ------------------------------------------------------------------ metadata

    def _metadata(self, req: Request, path: str, identity: str) -> Reply:
        if req.headers.get("metadata-flavor") != "Google":
            return Reply(403, "Missing Metadata-Flavor:Google header.")
        s = self.state
        name, mac = (identity, self._identities[identity]) if identity else (s.instance, s.mac)
        nic = "instance/network-interfaces/0/"
        values = {
            "instance/name": name,
            "instance/id": "4567890123456789",
            "instance/zone": f"projects/{s.numeric_project}/zones/{s.zone}",
            "project/project-id": s.project,
            "project/numeric-project-id": s.numeric_project,
            nic + "mac": mac,
            nic + "mtu": str(s.mtu),
            nic + "ip": "10.128.0.2",
            nic + "network": f"projects/{s.numeric_project}/networks/default",
            "instance/service-accounts/default/email": f"node@{s.project}.iam.gserviceaccount.com",
            "instance/service-accounts/default/scopes": "https://www.googleapis.com/auth/cloud-platform",
        }
        if path == "instance/service-accounts/default/token":
            return Reply(200, self._issue("metadata"))
        if path in values:
            return Reply(200, values[path])
        return Reply(404, "not found")

    def _issue(self, grant: str) -> dict[str, Any]:
        token = "ya29." + secrets.token_urlsafe(12)
        self.state.tokens.add(token)
        self.state.token_grants.append(grant)
        return {
            "access_token": token,
            "expires_in": self.state.token_lifetime,
            "token_type": "Bearer",
        }

    def _oauth(self, req: Request) -> Reply:
        form = dict(parse_qsl(req.body.decode()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return Reply(400, {"error": "unsupported_grant_type"})
        try:
            payload = form["assertion"].split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (KeyError, IndexError, ValueError):
            return Reply(400, {"error": "invalid_grant"})
        return Reply(200, self._issue(f"jwt:{claims.get('iss')}"))

    # ------------------------------------------------------------------ compute

    def _compute(self, req: Request, path: str) -> Reply:
        op = re.fullmatch(
            r"(projects/[^/]+/(?:zones|regions)/[^/]+)/operations/([^/]+)(/wait)?", path
        )
        if op:
            return self._operation(op.group(2), wait=bool(op.group(3)))
        if path.endswith("/updateNetworkInterface") and req.method == "PATCH":
            return self._mutate(req, path.removesuffix("/updateNetworkInterface"), self._update_nic)
        if path in self.state.subnetworks:
            if req.method == "GET":
                return Reply(200, self.state.subnetworks[path])
            if req.method == "PATCH":
                return self._mutate(req, path, self._patch_subnet)
        if path in self.state.instances and req.method == "GET":
            return Reply(200, self.state.instances[path])
        if path.endswith("/aggregated/instances") and req.method == "GET":
            return self._aggregated(req, path.split("/")[1])
        return _error(404, "notFound", f"The resource '{path}' was not found")

    def _aggregated(self, req: Request, project: str) -> Reply:
        """instances.aggregatedList: the project's instances by zone, in pages."""
        instances = sorted(
            (p, i) for p, i in self.state.instances.items() if p.split("/")[1] == project
        )
        size = int(req.query.get("maxResults", "500"))
        start = int(req.query.get("pageToken") or 0)
        page = instances[start : start + size]
        items: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for path, inst in page:
            items.setdefault(f"zones/{path.split('/')[3]}", {"instances": []})["instances"].append(
                inst
            )
        body: dict[str, Any] = {"kind": "compute#instanceAggregatedList", "items": items}
        if start + size < len(instances):
            body["nextPageToken"] = str(start + size)
        self.state.list_calls += 1
        return Reply(200, body)

    def _mutate(
        self, req: Request, path: str, apply: Callable[[Request, str], Reply | None]
    ) -> Reply:
        rid = req.query.get("requestId", "")
        if rid:
            try:
                if uuid.UUID(rid).int == 0:
                    raise ValueError
            except ValueError:
                return _error(400, "invalid", f"Invalid value for field 'requestId': '{rid}'")
            if rid in self.state.request_ids:  # the same logical request: no second apply
                return Reply(200, self.state.operations[self.state.request_ids[rid]])
        if self._before_next is not None:
            hook, self._before_next = self._before_next, None
            hook(self)
        failure, self._fail_next = self._fail_next, None
        if failure is None:
            try:
                refused = apply(req, path)
            except OperationFailed as exc:
                failure = exc.args[0]
            else:
                if refused is not None:
                    return refused
                self.state.mutations_applied += 1
        scope = path.rsplit("/", 2)[0]  # projects/P/zones/Z or projects/P/regions/R
        name = f"operation-{next(self._op_ids)}-{secrets.token_hex(4)}"
        operation: dict[str, Any] = {
            "kind": "compute#operation",
            "name": name,
            "operationType": "updateNetworkInterface" if "/instances/" in path else "patch",
            "targetLink": f"{GOOGLE_URL}/{path}",
            "status": "PENDING" if self.state.operation_polls else "DONE",
            "selfLink": f"{GOOGLE_URL}/{scope}/operations/{name}",
        }
        if failure is not None:
            status, code, *message = failure.split(":", 2)
            text = message[0] if message else f"emulated {code}"
            operation["error"] = {"errors": [{"code": code, "message": text}]}
            operation["httpErrorStatusCode"] = int(status)
        self.state.operations[name] = operation
        self.state.op_polls_left[name] = self.state.operation_polls
        if rid:
            self.state.request_ids[rid] = name
        return Reply(200, operation)

    def _operation(self, name: str, *, wait: bool) -> Reply:
        op = self.state.operations.get(name)
        if op is None:
            return _error(404, "notFound", f"The resource 'operations/{name}' was not found")
        if wait:
            left = self.state.op_polls_left[name] - 1
            self.state.op_polls_left[name] = left
            op["status"] = "DONE" if left <= 0 else "RUNNING"
        return Reply(200, op)

    def _check_fingerprint(self, body: dict[str, Any], current: str) -> Reply | None:
        if "fingerprint" not in body:
            return _error(400, "required", "Required field 'fingerprint' not specified")
        if body["fingerprint"] != current:
            return _error(
                412,
                "conditionNotMet",
                "Supplied fingerprint does not match current metadata fingerprint.",
            )
        return None

    def _patch_subnet(self, req: Request, path: str) -> Reply | None:
        subnet = self.state.subnetworks[path]
        body = req.json() or {}
        refused = self._check_fingerprint(body, subnet["fingerprint"])
        if refused:
            return refused
        ranges = body.get("secondaryIpRanges", [])
        nets = [ipaddress.ip_network(subnet["ipCidrRange"])]
        for entry in ranges:
            net = ipaddress.ip_network(entry["ipCidrRange"])
            if any(net.overlaps(other) for other in nets):
                return _error(
                    400, "invalid", f"Invalid IPCidrRange: {net} conflicts with an existing range."
                )
            nets.append(net)
        names = {r["rangeName"] for r in ranges}
        for inst in self.state.instances.values():
            for nic in inst["networkInterfaces"]:
                for alias in nic["aliasIpRanges"]:
                    if (
                        alias.get("subnetworkRangeName")
                        and alias["subnetworkRangeName"] not in names
                    ):
                        return _error(
                            400,
                            "resourceInUseByAnotherResource",
                            f"secondary range {alias['subnetworkRangeName']} is in use",
                        )
        subnet["secondaryIpRanges"] = ranges
        subnet["fingerprint"] = _fingerprint()
        return None

    def _update_nic(self, req: Request, path: str) -> Reply | None:
        inst = self.state.instances.get(path)
        if inst is None:
            return _error(404, "notFound", f"The resource '{path}' was not found")
        wanted = req.query.get("networkInterface", "")
        nic = next((n for n in inst["networkInterfaces"] if n["name"] == wanted), None)
        if nic is None:
            return _error(400, "invalid", f"network interface {wanted!r} not found")
        body = req.json() or {}
        refused = self._check_fingerprint(body, nic["fingerprint"])
        if refused:
            return refused
        subnet = self.state.subnetworks[nic["subnetwork"].removeprefix(GOOGLE_URL + "/")]
        ranges = {r["rangeName"]: r["ipCidrRange"] for r in subnet["secondaryIpRanges"]}
        aliases = body.get("aliasIpRanges", [])
        for alias in aliases:
            name = alias.get("subnetworkRangeName", "")
            parent = ranges.get(name) if name else subnet["ipCidrRange"]
            if parent is None:
                return _error(
                    400, "invalid", f"secondary range {name!r} does not exist in the subnetwork"
                )
            if not ipaddress.IPv4Network(alias["ipCidrRange"]).subnet_of(
                ipaddress.IPv4Network(parent)
            ):
                return _error(
                    400, "invalid", f"alias {alias['ipCidrRange']} is outside range {name}"
                )
            block = ipaddress.ip_network(alias["ipCidrRange"])
            for holder, other in self._aliases_elsewhere(path, nic["subnetwork"]):
                if block.overlaps(ipaddress.ip_network(other["ipCidrRange"])):
                    # The cloud's own coordination: an address lives on one instance only.
                    # Accepted as an operation, failed when it runs (as Compute does).
                    raise OperationFailed(
                        f"400:IP_IN_USE_BY_ANOTHER_RESOURCE:IP '{block}' is already being "
                        f"used by another resource ({holder})."
                    )
        nic["aliasIpRanges"] = aliases
        nic["fingerprint"] = _fingerprint()
        return None

    def _aliases_elsewhere(
        self, path: str, subnetwork: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for other_path, inst in self.state.instances.items():
            if other_path == path:
                continue
            for nic in inst["networkInterfaces"]:
                if nic["subnetwork"] == subnetwork:
                    for alias in nic["aliasIpRanges"]:
                        yield inst["name"], alias
