"""The real benchmarks' datamodules on small fake trees of their download layouts: labels follow
the folder semantics, split files are read right, and each bad layout gets its message."""

from __future__ import annotations

import json
import warnings
from importlib.resources import files

import pytest
import torch
from conftest import cifar10_c_tree, split_tree
from conftest import class_tree as tree

from tta.datamodules import (
    CIFAR10CDataModule,
    FineGrainedDataModule,
    ImageFolderDataModule,
    ImageNetCDataModule,
    ImageNetDataModule,
    ImageNetV2DataModule,
)
from tta.datamodules.corrupted import CORRUPTIONS, EXTRA_CORRUPTIONS
from tta.datamodules.fine_grained import DATASETS, fine_grained_class_names
from tta.datamodules.imagenet import DUPLICATE_RENAMES, imagenet_classes, imagenet_metadata


def batches(datamodule):
    return list(datamodule.predict_dataloader())


def labels_by_folder(datamodule) -> dict[str, set[int]]:
    """Folder name of each yielded image -> the labels given to it."""
    out: dict[str, set[int]] = {}
    for batch in batches(datamodule):
        for i, label in zip(batch["index"].tolist(), batch["label"].tolist()):
            out.setdefault(datamodule.dataset.samples[i][0].parent.name, set()).add(label)
    return out


# --- class names -------------------------------------------------------------------------------


def test_imagenet_names_are_clips_and_the_unique_list_changes_only_the_duplicates():
    raw = json.loads(files("tta.data").joinpath("imagenet.json").read_text())
    _, names = imagenet_classes("imagenet")
    assert names == raw["classnames"] and len(set(names)) == 998  # "missile", "sunglasses" twice
    wnids, unique = imagenet_classes("imagenet", "unique")
    assert len(unique) == len(set(unique)) == 1000
    changed = [wnid for wnid, a, b in zip(wnids, names, unique) if a != b]
    assert changed == sorted(DUPLICATE_RENAMES)


@pytest.mark.parametrize("variant", ["imagenet_a", "imagenet_r"])
def test_200_class_subsets_map_to_the_right_names(variant):
    wnids, names = imagenet_classes(variant)
    meta = imagenet_metadata()
    assert len(wnids) == len(names) == 200
    for wnid, name in zip(wnids, names):
        assert meta["classnames"][meta["wnids"].index(wnid)] == name


# --- ImageNet and variants ---------------------------------------------------------------------


def test_imagenet_labels_follow_the_wordnet_ids(tmp_path):
    wnids, names = imagenet_classes("imagenet")
    root = tree(tmp_path / "val", wnids)
    datamodule = ImageNetDataModule(root, image_size=8, batch_size=256)
    assert datamodule.class_names == names and datamodule.domains == ["imagenet"]
    assert labels_by_folder(datamodule) == {wnid: {label} for label, wnid in enumerate(wnids)}
    assert names[1] == "goldfish" and wnids[1] == "n01443537"


@pytest.mark.parametrize("variant", ["imagenet_a", "imagenet_r"])
def test_subset_variants_predict_over_their_200_classes(tmp_path, variant):
    wnids, names = imagenet_classes(variant)
    root = tree(tmp_path / variant, wnids)
    datamodule = ImageNetDataModule(root, variant=variant, image_size=8, batch_size=256)
    assert len(datamodule.class_names) == 200 and datamodule.name == variant
    found = labels_by_folder(datamodule)
    assert {wnid: datamodule.class_names[label] for wnid, (label,) in found.items()} == dict(zip(wnids, names))


def test_imagenet_v2_folders_are_integer_labels_not_string_order(tmp_path):
    root = tree(tmp_path / "imagenetv2-matched-frequency-format-val", [str(k) for k in range(1000)])
    datamodule = ImageNetV2DataModule(root, image_size=8, batch_size=500, stream="sorted")
    found = labels_by_folder(datamodule)
    assert found["2"] == {2} and found["10"] == {10} and found["999"] == {999}
    assert all(found[str(k)] == {k} for k in range(1000))
    assert datamodule.class_names == imagenet_classes("imagenet")[1]


