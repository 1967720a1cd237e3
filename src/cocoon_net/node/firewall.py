"""iptables rules for the VM subnet, in chains of our own, applied in one transaction.

    filter FORWARD  --(rule 1)--> COCOON-FORWARD   drop CIDRs, then ACCEPT VM traffic both ways
    filter INPUT    --(rule 1)--> COCOON-INPUT     ACCEPT DHCP (udp/67) from the bridge
    nat POSTROUTING --(rule 1)--> COCOON-POSTROUTING  VPC CIDRs unmasked, MASQUERADE the rest

Every apply is one `iptables-restore -w --noflush`: in --noflush mode a chain declaration such
as `:COCOON-FORWARD - [0:0]` creates the chain or empties it, so the input rebuilds our chains
from scratch and leaves every other rule alone; re-applying is idempotent and the kernel never
sees a half-written chain. The jumps are inserted only when missing, so a rule another tool
inserted above ours later (Docker's DOCKER-USER) is not fought over on every run.

Every rule carries a comment: `cocoon-net:<purpose>`, and the drop rules keep the Go tool's
`cocoon-net-drop` so its old rules, which sat directly in FORWARD, are recognised and removed.
The Go tool's untagged rules (ACCEPT between the bridge and each secondary NIC and within the
bridge, MASQUERADE of the subnet) are recognised only as exact copies of what it wrote for
this node's bridge, subnet and NICs, and are deleted in the same transaction that builds our
chains, so forwarded VM traffic always meets one set or the other. Only our chains, the jumps
into them and those old rules are ever changed.

IMPORTANT: chain names and comments are how later versions find these rules; do not rename
them without also removing the old names.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Network

from cocoon_net import proc
from cocoon_net.errors import HostSetupError

CHAIN_PREFIX = "COCOON-"
DROP_TAG = "cocoon-net-drop"  # the Go tool's tag, kept so both generations are recognised
# (table, built-in chain, our chain): the jump is rule 1 of the built-in chain.
HOOKS = (
    ("filter", "FORWARD", "COCOON-FORWARD"),
    ("filter", "INPUT", "COCOON-INPUT"),
    ("nat", "POSTROUTING", "COCOON-POSTROUTING"),
)
TABLES = ("filter", "nat")


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]  # tokens after "-A CHAIN", in iptables-save's canonical order

    def text(self) -> str:
        return " ".join(_quote(token) for token in self.spec)


def _quote(token: str) -> str:
    """Quote a token the way iptables-restore reads it: double quotes only, no shell rules."""
    if token and not any(ch.isspace() or ch in "\"'\\" for ch in token):
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Ruleset:
    """The part of iptables-save that is ours: our chains, jumps to them, Go's tagged rules."""

    chains: tuple[tuple[str, str], ...] = ()  # (table, chain) of declared COCOON- chains
    rules: tuple[Rule, ...] = ()
    # The (table, hook) chains whose first rule, of all rules in the chain, is our jump. The
    # rules above hold only ours, so a foreign rule inserted above our jump shows only here.
    first: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Chain:
    table: str
    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class FirewallSpec:
    bridge: str
    subnet: IPv4Network
    drop_cidrs: tuple[IPv4Network, ...] = ()
    drop_internal_access: bool = False
    vpc_cidrs: tuple[IPv4Network, ...] = ()
    secondary_nics: tuple[str, ...] = ()  # only to recognise the Go tool's rules for them


@dataclass(frozen=True)
class FirewallPlan:
    current: Ruleset
    fill: tuple[Chain, ...] = ()  # declared (so created or emptied), then filled
    delete: tuple[Rule, ...] = ()  # rendered as -D
    insert: tuple[Rule, ...] = ()  # rendered as -I <chain> 1
    drop_chains: tuple[tuple[str, str], ...] = ()  # emptied, then deleted with -X


