"""Every Hydra config option composes and every ``_target_`` in it instantiates.

Options are found by listing ``configs/<group>/*.yaml``, so a new file is tested as soon as
it exists; a new group fails ``test_every_group_is_tested`` until it gets a test here.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
import pytorch_lightning as pl
import torch
from conftest import fake_data_overrides
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tta.cli import with_model_preprocessing
from tta.models import VisionLanguageModel

CONFIGS = files("tta.configs")
GROUPS = {"model", "data", "trainer", "tta", "experiment", "logger"}
#: Hydra's own groups that the package adds options to (tested by test_launcher_config).
HYDRA_GROUPS = {"hydra"}


def options(group: str) -> list[str]:
    """The group's options, those in its sub-folders too (``tda_vit_b16/dtd``); files whose name starts
    with ``_`` are parts that options include, not options."""
    found = []
    for entry in CONFIGS.joinpath(group).iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")) and group == "experiment":
            found += [f"{entry.name}/{p.name.removesuffix('.yaml')}" for p in entry.iterdir() if _is_option(p.name)]
        elif _is_option(entry.name):
            found.append(entry.name.removesuffix(".yaml"))
    return sorted(found)


def _is_option(name: str) -> bool:
    return name.endswith(".yaml") and not name.startswith("_")


def test_every_group_is_tested():
    found = {p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert found == GROUPS | HYDRA_GROUPS


def test_each_group_has_options():
    assert all(options(group) for group in GROUPS)


def offline_overrides(compose, overrides: list[str]) -> list[str]:
    """Overrides that make ``overrides`` composable and instantiable without network or data:
    a model with pretrained weights to fetch becomes the tiny random CLIP (a vision-language
    model) or gets random weights (a plain classifier such as TimmClassifier)."""
    model = compose(overrides).model
    if "vlm" not in model:
        return [*overrides, "model.pretrained=false"] if model.get("pretrained") else overrides
    if model.vlm.get("pretrained") is not None:
        overrides = [*overrides, "model.vlm.name=tta-tiny-clip", "model.vlm.pretrained=null"]
    return overrides


def assert_run_key_sees_every_argument(obj: object) -> None:
    """The run key (``tta.callbacks.writer.object_settings``) reads every constructor argument of
    ``obj`` back, so that a rerun with another value of any of them is refused, not resumed (issue 22:
    a datamodule's ``interpolation`` was not seen)."""
    from tta.callbacks.writer import object_settings, unrecorded_arguments

    unseen = unrecorded_arguments(object_settings(obj))
    assert not unseen, f"the run key cannot see {unseen}: keep each as an attribute, or map it in argument_attributes"


def instantiate_model(cfg: DictConfig) -> pl.LightningModule:
    module = instantiate(cfg.model)
    assert isinstance(module, pl.LightningModule)
    if "vlm" in cfg.model:
        assert isinstance(module.vlm, VisionLanguageModel)
    assert_run_key_sees_every_argument(module)
    return module


def instantiate_data(
    cfg: DictConfig, image_size: int = 64, resize_mode: str = "shortest", interpolation: str = "bicubic"
) -> pl.LightningDataModule:
    preprocessing = {"image_size": image_size, "resize_mode": resize_mode, "interpolation": interpolation}
    datamodule = instantiate(with_model_preprocessing(cfg.data, preprocessing))  # as tta.cli.run does
    assert isinstance(datamodule, pl.LightningDataModule)
    # group datamodules (tta.datamodules.compositional) have kinds instead of classes
    assert list(datamodule.class_names) or list(datamodule.kinds)
    assert list(datamodule.domains)
    assert isinstance(datamodule.name, str)
    assert_run_key_sees_every_argument(datamodule)
    return datamodule


def instantiate_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    assert isinstance(cfg.tta.callbacks, DictConfig)
    callbacks = [instantiate(node) for node in cfg.tta.callbacks.values()]
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    for callback in callbacks:
        assert_run_key_sees_every_argument(callback)
    return callbacks


def instantiate_trainer(cfg: DictConfig) -> pl.Trainer | None:
    """The trainer, or None where it needs a GPU and none is here."""
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        return None
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer, pl.Trainer)
    return trainer


