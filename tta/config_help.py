"""``tta-predict list`` (and ``--help``): every knob, read from the shipped configs.

The config files are the documentation: a group option's leading comment says what it is (printed
whole), every key of a data, model or trainer option and every option of a method carries its
default and an inline comment, an experiment card's header says what it runs and (``Run time:``
lines) how long it takes and which keys shrink it. Reading them as text keeps this fast: nothing
but the standard library and OmegaConf is imported.
"""

from __future__ import annotations

import re
import textwrap
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

#: The config groups, in the order a user meets them.
GROUPS = ("model", "data", "tta", "trainer", "logger", "experiment")
#: The groups whose options list every key they set, with its default and note.
KEYED_GROUPS = ("model", "data", "trainer")
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
by default): predictions.csv, timing.csv, metrics.json, cli.log. A stopped
run prints the command that resumes it (the same hydra.run.dir)."""


def _config_dir() -> Path:
    return Path(str(files("tta.configs")))


def _raw_comment_lines(path: Path) -> list[str]:
    """The file's leading comment block as written after ``#`` (indentation kept), without
    package directives."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#")
        if not text.strip().startswith("@package"):
            lines.append(text.rstrip())
    return lines


def _comment_lines(path: Path) -> list[str]:
    """The file's leading comment block, without ``#`` and package directives."""
    return [line.strip() for line in _raw_comment_lines(path)]


#: Words ending in a full stop that end no sentence.
_ABBREVIATIONS = ("et al", "e.g", "i.e", "vs", "etc", "cf", "approx", "resp", "Fig", "Eq", "No")


def _sentence_end(text: str) -> int | None:
    """The index just past the first sentence of ``text``: a ``.``, ``!`` or ``?`` followed by
    white space (or the end), outside parentheses and brackets, not ending an abbreviation
    ("et al.", "e.g.", "i.e.", "vs.") and not a decimal point; None if the text is one sentence."""
    depth = 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char in ".!?" and depth == 0 and (i + 1 == len(text) or text[i + 1].isspace()):
            before = text[:i]
            if char == "." and any(re.search(rf"(^|[\s(]){re.escape(a)}$", before) for a in _ABBREVIATIONS):
                continue
            return i + 1
    return None


def option_summary(path: Path) -> str:
    """The first sentence of an option file's leading comment (cut at a real sentence end only)."""
    text = " ".join(line for line in _comment_lines(path) if line)
    end = _sentence_end(text)
    return text[:end] if end is not None else text


def option_note(path: Path) -> list[tuple[str, bool]]:
    """An option file's whole leading comment as ``(text, is_code)`` blocks: prose lines joined
    into paragraphs (a bare ``#`` ends one, and ``Run time:`` / ``Shrink:`` lines start one);
    lines indented in the file (example commands) kept whole, each a block of its own."""
    blocks: list[tuple[str, bool]] = []
    prose: list[str] = []

    def flush() -> None:
        if prose:
            blocks.append((" ".join(prose), False))
            prose.clear()

    for raw in _raw_comment_lines(path):
        body = raw[1:] if raw.startswith(" ") else raw
        if not body.strip() or body.startswith("  ") or body.lower().startswith(("run time", "shrink")):
            flush()
        if body.startswith("  "):
            blocks.append((body.strip(), True))
        elif body.strip():
            prose.append(body.strip())
    flush()
    return blocks


def _note_lines(path: Path, name: str, indent: int = 2, column: int = 28) -> list[str]:
    """``name`` beside its option file's whole note: prose wrapped in the note column, example
    lines (commands) at ``indent + 4`` across the width, a wrapped command continued with ``\\``."""
    out: list[str] = []
    continued = False
    blocks = option_note(path) or [("", False)]
    for text, code in blocks:
        if code:
            out += _code_lines(text, indent + (8 if continued else 4))
            continued = text.endswith("\\")
        else:
            out += _columns("" if out else name, _wrap(text, WIDTH - column), indent, column)
            continued = False
    return out


def _code_lines(text: str, indent: int) -> list[str]:
    """An example line at ``indent``, wrapped at spaces to 80 columns; a wrapped command (no
    comment in it) continues with `` \\`` so that it can be pasted as it is."""
    if len(text) + indent <= WIDTH:
        return [" " * indent + text]
    continued = text.endswith("\\")
    body = text[:-1].rstrip() if continued else text
    command = "#" not in body
    lines = textwrap.wrap(
        body,
        width=WIDTH - 2 if command else WIDTH,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 4),
        break_on_hyphens=False,
        break_long_words=False,
    )
    if command:
        lines = [f"{line} \\" for line in lines[:-1]] + [lines[-1] + (" \\" if continued else "")]
    # a word longer than a line (none in the shipped configs) is cut, to keep 80 columns
    return [part for line in lines for part in (_wrap(line, WIDTH) if len(line) > WIDTH else [line])]


def _wrap(text: str, width: int, indent: str = "", hanging: str | None = None) -> list[str]:
    """``text`` wrapped to ``width`` columns; never longer (over-long words are broken)."""
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=indent if hanging is None else hanging,
        break_on_hyphens=False,
    ) or [""]


def _entry(name: str, text: str, indent: int = 4, column: int = 28) -> list[str]:
    """``name`` and ``text`` in two columns, ``text`` wrapped to 80 characters."""
    return _columns(name, _wrap(text, WIDTH - column), indent, column)


