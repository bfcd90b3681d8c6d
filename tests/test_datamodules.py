"""Datamodules keep the batch contract; metrics match torchmetrics."""

from __future__ import annotations

import pytest
import torch
from conftest import FAKE_TREE
from torchmetrics.functional.classification import multiclass_calibration_error

from tta.datamodules import ImageFolderDataModule, WorldDataModule
from tta.datamodules.preprocess import Preprocess
from tta.metrics import classification_metrics, summarize
from tta.world import CLASS_NAMES, ORIGINAL_SIZE, render_domain


def predict_batches(datamodule):
    datamodule.setup("predict")
    return list(datamodule.predict_dataloader())


def assert_batch_contract(batch, image_size):
    # file-based datamodules add how many of the batch failed to decode, and which files
    assert set(batch) - {"skipped_images", "skipped_paths"} == {"image", "original", "label", "index", "domain"}
    assert batch.get("skipped_images", 0) == 0 and batch.get("skipped_paths", []) == []
    image = batch["image"]
    # the images as decoded, for view-based methods: a list (sizes differ), uint8 RGB
    assert isinstance(batch["original"], list) and len(batch["original"]) == len(image)
    assert all(o.dtype == torch.uint8 and o.ndim == 3 and o.shape[0] == 3 for o in batch["original"])
    assert image.dtype == torch.float32
    assert image.shape[1:] == (3, image_size, image_size)
    assert image.min() >= 0 and image.max() <= 1
    assert batch["label"].dtype == torch.long and batch["label"].shape == (len(image),)
    assert batch["index"].dtype == torch.long and batch["index"].shape == (len(image),)
    assert isinstance(batch["domain"], list) and len(batch["domain"]) == len(image)
    assert all(isinstance(d, str) for d in batch["domain"])


# --- the offline world -----------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 32])
def test_world_batches_keep_the_contract(image_size):
    domains = ["clean", "blur", "sketch"]
    datamodule = WorldDataModule(domains=domains, n_per_domain=10, image_size=image_size, batch_size=8)
    batches = predict_batches(datamodule)
    for batch in batches:
        assert_batch_contract(batch, image_size)
    index = torch.cat([b["index"] for b in batches])
    assert len(index) == 10 * len(domains)
    assert len(set(index.tolist())) == len(index)
    assert [d for b in batches for d in b["domain"]] == [d for d in domains for _ in range(10)]
    assert datamodule.class_names == list(CLASS_NAMES)
    assert datamodule.domains == domains


def test_world_data_are_the_rendered_scenes():
    datamodule = WorldDataModule(domains=["clean", "noise"], severity=2, n_per_domain=6, seed=3, batch_size=12)
    (batch,) = predict_batches(datamodule)
    by_index = batch["index"].argsort()  # the stream shuffles; the index keeps each sample's identity
    batch = {"label": batch["label"][by_index], "image": batch["image"][by_index]}
    for k, domain in enumerate(["clean", "noise"]):
        scenes = render_domain(domain, 2, 6, seed=3, size=ORIGINAL_SIZE)
        part = slice(6 * k, 6 * (k + 1))
        assert torch.equal(batch["label"][part], scenes.labels)
        # originals stored as uint8, like real images, then resized + centre-cropped for the model
        originals = (scenes.images * 255).round().to(torch.uint8)
        expected = torch.stack([Preprocess(64)(original) for original in originals])
        torch.testing.assert_close(batch["image"][part], expected, atol=0.5 / 255 + 1e-6, rtol=0)


def test_world_original_is_the_render_and_image_is_made_from_it_as_a_real_image():
    """render_size 64 (the model's input): original and image are the same 64 px render; the
    default 128 renders the same scene finer, and image is its resize to the model's input."""
    small = predict_batches(WorldDataModule(domains=["clean"], n_per_domain=4, batch_size=4, render_size=64))[0]
    assert all(o.shape == (3, 64, 64) for o in small["original"])
    assert all(torch.equal(o.float() / 255, i) for o, i in zip(small["original"], small["image"]))
    large = predict_batches(WorldDataModule(domains=["clean"], n_per_domain=4, batch_size=4))[0]
    assert torch.equal(large["index"], small["index"]) and torch.equal(large["label"], small["label"])
    assert all(o.shape == (3, 128, 128) for o in large["original"]) and large["image"].shape == (4, 3, 64, 64)
    assert (large["image"] - small["image"]).abs().mean() < 0.02  # the same scenes


def test_preprocess_resize_modes():
    from tta.datamodules.preprocess import Preprocess

    wide = torch.zeros(3, 40, 80, dtype=torch.uint8)
    wide[0, :, :20] = 255  # a red left quarter
    shortest = Preprocess(20, "shortest")(wide)  # shorter side to 20, centre crop: the red is cut away
    squash = Preprocess(20, "squash")(wide)  # both sides to 20: the red quarter stays (5 px)
    longest = Preprocess(20, "longest")(wide)  # longer side to 20, padded: 10 rows of image, black bars
    assert shortest.shape == squash.shape == longest.shape == (3, 20, 20)
    assert shortest[0].max() < 0.1 and squash[0, :, :4].min() > 0.9
    assert longest[:, :4].max() == 0 and longest[0, 10, :4].min() > 0.9
    with pytest.raises(ValueError, match="data.resize_mode"):
        Preprocess(20, "crop")
    with pytest.raises(ValueError, match="data.interpolation"):
        Preprocess(20, "shortest", "lanczos")


