"""Runs that cannot mix (issue 22): every input that changes a row is in the run key, non-finite
numbers are errors, class names are compared as the prompts use them, and a refused run writes
nothing. Each fault goes through a real entry point: ``tta-predict`` in a subprocess, or
``Trainer.predict`` with :class:`~tta.callbacks.PredictionWriter` from Python."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import RUN, class_tree, one_line_error, save_image, snapshot, tta_predict
from omegaconf import OmegaConf
from test_run_faults import python_predict, world

from tta.callbacks import TPT
from tta.models import create_vlm
from tta.models.factory import SHIPPED_MODELS
from tta.run_folder import RunFolderError

QUIET = ["trainer.enable_progress_bar=false", "print_table=false"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def without_lock(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name != "run.lock"}


# --- 1: the run key covers the data's files and the model's weights ----------------------------


def folder_run(tree: Path, run: Path, *extra: str) -> list[str]:
    return ["data=image_folder", f"data.root={tree}", "data.num_workers=0", "data.batch_size=2", *QUIET,
            f"hydra.run.dir={run}", *extra]  # fmt: skip


def test_a_folder_that_gained_files_is_refused_not_resumed(tmp_path):
    """Files added after a run (or between a stop and the rerun) shift every index: the rerun is
    refused with one line naming the data's listing, both values and the fix; nothing is written."""
    tree = class_tree(tmp_path / "images", ["cat", "dog"], per_folder=3)
    run = tmp_path / "run"
    done = tta_predict(folder_run(tree, run), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    save_image(tree / "cat" / "img_9.jpg", size=(10, 8), seed=99)
    before = snapshot(run)
    refused = tta_predict(folder_run(tree, run), tmp_path)
    one_line_error(
        refused,
        f"{run} holds the results of a different run: inputs.data.files is 6 there, 7 here",
        "the data's files are not the ones that run read",
        "or write to another directory",
    )
    assert without_lock(snapshot(run)) == without_lock(before)  # .hydra/ and cli.log included


def test_new_weights_at_the_same_model_path_are_refused(tmp_path):
    """A retrained model saved over the same ``local-dir:`` folder: the rerun is refused, naming the weights."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(SHIPPED_MODELS["tta-world-resnet"], model)
    run = tmp_path / "run"
    args = [f"model.vlm.name=local-dir:{model}", "data.domains=[clean]", "data.n_per_domain=8", *QUIET,
            f"hydra.run.dir={run}"]  # fmt: skip
    done = tta_predict(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = model / "open_clip_model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    save_file(state, weights)
    before = snapshot(run)
    one_line_error(
        tta_predict(args, tmp_path),
        'holds the results of a different run: inputs.weights is "sha256:',
        "the model's weights are not the ones that run used",
    )
    assert without_lock(snapshot(run)) == without_lock(before)


@pytest.mark.parametrize(
    ("setting", "first", "second"),
    [("interpolation", "bicubic", "bilinear"), ("resize_mode", "shortest", "squash")],
)
def test_the_python_writer_refuses_another_resizing(shipped_vlm, tmp_path, setting, first, second):
    python_predict(shipped_vlm, tmp_path, world(**{setting: first}))
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError) as info:
        python_predict(shipped_vlm, tmp_path, world(**{setting: second}))
    assert f'data.{setting} is "{first}" there, "{second}" here' in str(info.value)
    assert snapshot(tmp_path) == before


def test_the_python_writer_refuses_another_global_seed(shipped_vlm, tmp_path):
    """TPT's views draw from ``seed_everything``'s seed when the writer and the callback are given none."""
    try:
        pl.seed_everything(0, verbose=False)
        python_predict(shipped_vlm, tmp_path, world(n_per_domain=4), [TPT(n_views=4)])
        before = snapshot(tmp_path)
        pl.seed_everything(1, verbose=False)
        with pytest.raises(RunFolderError, match="seed_in_force is 0 there, 1 here"):
            python_predict(shipped_vlm, tmp_path, world(n_per_domain=4), [TPT(n_views=4)])
        assert snapshot(tmp_path) == before
    finally:
        pl.seed_everything(0, verbose=False)


def test_the_python_writer_refuses_weights_changed_in_memory(tmp_path):
    vlm = create_vlm("tta-world-resnet")
    python_predict(vlm, tmp_path, world(n_per_domain=4))
    with torch.no_grad():
        vlm.model.logit_scale.add_(0.5)  # in place: the cached fingerprint must notice
    with pytest.raises(RunFolderError, match="inputs.weights is"):
        python_predict(vlm, tmp_path, world(n_per_domain=4))


def test_fingerprints_see_what_changes_rows_and_nothing_else(tmp_path):
    from tta.fingerprint import files_fingerprint, weights_fingerprint

    vlm = create_vlm("tta-world-resnet")
    same = create_vlm("tta-world-resnet")
    assert weights_fingerprint(vlm) == weights_fingerprint(same) == weights_fingerprint(vlm)
    with torch.no_grad():
        next(same.model.visual.parameters()).view(-1)[0] += 1e-6
    assert weights_fingerprint(same) != weights_fingerprint(vlm)
    tree = class_tree(tmp_path / "a", ["cat", "dog"], per_folder=2)
    paths = sorted(tree.rglob("*.jpg"))
    listing = files_fingerprint(paths, tree)
    moved = tmp_path / "b"
    shutil.copytree(tree, moved)  # copy2 keeps modification times: the same data elsewhere
    assert files_fingerprint(sorted(moved.rglob("*.jpg")), moved) == listing
    (tree / "cat" / "img_0.jpg").write_bytes((tree / "cat" / "img_0.jpg").read_bytes() + b"\0")
    assert files_fingerprint(paths, tree)["listing"] != listing["listing"]


# --- 2: NaN and inf are errors -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_option_is_refused_before_any_work(tmp_path, value):
    run = tmp_path / "run"
    refused = tta_predict(["tta=tpt", f"tta.callbacks.tpt.lr={value}", *QUIET, f"hydra.run.dir={run}"], tmp_path)
    one_line_error(refused, "tta.callbacks.tpt.lr must be a finite number", "give it a finite value")
    assert not [p for p in run.rglob("*") if p.is_file()]  # not even the lock: refused before it


def test_non_finite_logits_stop_the_run_naming_the_batch_the_method_and_the_setting(tmp_path):
    """A step so large that TPT's prompt overflows: the run stops at the first such batch, exit 2,
    and no row of it is written (it used to exit 0 with every row predicting class 0 at NaN)."""
    run = tmp_path / "run"
    args = [a for a in RUN if not a.startswith("data.n_per_domain")]
    refused = tta_predict([*args, "data.n_per_domain=8", "tta.callbacks.tpt.lr=1e30", f"hydra.run.dir={run}"], tmp_path)
    line = one_line_error(refused, "tpt gave non-finite values (NaN or inf) in batch 1", "lr (now 1e+30; "
                          "tta.callbacks.tpt.lr)")  # fmt: skip
    assert "index " in line
    assert (run / "predictions.csv").read_text().splitlines() == [
        "index,domain,label,pred,confidence,pred_zs,confidence_zs"
    ]


def numeric_options(group: str) -> list[tuple[str, str, object]]:
    """``(option file, dotted key, default)`` of every number in the option files of ``group``."""

    def walk(node: dict, prefix: str) -> list[tuple[str, object]]:
        numbers = []
        for key, value in node.items():
            if isinstance(value, dict):
                numbers += walk(value, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.append((f"{prefix}{key}", value))
        return numbers

    return [
        (path.stem, key, value)
        for path in sorted((CONFIGS / group).glob("*.yaml"))
        for key, value in walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), f"{group}.")
    ]


#: Options that take any finite value (no range to leave).
ANY_FINITE = {"seed", "stream_seed", "guidance_scale", "tiny_seed"}


@pytest.mark.parametrize(("option", "key", "default"), numeric_options("tta"), ids=lambda v: str(v))
def test_every_numeric_method_option_is_checked(compose, option, key, default):
    """Every number of every tta= config: non-finite is refused naming the key (the config check),
    and so is a value far out of range (the callback's own check, the same in Python)."""
    from tta.cli import check_config, tta_callbacks
    from tta.validation import OptionError

    for bad in ("nan", "inf"):
        with pytest.raises(OptionError, match=rf"^{key} must be a finite number"):
            check_config(compose([f"tta={option}", f"{key}={bad}"]))
    if key.rsplit(".", 1)[-1] in ANY_FINITE:
        return
    far = -1 if isinstance(default, int) else -1.0e9
    with pytest.raises(OptionError, match=rf"^{key} must be "):
        tta_callbacks(compose([f"tta={option}", f"{key}={far}"]))


# --- 4 and 9: class names as the prompts use them; a refused run writes nothing -----------------


def test_refusals_write_nothing_but_the_lock(tmp_path):
    """Class names in another order (capitalised, spaces for underscores) for the folders or the
    model, and a bad option: each refused with one line, exit 2; the run folder then holds the lock
    and nothing else (no .hydra/, no cli.log)."""
    tree = class_tree(tmp_path / "shapes", ["red_circle", "green_circle", "blue_circle"], per_folder=1)
    folder = ["data=image_folder", f"data.root={tree}", "data.num_workers=0", *QUIET]
    cases = {
        "folders reordered, capitalised": (
            [*folder, "data.class_names=[Red circle,Green circle,Blue circle]"],
            ["data.class_names", "in another order", "['blue_circle', 'green_circle', 'red_circle']"],
        ),
        "model names reordered": (
            [*folder, "model.class_names=[green circle,blue circle,red circle]"],
            ["model.class_names", "in another order", "leave model.class_names unset"],
        ),
        "a bad value": (
            ["tta=tpt", "tta.callbacks.tpt.selection=2.0", *QUIET],
            ["tta.callbacks.tpt.selection must be"],
        ),
    }
    runs = {name: tmp_path / f"run{k}" for k, name in enumerate(cases)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(
            zip(cases, pool.map(lambda n: tta_predict([*cases[n][0], f"hydra.run.dir={runs[n]}"], tmp_path), cases))
        )
    for name, (_, expected) in cases.items():
        one_line_error(done[name], *expected)
        assert [p.relative_to(runs[name]).as_posix() for p in runs[name].rglob("*")] == ["run.lock"], name


def test_class_names_in_the_folders_order_up_to_case_and_spaces_are_accepted(tmp_path):
    tree = class_tree(tmp_path / "shapes", ["blue_circle", "green_circle", "red_circle"], per_folder=1)
    args = ["data=image_folder", f"data.root={tree}", "data.num_workers=0", *QUIET, f"hydra.run.dir={tmp_path / 'r'}",
            'data.class_names=["Blue Circle","green  circle",RED_circle]']  # fmt: skip
    done = tta_predict(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
