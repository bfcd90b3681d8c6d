"""Compositional datamodules: the offline world's groups (captions differ by the swap alone) and
the readers of Winoground, MMVP-VLM, SugarCrepe and What'sUp on small fake copies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_vlm, mmvp_vlm_tree, sugarcrepe_tree, whatsup_tree, winoground_tree

from tta.datamodules import (
    MMVPVLMDataModule,
    SugarCrepeDataModule,
    WhatsUpDataModule,
    WinogroundDataModule,
    WorldGroupsDataModule,
)
from tta.tasks import GroupScorer
from tta.world import COLOUR_NAMES, SHAPES
from tta.world.groups import render_groups


def batches(datamodule):
    return list(datamodule.predict_dataloader())


def objects(caption: str) -> tuple[tuple[str, str], str, tuple[str, str]]:
    """ "a red circle left of a blue square." -> ((red, circle), "left of", (blue, square))."""
    words = caption.rstrip(".").split()
    return (words[1], words[2]), " ".join(words[3:-3]), (words[-2], words[-1])


# --- the offline world ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relation", "colour", "shape"])
def test_world_group_captions_differ_by_the_swap_alone(kind):
    groups = render_groups(kind, 20, seed=1)
    assert groups.images.shape == (20, 2, 3, 64, 64)
    for a, b in groups.captions:
        assert a != b and sorted(a.rstrip(".").split()) == sorted(b.rstrip(".").split())  # same words
        (c1, s1), rel, (c2, s2) = objects(a)
        (d1, t1), rel_b, (d2, t2) = objects(b)
        assert rel == rel_b and c1 != c2 and s1 != s2
        assert c1 in COLOUR_NAMES and s1 in SHAPES
        expected = {"relation": ((c2, s2), (c1, s1)), "colour": ((c2, s1), (c1, s2)), "shape": ((c1, s2), (c2, s1))}[
            kind
        ]
        assert ((d1, t1), (d2, t2)) == expected
    # the two images of a group share their background and differ where the objects are
    diff = (groups.images[:, 0] - groups.images[:, 1]).abs().amax(1)
    changed = (diff > 1e-6).float().mean((1, 2))
    assert ((changed > 0) & (changed < 0.3)).all()


def test_world_groups_same_scenes_in_every_domain():
    clean = render_groups("colour", 5, seed=2)
    texture = render_groups("colour", 5, seed=2, domain="texture", severity=3)
    assert clean.captions == texture.captions and not torch.equal(clean.images, texture.images)
    assert torch.equal(render_groups("colour", 5, seed=2).images, clean.images)


def test_world_groups_datamodule_contract():
    datamodule = WorldGroupsDataModule(
        kinds=["colour", "shape"], domains=["clean", "blur@1"], n_per_cell=3, image_size=32, batch_size=5
    )
    found = batches(datamodule)
    batch = found[0]
    assert batch["images"].shape == (5, 2, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    assert len(batch["captions"]) == 5 and all(len(c) == 2 for c in batch["captions"])
    assert torch.cat([b["index"] for b in found]).tolist() == list(range(12))
    assert [d for b in found for d in b["domain"]] == ["clean"] * 6 + ["blur@1"] * 6
    assert [k for b in found for k in b["kind"]][:6] == ["colour"] * 3 + ["shape"] * 3
    assert datamodule.domains == ["clean", "blur@1"] and datamodule.kinds == ["colour", "shape"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ["size"]}, "swap kind"),
        ({"domains": ["fog"]}, "domain"),
        ({"domains": ["noise@9"]}, "severity"),
        ({"domains": ["clean", "clean"]}, "repeat"),
        ({"n_per_cell": 0}, "n_per_cell"),
    ],
)
def test_world_groups_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldGroupsDataModule(**kwargs)


# --- readers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["parquet", "zip", "unzipped"])
@pytest.mark.parametrize("in_data", [False, True])
def test_winoground_reads_the_hub_copy_in_every_layout(tmp_path, layout, in_data):
    # the hub copy today: data/test-00000-of-00001.parquet with the images embedded; before:
    # data/examples.jsonl + data/images.zip; root is the copy or its data/ folder
    root = winoground_tree(tmp_path / layout, layout=layout)
    datamodule = WinogroundDataModule(root / "data" if in_data else root, image_size=16, batch_size=2)
    found = batches(datamodule)
    assert [len(b["index"]) for b in found] == [2, 1]
    assert found[0]["images"].shape == (2, 2, 3, 16, 16)
    assert found[0]["captions"][1] == ["a mug left of a cat 1", "a cat left of a mug 1"]
    assert found[0]["kind"] == ["Object", "Relation"] and datamodule.kinds == ["Object", "Relation"]
    assert datamodule.domains == ["winoground"]
    # the pixels are the embedded images'
    reference = WinogroundDataModule(winoground_tree(tmp_path / "ref", layout="unzipped"), image_size=16)
    assert torch.equal(batches(reference)[0]["images"], torch.cat([b["images"] for b in found]))


def test_whatsup_reads_the_repository_from_either_root(tmp_path):
    files = ["controlled_images_dataset", "controlled_clevr_dataset"]
    repo = whatsup_tree(tmp_path / "whatsup_vlms", files=files)
    for root in (repo, repo / "data"):  # image paths are relative to the repository: data/controlled_images/...
        (batch,) = batches(WhatsUpDataModule(root, files=files, image_size=16))
        assert batch["images"].shape == (4, 1, 3, 16, 16) and batch["captions"][0][0] == "a mug on a table"
        assert batch["domain"] == ["controlled_images_dataset"] * 2 + ["controlled_clevr_dataset"] * 2


def test_whatsup_reads_the_coco_and_visual_genome_questions(tmp_path):
    files = ["coco_qa_one_obj", "coco_qa_two_obj", "vg_qa_one_obj", "vg_qa_two_obj"]
    repo = whatsup_tree(tmp_path / "whatsup_vlms", files=files)
    datamodule = WhatsUpDataModule(repo, files=files, image_size=16)
    assert datamodule.groups[0].images[0] == repo / "data" / "val2017" / "000000397133.jpg"
    assert datamodule.groups[-1].images[0] == repo / "data" / "vg_images" / "397164.jpg"
    (batch,) = batches(datamodule)
    assert batch["images"].shape == (8, 1, 3, 16, 16)
    assert batch["captions"][0] == ["a mug above a table 0", "a mug below a table 0"]
    assert datamodule.domains == files


def test_mmvp_vlm_reader_pairs_consecutive_rows(tmp_path):
    datamodule = MMVPVLMDataModule(mmvp_vlm_tree(tmp_path), image_size=16)
    (batch,) = batches(datamodule)
    assert batch["images"].shape == (2, 2, 3, 16, 16)
    assert batch["captions"][0] == ["The dog is facing left, pair 0", "The dog is facing right, pair 0"]
    assert batch["kind"] == ["Orientation and Direction", "Color and Appearance"]
    assert datamodule.groups[1].images[1].name == "4.jpg"


def test_sugarcrepe_and_whatsup_are_1_x_k(tmp_path):
    sugar = SugarCrepeDataModule(sugarcrepe_tree(tmp_path / "sc"), files=["replace_rel", "swap_att"], image_size=16)
    (batch,) = batches(sugar)
    assert batch["images"].shape == (4, 1, 3, 16, 16)
    assert batch["captions"][0] == ["a dog on a sofa 0", "a sofa on a dog 0"]
    assert sugar.domains == ["replace_rel", "swap_att"]
    whatsup = WhatsUpDataModule(whatsup_tree(tmp_path / "wu"), image_size=16)
    (batch,) = batches(whatsup)
    assert batch["images"].shape == (2, 1, 3, 16, 16) and len(batch["captions"][0]) == 4
    assert batch["captions"][0][0] == "a mug on a table"


def test_group_scorer_rows_for_1_x_k(tmp_path):
    vlm = make_tiny_vlm("tta-tiny-clip")
    (batch,) = batches(WhatsUpDataModule(whatsup_tree(tmp_path), image_size=vlm.image_size[0]))
    module = GroupScorer(vlm)
    with torch.no_grad():
        out = module.predict_step(batch, 0)
    assert out["scores"].shape == (2, 1, 4)
    rows = module.prediction_rows(out)
    assert rows[0]["shape"] == "1x4" and rows[0]["group_score"] is None and rows[0]["text_score"] in (0, 1)
    summary = module.summarize_predictions([{k: "" if v is None else str(v) for k, v in r.items()} for r in rows])
    assert summary["group_score"] is None and summary["text_score"] is not None and "group_score_zs" not in summary


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WinogroundDataModule(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="examples.jsonl"):
        WinogroundDataModule(tmp_path / "empty")
    root = winoground_tree(tmp_path / "missing", layout="unzipped")
    (root / "data" / "images" / "ex_1_img_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        WinogroundDataModule(root)
    bare = winoground_tree(tmp_path / "bare", layout="zip")
    (bare / "data" / "images.zip").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        WinogroundDataModule(bare)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "examples.jsonl").write_text(json.dumps({"id": 0, "image_0": "a"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        WinogroundDataModule(bad)
    odd = mmvp_vlm_tree(tmp_path / "odd")
    (odd / "Questions.csv").write_text((odd / "Questions.csv").read_text() + "5,Color and Appearance,one more\n")
    with pytest.raises(ValueError, match="even"):
        MMVPVLMDataModule(odd)
    sugar = sugarcrepe_tree(tmp_path / "sc", files=["swap_att"])
    (sugar / "swap_att.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="SugarCrepe"):
        SugarCrepeDataModule(sugar, files=["swap_att"])
    mixed = whatsup_tree(tmp_path / "wu", files=["controlled_images_dataset", "coco_qa_one_obj"])
    with pytest.raises(ValueError, match="mixes group shapes"):
        WhatsUpDataModule(mixed, files=["controlled_images_dataset", "coco_qa_one_obj"])
    (mixed / "data" / "coco_qa_one_obj.json").write_text(json.dumps([{"image_path": "x.jpg"}]))
    with pytest.raises(ValueError, match=r"\[image_id, correct_caption, wrong_caption\]"):
        WhatsUpDataModule(mixed, files=["coco_qa_one_obj"])


def test_a_group_that_fails_to_decode_is_skipped_and_counted(tmp_path):
    root = winoground_tree(tmp_path, layout="unzipped")
    (root / "data" / "images" / "ex_2_img_1.png").write_bytes(b"not an image")
    datamodule = WinogroundDataModule(root, image_size=16, batch_size=8)
    (batch,) = batches(datamodule)
    assert batch["index"].tolist() == [0, 1] and batch["skipped_images"] == 1
    (whole,) = list(datamodule.whole_set_dataloader())
    assert whole["index"].tolist() == [0, 1]