def test_imagenet_sketch_uses_all_classes(tmp_path):
    wnids, _ = imagenet_classes("imagenet_sketch")
    datamodule = ImageNetDataModule(tree(tmp_path / "sketch", wnids), variant="imagenet_sketch", image_size=8)
    assert len(datamodule.class_names) == 1000 and datamodule.domains == ["imagenet_sketch"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("parent", "looks like the parent of the class folders"),
        ("missing", "does not exist"),
        ("few", "has 3 class folders but ImageNet-A has 200 classes"),
        ("unknown", "not ImageNet WordNet ids: ['n99999999']"),
        ("foreign", "outside the 200 of ImageNet-A"),
    ],
)
def test_imagenet_bad_layouts(tmp_path, layout, message):
    wnids, _ = imagenet_classes("imagenet_a")
    root = tmp_path / "imagenet-a"
    if layout == "parent":
        tree(root / "imagenet-a", wnids[:2])
    elif layout == "few":
        tree(root, wnids[:3])
    elif layout == "unknown":
        tree(root, [*wnids, "n99999999"])
    elif layout == "foreign":
        tree(root, [*wnids, next(w for w in imagenet_classes("imagenet")[0] if w not in wnids)])
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
        ImageNetDataModule(root, variant="imagenet_a")


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        ([str(k) for k in range(999)], "has 999 label folders but ImageNet-V2 has 1000"),
        ([*map(str, range(1000)), "cat"], "not labels 0..999: ['cat']"),
        ([*map(str, range(1000)), "1000"], "not labels 0..999: ['1000']"),
    ],
)
def test_imagenet_v2_bad_layouts(tmp_path, folders, message):
    root = tree(tmp_path / "v2", folders)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ImageNetV2DataModule(root)


# --- images that fail to decode ----------------------------------------------------------------


def test_undecodable_images_are_skipped_and_counted(image_tree):
    (image_tree / "apple" / "broken.jpg").write_bytes(b"not a jpeg")
    (image_tree / "zebra_fish" / "truncated.png").write_bytes(
        (image_tree / "zebra_fish" / "img_0.png").read_bytes()[:60]
    )
    datamodule = ImageFolderDataModule(image_tree, image_size=8, batch_size=2, stream="sorted")
    found = batches(datamodule)
    assert all(
        set(b) == {"image", "original", "label", "index", "domain", "skipped_images", "skipped_paths"} for b in found
    )
    assert sorted(p.rsplit("/", 1)[-1] for b in found for p in b["skipped_paths"]) == ["broken.jpg", "truncated.png"]
    index = torch.cat([b["index"] for b in found]).tolist()
    assert len(index) == len(datamodule.dataset) - 2 and sum(b["skipped_images"] for b in found) == 2
    paths = [datamodule.dataset.samples[i][0].name for i in index]
    assert "broken.jpg" not in paths and "truncated.png" not in paths


