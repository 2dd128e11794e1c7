"""Every `dldkd ...` command the README and docs show names subcommands and flags that exist,
so a documented flag that was renamed or removed fails here (checked against the real parser,
as `dldkd ... --help` would list them)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from launch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "k8s" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "configs").glob("*.yaml"))]
# A command: `dldkd` at the start of a code line or inline code span (or after `$ `).
COMMAND = re.compile(r"(?:^|`|\$ |^\s*#?\s*)dldkd ((?:[a-z][a-z-]*)(?: [^`#\n]*)?)", re.M)


def documented() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        if path.suffix == ".yaml":
            blocks = [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]
        for block in blocks:
            # continuation lines: a trailing backslash, or an indented line of [--options]
            joined = re.sub(r"\\\n\s*|\n\s+(?=\[--)", " ", block)
            for line in joined.splitlines():
                m = re.match(r"\s*(?:\$ )?dldkd ([a-z].*)", line)
                if m:
                    out.append((f"{path.relative_to(ROOT)}", m.group(1).split("#")[0].strip()))
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(sub.choices) if sub else {}


CASES = documented()


def test_the_docs_show_commands():
    assert len(CASES) > 20


@pytest.mark.parametrize("where, command", CASES, ids=[f"{w}: {c[:50]}" for w, c in CASES])
def test_documented_command_exists(where: str, command: str):
    """Walk the tokens as argparse would: subcommand words descend, options must belong to the
    parser they appear under (``dldkd submit --address A sweep --config C``)."""
    parser, path = build_parser(), ["dldkd"]
    tokens = command.split()
    i = 0
    while i < len(tokens):
        tok = tokens[i].strip("[]")   # [--optional] as usage lines write them
        subs = _subcommands(parser)
        if tok in subs:
            parser, path = subs[tok], path + [tok]
        elif tok.startswith("--"):
            flag = tok.split("=", 1)[0].rstrip(",;.)")
            actions = {s: a for a in parser._actions for s in a.option_strings}
            assert flag in actions or flag == "--debug", (
                f"{where}: `dldkd {command}` uses {flag}, which `{' '.join(path)}` does not "
                f"have ({sorted(actions)})")
            if flag in actions and actions[flag].nargs != 0 and "=" not in tok:
                i += 1  # its value
        elif subs and re.fullmatch(r"[a-z][a-z-]*", tok) and len(path) < 3:
            raise AssertionError(f"{where}: `dldkd {command}`: {tok!r} is not a subcommand of "
                                 f"`{' '.join(path)}` ({sorted(subs)})")
        i += 1
