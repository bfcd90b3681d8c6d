"""``tta-predict list`` (and ``--help``): every knob, read from the shipped configs.

The config files are the documentation: a group option's first comment line says what it is,
every option of a method carries its default and a one-line comment, an experiment card's
header says what it runs and (``Run time:`` lines) how long it takes and which keys shrink it.
Reading them as text keeps this fast: nothing but the standard library and OmegaConf is imported.
"""

from __future__ import annotations

import re
import textwrap
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

#: The config groups, in the order a user meets them.
GROUPS = ("model", "data", "tta", "trainer", "logger", "experiment")
WIDTH = 80
USAGE = """\
usage: tta-predict [-m] [KEY=VALUE ...]  (Hydra overrides; -m sweeps a,b,c)
       tta-predict list | --help         (this text)
       tta-report DIR [--compare-published]

  tta-predict                                     zero-shot, offline world
  tta-predict tta=tpt data.n_per_domain=100       a method, less data
  tta-predict tta=[sts,lame] data.stream=sorted   methods stack in order
  tta-predict -m tta=none,tpt seed=0,1,2          a sweep (then tta-report)
  tta-predict tta=tpt --cfg job                   print the config, stop
  tta-predict --hydra-help                        Hydra's own flags

Results go to the run directory printed at the start (outputs/<date>/<time>/
by default): predictions.csv, timing.csv, metrics.json, cli.log. Rerun the
same command with the same hydra.run.dir to resume a stopped run."""


def _config_dir() -> Path:
    return Path(str(files("tta.configs")))


def _comment_lines(path: Path) -> list[str]:
    """The file's leading comment block, without ``#`` and package directives."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return lines


def option_summary(path: Path) -> str:
    """The first sentence of an option file's leading comment."""
    text = " ".join(line for line in _comment_lines(path) if line)
    match = re.search(r"[.:;](\s|$)", text)
    return text[: match.start() + 1].rstrip(":;") if match else text


def _entry(name: str, text: str, indent: int = 4, column: int = 28) -> list[str]:
    """``name`` and ``text`` in two columns, ``text`` wrapped to 80 characters."""
    lines = textwrap.wrap(text, width=WIDTH - column) or [""]
    head = f"{' ' * indent}{name}"
    first = f"{head:<{column}}{lines[0]}" if len(head) < column - 1 else f"{head}\n{' ' * column}{lines[0]}"
    return [first.rstrip(), *(f"{' ' * column}{line}" for line in lines[1:])]


def run_time_lines(path: Path) -> list[str]:
    """An experiment card's ``Run time:`` lines (measured cost and the keys that shrink it)."""
    return [line for line in _comment_lines(path) if line.lower().startswith(("run time", "shrink"))]


_OPTION = re.compile(r"^(?P<indent>\s+)(?P<key>[A-Za-z_][A-Za-z0-9_]*):\s*(?P<value>[^#]*?)\s*(#\s*(?P<note>.*))?$")


def method_options(path: Path) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Per callback in a ``tta`` option file: ``(name, [(key, default, note)])``; nested
    blocks (DiffTPT's ``generator``) are listed with a dotted key."""
    config = OmegaConf.load(path)
    methods = []
    for name, node in (config.get("callbacks") or {}).items():
        notes = _inline_notes(path, name)
        options = []
        for key, value in _flatten(OmegaConf.to_container(node)):
            if key.endswith("_target_"):
                continue
            options.append((key, _yaml_value(value), notes.get(key, "")))
        methods.append((name, options))
    return methods


def _yaml_value(value: object) -> str:
    """A default as it is written on the command line (``null``, ``true``, ``5.0e-3`` -> ``0.005``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _flatten(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in node.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _inline_notes(path: Path, callback: str) -> dict[str, str]:
    """``dotted key -> inline comment`` of the lines under ``callbacks.<callback>``."""
    notes, stack, inside = {}, [], False
    for line in path.read_text().splitlines():
        match = _OPTION.match(line)
        if line.strip() == f"{callback}:" or line.rstrip() == f"  {callback}:":
            inside, stack = True, []
            continue
        if not inside or match is None:
            continue
        depth = (len(match["indent"]) - 4) // 2
        if depth < 0:
            break
        stack = [*stack[:depth], match["key"]]
        if match["note"]:
            notes[".".join(stack)] = match["note"]
    return notes


def describe() -> str:
    """The text of ``tta-predict list`` (and ``--help``)."""
    root = _config_dir()
    out = [USAGE, ""]
    for group in GROUPS:
        folder = root / group
        options = sorted(folder.glob("*.yaml"))
        out.append(f"{group}=  ({len(options)} options)")
        for path in options:
            out += _entry(path.stem, option_summary(path), indent=2)
            if group == "tta":
                for name, settings in method_options(path):
                    out.append(f"      tta.callbacks.{name}.<key>=<value>, defaults:")
                    for key, default, note in settings:
                        out += _entry(f"{key}={default}", note, indent=8, column=40)
            elif group == "experiment":
                for line in run_time_lines(path):
                    out += _entry("", line, indent=2)
        out.append("")
    out.append("Top-level keys: seed=<int> (views and adaptation randomness), threads=<n>")
    out.append("(torch CPU threads), print_table=true|false. Random weights for any open_clip")
    out.append("architecture (to try a real model offline): model.vlm.pretrained=null.")
    return "\n".join(out)
