"""Config files and command-line values as plain trees, read by one set of YAML rules.

A file may name the file it refines (``base:``); the chain is merged here, before any model sees
the tree, so every reader of a config file (runs, sweeps, validation) gets the same resolved
tree. YAML anchors and aliases are refused where the parser meets them, so an alias bomb never
expands. :mod:`trainer.config` builds and validates the typed Config from these trees.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


class AliasRefused(yaml.MarkedYAMLError):
    """A YAML anchor (&name) or alias (*name): configs are plain trees (a preset reuses another
    with ``base:``), and refusing them at the parser keeps an alias bomb from ever expanding."""


class Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 booleans and exponents: ``kd: off`` is the string 'off'
    (only true/false are booleans) and ``lr: 1e-4`` is a number, in files and overrides alike.
    Anchors and aliases are refused (:class:`AliasRefused`) as the parser meets the first one."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise AliasRefused(problem=f"YAML {kind}{event.anchor} is not allowed in a config",
                               problem_mark=event.start_mark)
        return super().compose_node(parent, index)


Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                             re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                             re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                             list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML like a file's value (:class:`Loader`); an empty value
    is the empty string, and text that is not YAML stays itself."""
    if not text.strip():
        return text
    try:
        return yaml.load(text, Loader=Loader)
    except AliasRefused as err:
        raise ConfigError(f"value {text[:80]!r}: {err.problem} at column "
                          f"{err.problem_mark.column + 1}; write the value out, or quote it "
                          "('*text') if you meant the characters") from None
    except yaml.YAMLError:
        return text


# The top-level key naming the file a config refines (:func:`load_yaml`).
BASE_KEY = "base"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a tree, with the chain of files its ``base:`` names merged under it.

    ``base: tiny.yaml`` (relative to the file's own folder, so installed presets find theirs)
    makes the file a refinement: its mappings merge key by key into the base's, and any other
    value replaces the base's (:func:`merge`). A missing base or a circle is a ConfigError that
    names the files.
    """
    return _load_chain(Path(path), ())


def _load_chain(path: Path, children: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in [c.resolve() for c in children]:
        circle = " -> ".join(str(p) for p in (*children, path))
        raise ConfigError(f"config files name each other as base in a circle: {circle}; "
                          f"remove the {BASE_KEY}: key from one of them")
    tree = _read_yaml(path)
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY}={base!r} must name the YAML file this one "
                          f"refines, relative to {path.parent} (e.g. {BASE_KEY}: tiny.yaml)")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: {BASE_KEY} file {base!r} does not exist (looked for "
                          f"{base_path}); name a file relative to the folder of {path.name}")
    return merge(_load_chain(base_path, (*children, path)), tree)


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key; an empty (null) section keeps the
    base's; any other value (a scalar, a list) replaces the base's."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value is not None or not isinstance(out.get(key), dict):
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.load(path.read_text(), Loader=Loader) or {}
    except AliasRefused as err:
        mark = err.problem_mark
        raise ConfigError(f"{path}: line {mark.line + 1}, column {mark.column + 1}: {err.problem}; "
                          f"write the values out (a file reuses another whole with "
                          f"{BASE_KEY}: FILE)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file "
                          "(indentation, a missing ':' or an unclosed bracket or quote)") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def parse_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = parse_value(text)
        except ConfigError as err:
            raise ConfigError(f"override {key.strip()}: {err}") from None
    return out
