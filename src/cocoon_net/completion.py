"""`cocoon-net completion bash|zsh|fish`: shell completion scripts made from the parser itself.

Read from argparse, so every subcommand and flag the command line has is completed, with the
choices of a flag that has them (`--platform gke|volcengine|static`) and file names for a flag
that takes a path; nothing is listed by hand.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

PROG = "cocoon-net"


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # "--state-dir", or "-v", "--version"
    help: str
    takes_value: bool
    choices: tuple[str, ...]
    path: bool  # the value is a file or directory name


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    flags: tuple[Flag, ...]
    words: tuple[str, ...]  # the choices of its positional argument, if it has one


def _flags(parser: argparse.ArgumentParser) -> tuple[Flag, ...]:
    out = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        help_text = (action.help or "").split(" (")[0].strip()
        out.append(
            Flag(
                names=tuple(action.option_strings),
                help=help_text if help_text != argparse.SUPPRESS else "",
                takes_value=action.nargs != 0,
                choices=tuple(str(c) for c in action.choices or ()),
                path=action.type is Path,
            )
        )
    return tuple(out)


def _positional_choices(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    return tuple(
        str(choice)
        for action in parser._actions
        if not action.option_strings
        for choice in action.choices or ()
    )


def read_parser(parser: argparse.ArgumentParser) -> tuple[tuple[Flag, ...], tuple[Command, ...]]:
    """The global flags and every subcommand with its flags."""
    commands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            commands += [
                Command(name, helps.get(name, ""), _flags(sub), _positional_choices(sub))
                for name, sub in action.choices.items()
            ]
    return _flags(parser), tuple(commands)


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    top, commands = read_parser(parser)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](top, commands)


def _words(items: list[str] | tuple[str, ...]) -> str:
    return " ".join(items)


def _bash(top: tuple[Flag, ...], commands: tuple[Command, ...]) -> str:
    by_action: dict[str, list[str]] = {}  # what to complete after a flag -> those flags
    seen: set[str] = set()
    for flag in (*top, *(f for c in commands for f in c.flags)):
        if not flag.takes_value or flag.names[0] in seen:
            continue
        seen.update(flag.names)
        if flag.choices:
            action = f'COMPREPLY=($(compgen -W "{_words(flag.choices)}" -- "$cur"))'
        elif flag.path:
            action = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            action = "COMPREPLY=()"
        by_action.setdefault(action, []).extend(flag.names)
    value_arms = "".join(
        f"    {'|'.join(names)}) {action}; return ;;\n" for action, names in by_action.items()
    )
    top_words = _words([n for f in top for n in f.names] + [c.name for c in commands])
    command_arms = "".join(
        f'    {c.name}) words="{_words([*c.words, *(n for f in c.flags for n in f.names)])}" ;;\n'
        for c in commands
    )
    names = "|".join(c.name for c in commands)
    return f"""# bash completion for {PROG} (made by `{PROG} completion bash`)
_cocoon_net() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmd= words i
  for ((i = 1; i < COMP_CWORD; i++)); do
    case ${{COMP_WORDS[i]}} in {names}) cmd=${{COMP_WORDS[i]}}; break ;; esac
  done
  case $prev in
{value_arms}  esac
  case $cmd in
    "") words="{top_words}" ;;
{command_arms}  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _cocoon_net {PROG}
"""


def _zsh_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zsh_word(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_spec(flag: Flag) -> str:
    value = ""
    if flag.takes_value:
        what = flag.names[-1].lstrip("-")
        action = f"({_words(flag.choices)})" if flag.choices else "_files" if flag.path else " "
        value = f":{what}:{action}"
    spec = f"[{_zsh_quote(flag.help)}]{value}"
    if len(flag.names) == 1:
        return _zsh_word(flag.names[0] + spec)
    exclusive = _zsh_word(f"({' '.join(flag.names)})")
    return f"{exclusive}{{{','.join(flag.names)}}}{_zsh_word(spec)}"


def _zsh(top: tuple[Flag, ...], commands: tuple[Command, ...]) -> str:
    described = "\n".join(f"    {_zsh_word(c.name + ':' + _zsh_quote(c.help))}" for c in commands)
    arms = "".join(
        f"        {c.name}) _arguments \\\n"
        + "".join(f"            {_zsh_spec(f)} \\\n" for f in c.flags)
        + (f"            '1:{c.name}:({_words(c.words)})' \\\n" if c.words else "")
        + "        ;;\n"
        for c in commands
    )
    top_specs = "".join(f"    {_zsh_spec(f)} \\\n" for f in top)
    return f"""#compdef {PROG}
# zsh completion for {PROG} (made by `{PROG} completion zsh`)
_cocoon_net() {{
  local -a commands
  local state line
  commands=(
{described}
  )
  _arguments -C \\
{top_specs}    '1:command:->command' \\
    '*::argument:->argument'
  case $state in
    command) _describe -t commands command commands ;;
    argument)
      case $line[1] in
{arms}      esac
      ;;
  esac
}}
_cocoon_net "$@"
"""


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_flag(flag: Flag, condition: str) -> str:
    parts = [f"complete -c {PROG} -n {_fish_quote(condition)}"]
    for name in flag.names:
        parts.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
    if flag.choices:
        parts.append(f"-x -a {_fish_quote(_words(flag.choices))}")
    elif flag.path:
        parts.append("-r -F")
    elif flag.takes_value:
        parts.append("-x")
    if flag.help:
        parts.append(f"-d {_fish_quote(flag.help)}")
    return " ".join(parts)


def _fish(top: tuple[Flag, ...], commands: tuple[Command, ...]) -> str:
    lines = [
        f"# fish completion for {PROG} (made by `{PROG} completion fish`)",
        f"complete -c {PROG} -f",
    ]
    lines += [_fish_flag(f, "__fish_use_subcommand") for f in top]
    for c in commands:
        lines.append(
            f"complete -c {PROG} -n __fish_use_subcommand -a {c.name} -d {_fish_quote(c.help)}"
        )
        seen = f"__fish_seen_subcommand_from {c.name}"
        lines += [_fish_flag(f, seen) for f in c.flags]
        if c.words:
            words = _fish_quote(_words(c.words))
            lines.append(f"complete -c {PROG} -n {_fish_quote(seen)} -a {words}")
    return "\n".join(lines) + "\n"
