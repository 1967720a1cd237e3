"""The one exception tree of cocoon-net.

    CocoonError                 anything the CLI reports as one line and exit 1
    ├── UsageError              bad flags or values: exit 2, nothing touched
    ├── StateError              pool.json / leases missing, corrupt or foreign
    ├── LockHeldError           another cocoon-net holds the state lock
    ├── HostSetupError          a kernel object, sysctl, firewall rule or file could not be set
    └── CloudError              a cloud API call failed (platforms refine it)
        ├── CloudAuthError      credentials missing or refused (401/403)
        ├── CloudNotFound       the resource does not exist (404)
        ├── CloudConflict       a precondition or fingerprint did not match (409/412)
        ├── CloudQuotaError     a quota or capacity limit was hit
        └── CloudTimeout        the cloud did not answer or finish in time

Messages are written for the operator: they say what failed, on what, and what to do.
"""

from __future__ import annotations


class CocoonError(Exception):
    """Base of every error cocoon-net reports to the operator."""

    exit_code = 1


class UsageError(CocoonError):
    """Invalid command-line input; raised before any side effect."""

    exit_code = 2


class StateError(CocoonError):
    """A state file is missing, unreadable, corrupt or inconsistent."""


class LockHeldError(CocoonError):
    """Another cocoon-net process holds the exclusive lock."""


class HostSetupError(CocoonError):
    """A change to the host (links, addresses, routes, sysctls, firewall, files) failed."""


class CloudError(CocoonError):
    """A cloud API call failed."""


class CloudAuthError(CloudError):
    pass


class CloudNotFound(CloudError):
    pass


class CloudConflict(CloudError):
    pass


class CloudQuotaError(CloudError):
    pass


class CloudTimeout(CloudError):
    pass


MAX_LINE = 299  # what the operator reads on stderr, the program name included


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """text as one line of at most limit characters: its head (the first cause) and its tail
    (what to do) survive; the middle is elided. The full text is for the debug log."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    tail = min(90, limit // 3)
    return flat[: limit - tail - 5] + " ... " + flat[-tail:]


def combined(kind: type[CocoonError], failures: list[str], hint: str) -> CocoonError:
    """One error for several failures: the first in full, the rest counted (each is logged
    at debug by the caller), then what to do."""
    more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
    return kind(f"{failures[0]}{more}; {hint}" if hint else failures[0] + more)
