"""``mgrpc completion bash|zsh``: a shell completion script, generated from the argument parser.

Load it with ``eval "$(mgrpc completion bash)"`` (in ``~/.bashrc``) or ``source <(mgrpc completion
zsh)`` (in ``~/.zshrc``). It completes command names, sub-commands (``fw build``) and each command's
flags; other words fall back to file names.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["bash_script", "register", "zsh_script"]


def register(sub: Any) -> None:
    """Add the ``completion`` command."""
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for SHELL on stdout. bash: add "
        "'eval \"$(mgrpc completion bash)\"' to ~/.bashrc; zsh: add 'source <(mgrpc completion zsh)' "
        "to ~/.zshrc.",
    )
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")
    p.set_defaults(func=cmd_completion)


def _model(parser: argparse.ArgumentParser) -> tuple[list[str], list[str], dict[str, tuple[list[str], list[str]]]]:
    """(global flags, flags taking a value, {command: (its words: sub-commands and flags, value flags)})."""
    glob = [o for a in parser._actions for o in a.option_strings]
    valued = {o for a in parser._actions if a.nargs != 0 for o in a.option_strings}
    cmds: dict[str, tuple[list[str], list[str]]] = {}
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sp in action.choices.items():
            words: list[str] = []
            vals: list[str] = []
            for a in sp._actions:
                if isinstance(a, argparse._SubParsersAction):
                    words.extend(a.choices)
                words.extend(a.option_strings)
                if a.nargs != 0:
                    vals.extend(a.option_strings)
            cmds[name] = (words, vals)
    return glob, sorted(valued), cmds


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: (a.help or "") for a in action._choices_actions}
    return {}


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion function for ``parser`` (``complete -F _mgrpc mgrpc``)."""
    glob, valued, cmds = _model(parser)
    cases = []
    for name, (words, _vals) in sorted(cmds.items()):
        cases.append(f'        {name}) words="{" ".join(words)}" ;;')
    return "\n".join([
        "# bash completion for mgrpc; load with: eval \"$(mgrpc completion bash)\"",
        "_mgrpc() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" cmd="" i w words',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        case "$w" in',
        f"            {'|'.join(valued)}) ((i++)) ;;",
        "            -*) ;;",
        '            *) cmd="$w"; break ;;',
        "        esac",
        "    done",
        '    case "$cmd" in',
        f'        "") words="{" ".join(sorted(cmds))} {" ".join(glob)}" ;;',
        *cases,
        '        *) words="" ;;',
        "    esac",
        '    if [[ -z "$cmd" || "$cur" == -* || ( "$cmd" == fw && $i -eq $((COMP_CWORD - 1)) ) ]]; then',
        '        COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "    fi",
        "}",
        "complete -o default -F _mgrpc mgrpc",
        "",
    ])  # fmt: skip


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """The zsh completion function for ``parser`` (``compdef _mgrpc mgrpc``)."""
    glob, valued, cmds = _model(parser)
    helps = _helps(parser)

    def q(text: str) -> str:
        return "'" + text.replace("'", "'\\''") + "'"

    described = " ".join(q(f"{n}:{helps.get(n, '')}") for n in sorted(cmds))
    cases = []
    for name, (words, _vals) in sorted(cmds.items()):
        cases.append(f"        {name}) opts=({' '.join(words)}) ;;")
    return "\n".join([
        "#compdef mgrpc",
        "# zsh completion for mgrpc; load with: source <(mgrpc completion zsh)",
        "_mgrpc() {",
        "    local -a cmds opts  # (not `words`: zsh keeps the command line there)",
        "    local cmd='' i",
        f"    cmds=({described})",
        "    for ((i = 2; i < CURRENT; i++)); do",
        '        case "${words[i]}" in',
        f"            {'|'.join(valued)}) ((i++)) ;;",
        "            -*) ;;",
        '            *) cmd="${words[i]}"; break ;;',
        "        esac",
        "    done",
        '    if [[ -z "$cmd" ]]; then',
        '        if [[ "$PREFIX" == -* ]]; then',
        f"            compadd -- {' '.join(glob)}",
        "        else",
        "            _describe 'command' cmds",
        "        fi",
        "        return",
        "    fi",
        '    case "$cmd" in',
        *cases,
        "        *) opts=() ;;",
        "    esac",
        '    if [[ "$PREFIX" == -* || ( "$cmd" == fw && $i -eq $((CURRENT - 1)) ) ]]; then',
        "        compadd -- $opts",
        "    else",
        "        _files",
        "    fi",
        "}",
        'if (( $+functions[compdef] )); then compdef _mgrpc mgrpc; fi',
        "",
    ])  # fmt: skip


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the completion script for ``args.shell``."""
    from mgrpc.cli import build_parser

    parser = build_parser()
    sys.stdout.write(bash_script(parser) if args.shell == "bash" else zsh_script(parser))
    return 0
