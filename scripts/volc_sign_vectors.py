#!/usr/bin/env python3
"""Write tests/data/volc_sign_vectors.json: Authorization headers made by the official
Volcengine Python SDK (`volcengine`, its auth.SignerV4) for fixed requests, keys and times.

The vectors are committed; this script is not part of `make test` and needs the SDK, which
is no dependency of cocoon-net. Regenerate in a throw-away virtualenv:

    python3 -m venv /tmp/volc && /tmp/volc/bin/pip install volcengine
    /tmp/volc/bin/python scripts/volc_sign_vectors.py
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    from volcengine.auth.SignerV4 import SignerV4  # type: ignore[import-not-found]
    from volcengine.auth.SignParam import SignParam  # type: ignore[import-not-found]
    from volcengine.Credentials import Credentials  # type: ignore[import-not-found]
except ImportError:
    sys.exit("volc_sign_vectors: needs the official SDK (pip install volcengine)")

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "volc_sign_vectors.json"
AK, SK = "AKLTexampleAccessKeyId0001", "ZXhhbXBsZVNlY3JldEtleQ=="
ENDPOINT = "https://vpc.cn-beijing.volcengineapi.com/"

# name, method, url, query, extra headers, body, region, service, session token, time
Case = tuple[str, str, str, dict[str, Any], dict[str, str], str, str, str, str, str]
CASES: list[Case] = [
    (
        "describe-subnets",
        "GET",
        ENDPOINT,
        {
            "Action": "DescribeSubnets",
            "Version": "2020-04-01",
            "VpcId": "vpc-13fpdgwk7rxfk3n",
        },
        {},
        "",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
    (
        "list-values-and-escapes",
        "GET",
        ENDPOINT,
        {
            "Action": "CreateNetworkInterface",
            "Version": "2020-04-01",
            "SecurityGroupIds.1": "sg-b",
            "SecurityGroupIds.2": "sg-a",
            "Description": "cocoon-net node a/b * ~x (test)",
            "NetworkInterfaceName": "名字 with space+plus",
            "Tags.1.Key": "cocoon-net",
            "Tags.1.Value": "",
        },
        {},
        "",
        "cn-shanghai",
        "vpc",
        "",
        "2026-12-31T23:59:59",
    ),
    (
        "repeated-key",
        "GET",
        "https://open.volcengineapi.com/",
        {
            "Action": "DescribeNetworkInterfaces",
            "Version": "2020-04-01",
            "NetworkInterfaceIds": ["eni-2", "eni-1"],
        },
        {},
        "",
        "ap-southeast-1",
        "vpc",
        "",
        "2027-01-01T00:00:00",
    ),
    (
        "sts-session-token",
        "GET",
        ENDPOINT,
        {"Action": "DescribeVpcAttributes", "Version": "2020-04-01", "VpcId": "vpc-1"},
        {},
        "",
        "cn-beijing",
        "vpc",
        "STSexampleSessionToken/+=",
        "2026-04-05T06:00:00",
    ),
    (
        "post-with-body",
        "POST",
        "https://open.volcengineapi.com/",
        {"Action": "TagResources", "Version": "2020-04-01"},
        {"Content-Type": "application/json"},
        '{"ResourceType":"eni","ResourceIds":["eni-1"]}',
        "cn-guangzhou",
        "vpc",
        "",
        "2026-06-15T12:34:56",
    ),
    (
        "host-port-and-path",
        "GET",
        "http://127.0.0.1:8080/some/path",
        {"Action": "DescribeSubnets", "Version": "2020-04-01"},
        {"X-Custom": "v"},
        "",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
    (
        "port-80-dropped-md5-signed",
        "POST",
        "http://open.volcengineapi.com:80/",
        {"Action": "TagResources", "Version": "2020-04-01"},
        {"Content-Type": "application/json", "Content-Md5": "1B2M2Y8AsgTpgAmY7PhCfg=="},
        "{}",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
    (
        "path-quoting-and-no-path",
        "GET",
        "https://open.volcengineapi.com/a b/c~d/é",
        {"Action": "DescribeSubnets", "Version": "2020-04-01"},
        {},
        "",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
    (
        "empty-path",
        "GET",
        "https://open.volcengineapi.com",
        {"Action": "DescribeSubnets", "Version": "2020-04-01"},
        {},
        "",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
    (
        "default-port-dropped",
        "GET",
        "https://vpc.cn-beijing.volcengineapi.com:443/",
        {"Action": "DescribeSubnets", "Version": "2020-04-01"},
        {},
        "",
        "cn-beijing",
        "vpc",
        "",
        "2026-04-05T06:00:00",
    ),
]


def vector(
    case: tuple[str, str, str, dict[str, Any], dict[str, str], str, str, str, str, str],
) -> dict[str, Any]:
    name, method, url, query, headers, body, region, service, token, when = case
    parts = urlsplit(url)
    param = SignParam()
    param.set_method(method)
    param.set_host(parts.netloc)
    param.set_path(parts.path or "/")
    param.set_query(OrderedDict(query))
    param.set_header_list(OrderedDict({"Host": parts.netloc, **headers}))
    param.set_body(body)
    param.set_date(datetime.fromisoformat(when).replace(tzinfo=UTC))
    creds = Credentials(AK, SK, service, region, token)
    result = SignerV4.sign_only(param, creds)
    return {
        "name": name,
        "method": method,
        "url": url,
        "query": query,
        "headers": headers,
        "body": body,
        "access_key_id": AK,
        "secret_access_key": SK,
        "region": region,
        "service": service,
        "session_token": token,
        "now": when + "Z",
        "expected": {
            "X-Date": result.xdate,
            "X-Content-Sha256": result.xContextSha256,
            "Authorization": result.authorization,
        },
    }


def main() -> None:
    data = {
        "generator": "scripts/volc_sign_vectors.py",
        "sdk": f"volcengine {version('volcengine')} (volcengine.auth.SignerV4.sign_only)",
        "vectors": [vector(case) for case in CASES],
    }
    OUT.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(CASES)} vectors to {OUT}")


if __name__ == "__main__":
    main()