def _comment(purpose: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", purpose)


def _jump(table: str, hook: str, chain: str) -> Rule:
    return Rule(table, hook, (*_comment("cocoon-net:jump"), "-j", chain))


JUMPS = {(table, hook): _jump(table, hook, chain) for table, hook, chain in HOOKS}


def _is_jump(rule: Rule) -> bool:
    """A rule in a chain not ours whose target is one of our chains."""
    spec = rule.spec
    return (
        not rule.chain.startswith(CHAIN_PREFIX)
        and "-j" in spec[:-1]
        and spec[spec.index("-j") + 1].startswith(CHAIN_PREFIX)
    )


def _is_go_rule(rule: Rule) -> bool:
    """A drop rule the Go tool inserted directly into FORWARD."""
    return rule.table == "filter" and rule.chain == "FORWARD" and DROP_TAG in rule.spec


def go_rules(spec: FirewallSpec) -> frozenset[Rule]:
    """The Go tool's untagged rules for spec's node, token for token as iptables-save prints
    them. iptables stores a source with host bits cleared, so the subnet as the Go tool wrote
    it (pool.json keeps it raw) is listed in its canonical form, which is spec.subnet."""
    br = spec.bridge
    forward = [("-i", nic, "-o", br, "-j", "ACCEPT") for nic in spec.secondary_nics]
    forward += [("-i", br, "-o", nic, "-j", "ACCEPT") for nic in spec.secondary_nics]
    forward.append(("-i", br, "-o", br, "-j", "ACCEPT"))
    masquerade = ("-s", str(spec.subnet), "!", "-o", br, "-j", "MASQUERADE")
    return frozenset(
        [*(Rule("filter", "FORWARD", r) for r in forward), Rule("nat", "POSTROUTING", masquerade)]
    )


def parse_save(text: str, foreign: Collection[Rule] = ()) -> Ruleset:
    """Pick our chains and rules out of iptables-save output (quoting normalised by shlex),
    and every rule equal to one in `foreign` (the Go tool's, see go_rules)."""
    table = ""
    chains: list[tuple[str, str]] = []
    rules: list[Rule] = []
    heads: dict[tuple[str, str], Rule] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif table not in TABLES:
            continue
        elif line.startswith(":" + CHAIN_PREFIX):
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            _, chain, *spec = shlex.split(line)
            rule = Rule(table, chain, tuple(spec))
            heads.setdefault((table, chain), rule)
            if (
                chain.startswith(CHAIN_PREFIX)
                or _is_jump(rule)
                or _is_go_rule(rule)
                or rule in foreign
            ):
                rules.append(rule)
    first = frozenset(hook for hook, jump in JUMPS.items() if heads.get(hook) == jump)
    return Ruleset(tuple(chains), tuple(rules), first)


def _chain(table: str, name: str, specs: list[tuple[str, ...]]) -> Chain:
    return Chain(table, name, tuple(Rule(table, name, spec) for spec in specs))


def desired_chains(spec: FirewallSpec) -> tuple[Chain, ...]:
    """Our three chains for spec. Token order is iptables-save's, so plans compare exactly."""
    br, subnet = spec.bridge, str(spec.subnet)
    internal = [spec.subnet] if spec.drop_internal_access else []
    forward = [
        ("-d", str(cidr), "-i", br, *_comment(DROP_TAG), "-j", "DROP")
        for cidr in dict.fromkeys([*spec.drop_cidrs, *internal])
    ]
    # ACCEPT after the drops, and before whatever follows our jump: a FORWARD policy of DROP
    # (Docker, kube) would otherwise drop VM traffic.
    forward += [
        ("-s", subnet, "-i", br, *_comment("cocoon-net:vm-egress"), "-j", "ACCEPT"),
        ("-d", subnet, "-o", br, *_comment("cocoon-net:vm-ingress"), "-j", "ACCEPT"),
    ]
    # VMs get their address over DHCP from us: let it in when INPUT defaults to DROP.
    dhcp = ("-i", br, "-p", "udp", "-m", "udp", "--dport", "67", *_comment("cocoon-net:dhcp"))
    # Traffic to the VPC keeps the VM's own address (that is what VPC-native means). ACCEPT,
    # not RETURN: RETURN would fall back into POSTROUTING, where a later MASQUERADE of Docker
    # or ip-masq-agent could still hide the VM; ACCEPT ends NAT for the connection.
    post = [
        ("-s", subnet, "-d", str(cidr), *_comment("cocoon-net:vpc-native"), "-j", "ACCEPT")
        for cidr in dict.fromkeys(spec.vpc_cidrs)
    ]
    post.append(
        ("-s", subnet, "!", "-o", br, *_comment("cocoon-net:masquerade"), "-j", "MASQUERADE")
    )
    return (
        _chain("filter", "COCOON-FORWARD", forward),
        _chain("filter", "COCOON-INPUT", [(*dhcp, "-j", "ACCEPT")]),
        _chain("nat", "COCOON-POSTROUTING", post),
    )


def plan(spec: FirewallSpec, current: Ruleset) -> FirewallPlan:
    """Rebuild our chains that differ, put our jumps first where they are not, delete the Go
    tool's rules for this node: its tagged drops and the exact copies of its ACCEPT and
    MASQUERADE rules (go_rules). Nothing when all is in place, so that checking again
    changes nothing (a ruleset rewrite wakes every nftables listener, the daemon included)."""
    untagged = go_rules(spec)
    old = [r for r in current.rules if _is_go_rule(r) or r in untagged]
    missing: list[Rule] = []
    for table, hook, chain in HOOKS:
        in_hook = [r for r in current.rules if (r.table, r.chain) == (table, hook)]
        jump = JUMPS[table, hook]
        if (table, hook) not in current.first:
            old += [r for r in in_hook if _is_jump(r) and r.spec[-1] == chain]
            missing.append(jump)
    fill = tuple(
        c
        for c in desired_chains(spec)
        if (c.table, c.name) not in current.chains
        or tuple(r for r in current.rules if (r.table, r.chain) == (c.table, c.name)) != c.rules
    )
    return FirewallPlan(current, fill=fill, delete=tuple(old), insert=tuple(missing))


def plan_teardown(current: Ruleset) -> FirewallPlan:
    """Delete the jumps, the Go tool's tagged rules and our chains; nothing when none is there."""
    delete = tuple(r for r in current.rules if _is_jump(r) or _is_go_rule(r))
    return FirewallPlan(current, delete=delete, drop_chains=current.chains)


def render(fw: FirewallPlan) -> str:
    """iptables-restore --noflush input for fw; empty when there is nothing to do."""
    out: list[str] = []
    for table in TABLES:
        lines = [f":{c.name} - [0:0]" for c in fw.fill if c.table == table]
        lines += [f":{name} - [0:0]" for t, name in fw.drop_chains if t == table]
        lines += [f"-A {r.chain} {r.text()}" for c in fw.fill if c.table == table for r in c.rules]
        lines += [f"-D {r.chain} {r.text()}" for r in fw.delete if r.table == table]
        lines += [f"-I {r.chain} 1 {r.text()}" for r in fw.insert if r.table == table]
        lines += [f"-X {name}" for t, name in fw.drop_chains if t == table]
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def expected(fw: FirewallPlan) -> Ruleset:
    """What our part of iptables-save holds once fw is applied."""
    filled = {(c.table, c.name) for c in fw.fill}
    dropped = set(fw.drop_chains)
    kept = Counter(r for r in fw.current.rules if (r.table, r.chain) not in filled)
    kept.subtract(fw.delete)
    rules = [*kept.elements(), *fw.insert, *(r for c in fw.fill for r in c.rules)]
    chains = dict.fromkeys([*fw.current.chains, *((c.table, c.name) for c in fw.fill)])
    first = {(r.table, r.chain) for r in fw.insert}
    first |= {hook for hook in fw.current.first if JUMPS[hook] not in fw.delete}
    return Ruleset(
        tuple(c for c in chains if c not in dropped),
        tuple(r for r in rules if (r.table, r.chain) not in dropped),
        frozenset(first),
    )


def summarize(before: Ruleset, after: Ruleset) -> list[str]:
    """One line such as 'firewall: add 2 rules, remove 1'; nothing when nothing differs."""
    old, new = Counter(before.rules), Counter(after.rules)
    added, removed = sum((new - old).values()), sum((old - new).values())
    # A jump that was there and is first only now was moved: deleted and put back first.
    moved = [
        hook
        for table, hook in sorted(after.first - before.first)
        if JUMPS[table, hook] in old and JUMPS[table, hook] in new
    ]
    created = [name for table, name in after.chains if (table, name) not in before.chains]
    deleted = [name for table, name in before.chains if (table, name) not in after.chains]
    parts = []
    if created:
        parts.append("create chain " + ", ".join(created))
    if added:
        parts.append(f"add {added} rule" + ("s" if added != 1 else ""))
    if removed:
        parts.append(f"remove {removed} rule" + ("s" if removed != 1 else ""))
    if moved:
        parts.append("put our jump first again in " + ", ".join(moved))
    if deleted:
        parts.append("delete chain " + ", ".join(deleted))
    return ["firewall: " + ", ".join(parts)] if parts else []


def read_ruleset(foreign: Collection[Rule] = ()) -> Ruleset:
    return parse_save(proc.run(["iptables-save"]).stdout, foreign)


def apply(fw: FirewallPlan) -> list[str]:
    """Run fw in one iptables-restore; report what iptables-save shows changed."""
    text = render(fw)
    if not text:
        return []
    result = proc.run(["iptables-restore", "-w", "--noflush"], stdin=text, ok_codes=range(256))
    if result.returncode != 0:
        # iptables-restore ends with a "Try `iptables-restore -h'" hint; the cause and the
        # failing line of our input come before it.
        reason = [line for line in result.stderr.splitlines() if line and "--help" not in line]
        raise HostSetupError(
            "iptables-restore -w --noflush: " + (" / ".join(reason) or f"exit {result.returncode}")
        )
    return summarize(fw.current, read_ruleset())


def ensure(spec: FirewallSpec, *, dry_run: bool = False) -> list[str]:
    fw = plan(spec, read_ruleset(go_rules(spec)))
    return summarize(fw.current, expected(fw)) if dry_run else apply(fw)


def plan_removal() -> list[str]:
    fw = plan_teardown(read_ruleset())
    return summarize(fw.current, expected(fw))


def remove() -> list[str]:
    return apply(plan_teardown(read_ruleset()))
