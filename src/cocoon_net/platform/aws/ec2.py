"""The EC2 API through botocore, the official SDK's core, imported here and only here.

    api = Ec2Api.connect(environ, region="us-east-1")
    api.call("DescribeSubnets", {"Filters": [...]})

Credentials are what the SDK's own chain finds (environment, ~/.aws, the instance profile
through IMDS), unless `AWS_ACCESS_KEY_ID` is in the environ passed in. The endpoint is the
SDK's setting too (`AWS_ENDPOINT_URL_EC2`, then `AWS_ENDPOINT_URL`).

The SDK's own retries are off: one loop here decides. Throttling (`RequestLimitExceeded`) is
always retried, since EC2 refused the call before doing anything. A server error or a lost
answer is retried only for calls that are safe to repeat: reads, deletes, and creates that
carry a `ClientToken` (EC2 answers a repeat with what the first made). Any other mutation
that may or may not have happened raises, and the next run of init or teardown finds out
what did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cocoon_net.errors import (
    CloudAuthError,
    CloudConflict,
    CloudError,
    CloudNotFound,
    CloudQuotaError,
    CloudTimeout,
)
from cocoon_net.platform.http import Backoff, RetryPolicy

THROTTLE_CODES = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled"}
)
AUTH_CODES = frozenset(
    {
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "OptInRequired",
        "Blocked",
        "ExpiredToken",
    }
)
QUOTA_CODES = frozenset(
    {
        "InsufficientFreeAddressesInSubnet",
        "InsufficientCidrBlocks",
        "PrivateIpAddressLimitExceeded",
        "AttachmentLimitExceeded",
        "NetworkInterfaceLimitExceeded",
        "RulesPerSecurityGroupLimitExceeded",
        "SubnetLimitExceeded",
    }
)
CONFLICT_CODES = frozenset(
    {
        "IncorrectState",
        "InvalidNetworkInterface.InUse",
        "DependencyViolation",
        "InvalidPermission.Duplicate",
        "IdempotentParameterMismatch",
        "InvalidSubnet.Conflict",
    }
)
AUTH_HINT = (
    "check the instance profile's role (or AWS_ACCESS_KEY_ID) and that it allows the EC2 "
    "actions listed in docs/aws.md"
)
# Safe to send twice: a repeat changes nothing or is answered like the first.
_REPEATABLE_PREFIXES = ("Describe", "Delete", "CreateTags", "DeleteTags")


def classify(action: str, code: str, message: str) -> CloudError:
    text = f"EC2 {action}: {code}: {message}"
    if code in AUTH_CODES:
        return CloudAuthError(f"{text} ({AUTH_HINT})")
    if code.endswith("NotFound"):
        return CloudNotFound(text)
    if code in QUOTA_CODES or (code.endswith("LimitExceeded") and code not in THROTTLE_CODES):
        return CloudQuotaError(text)
    if code in CONFLICT_CODES:
        return CloudConflict(text)
    return CloudError(text)


def repeatable(action: str, params: Mapping[str, Any]) -> bool:
    return action.startswith(_REPEATABLE_PREFIXES) or "ClientToken" in params


class Ec2Api:
    """One botocore client with the retry and error rules above."""

    def __init__(
        self,
        client: Any,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.backoff = Backoff(retry or RetryPolicy(), sleep, clock)
        self.calls = 0  # attempts sent, for the provisioning benchmark

    @classmethod
    def connect(
        cls, environ: Mapping[str, str], *, region: str, retry: RetryPolicy | None = None
    ) -> Ec2Api:
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        keys: dict[str, str] = {}
        if environ.get("AWS_ACCESS_KEY_ID"):
            keys = {
                "aws_access_key_id": environ["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": environ.get("AWS_SECRET_ACCESS_KEY", ""),
            }
            if environ.get("AWS_SESSION_TOKEN"):
                keys["aws_session_token"] = environ["AWS_SESSION_TOKEN"]
        endpoint = environ.get("AWS_ENDPOINT_URL_EC2") or environ.get("AWS_ENDPOINT_URL")
        config = botocore.config.Config(
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=20,
            user_agent_extra="cocoon-net",
        )
        client = session.create_client(
            "ec2", region_name=region, endpoint_url=endpoint or None, config=config, **keys
        )
        return cls(client, retry=retry)

    def call(self, action: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from botocore import xform_name
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        params = dict(params or {})
        method = getattr(self._client, xform_name(action))
        safe = repeatable(action, params)
        deadline = self.backoff.deadline()
        attempt = 0
        while True:
            attempt += 1
            self.calls += 1
            try:
                answer: dict[str, Any] = method(**params)
                return answer
            except (NoCredentialsError, PartialCredentialsError) as exc:
                raise CloudAuthError(f"EC2 {action}: {exc} ({AUTH_HINT})") from None
            except ClientError as exc:
                error = exc.response.get("Error") or {}
                code = str(error.get("Code") or "")
                status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0))
                failure = classify(action, code, str(error.get("Message") or ""))
                again = code in THROTTLE_CODES or (status >= 500 and safe)
            except (ConnectionError, HTTPClientError) as exc:  # refused, reset, timed out
                failure = CloudTimeout(f"EC2 {action}: no answer: {exc}")
                again = safe
            except BotoCoreError as exc:
                raise CloudError(f"EC2 {action}: {exc}") from None
            delay = self.backoff.delay(attempt, deadline) if again else None
            if delay is None:
                raise failure
            self.backoff.sleep(delay)

    def pages(
        self, action: str, params: Mapping[str, Any], key: str
    ) -> Iterator[Mapping[str, Any]]:
        """Every item of a paginated Describe*, following NextToken."""
        params = dict(params)
        while True:
            answer = self.call(action, params)
            yield from answer.get(key) or ()
            token = answer.get("NextToken")
            if not token:
                return
            params["NextToken"] = token