def _columns(name: str, lines: list[str], indent: int = 4, column: int = 28) -> list[str]:
    """``name`` and the (already wrapped) ``lines`` in two columns; a name too long for its
    column gets a line of its own (wrapped itself if longer than 80 characters)."""
    lines = lines or [""]
    head = f"{' ' * indent}{name}"
    if len(head) < column - 1:
        first = [f"{head:<{column}}{lines[0]}".rstrip()]
    else:
        heads = _wrap(name, WIDTH, indent=" " * indent, hanging=" " * (indent + 4)) if len(head) > WIDTH else [head]
        first = [*heads, f"{' ' * column}{lines[0]}".rstrip()] if lines[0] else heads
    return [*first, *(f"{' ' * column}{line}".rstrip() for line in lines[1:])]


def run_time_lines(path: Path) -> list[str]:
    """An experiment card's ``Run time:`` lines (measured cost and the keys that shrink it)."""
    return [line for line in _comment_lines(path) if line.lower().startswith(("run time", "shrink"))]


_OPTION = re.compile(r"^(?P<indent>\s+)(?P<key>[A-Za-z_][A-Za-z0-9_]*):\s*(?P<value>[^#]*?)\s*(#\s*(?P<note>.*))?$")
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(\s|$)")


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


def _package(path: Path, group: str) -> str:
    """Where an option file's keys land: its ``# @package`` header, else its group."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*@package\s+(\S+)", line)
        if match:
            return "" if match[1] == "_global_" else match[1].replace("_group_", group)
    return group


def option_defaults(path: Path) -> list[str]:
    """The configs an option file composes first (its ``defaults:`` list, ``_self_`` aside)."""
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    names = []
    for entry in defaults:
        if isinstance(entry, dict):
            names += [f"{k}={v}" for k, v in entry.items()]
        elif entry != "_self_":
            names.append(str(entry))
    return names


def option_keys(path: Path, group: str) -> list[tuple[str, str, str]]:
    """``(dotted key, default, note)`` of every key an option file sets itself, as written on the
    command line (``data.n_per_domain``, ``model.vlm.name``): ``_target_`` keys and the
    ``defaults`` list left out, interpolations (``${...}``) as written, unset values (``???``)
    with a note that they must be set."""
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    config.pop("defaults", None)
    package = _package(path, group)
    prefix = f"{package}." if package else ""
    notes = _key_notes(path)
    keys = []
    for key, value in _flatten(config):
        if key.split(".")[-1] == "_target_":
            continue
        note = notes.get(key, "")
        if value == "???":
            note = f"must be set: {prefix}{key}=<value>" + (f" ({note})" if note else "")
        keys.append((f"{prefix}{key}", _yaml_value(value), note))
    return keys


def _yaml_value(value: object, inner: bool = False) -> str:
    """A default as it is written on the command line (``null``, ``true``, ``5.0e-3`` -> ``0.005``,
    ``[colour, shape]``, ``{}``; interpolations and ``???`` as written)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v, inner=True) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v, inner=True)}" for k, v in value.items()) + "}"
    text = str(value)
    if inner and isinstance(value, str) and (not text or re.search(r"[\s,\[\]{}:'\"#]", text)):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _flatten(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf; an empty mapping is a leaf (``world={}``)."""
    items = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
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


def _comment_start(line: str) -> int | None:
    """Where a YAML line's comment starts: a ``#`` after white space, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return None


def _key_notes(path: Path) -> dict[str, str]:
    """``dotted key -> inline comment`` of every mapping key of a YAML file (block style)."""
    notes: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = _KEY.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        start = _comment_start(line)
        if start is not None and line[start + 1 :].strip():
            notes[".".join(key for _, key in stack)] = line[start + 1 :].strip()
    return notes


def card_families(folder: Path) -> dict[str, list[Path]]:
    """The card folders of ``experiment`` (one card per data set: ``tda_vit_b16/dtd``) and their cards;
    files whose name starts with ``_`` are the parts the cards include."""
    return {
        family.name: sorted(p for p in family.glob("*.yaml") if not p.name.startswith("_"))
        for family in sorted(folder.iterdir())
        if family.is_dir() and not family.name.startswith(("_", "."))
    }


def describe() -> str:
    """The text of ``tta-predict list`` (and ``--help``); every line fits 80 columns."""
    root = _config_dir()
    out = [USAGE, ""]
    for group in GROUPS:
        folder = root / group
        options = sorted(folder.glob("*.yaml"))
        families = card_families(folder) if group == "experiment" else {}
        count = len(options) + sum(len(cards) for cards in families.values())
        out.append(f"{group}=  ({count} options)")
        for path in options:
            out += _note_lines(path, path.stem)
            if group == "tta":
                for name, settings in method_options(path):
                    out.append(f"      tta.callbacks.{name}.<key>=<value>, defaults:")
                    for key, default, note in settings:
                        out += _entry(f"{key}={default}", note, indent=8, column=40)
            elif group in KEYED_GROUPS:
                bases = ", ".join(b if "=" in b else f"{group}={b}" for b in option_defaults(path))
                out += _wrap(f"keys and defaults{f' (on top of {bases})' if bases else ''}:", WIDTH, " " * 6)
                for key, default, note in option_keys(path, group):
                    out += _entry(f"{key}={default}", note, indent=8, column=40)
        for family, cards in families.items():
            bases = sorted((folder / family).glob("_*.yaml"))
            out += _note_lines(bases[0] if bases else cards[0], f"{family}/<data set>")
            out += _wrap("data sets: " + ", ".join(card.stem for card in cards), WIDTH, " " * 6)
        out.append("")
    out.append("Top-level keys: seed=<int> (views and adaptation randomness), threads=<n>")
    out.append("(torch CPU threads), print_table=true|false. Random weights for any open_clip")
    out.append("architecture (to try a real model offline): model.vlm.pretrained=null.")
    return "\n".join(out)