def test_skipped_images_reach_metrics_json(image_tree, tmp_path):
    import pytorch_lightning as pl
    from conftest import make_tiny_vlm

    from tta.callbacks import PredictionWriter
    from tta.tasks import ZeroShotClassifier

    (image_tree / "apple" / "broken.jpg").write_bytes(b"not a jpeg")
    vlm = make_tiny_vlm("tta-tiny-clip")
    datamodule = ImageFolderDataModule(image_tree, image_size=vlm.image_size[0], batch_size=4)
    writer = PredictionWriter(tmp_path / "run")
    trainer = pl.Trainer(logger=False, callbacks=[writer], enable_progress_bar=False, accelerator="cpu")
    trainer.predict(
        ZeroShotClassifier(vlm, class_names=datamodule.class_names), datamodule=datamodule, return_predictions=False
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["n"] == len(datamodule.dataset) - 1


# --- ImageNet-C --------------------------------------------------------------------------------


def test_imagenet_c_domains_and_labels(tmp_path):
    wnids, _ = imagenet_classes("imagenet")
    for corruption in ("fog", "snow"):
        for severity in (3, 5):
            tree(tmp_path / "imagenet-c" / corruption / str(severity), wnids)
    datamodule = ImageNetCDataModule(
        tmp_path / "imagenet-c",
        corruptions=["fog", "snow"],
        severities=[3, 5],
        image_size=8,
        batch_size=1000,
        stream="sorted",
    )
    assert datamodule.domains == ["fog_3", "fog_5", "snow_3", "snow_5"]
    found = batches(datamodule)
    domains = [d for b in found for d in b["domain"]]
    assert domains == [d for d in datamodule.domains for _ in range(1000)]  # domains follow each other
    labels = torch.cat([b["label"] for b in found])
    assert labels.tolist() == list(range(1000)) * 4


def test_imagenet_c_reads_the_four_extra_corruptions_of_the_official_download(tmp_path):
    wnids, _ = imagenet_classes("imagenet")
    for corruption in ("speckle_noise", "saturate"):
        tree(tmp_path / "imagenet-c" / corruption / "5", wnids)
    datamodule = ImageNetCDataModule(tmp_path / "imagenet-c", corruptions=["speckle_noise", "saturate"])
    assert datamodule.domains == ["speckle_noise_5", "saturate_5"]
    for corruption in EXTRA_CORRUPTIONS:  # speckle_noise, gaussian_blur, spatter, saturate: known names
        with pytest.raises(FileNotFoundError, match="corruption folders"):
            ImageNetCDataModule(tmp_path / "imagenet-c", corruptions=[corruption, "fog"])
    assert len(CORRUPTIONS) == 15  # "all" stays the benchmark's 15


def test_imagenet_c_pixels_are_the_files(tmp_path):
    """Pre-generated corruptions: the same file gives the same pixels on every pass."""
    wnids, _ = imagenet_classes("imagenet")
    tree(tmp_path / "c" / "fog" / "5", wnids)
    first = batches(ImageNetCDataModule(tmp_path / "c", corruptions="fog", image_size=8, batch_size=1000))
    again = batches(ImageNetCDataModule(tmp_path / "c", corruptions="fog", image_size=8, batch_size=1000))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corruptions": ["fogg"]}, "unknown or no corruptions"),
        ({"severities": [6]}, "severities must be a non-empty list of 1..5"),
        ({"corruptions": ["snow"]}, r"corruption folders \['snow'\] not in"),
    ],
)
def test_imagenet_c_bad_settings(tmp_path, kwargs, message):
    (tmp_path / "c" / "fog" / "5").mkdir(parents=True)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ImageNetCDataModule(tmp_path / "c", **kwargs)


def test_imagenet_c_parent_folder_is_named(tmp_path):
    wnids, _ = imagenet_classes("imagenet")
    tree(tmp_path / "data" / "imagenet-c" / "fog" / "5", wnids[:1])
    with pytest.raises(FileNotFoundError, match="set data.root to .*imagenet-c"):
        ImageNetCDataModule(tmp_path / "data", corruptions=["fog"])
    assert len(CORRUPTIONS) == 15


# --- the fine-grained split files --------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_fine_grained_split_files(tmp_path, dataset):
    root = split_tree(tmp_path / DATASETS[dataset][0], dataset)
    datamodule = FineGrainedDataModule(root, dataset=dataset, image_size=8, batch_size=512, stream="sorted")
    names = fine_grained_class_names(dataset)
    assert datamodule.class_names == names and datamodule.domains == [dataset]
    found = batches(datamodule)
    assert torch.cat([b["label"] for b in found]).tolist() == list(range(len(names)))
    for i, label in zip(torch.cat([b["index"] for b in found]).tolist(), torch.cat([b["label"] for b in found])):
        assert f"c{int(label):03d}" in str(datamodule.dataset.samples[i][0])


