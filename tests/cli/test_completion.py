"""`cocoon-net completion bash|zsh|fish`: each script, loaded into its real shell, completes
the subcommands, their flags and the choices of a flag."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cocoon_net.cli import build_parser
from cocoon_net.completion import read_parser


def completion(shell: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cocoon_net", "completion", shell],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def needs(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is not installed (scripts/system-deps installs it)")


def bash_complete(script: Path, line: str) -> list[str]:
    """What bash offers for the last word of line (empty word after a trailing space)."""
    words = line.split(" ")
    probe = (
        f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}; _cocoon_net; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    out = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, check=True, cwd=script.parent
    )
    return out.stdout.split()


def test_bash_completes_commands_flags_and_choices(tmp_path: Path) -> None:
    needs("bash")
    script = tmp_path / "cocoon-net.bash"
    script.write_text(completion("bash"))
    (tmp_path / "pool-dir").mkdir()
    _, commands = read_parser(build_parser())
    assert set(bash_complete(script, "cocoon-net ")) >= {c.name for c in commands}
    assert bash_complete(script, "cocoon-net ad") == ["adopt"]
    assert bash_complete(script, "cocoon-net adopt --manage") == ["--manage-iptables"]
    assert "--manage-iptables" not in bash_complete(script, "cocoon-net init --")
    assert bash_complete(script, "cocoon-net daemon --metrics") == ["--metrics-addr"]
    assert bash_complete(script, "cocoon-net --log-format j") == ["json"]
    assert bash_complete(script, "cocoon-net status --state-dir pool") == ["pool-dir"]
    assert bash_complete(script, "cocoon-net completion z") == ["zsh"]
    assert bash_complete(script, "cocoon-net daemon --lease-time ") == []


def test_fish_completes_commands_flags_and_choices(tmp_path: Path) -> None:
    needs("fish")
    script = tmp_path / "cocoon-net.fish"
    script.write_text(completion("fish"))

    def offered(line: str) -> list[str]:
        out = subprocess.run(
            ["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
            capture_output=True,
            text=True,
            check=True,
        )
        return [row.split("\t")[0] for row in out.stdout.splitlines()]

    assert "teardown" in offered("cocoon-net ")
    assert offered("cocoon-net rel") == ["release"]
    assert offered("cocoon-net adopt --manage-") == ["--manage-iptables"]
    assert offered("cocoon-net --log-format ") == ["json", "text"]
    assert offered("cocoon-net completion ") == ["bash", "fish", "zsh"]


def test_zsh_script_loads_and_names_every_flag(tmp_path: Path) -> None:
    needs("zsh")
    script = completion("zsh")
    (tmp_path / "_cocoon-net").write_text(script)
    check = subprocess.run(
        ["zsh", "-n", str(tmp_path / "_cocoon-net")], capture_output=True, check=False
    )
    assert check.returncode == 0, check.stderr
    # compinit finds the function by its #compdef line and binds it to the command.
    probe = (
        f"fpath=({tmp_path} $fpath); autoload -Uz compinit; compinit -u -D; "
        "print -r -- $_comps[cocoon-net]"
    )
    out = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "_cocoon-net"
    top, commands = read_parser(build_parser())
    for flag in (*top, *(f for c in commands for f in c.flags)):
        assert all(name in script for name in flag.names), flag


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cocoon_net", "completion", "tcsh"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'tcsh'" in result.stderr
