"""benchmarks/search_world.py: its Search-TTA arms take the world rates from the config a user runs
(configs/tta/search_tta_world.yaml), ``--lr`` pairs and ``--seed`` choose rates on other episodes
than the benchmark's, and a one-episode run writes the report and per-episode CSV it documents."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "search_world.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_world_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def world_config() -> dict:
    config = OmegaConf.load(files("tta.configs").joinpath("tta", "search_tta_world.yaml"))
    settings = OmegaConf.to_container(config.callbacks.search_tta)
    settings.pop("_target_")
    return settings


def arguments(**changes) -> argparse.Namespace:
    defaults = {"lr": None, "with_reference_lr": False, "with_centred": False, "budget": 64}
    return argparse.Namespace(**{**defaults, **changes})


def adapted(arms: dict) -> dict:
    return {name: tta for name, (_, tta, _) in arms.items() if tta}


def test_the_default_arm_runs_the_world_config(bench):
    """No rates repeated in the script: the adapted arm is the config's, every setting."""
    world = world_config()
    (name, settings), *others = adapted(bench.build_arms(arguments())).items()
    assert not others and settings == world
    assert name == f"greedy + Search-TTA, lr {bench.lr_text(world['lr_start'])} -> {bench.lr_text(world['lr_end'])}"


def test_lr_pairs_give_one_arm_each_with_the_rest_of_the_config(bench):
    world = world_config()
    arms = bench.build_arms(arguments(lr=[(1e-5, 1e-4), (3e-4, 3e-3)], with_centred=True))
    tta = adapted(arms)
    assert tta["greedy + Search-TTA, lr 1e-5 -> 1e-4"] == {**world, "lr_start": 1e-5, "lr_end": 1e-4}
    assert tta["greedy + Search-TTA, lr 3e-4 -> 3e-3"] == {**world, "lr_start": 3e-4, "lr_end": 3e-3}
    centred = [name for name in tta if "centred" in name]
    assert len(tta) == 3 and tta[centred[0]]["lr_ramp_steps"] == 64  # the centred arm ramps over the budget
    assert arms[centred[0]][2] == bench.UNADAPTED_CENTRED


@pytest.mark.parametrize(
    ("text", "message"), [("1e-3", "START:END"), ("0:1e-3", "START must be"), ("1e-4:x", "START:END")]
)
def test_bad_lr_pairs_name_the_fix(bench, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        bench.rate_pair(text)


def test_one_episode_writes_the_report_and_csv(bench, tmp_path, monkeypatch):
    """--seed and --lr reach the run: the header names the seeds and the command, the CSV has the
    arm's finds, updates and AUROCs on the cells it left unvisited."""
    out = tmp_path / "rates.md"
    argv = [
        "--episodes",
        "1",
        "--seed",
        "1000",
        "--grid",
        "8",
        "--budget",
        "20",
        "--lr",
        "1e-3:1e-2",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    assert f"`python benchmarks/search_world.py {' '.join(argv)}` (seeds 1000-1000;" in report
    assert "| greedy + Search-TTA, lr 1e-3 -> 1e-2 |" in report
    (row,) = csv.DictReader(out.with_name("rates_episodes.csv").read_text().splitlines())
    arm = "greedy + Search-TTA, lr 1e-3 -> 1e-2"
    assert int(row[f"updates[{arm}]"]) >= 1  # an update every 20 steps without a find
    assert int(row[f"found[{arm}]"]) >= 0
    # the update moved the map on the cells left unvisited (the same cells for both)
    assert row[f"auroc_unvisited_before[{arm}]"] != row[f"auroc_unvisited_after[{arm}]"]