def test_fine_grained_reads_the_asked_split(tmp_path):
    root = split_tree(tmp_path / "dtd", "dtd")
    table = json.loads((root / DATASETS["dtd"][2]).read_text())
    table["val"] = table["test"] * 2
    (root / DATASETS["dtd"][2]).write_text(json.dumps(table))
    assert len(FineGrainedDataModule(root, "dtd", split="val", image_size=8).dataset) == 2 * 47
    assert len(FineGrainedDataModule(root, "dtd", split="test", image_size=8).dataset) == 47


def test_fine_grained_bad_layouts(tmp_path):
    root = split_tree(tmp_path / "data" / "eurosat", "eurosat")
    with pytest.raises(FileNotFoundError, match="set data.root to .*eurosat"):
        FineGrainedDataModule(tmp_path / "data", "eurosat")
    with pytest.raises(ValueError, match="unknown fine-grained data set 'imagenet'"):
        FineGrainedDataModule(root, "imagenet")
    with pytest.raises(ValueError, match="unknown split"):
        FineGrainedDataModule(root, "eurosat", split="testing")
    (root / DATASETS["dtd"][2]).write_text((root / DATASETS["eurosat"][2]).read_text())
    with pytest.raises(ValueError, match="over 10 classes but dtd has 47 classes"):
        FineGrainedDataModule(root, "dtd")
    (root / "2750" / "c003" / "0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of the test split"):
        FineGrainedDataModule(root, "eurosat")


def test_cifar10_c_reads_the_right_severity_block_and_labels(tmp_path):
    root = cifar10_c_tree(tmp_path / "CIFAR-10-C", ["fog", "snow"], per_severity=4)
    datamodule = CIFAR10CDataModule(
        root, corruptions=["fog", "snow"], severities=[2, 5], image_size=32, batch_size=4, stream="sorted"
    )
    assert datamodule.domains == ["fog_2", "fog_5", "snow_2", "snow_5"]
    assert datamodule.class_names[0] == "airplane" and len(datamodule.class_names) == 10
    batches = list(datamodule.predict_dataloader())
    first = batches[0]
    assert first["image"].shape == (4, 3, 32, 32) and first["domain"] == ["fog_2"] * 4
    # severity 2 is the second block of 4 rows: pixel values 40 + row, labels (4 + row) % 10
    assert sorted(round(v * 255) for v in first["image"][:, 0, 0, 0].tolist()) == [40, 41, 42, 43]
    assert sorted(first["label"].tolist()) == [4, 5, 6, 7]
    upsampled = CIFAR10CDataModule(root, corruptions="fog", severities=[1], image_size=64, batch_size=2)
    assert next(iter(upsampled.predict_dataloader()))["image"].shape == (2, 3, 64, 64)


def test_cifar10_c_reads_its_read_only_memory_maps_without_a_warning(tmp_path):
    root = cifar10_c_tree(tmp_path / "CIFAR-10-C", ["fog"])
    datamodule = CIFAR10CDataModule(root, corruptions=["fog"], image_size=32)
    assert not datamodule.dataset.arrays["fog"].flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns "The given NumPy array is not writable" on a read-only view
        assert datamodule.dataset[0]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"corruptions": ["rain"]}, "rain"),
        ({"severities": [6]}, "severities"),
        ({"corruptions": ["snow"]}, "snow.npy"),
    ],
)
def test_cifar10_c_errors_name_the_fix(tmp_path, kwargs, match):
    root = cifar10_c_tree(tmp_path / "c", ["fog"])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        CIFAR10CDataModule(root, **{"corruptions": ["fog"], **kwargs})


def test_cifar10_c_parent_folder_is_named(tmp_path):
    cifar10_c_tree(tmp_path / "parent" / "CIFAR-10-C", ["fog"])
    with pytest.raises(FileNotFoundError, match="set data.root to .*CIFAR-10-C"):
        CIFAR10CDataModule(tmp_path / "parent", corruptions="fog")
