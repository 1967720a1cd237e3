"""An EC2 instance metadata service (IMDSv2) for tests, served by EmulatorServer.

    imds = ImdsEmulator(instance_id="i-0abc", region="us-east-1", zone="us-east-1a",
                        mac="0e:..", vpc_id="vpc-..")
    server = EmulatorServer(imds.handle, netns=ns.name).start()

`PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1 to 21600) returns a
token; `GET /latest/meta-data/<path>` needs it in `X-aws-ec2-metadata-token` unless IMDSv1 is
allowed (`v1_allowed`), and answers 401 otherwise, as EC2 does. `put_hangs` makes the token
PUT go unanswered, as a container one hop too far sees it.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from tests.emulators import Reply, Request


@dataclass
class ImdsEmulator:
    instance_id: str
    region: str
    zone: str
    mac: str
    vpc_id: str
    v1_allowed: bool = False
    put_hangs: bool = False
    tokens: set[str] = field(default_factory=set)
    hung: threading.Event = field(default_factory=threading.Event)  # set to release hung PUTs

    def paths(self) -> dict[str, str]:
        mac = f"network/interfaces/macs/{self.mac}"
        return {
            "instance-id": self.instance_id,
            "placement/region": self.region,
            "placement/availability-zone": self.zone,
            "mac": self.mac,
            f"{mac}/vpc-id": self.vpc_id,
            "network/interfaces/macs/": self.mac + "/",
        }

    def handle(self, req: Request) -> Reply:
        if req.path == "/latest/api/token":
            if req.method != "PUT":
                return Reply(405, "")
            ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Reply(400, "")
            if self.put_hangs:
                self.hung.wait(30)
                return Reply(200, "late")
            token = secrets.token_urlsafe(24)
            self.tokens.add(token)
            return Reply(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        if req.method != "GET" or not req.path.startswith("/latest/meta-data/"):
            return Reply(404, "")
        given = req.headers.get("x-aws-ec2-metadata-token")
        if given is None and not self.v1_allowed:
            return Reply(401, "")
        if given is not None and given not in self.tokens:
            return Reply(401, "")
        value = self.paths().get(req.path.removeprefix("/latest/meta-data/"))
        return Reply(200, value) if value is not None else Reply(404, "")