@pytest.mark.parametrize("option", options("model"))
def test_model_config(compose, option):
    cfg = compose(offline_overrides(compose, [f"model={option}"]))
    module = instantiate_model(cfg)
    assert module.model_name == (cfg.model.vlm.name if "vlm" in cfg.model else cfg.model.model_name)


@pytest.mark.parametrize("option", options("data"))
def test_data_config(compose, option, image_tree, tmp_path):
    overrides = [f"data={option}"]
    if OmegaConf.is_missing(compose(overrides).data, "root"):
        overrides += fake_data_overrides(compose(overrides).data, tmp_path, image_tree)
    datamodule = instantiate_data(compose(overrides), image_size=32, resize_mode="squash", interpolation="bilinear")
    assert datamodule.image_size == 32
    # every datamodule that resizes images takes the model's resize mode and interpolation (issue 14)
    data = compose(overrides).data
    if "resize_mode" in data:
        assert (datamodule.preprocess.resize_mode, datamodule.preprocess.interpolation) == ("squash", "bilinear")
    elif "interpolation" in data:
        assert datamodule.interpolation == "bilinear"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_config(compose, option):
    cfg = compose([f"trainer={option}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    trainer = instantiate_trainer(cfg)
    if trainer is None:
        pytest.skip(f"trainer={option} needs a GPU; composed only")


@pytest.mark.parametrize("option", options("tta"))
def test_tta_config(compose, option):
    cfg = compose([f"tta={option}"])
    callbacks = instantiate_callbacks(cfg)
    assert len(callbacks) == len(cfg.tta.callbacks)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_config(compose, option, tmp_path, monkeypatch):
    """Each logger option composes; it is built with its save_dir in a temporary folder (the run
    directory in the CLI) where its package is installed, and its class is importable otherwise."""
    import importlib.util

    from hydra.utils import get_class

    cfg = compose([f"logger={option}"])
    if option == "none":
        assert not cfg.get("logger")
        return
    logger = cfg.logger
    cls = get_class(logger._target_)
    package = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb", "TensorBoardLogger": "tensorboard"}.get(cls.__name__)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"logger={option} needs {package}; its class imports and the option composes")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what configs/logger/mlflow.yaml's hydra.job.env_set does
    built = instantiate(logger, save_dir=str(tmp_path))
    assert isinstance(built, cls)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_config(compose, option, image_tree, tmp_path):
    """Protocol cards name real models and data folders: the model becomes a tiny one and the
    mandatory data root a fake tree of the card's layout; a ``published`` block is well-formed."""
    base = compose([])
    overrides = [f"experiment={option}"]
    cfg = compose(overrides)
    assert cfg != base, f"experiment={option} changes nothing"
    if "published" in cfg:
        assert {"method", "model", "source", "accuracy"} <= set(cfg.published)
        assert all(0 < value <= 100 for value in cfg.published.accuracy.values())
    if OmegaConf.is_missing(cfg.data, "root"):
        overrides += fake_data_overrides(cfg.data, tmp_path, image_tree)
    cfg = compose(offline_overrides(compose, overrides))
    module = instantiate_model(cfg)
    instantiate_data(cfg, image_size=module.vlm.image_size[0] if "vlm" in cfg.model else 32)
    instantiate_callbacks(cfg)
    instantiate_trainer(cfg)


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_launcher_config(option):
    """A launcher option composes onto Hydra's own launcher config and its class imports
    (launching needs the cluster, so it is not started)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.utils import get_class

    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        cfg = hydra_compose("predict", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.max_num_timeout > 0  # requeued jobs resume: PredictionWriter keeps finished batches


def test_default_config_is_the_shipped_model_on_every_world_domain(compose):
    from tta.world import DOMAINS

    cfg = compose([])
    assert cfg.model.vlm.name == "tta-world-resnet"
    datamodule = instantiate_data(cfg)
    assert datamodule.domains == list(DOMAINS)
    assert isinstance(cfg.seed, int)
