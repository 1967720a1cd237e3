"""The composition root of `cocoon-net daemon`: the only place long-lived objects are built.

Start-up order: lock -> pool.json -> host setup -> ready. The daemon holds the state lock for
its whole life, so init/adopt/teardown cannot change the node under it.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from cocoon_net import config, lifecycle, state
from cocoon_net.lock import StateLock

log = logging.getLogger("cocoon_net.daemon")


@dataclass(frozen=True)
class DaemonOptions:
    paths: config.Paths
    skip_iptables: bool
    metrics_addr: str
    lease_seconds: int


def run(opts: DaemonOptions) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    state.load(opts.paths.pool_file)  # a bad pool.json fails before the lock file is made
    with StateLock(opts.paths.lock_file, "daemon"):
        pool = state.load(opts.paths.pool_file)
        changes = lifecycle.reconcile_host(
            pool,
            opts.paths.pool_file,
            manage_firewall=pool.manage_iptables and not opts.skip_iptables,
        )
        for change in changes:
            log.info("host setup: %s", change)
        log.info("ready: %d addresses on %s via %s", len(pool.ips), pool.subnet, pool.bridge)
        stop.wait()
        log.info("stopping")
    return 0
