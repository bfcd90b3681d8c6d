"""``tta-predict --help`` / ``list`` print whole notes and every key of the data, model and trainer
options; a mistyped key is answered with the closest existing keys (``tta.overrides``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script

from tta.overrides import check_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
WIDTH = 80
HEAVY = ("torch", "pytorch_lightning", "open_clip")


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    """What the console script prints for ``--help`` (checked to be the same for ``list``)."""
    cwd = tmp_path_factory.mktemp("help")
    done = [run_script("tta-predict", [arg], cwd=cwd, timeout=120) for arg in ("--help", "list")]
    for result in done:
        assert result.returncode == 0, result.stderr
    assert done[0].stdout == done[1].stdout
    return done[0].stdout


def words(text: str) -> str:
    """The text with every run of white space (line ends and column padding) as one space."""
    return " ".join(text.split())


# --- --help / list -------------------------------------------------------------------------------


def test_help_prints_each_options_whole_note_within_80_columns(help_text):
    flat = words(help_text)
    # the first sentence goes past "et al." (it was cut to "DiffTPT (Feng et al.")
    assert "DiffTPT (Feng et al. 2023): TPT over the original + 64 conventional views" in flat
    # and the sentences after it are there too
    assert "4 AdamW steps at lr 5e-3; prediction on the original. On the offline world (the default data" in flat
    assert "cosine filter (80%, logit vectors as in the reference code;" in flat
    assert "Below the ResNet's accuracy within the recipe's CPU budget (docs/world.md), so not the default." in flat
    # an example command of a note, continued with a backslash where it is wrapped
    assert "tta-predict model=siglip_b16 \\" in help_text
    too_long = [line for line in help_text.splitlines() if len(line) > WIDTH]
    assert not too_long, too_long


def test_help_lists_the_keys_of_every_data_model_and_trainer_option(help_text):
    lines = help_text.splitlines()
    assert any(re.match(r"\s+data\.n_per_domain=500\s*$", line) for line in lines)
    assert any(re.match(r"\s+data\.seed=10000\s+which scenes; disjoint", line) for line in lines)
    assert any(re.match(r"\s+model\.vlm\.name=tta-world-resnet\b", line) for line in lines)
    assert any(re.match(r"\s+trainer\.precision=32-true\s*$", line) for line in lines)
    assert any(re.match(r"\s+trainer\.precision=bf16-mixed\s*$", line) for line in lines)
    assert "data.root=???" in help_text and "must be set: data.root=<value>" in help_text
    assert "data.world={}" in help_text and 'model.templates=["a photo of a {}."]' in help_text
    assert "(on top of trainer=default)" in help_text
    assert "_target_" not in help_text and "trainer.defaults" not in help_text
    from tta.config_help import option_keys

    for group in ("data", "model", "trainer"):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            for key, default, _ in option_keys(path, group):
                assert words(f"{key}={default}") in words(help_text), (path.name, key)


def test_a_trainer_option_lists_what_it_sets_on_top_of_default():
    from tta.config_help import option_keys

    keys = [key for key, _, _ in option_keys(CONFIGS / "trainer" / "gpu.yaml", "trainer")]
    assert keys == ["trainer.accelerator", "trainer.precision"]


def test_option_keys_print_values_as_written(tmp_path):
    from tta.config_help import option_keys

    path = tmp_path / "demo.yaml"
    path.write_text(
        "# A demo option.\n"
        "defaults:\n"
        "  - base\n"
        "  - _self_\n"
        "_target_: some.Class\n"
        "save_dir: ${hydra:runtime.output_dir}/runs  # where it writes\n"
        "root: ???  # the data folder\n"
        "name: '# not a note'\n"
        "inner:\n"
        "  _target_: other.Class\n"
        "  size: [16, 16]  # rows, cols\n"
        "  extra: {}\n"
        "  words: [a photo, b]\n"
    )
    assert option_keys(path, "logger") == [
        ("logger.save_dir", "${hydra:runtime.output_dir}/runs", "where it writes"),
        ("logger.root", "???", "must be set: logger.root=<value> (the data folder)"),
        ("logger.name", "# not a note", ""),
        ("logger.inner.size", "[16, 16]", "rows, cols"),
        ("logger.inner.extra", "{}", ""),
        ("logger.inner.words", '["a photo", b]', ""),
    ]


@pytest.mark.parametrize(
    ("comment", "first"),
    [
        ("DiffTPT (Feng et al. 2023): a method. More.", "DiffTPT (Feng et al. 2023): a method."),
        ("Crops, e.g. a centre crop, i.e. one view. Then more.", "Crops, e.g. a centre crop, i.e. one view."),
        ("Ours vs. theirs at 0.5 s per image. Then more.", "Ours vs. theirs at 0.5 s per image."),
        ("A set (root: its folder. Or a file.) to read. Then more.", "A set (root: its folder. Or a file.) to read."),
        ("Spread over\n# two lines. Then more.", "Spread over two lines."),
        ("One sentence without a full stop", "One sentence without a full stop"),
    ],
)
def test_a_short_note_is_cut_at_a_real_sentence_end_only(tmp_path, comment, first):
    from tta.config_help import option_summary

    path = tmp_path / "option.yaml"
    path.write_text(f"# {comment}\nkey: 1\n")
    assert option_summary(path) == first


# --- check_overrides -------------------------------------------------------------------------------


def test_a_mistyped_data_key_is_answered_with_the_closest_key():
    message = check_overrides(["data.n_per_domian=5"])
    assert message is not None and "\n" not in message
    assert message.startswith("unknown key data.n_per_domian: did you mean data.n_per_domain?")
    assert "tta-predict list" in message


def test_a_mistyped_method_option_is_answered_with_the_methods_option():
    message = check_overrides(["tta=tpt", "tta.callbacks.tpt.n_view=8"])
    assert message is not None and "did you mean tta.callbacks.tpt.n_views?" in message


def test_a_method_option_without_its_method_names_the_method():
    message = check_overrides(["tta.callbacks.tpt.n_views=8"])
    assert message is not None and "with tta=none" in message and "add tta=tpt" in message


def test_a_key_missing_in_some_jobs_of_a_sweep_names_those_jobs():
    message = check_overrides(["-m", "tta=none,tpt", "tta.callbacks.tpt.n_views=8"])
    assert message is not None and "\n" not in message
    assert "job with tta=none " in message and "(it is with tta=tpt)" in message
    assert "++tta.callbacks.tpt.n_views=8" in message  # the fix that runs both jobs


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tta=tptt"], "unknown option tta=tptt: did you mean tta=tpt?"),
        (["-m", "tta=none,tptt"], "unknown option tta=tptt: did you mean tta=tpt?"),
        (["tta=[sts,lamee]"], "unknown option tta=lamee: did you mean tta=lame?"),
        (["dat=world"], "unknown key dat: did you mean data?"),
        (["n_per_domain=5"], "unknown key n_per_domain: did you mean data.n_per_domain?"),
        (["data=world_search", "data.world.dense_rate=0.5"], "add dense_rate with +data.world.dense_rate=0.5"),
        (["--cfg", "job", "seed=1", "data.severty=1"], "did you mean data.severity?"),
        (["foo.bar=1"], "unknown key foo.bar: no close match"),
    ],
)
def test_misspelled_groups_and_keys(args, expected):
    message = check_overrides(args)
    assert message is not None and expected in message and "\n" not in message


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["tta=tpt", "data.n_per_domain=10", "seed=1"],
        ["experiment=ttm_world", "data.n_per_cell=10", "tta.callbacks.ttm.rounds=2", "tta.callbacks.ttm.epochs=1"],
        ["hydra.run.dir=x"],
        ["+foo=1"],
        ["++data.foo=1", "~logger"],
        ["--cfg", "job"],
        ["-c", "job", "tta=tpt", "tta.callbacks.tpt.lr=1e-3"],
        ["-m", "seed=0,1,2"],
        ["-m", "tta=tpt,sts", "data.n_per_domain=5"],
        ["tta=[sts,lame]", "tta.callbacks.lame.k=3"],
        ["data=world_search", "data.grid.0=8", "data.world={dense_rate:0.5}"],
        ["logger=csv", "logger.save_dir=x"],
        ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=p", "tta=none,tpt", "seed=0,1"],
        ["--config-dir", "/nowhere", "whatever.key=1"],
        ["--hydra-help"],
    ],
)
def test_commands_with_existing_keys_pass(args):
    assert check_overrides(args) is None


def _shrink_keys(card: Path) -> list[str]:
    text = " ".join(line for line in card.read_text().splitlines() if line.startswith("# Shrink"))
    return sorted(set(re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)=", text)))


@pytest.mark.parametrize("card", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_cards_shrink_keys_pass(card):
    keys = _shrink_keys(CONFIGS / "experiment" / f"{card}.yaml")
    assert keys, card
    assert check_overrides([f"experiment={card}", *(f"{key}=1" for key in keys)]) is None


def test_hydra_is_left_as_it_was():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    check_overrides(["data.n_per_domian=5"])
    assert not GlobalHydra.instance().is_initialized()
    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        assert check_overrides(["data.n_per_domian=5"]) is not None
        assert GlobalHydra.instance().is_initialized()
        assert compose("predict", overrides=["data.n_per_domain=5"]).data.n_per_domain == 5


def test_the_check_imports_no_torch():
    code = (
        "import sys; from tta.overrides import check_overrides; "
        "print(check_overrides(['tta=tpt', 'data.n_per_domian=5'])); "
        f"print('heavy:', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "did you mean data.n_per_domain?" in done.stdout and "heavy: []" in done.stdout
