"""`make demo` and `make test` install the Debian packages first, and those cover every program
the code runs.

The programs are read from the source, not listed by hand: the argv literals handed to
subprocess (directly or through proc.run, Netns.run, Sandbox.run/popen), the program behind
`ip netns exec NS`, `unshare ... --` and `taskset -c N`, and the commands of the shell scripts
the code writes or passes to `sh -c`. Each program is mapped to its Debian package with dpkg,
so the mapping is the machine's own. A program is covered when scripts/system-deps lists its
package or the package is of priority "required" (in every Debian installation).
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.run import PACKAGES as BENCH_PACKAGES

from cocoon_net.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("src", "tests", "bench")
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAM = re.compile(r"^[a-z][a-z0-9.+_-]*$")

# Run by the code, but not a Debian package of their own. (The console script, cocoon-net, is
# never run by name: the demo, the tests and the bench run `sys.executable -m cocoon_net`.)
NOT_DEBIAN = {
    "sys.executable": "the interpreter running the code: the virtualenv's python3",
}
# The bench installs these peers itself when it runs (bench/run.py PACKAGES) and skips one it
# cannot install; nothing outside bench/ may run them, so they stay out of system-deps.
BENCH_ONLY = {"kea-dhcp4", "perfdhcp"}
# SandboxNode.run(COMMAND, ...) runs `python -m cocoon_net --netns NODE COMMAND`: our own
# subcommands, never a program on PATH.
COCOON_COMMANDS = {
    name
    for action in build_parser()._actions
    if isinstance(action, argparse._SubParsersAction)
    for name in action.choices
}
# Functions that take an argv (a list) or, for `run`, the program and its arguments inline.
RUNNERS = {"run", "run_json", "Popen", "popen", "check_output", "check_call", "show_dev"}
# Shell words that are not programs; `exec`, `if`, `!` and the like are skipped as prefixes.
SHELL_PREFIXES = {"if", "then", "else", "elif", "while", "until", "do", "!", "exec", "command"}
SHELL_BUILTINS = {"case", "esac", "fi", "done", "for", "echo", "printf", "exit", "return", "set"}
SHELL_BUILTINS |= {"export", "local", "read", "shift", "trap", "cd", "true", "false", "test"}


def system_deps() -> list[str]:
    out = subprocess.run(
        [str(REPO / "scripts" / "system-deps"), "--list"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


# -- make: system-deps comes first ------------------------------------------------------------


def _make(*argv: str) -> str:
    return subprocess.run(
        ["make", "-C", str(REPO), *argv],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MAKEFLAGS": ""},
    ).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["demo", "test", "bench"])
def test_make_target_installs_the_debian_packages_before_anything_else(target: str) -> None:
    # -n prints the commands without running them; -B prints the venv's too, as on a fresh
    # clone. The venv itself needs python3-venv, so nothing may come before system-deps.
    commands = [line for line in _make("-n", "-B", target).splitlines() if line[:4] != "make"]
    assert commands[0] == "./scripts/system-deps"
    assert commands.count("./scripts/system-deps") == 1
    assert commands[1] == "python3 -m venv .venv"  # then setup, then the target itself
    assert {"python3", "python3-venv"} <= set(system_deps())
    # ... and in that order under `make -j` too: prerequisites are made one at a time.
    assert ".NOTPARALLEL:" in _make("-n", "-p", "system-deps").splitlines()


# -- the packages cover every program --------------------------------------------------------


Names = dict[str, ast.expr]  # a module's simple assignments, name -> value (the last one)


def _names(tree: ast.AST) -> Names:
    return {
        node.targets[0].id: node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }


def _text(node: ast.expr, names: Names, depth: int = 0) -> str | None:
    """A string expression as text, each value it cannot follow as X; None if not a string.

    Follows concatenation, f-strings, "".join(f"..." for ...) and names assigned in the module.
    """
    if depth > 5:
        return None

    def part(child: ast.expr) -> str | None:
        return _text(child, names, depth + 1)

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part(v) or "X" for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return part(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return part(names[node.id])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = part(node.left), part(node.right)
        return None if left is None and right is None else (left or "X") + (right or "X")
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and node.args
        and isinstance(node.args[0], (ast.GeneratorExp, ast.ListComp))
    ):
        return part(node.args[0].elt)
    return None


def _word(node: ast.expr) -> str | None:
    value = node.value if isinstance(node, ast.Constant) else None
    return value if isinstance(value, str) and PROGRAM.match(value) else None


def shell_commands(script: str) -> set[str]:
    """The programs a POSIX shell script runs (the first word of each simple command)."""
    functions = set(re.findall(r"^\s*([A-Za-z_]\w*)\s*\(\)", script, re.M))
    found: set[str] = set()
    for raw in script.splitlines():
        line = "" if raw.lstrip().startswith("#") else raw
        line = re.sub(r"^\s*[^\s()]+\)\s*", "", line)  # a case arm's "pattern)"
        for segment in re.split(r"&&|\|\||;;|[;|`()]", line):
            words = segment.split()
            while words and (words[0] in SHELL_PREFIXES or re.match(r"^\w+=", words[0])):
                words.pop(0)
            if words and PROGRAM.match(words[0]) and words[0] not in functions | SHELL_BUILTINS:
                found.add(words[0])
    return found


def _argv_programs(elts: list[ast.expr], names: Names) -> Iterator[str]:
    """The programs an argv literal runs: its head, and what a wrapper in it runs."""
    words = [e.value if isinstance(e, ast.Constant) else None for e in elts]

    def program_at(i: int) -> Iterator[str]:
        if i < len(elts) and _word(elts[i]):
            yield str(words[i])

    yield from program_at(0)
    if words[:3] == ["ip", "netns", "exec"]:
        yield from program_at(4)
    if words[:2] == ["taskset", "-c"]:
        yield from program_at(3)
    if words[0] == "unshare" and "--" in words:
        yield from program_at(words.index("--") + 1)
    for i in range(len(words) - 2):
        if words[i : i + 2] == ["sh", "-c"]:
            yield from shell_commands(_text(elts[i + 2], names) or "")
    if (
        isinstance(elts[0], ast.Attribute)
        and isinstance(elts[0].value, ast.Name)
        and f"{elts[0].value.id}.{elts[0].attr}" in NOT_DEBIAN
    ):
        yield f"{elts[0].value.id}.{elts[0].attr}"


def _is_argv(node: ast.List | ast.Tuple, parents: dict[ast.AST, ast.AST]) -> bool:
    """A list literal is an argv when it is used as one: passed to a call, assigned or
    returned (not an element of other data), and its head is a program name followed by an
    option, or it goes straight to one of the RUNNERS."""
    if not node.elts:
        return False
    head = node.elts[0]
    if not (_word(head) or isinstance(head, ast.Attribute)):
        return False
    parent = parents.get(node)
    while isinstance(parent, (ast.IfExp, ast.BinOp, ast.Starred)):
        parent = parents.get(parent)
    if isinstance(parent, ast.Call):
        name = parent.func.attr if isinstance(parent.func, ast.Attribute) else None
        name = name or (parent.func.id if isinstance(parent.func, ast.Name) else None)
        if name in RUNNERS:
            return True
    elif not isinstance(parent, (ast.Assign, ast.AnnAssign, ast.Return, ast.keyword)):
        return False
    return any(isinstance(e, ast.Constant) and str(e.value).startswith("-") for e in node.elts)


def programs_in(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(program, line) for each program the module runs."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names = _names(tree)
    for node in ast.walk(tree):
        scripts: list[ast.expr] = []
        if isinstance(node, (ast.List, ast.Tuple)) and _is_argv(node, parents):
            yield from ((p, node.lineno) for p in _argv_programs(list(node.elts), names))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            first = _text(node.args[0], names)
            if (
                node.func.attr == "run"
                and first is not None
                and PROGRAM.match(first)
                and first not in COCOON_COMMANDS
            ):
                # Netns.run("prog", "arg", ...); SandboxNode.run("adopt", ...) is cocoon-net
                yield from ((p, node.lineno) for p in _argv_programs(list(node.args), names))
            elif node.func.attr == "sh":  # Netns.sh("script")
                scripts.append(node.args[0])
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.startswith("_SH_") for t in node.targets
        ):
            scripts.append(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name == "_script_body":
            scripts += [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value]
        for script in scripts:
            yield from ((p, script.lineno) for p in shell_commands(_text(script, names) or ""))


def used_programs() -> dict[str, set[str]]:
    """program -> where it is run ("path:line", relative to the repository)."""
    used: dict[str, set[str]] = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO)
            for program, line in programs_in(ast.parse(path.read_text(), filename=str(rel))):
                used.setdefault(program, set()).add(f"{rel}:{line}")
    # The bench's servers name their binary in a class attribute; its install table has them.
    for program in BENCH_PACKAGES:
        used.setdefault(program, set()).add("bench/run.py (PACKAGES)")
    return used


@functools.cache
def package_of(program: str) -> str | None:
    """The installed Debian package that provides program, by dpkg's own file lists.

    The name on PATH comes first (udhcpc is a symlink of the udhcpc package into busybox),
    then what it resolves to (iptables is an alternatives link to the iptables package's
    xtables binary). Both spellings of a merged-/usr path are asked.
    """
    found = shutil.which(program, path=SEARCH_PATH)
    if found is None:
        return None
    for path in (found, os.path.realpath(found)):
        other = path.removeprefix("/usr") if path.startswith("/usr/") else "/usr" + path
        for candidate in (path, other):
            query = subprocess.run(
                ["dpkg-query", "-S", candidate], capture_output=True, text=True, check=False
            )
            for line in query.stdout.splitlines():
                packages, _, file = line.partition(": ")
                if file == candidate and not line.startswith("diversion "):
                    return packages.split(",")[0].split(":")[0].strip()
    return None


@functools.cache
def priority(package: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Priority}", package], capture_output=True, text=True, check=False
    ).stdout.strip()


def uncovered(used: dict[str, set[str]], listed: set[str]) -> list[str]:
    """One line for each program no listed (or required) package provides."""
    problems: list[str] = []
    for program, where in sorted(used.items()):
        places = ", ".join(sorted(where))
        if program in NOT_DEBIAN:
            continue
        if program in BENCH_ONLY:
            outside = [w for w in where if not w.startswith("bench/")]
            if outside:
                problems.append(f"{program}: bench-only, but run from {', '.join(outside)}")
            continue
        package = package_of(program)
        if package is None:
            problems.append(f"{program} ({places}): not installed here, no package known")
        elif package not in listed and priority(package) != "required":
            problems.append(f"{program} ({places}): package {package} is not in system-deps")
    return problems


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs Debian's dpkg")
def test_system_deps_provides_every_program_the_code_runs() -> None:
    used = used_programs()
    # The scan finds what the product, the demo, the tests and the bench run.
    assert {"ip", "iptables-save", "iptables-restore"} <= used.keys()  # the product
    assert {"dhclient", "busybox", "dhcpcd", "unshare"} <= used.keys()  # the demo's clients
    assert {"udhcpc", "ping", "dnsmasq", "setpriv", "grep", "mount"} <= used.keys()
    assert {"apt-get", "taskset"} | BENCH_ONLY <= used.keys()
    assert uncovered(used, set(system_deps())) == []


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs Debian's dpkg")
def test_a_program_whose_package_is_not_listed_is_reported() -> None:
    used = used_programs()
    listed = set(system_deps()) - {"udhcpc"}
    assert [line.split(" (")[0] for line in uncovered(used, listed)] == ["udhcpc"]
    stray = {**used, "kea-dhcp4": {"tests/netns/test_x.py:1"}}
    assert uncovered(stray, set(system_deps())) == [
        "kea-dhcp4: bench-only, but run from tests/netns/test_x.py:1"
    ]


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs Debian's dpkg")
def test_every_listed_package_is_needed() -> None:
    provided = {package_of(program) for program in used_programs()}
    # python3 and python3-venv make the virtualenv (the make test above shows it).
    assert set(system_deps()) - provided == {"python3", "python3-venv"}


def test_bench_only_peers_stay_out_of_system_deps() -> None:
    listed = set(system_deps())
    # bench/run.py installs each of them (KeyError otherwise), system-deps none of them.
    assert {BENCH_PACKAGES[p] for p in BENCH_ONLY}.isdisjoint(listed)
    # dnsmasq is a bench peer too, but the sandbox tests run it: it is a system package.
    assert BENCH_PACKAGES["dnsmasq"] in listed


def test_shell_scripts_are_read_command_by_command() -> None:
    script = """#!/bin/sh
PATH=/usr/sbin:/usr/bin
configure() {
    if ! ip -4 -o addr show dev "$interface" | grep -q " inet $1/"; then
        ip -4 addr flush dev "$interface"
    fi
    [ -z "$3" ] || ip route replace default via "$3"
}
case "$1" in
deconfig) ip link set dev eth0 up ;;
bound|renew) configure "$ip" ;;
esac
echo "$1" >> "$EVENTS"; X=1 logger -t x "$(hostname)"
exec "$@"
"""
    assert shell_commands(script) == {"ip", "grep", "logger", "hostname"}