def test_image_folder_originals_are_the_files_as_decoded(image_tree):
    datamodule = ImageFolderDataModule(image_tree, image_size=24, batch_size=8, stream="sorted")
    (batch,) = predict_batches(datamodule)
    sizes = [tuple(o.shape) for o in batch["original"]]
    assert sizes == [(3, 30, 40 + 8 * i) for folder in sorted(FAKE_TREE) for i in range(len(FAKE_TREE[folder]))]


def test_world_all_domains():
    from tta.world import DOMAINS

    assert WorldDataModule(n_per_domain=1).domains == list(DOMAINS)
    assert WorldDataModule(domains="blur", n_per_domain=1).domains == ["blur"]


@pytest.mark.parametrize(
    "kwargs", [{"domains": []}, {"domains": ["clean", "clean"]}, {"severity": 0}, {"severity": 6}, {"n_per_domain": 0}]
)
def test_world_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        WorldDataModule(**kwargs)


# --- image folders ---------------------------------------------------------------------------


def test_image_folder_batches_keep_the_contract(image_tree):
    datamodule = ImageFolderDataModule(image_tree, image_size=24, batch_size=3, stream="sorted")
    batches = predict_batches(datamodule)
    for batch in batches:
        assert_batch_contract(batch, 24)
    labels = torch.cat([b["label"] for b in batches]).tolist()
    folders = sorted(FAKE_TREE)
    assert labels == [k for k, folder in enumerate(folders) for _ in FAKE_TREE[folder]]
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert index == list(range(len(labels)))
    assert {d for b in batches for d in b["domain"]} == {"images"}


def test_image_folder_class_names_from_folders(image_tree):
    datamodule = ImageFolderDataModule(image_tree, image_size=24)
    assert datamodule.class_names == ["apple", "golden retriever", "zebra fish"]
    assert datamodule.name == "images" and datamodule.domains == ["images"]


def test_image_folder_given_class_names_and_domain(image_tree):
    datamodule = ImageFolderDataModule(
        image_tree, class_names=["red apple", "dog", "fish"], domain="photos", image_size=24
    )
    assert datamodule.class_names == ["red apple", "dog", "fish"]
    assert datamodule.domains == ["photos"]
    assert predict_batches(datamodule)[0]["domain"][0] == "photos"


def test_image_folder_converts_grey_and_rgba_to_rgb(image_tree):
    datamodule = ImageFolderDataModule(image_tree, image_size=24)
    samples = {path.parent.name + "/" + path.name: i for i, (path, *_) in enumerate(datamodule.dataset.samples)}
    grey = datamodule.dataset[samples["apple/img_1.png"]]["image"]
    assert grey.shape == (3, 24, 24)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    rgba = datamodule.dataset[samples["golden_retriever/img_0.png"]]["image"]
    assert rgba.shape == (3, 24, 24)
    assert not torch.equal(rgba[0], rgba[1])


def test_image_folder_ignores_other_files(image_tree):
    (image_tree / "apple" / "notes.txt").write_text("not an image")
    (image_tree / ".cache").mkdir()
    datamodule = ImageFolderDataModule(image_tree, image_size=24)
    assert len(datamodule.dataset) == sum(len(v) for v in FAKE_TREE.values())
    assert len(datamodule.class_names) == len(FAKE_TREE)


# --- metrics ---------------------------------------------------------------------------------


def test_ece_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    n, c = 500, 7
    probs = (torch.randn(n, c, generator=g) * 2).softmax(-1)
    label = torch.randint(0, c, (n,), generator=g)
    confidence, pred = probs.max(-1)
    metrics = classification_metrics(pred, label, confidence)
    expected = multiclass_calibration_error(probs, label, num_classes=c, n_bins=15, norm="l1")
    assert metrics["n"] == n
    assert metrics["accuracy"] == pytest.approx((pred == label).double().mean().item())
    assert metrics["ece"] == pytest.approx(expected.item(), abs=1e-6)


def test_unknown_labels_are_excluded():
    pred = torch.tensor([0, 1, 2, 1, 0])
    label = torch.tensor([0, -1, 2, -1, 1])
    confidence = torch.tensor([0.9, 0.8, 0.6, 0.7, 0.5])
    known = label >= 0
    metrics = classification_metrics(pred, label, confidence)
    assert metrics == classification_metrics(pred[known], label[known], confidence[known])
    assert metrics["n"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    unlabelled = classification_metrics(pred, torch.full_like(label, -1), confidence)
    assert unlabelled == {"n": 0, "accuracy": None, "ece": None}


def test_summarize_per_domain():
    out = summarize(pred=[0, 1, 1, 2], label=[0, 0, 1, 2], confidence=[0.9, 0.6, 0.8, 0.7], domain=["b", "a", "a", "b"])
    assert list(out["domains"]) == ["b", "a"]
    assert out["n"] == 4 and out["accuracy"] == pytest.approx(0.75)
    assert out["domains"]["b"]["accuracy"] == 1.0 and out["domains"]["a"]["accuracy"] == 0.5
    assert out["domains"]["a"]["n"] == out["domains"]["b"]["n"] == 2
