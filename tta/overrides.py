"""A mistyped key on the ``tta-predict`` command line, answered with the closest existing keys.

Hydra's own answer to ``data.n_per_domian=5`` is "Could not override 'data.n_per_domian'. To
append to your config use +data.n_per_domian=5", and following that advice fails deep inside the
datamodule's constructor. :func:`check_overrides` runs before Hydra: it composes the config with
the command's group selections (``tta=tpt``, ``experiment=ttm_world``; every combination of a
``-m`` sweep over groups) and checks every key override against the composed keys.

Only Hydra, OmegaConf and the standard library are imported (start-up time); interpolations are
never resolved (``hydra:`` resolvers exist only inside a Hydra run).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import itertools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

#: The most group combinations of a sweep that are composed and checked (each takes ~0.1 s).
#: Beyond it, a covering set is checked instead: every swept choice of every group once.
MAX_COMBINATIONS = 16
CONFIG_MODULE = "tta.configs"
CONFIG_NAME = "predict"
HINT = "(tta-predict list shows every key)"


def check_overrides(args: list[str]) -> str | None:
    """None when every key override of the command line ``args`` (``sys.argv[1:]``) names a key
    of the composed config, else one line naming the unknown key and the fix (the closest keys,
    the group option that has it, or the sweep's job where it is missing).

    Left to Hydra: flags, ``hydra.*`` keys, ``+key=`` / ``++key=`` / ``~key`` overrides, syntax
    errors, commands with another config path (``--config-path``, ``--config-dir``) and anything
    this check cannot compose. Misspelled group options (``tta=tptt``) are answered too."""
    try:
        return _check(args)
    except Exception:  # a bug here must never stop a run that Hydra would accept
        return None


def _check(args: list[str]) -> str | None:
    command = _command_line(args)
    if command is None:
        return None
    config_name, strings = command
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(strings)
    except HydraException:  # Hydra's own message says what is wrong with the syntax
        return None
    if all(o.key_or_group == "hydra" or o.key_or_group.startswith(("hydra.", "hydra/")) for o in overrides):
        return None  # nothing to check: no need to start Hydra
    with _hydra() as repo:
        groups, keys, added = _split(overrides, repo)
        if not keys and not groups:
            return None
        jobs = _jobs(groups, repo)
        if isinstance(jobs, str):
            return jobs
        if not keys or jobs is None:
            return None
        composed = [(choices, _compose(config_name, fixed)) for choices, fixed in jobs]
        composed = [(choices, result) for choices, result in composed if result is not None]
    if not composed:
        return None
    problems = []
    for override in keys:
        key = override.key_or_group
        if key in added or any(key.startswith(f"{a}.") for a in added):
            continue
        missing = [(choices, result) for choices, result in composed if key not in result[0]]
        if missing:
            problems.append(_problem(override, missing, composed))
    return f"{'; '.join(problems)} {HINT}" if problems else None


# --- the command line ----------------------------------------------------------------------------


def _command_line(args: list[str]) -> tuple[str, list[str]] | None:
    """``(config name, overrides)`` as Hydra's own argument parser reads ``args``; None where this
    check stands aside (a parse error, another config path or a command that runs no job)."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parsed = get_args_parser().parse_args(list(args))
        except SystemExit:  # --version, a bad flag: Hydra answers
            return None
    aside = ("help", "hydra_help", "config_path", "config_dir", "experimental_rerun", "shell_completion", "info")
    if any(getattr(parsed, name, None) for name in aside):
        return None
    return parsed.config_name or CONFIG_NAME, list(parsed.overrides or [])


def _split(overrides: list[Override], repo: Any) -> tuple[list[Override], list[Override], set[str]]:
    """Group selections, key overrides to check, and keys that ``+`` / ``++`` add (as Hydra
    splits them: a key that names a config group, with no dict value, is a group selection)."""
    groups, keys, added = [], [], set()
    for override in overrides:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        value = None if override.is_sweep_override() else override.value()
        if repo.group_exists(key) and not isinstance(value, dict):
            groups.append(override)
        elif override.is_add() or override.is_force_add() or override.is_delete():
            added.add(key)
        else:
            keys.append(override)
    return groups, keys, added


def _jobs(groups: list[Override], repo: Any) -> list[tuple[dict[str, str], list[str]]] | str | None:
    """The group overrides of each job to compose: ``(swept choices, overrides)``; a message for
    a group option that does not exist; None where a sweep cannot be expanded here."""
    from hydra.core.override_parser.types import Glob, ValueType

    fixed, swept = [], []
    for override in groups:
        group = override.key_or_group
        options = _group_options(repo, group)
        if override.is_sweep_override():
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP and isinstance(override.value(), Glob):
                choices = override.value().filter(options)
            elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
                choices = list(override.sweep_string_iterator())
            else:
                return None
            swept.append([(override.get_key_element(), choice) for choice in choices])
            names = [c for choice in choices for c in _choice_names(choice)]
        else:
            fixed.append(override.input_line)
            value = override.value()
            names = [] if override.is_delete() or value is None else value if isinstance(value, list) else [value]
        for name in names:
            if isinstance(name, str) and name not in options:
                close = _close(name, options)
                mean = f": did you mean {', '.join(f'{group}={c}' for c in close)}?" if close else ""
                return f"unknown option {group}={name}{mean} (options: {', '.join(options)})"
    combinations = list(itertools.product(*swept))
    if len(combinations) > MAX_COMBINATIONS:  # every choice once, as few jobs as the longest sweep
        longest = max(len(choices) for choices in swept)
        combinations = [tuple(choices[i % len(choices)] for choices in swept) for i in range(longest)]
        combinations = combinations[:MAX_COMBINATIONS]
    return [(dict(combo), [*fixed, *(f"{k}={v}" for k, v in combo)]) for combo in combinations]


def _group_options(repo: Any, group: str) -> list[str]:
    """The group's options, those of its sub-folders too (``tda_vit_b16/dtd``); names starting with ``_``
    are parts that options include."""
    from hydra.core.object_type import ObjectType

    options = repo.get_group_options(group, results_filter=ObjectType.CONFIG)
    for folder in repo.get_group_options(group, results_filter=ObjectType.GROUP):
        options += [
            f"{folder}/{name}"
            for name in repo.get_group_options(f"{group}/{folder}", results_filter=ObjectType.CONFIG)
            if not name.startswith("_")
        ]
    return options


def _choice_names(choice: str) -> list[str]:
    """The option names of one swept choice (``tpt``, or ``[sts,lame]``)."""
    text = choice.strip()
    if text.startswith("[") and text.endswith("]"):
        return [part.strip() for part in text[1:-1].split(",") if part.strip()]
    return [text] if text not in ("null", "") else []


# --- composing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _hydra() -> Iterator[Any]:
    """Hydra initialised on the package's configs; the config repository. Hydra's global state
    is restored afterwards, whatever it was."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            yield GlobalHydra.instance().config_loader().repository
    finally:
        restore_gh_from_backup(backup)


def _compose(config_name: str, overrides: list[str]) -> tuple[set[str], dict[str, str]] | None:
    """Every dotted key of the composed config (inner nodes included) and the group choices;
    None if Hydra cannot compose it (its own run then says why)."""
    from hydra import compose
    from omegaconf import OmegaConf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        return None
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return set(_paths(container)), choices


def _paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted path of a container, inner nodes and list indices included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        yield path
        yield from _paths(value, f"{path}.")


# --- the answer ----------------------------------------------------------------------------------


def _problem(override: Override, missing: list, composed: list) -> str:
    """One clause for an override whose key is missing in the ``missing`` jobs."""
    key = override.key_or_group
    line = override.input_line
    if len(missing) < len(composed):  # a sweep: some jobs have the key, some do not
        fix = (
            f"set it with ++{line} (ignored where tta= does not select the method)"
            if key.startswith("tta.callbacks.")
            else "run those jobs in a command of their own"
        )
        where = _jobs_text([choices for choices, _ in missing])
        have = _jobs_text([choices for choices, result in composed if key in result[0]])
        return f"{key} is no key of the job with {where} (it is with {have}), so Hydra would stop that job: {fix}"
    _, (keys, choices) = missing[0]
    owners = _option_keys()
    parent, _, leaf = key.rpartition(".")
    if key in owners:
        names = _preferred(owners[key])
        group = names[0].split("=")[0]
        current = f" with {group}={_choice(choices[group])}" if choices.get(group) else ""
        add = f"add {names[0]}" if len(names) == 1 else f"add one of {', '.join(names)}"
        return f"unknown key {key}{current}: it is a key of {' or '.join(names)} ({add} to the command)"
    if parent in keys and not any(k.startswith(f"{parent}.") for k in (*keys, *owners)):
        return f"{parent} is empty: add {leaf} with +{line}"
    close = _close(key, sorted(keys | _groups()))
    if not close:  # a key of another group option, misspelled
        close = [f"{k} ({_preferred(owners[k])[0]})" for k in _close(key, sorted(owners))]
    return f"unknown key {key}: " + (f"did you mean {', '.join(close)}?" if close else "no close match")


def _choice(value: Any) -> str:
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _jobs_text(jobs: list[dict[str, Any]], n: int = 3) -> str:
    """``tta=none; tta=sts`` (the first ``n`` jobs' swept choices, then how many more)."""
    text = "; ".join(" ".join(f"{k}={_choice(v)}" for k, v in job.items()) or "the defaults" for job in jobs[:n])
    return text + (f" and {len(jobs) - n} more" if len(jobs) > n else "")


def _close(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """The closest of ``candidates`` (never ``name``'s own parents): a key ending in ``name``
    (``n_per_domain`` -> ``data.n_per_domain``), else a sibling spelled alike (``data.n_per_domian``
    -> ``data.n_per_domain``), else a key spelled alike as a whole, else a key with the same last
    part. Spelled alike: ``difflib``'s ratio at least 0.7 and near the best one."""
    parts = name.split(".")
    parents = {".".join(parts[:i]) for i in range(1, len(parts))}
    candidates = sorted(set(candidates) - parents - {name})
    ends = [c for c in candidates if c.endswith(f".{name}")]
    if ends:
        return ends[:n]
    parent, _, leaf = name.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    close = _alike(leaf, sorted(siblings), n) if parent else []
    if close:
        return [siblings[c] for c in close]
    return _alike(name, candidates, n) or [c for c in candidates if c.rpartition(".")[2] == leaf][:n]


def _alike(name: str, candidates: list[str], n: int) -> list[str]:
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True)
    best = scored[0][0] if scored else 0
    return [c for score, c in scored if score >= 0.7 and score >= best - 0.05][:n]


def _groups() -> set[str]:
    from tta.config_help import GROUPS

    return set(GROUPS)


def _preferred(owners: list[str], n: int = 3) -> list[str]:
    """Options of the plain groups (``tta=tpt``) if any, else experiment cards; the first ``n``."""
    plain = [o for o in owners if not o.startswith("experiment=")]
    return (plain or owners)[:n]


def _option_keys() -> dict[str, list[str]]:
    """``dotted key -> [group=option, ...]``: the keys each group option's file sets, inner nodes
    included, where they land (its ``@package``). Read from the files, on the failure path only."""
    from omegaconf import OmegaConf

    from tta.config_help import GROUPS, _config_dir, _package

    owners: dict[str, list[str]] = {}
    for group in GROUPS:
        for path in sorted((_config_dir() / group).glob("*.yaml")):
            container = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            container.pop("defaults", None)
            package = _package(path, group)
            for key in _paths(container):
                owners.setdefault(f"{package}.{key}" if package else key, []).append(f"{group}={path.stem}")
    return owners
