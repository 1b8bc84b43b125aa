"""Every command, flag and config key that afinar's own messages and guides tell a user to type exists.

A message once pointed to `afinar train --help-config`, which never existed. This test reads every
string in the package's source (error messages, hints, the integration guide's templates) and checks
each `afinar <command>` against the CLI, each `--flag` against that command's options (or, when no
command is named, against some command), and each `--set key=` against the config keys.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer

from afinar.cli import app
from afinar.config import VALID_KEYS

PACKAGE = Path(__file__).resolve().parents[1] / "afinar"
COMMAND = re.compile(r"\bafinar ((?:data )?[a-z][a-z-]*)([^`'\"\n;()]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
SET_KEY = re.compile(r"--set ([a-z_]+\.[a-z_]+)")
# Flags of other programs that afinar's guides quote (vLLM, torchrun, llama.cpp, curl, pip, node).
FOREIGN = {"--nproc-per-node", "--multi_gpu", "--enable-lora", "--lora-modules", "--max-lora-rank", "--jinja",
           "--index-url", "--no-deps", "--host", "--port", "--model", "--served-model-name", "--test", "--max-loras",
           "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--num_processes", "--rdzv-id", "--data",
           "--header", "--no-cache-dir", "--logdir"}


def _strings() -> list[tuple[str, str]]:
    """(where, text) of every string constant in the package, f-string pieces joined."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            out.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", text))
    return out


def _cli() -> dict[str, set[str]]:
    """'train' -> its options, 'data check' -> its options, ..."""
    root = typer.main.get_command(app)
    found: dict[str, set[str]] = {}

    def walk(group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            full = f"{prefix}{name}"
            if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance check)
                walk(cmd, f"{full} ")
            found[full] = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}

    walk(root, "")
    found[""] = {opt for p in root.params for opt in (*p.opts, *p.secondary_opts)}  # afinar --version
    return found


CLI = _cli()
ALL_FLAGS = set().union(*CLI.values())
STRINGS = _strings()


def test_the_scan_sees_the_messages():
    """The scan itself works: it finds commands and flags in the package's own strings."""
    commands = [m.group(1) for _, text in STRINGS for m in COMMAND.finditer(text)]
    assert {"train", "ask", "serve"} <= set(commands)
    assert sum(len(FLAG.findall(text)) for _, text in STRINGS) > 20


@pytest.mark.parametrize("where,text", [(w, t) for w, t in STRINGS if "afinar " in t or "--" in t],
                         ids=lambda v: v if ":" in str(v) and str(v).endswith(tuple("0123456789")) else "")
def test_named_commands_flags_and_keys_exist(where, text):
    for match in COMMAND.finditer(text):
        command, rest = match.group(1), match.group(2)
        if command not in CLI:
            if command.split()[0] in ("data",) or " " not in command:
                # "afinar is ..." prose, not a command: only words that look like a command line count
                if rest.strip().startswith(("-", "RUN", "run", "X", "/", ".")) or command in ("data",):
                    pytest.fail(f"{where}: `afinar {command}` is not a command (commands: {sorted(CLI)})")
            continue
        for flag in FLAG.findall(rest):
            assert flag in CLI[command] or flag in FOREIGN, \
                f"{where}: `afinar {command}` has no option {flag} (it has {sorted(CLI[command])})"
    for flag in FLAG.findall(text):
        assert flag in ALL_FLAGS or flag in FOREIGN, f"{where}: no afinar command has {flag}: {text[:120]!r}"
    for key in SET_KEY.findall(text):
        assert key in VALID_KEYS, f"{where}: --set {key}: not a config key"
