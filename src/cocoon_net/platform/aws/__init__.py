"""AWS EC2: pure plan (plan.py), instance metadata (imds.py), the EC2 API (ec2.py), the
platform (platform.py) and its steps (provision.py, teardown.py)."""

from __future__ import annotations

from collections.abc import Mapping

from cocoon_net.platform.aws.platform import AwsPlatform
from cocoon_net.platform.http import RetryPolicy
from cocoon_net.platform.volc_api import PollPolicy

__all__ = ["AwsPlatform", "create"]


def create(
    environ: Mapping[str, str],
    *,
    retry: RetryPolicy | None = None,
    poll: PollPolicy | None = None,
) -> AwsPlatform:
    return AwsPlatform(environ, retry=retry, poll=poll)
