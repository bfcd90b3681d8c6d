"""Bad input fails early, and the message names the input and says how to fix it."""

from __future__ import annotations

import open_clip
import pytest
import torch
from conftest import make_tiny_vlm, run_script, save_image

from tta.datamodules import ImageFolderDataModule, WorldDataModule
from tta.models import create_vlm
from tta.models.vlm import check_class_names
from tta.tasks import ZeroShotClassifier
from tta.tasks.zero_shot import check_batch


@pytest.fixture
def no_model_builds(monkeypatch):
    """Fail the test if open_clip starts building a model: the error must come first."""

    def build(*args, **kwargs):
        raise AssertionError(f"open_clip.create_model{args} ran before the input was checked")

    monkeypatch.setattr(open_clip, "create_model", build)


# --- models ----------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_matches(no_model_builds):
    with pytest.raises(ValueError) as info:
        create_vlm("ViT-B-99")
    message = str(info.value)
    assert "'ViT-B-99'" in message
    assert "close matches" in message and "ViT-B-16" in message
    assert "open_clip.list_models()" in message and "local-dir:" in message


def test_missing_checkpoint_file_fails_before_building(no_model_builds):
    with pytest.raises(FileNotFoundError) as info:
        create_vlm("ViT-B-16", pretrained="/nonexistent.pt")
    message = str(info.value)
    assert "/nonexistent.pt" in message
    assert "openai" in message  # the tags one could pass instead
    assert "fix the path" in message


def test_missing_local_dir(no_model_builds, tmp_path):
    folder = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as info:
        create_vlm(f"local-dir:{folder}")
    message = str(info.value)
    assert str(folder) in message and "open_clip_config.json" in message


def test_local_dir_without_weights(no_model_builds, tmp_path):
    from tta.models.factory import SHIPPED_MODELS

    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        (SHIPPED_MODELS["tta-world-resnet"] / "open_clip_config.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors"):
        create_vlm(f"local-dir:{folder}")


# --- class names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([], "empty"),
        (["cat", "  ", "dog"], "positions [1]"),
    ],
)
def test_bad_class_names(names, expected):
    with pytest.raises(ValueError) as info:
        check_class_names(names)
    assert expected in str(info.value)
    assert "class_names" in str(info.value)


def test_duplicate_class_names_pass_with_a_warning():
    """CLIP's and TPT's ImageNet list has "missile" and "sunglasses" twice: the reference prompts with
    it as is, so duplicates are allowed (the classes share text features) and said once."""
    from tta.models.vlm import _warn_duplicates

    _warn_duplicates.cache_clear()
    with pytest.warns(UserWarning, match=r"duplicates \['cat'\].*class_list=unique"):
        assert check_class_names(["cat", "dog", "cat"]) == ["cat", "dog", "cat"]


def test_classifier_checks_class_names_at_construction():
    with pytest.raises(ValueError, match="positions"):
        ZeroShotClassifier(make_tiny_vlm("tta-tiny-clip"), class_names=["a", " "])


# --- data folders ----------------------------------------------------------------------------


def test_missing_data_folder(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(root)
    assert str(root) in str(info.value) and "data.root" in str(info.value)


def test_data_folder_that_is_the_parent_of_the_class_folders(tmp_path):
    save_image(tmp_path / "only_sub" / "classA" / "img.png")
    save_image(tmp_path / "only_sub" / "classB" / "img.png")
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(tmp_path)
    assert f"set data.root to {tmp_path / 'only_sub'}" in str(info.value)


def test_class_folders_without_images(tmp_path):
    save_image(tmp_path / "cat" / "img.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(tmp_path)
    assert "['dog']" in str(info.value)


def test_class_name_count_must_match_folders(image_tree):
    with pytest.raises(ValueError) as info:
        ImageFolderDataModule(image_tree, class_names=["one", "two"])
    message = str(info.value)
    assert "2 class names for 3 class folders" in message and "sorted folder order" in message


def test_unknown_world_domain_fails_at_construction():
    with pytest.raises(ValueError) as info:
        WorldDataModule(domains=["clean", "fog"])
    assert "'fog'" in str(info.value) and "blur" in str(info.value)


# --- batches and images ----------------------------------------------------------------------


@pytest.fixture
def classifier(monkeypatch):
    module = ZeroShotClassifier(make_tiny_vlm("tta-tiny-clip"), class_names=["cat", "dog", "fish"])

    def encode(*args, **kwargs):
        raise AssertionError("images were encoded before the batch was checked")

    monkeypatch.setattr(module.vlm, "encode_image", encode)
    return module


def batch(labels, images=None):
    n = len(labels)
    return {
        "image": torch.rand(n, 3, 64, 64) if images is None else images,
        "label": torch.tensor(labels),
        "index": torch.arange(10, 10 + n),
        "domain": ["d"] * n,
    }


def test_labels_outside_the_class_list(classifier):
    with pytest.raises(ValueError) as info:
        classifier.predict_step(batch([0, 3, -1]), 0)
    assert "label 3" in str(info.value) and "3 classes" in str(info.value)


def test_nan_images_name_the_samples(classifier):
    images = torch.rand(3, 3, 64, 64)
    images[1, 2, 5, 5] = float("nan")
    with pytest.raises(ValueError) as info:
        classifier.predict_step(batch([0, 1, 2], images), 0)
    assert "NaN" in str(info.value) and "[11]" in str(info.value)


def test_batch_without_the_contract_keys():
    with pytest.raises(KeyError, match="index"):
        check_batch({"image": torch.rand(1, 3, 8, 8), "label": torch.tensor([0]), "domain": ["d"]}, 3)


def test_unknown_labels_are_allowed():
    check_batch(batch([-1, -1, 2]), 3)


@pytest.mark.parametrize(
    ("images", "names", "fix"),
    [
        (torch.rand(2, 3, 32, 32), "(32, 32)", "set the datamodule's image_size to 64"),
        (torch.rand(2, 1, 64, 64), "(2, 1, 64, 64)", "convert grey or RGBA images to RGB"),
        (torch.rand(2, 4, 64, 64), "(2, 4, 64, 64)", "convert grey or RGBA images to RGB"),
        (torch.rand(3, 64, 64), "(3, 64, 64)", "B x 3 x H x W"),
        (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), "torch.uint8", "divide uint8 images by 255"),
    ],
)
def test_check_images(images, names, fix):
    vlm = make_tiny_vlm("tta-tiny-clip")
    with pytest.raises(ValueError) as info:
        vlm.check_images(images)
    assert names in str(info.value)
    assert fix in str(info.value)


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_model")
    return run_script("tta-predict", ["model.vlm.name=NoSuchModel", f"hydra.run.dir={out}/run"], cwd=out)


def test_cli_user_error_exits_2_without_traceback(bad_model_run):
    assert bad_model_run.returncode == 2
    assert "Traceback" not in bad_model_run.stderr + bad_model_run.stdout
    assert bad_model_run.stderr.startswith("tta-predict: error:")
    assert "NoSuchModel" in bad_model_run.stderr


def test_cli_user_error_is_one_line(bad_model_run):
    assert len(bad_model_run.stderr.strip().splitlines()) == 1
