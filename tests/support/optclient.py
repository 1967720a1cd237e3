"""A busybox udhcpc that also records the DHCP options it was given, as udhcpc hands them to
its script (environment variables: domain, search, ntpsrv, staticroutes, lease, ...)."""

from __future__ import annotations

import shlex

from cocoon_net.sandbox import Udhcpc

# Options udhcpc asks for on top of its defaults (subnet, router, dns, hostname, domain,
# broadcast), by busybox's names: 42 ntpsrv, 119 search, 121 staticroutes, 249 msstaticroutes.
REQUESTED = ("ntpsrv", "search", "staticroutes", "msstaticroutes")
RECORDED = ("ip", "subnet", "router", "dns", "domain", "search", "ntpsrv", "staticroutes",
            "msstaticroutes", "lease", "serverid")  # fmt: skip


class OptionsUdhcpc(Udhcpc):
    def _script_body(self) -> str:
        options = shlex.quote(str(self.statedir / "options"))
        dump = "".join(f'echo "{name}=${{{name}:-}}" >> {options}.new\n' for name in RECORDED)
        return (
            'if [ "$1" = bound ] || [ "$1" = renew ]; then\n'
            f": > {options}.new\n{dump}mv {options}.new {options}\nfi\n" + super()._script_body()
        )

    def _argv(self) -> list[str]:
        return [*super()._argv(), *(arg for name in REQUESTED for arg in ("-O", name))]

    def options(self) -> dict[str, str]:
        """The options of the latest bound or renew event, by udhcpc's variable names."""
        text = (self.statedir / "options").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
