"""The card tier: every experiment card runs end to end through ``tta-predict experiment=...`` on CPU,
on the card's real architecture with random weights, over a fake tree of the card's real on-disk
layout with real image sizes; the settings that decide published numbers are asserted on what the
run did (activation, preprocessing, precision, class names, views and candidates).

Small where it can be without changing a card: open_clip towers cut to one block per stage
(``tests/card_probe.py``; widths, activation, tokenizer, context length and preprocessing as they
are), two images (``trainer.limit_predict_batches=1``), ten views. The cards' fp16 autocast is
asserted on their composed config; the runs themselves are fp32 (``trainer.precision=32-true``):
Lightning has no fp16 on a CPU and swaps in bf16, which a CPU without bf16 units emulates about
100x slower than fp32 (one TPT card took over 10 minutes). These runs take minutes, so they carry
the ``slow`` marker: CI runs them; ``pytest -m "not slow"`` skips them locally.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import console_script
from PIL import Image

from tta.datamodules.fine_grained import DATASETS, _listed_names
from tta.datamodules.imagenet import imagenet_classes

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
#: ImageNet's validation photos are mostly 500 x 375; ImageNet-C's are 224 x 224; Food-101's 512 px.
PHOTO, CORRUPTED, FOOD = (500, 375), (224, 224), (512, 384)


def photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth JPEG (small on disk, unlike noise) of ``size`` (width, height): colour gradients."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramps = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-1, 1, 3) + np.linspace(0, 1, height)[:, None, None]
    pixels = (np.clip(ramps * rng.uniform(40, 120, 3) + rng.uniform(0, 120, 3), 0, 255)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """ImageNet val (``<wnid>/ILSVRC2012_val_*.JPEG``), ImageNet-A (its 200 ``<wnid>/*.jpg``),
    ImageNet-C (``fog/5/<wnid>/*.JPEG``) and Food-101 in CoOp's split-file layout
    (``images/<class>/<id>.jpg`` + ``split_zhou_Food101.json``). Eight distinct photos per size,
    hard-linked into every folder (thousands of files in seconds)."""
    root = tmp_path_factory.mktemp("cards")
    sources = {}
    for size in (PHOTO, CORRUPTED, FOOD):
        sources[size] = [root / "sources" / f"{size[0]}x{size[1]}_{k}.jpg" for k in range(8)]
        for k, path in enumerate(sources[size]):
            photo(path, size, seed=k)

    def place(path: Path, size: tuple[int, int], k: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[size][k % 8], path)

    wnids, _ = imagenet_classes("imagenet")
    for k, wnid in enumerate(wnids):
        place(root / "imagenet" / wnid / f"ILSVRC2012_val_{k + 1:08d}.JPEG", PHOTO, k)
        place(root / "imagenet_c" / "fog" / "5" / wnid / f"ILSVRC2012_val_{k + 1:08d}.JPEG", CORRUPTED, k)
    for k, wnid in enumerate(imagenet_classes("imagenet_a")[0]):
        place(root / "imagenet-a" / wnid / f"{k:04d}.jpg", PHOTO, k)
    _, image_dir, split_name = DATASETS["food101"]
    entries = []
    for label, name in enumerate(_listed_names("food101")):
        place(root / "food-101" / image_dir / name / f"{100 + label}.jpg", FOOD, label)
        entries.append([f"{name}/{100 + label}.jpg", label, name])
    (root / "food-101" / split_name).write_text(json.dumps({"train": entries[:1], "val": entries[:1], "test": entries}))
    return {
        "imagenet": root / "imagenet",
        "imagenet_a": root / "imagenet-a",
        "imagenet_c": root / "imagenet_c",
        "food101": root / "food-101",
    }


def run_card(card: str, overrides: list[str], out: Path, probe: bool = True, cut: bool = True) -> dict:
    """``tta-predict experiment=<card> ...`` in a subprocess; returns the composed config, the
    metrics and (with ``probe``) what the probe recorded."""
    args = [f"experiment={card}", f"hydra.run.dir={out}", "trainer.enable_progress_bar=false", "print_table=false"]
    args += ["trainer.precision=32-true"]  # see the module doc; the card's own precision is asserted apart
    if cut:
        args += ["model.vlm._target_=card_probe.create_cut_vlm", "+model.vlm.blocks=1", "model.vlm.load_weights=false"]
    if probe:
        args += ["+tta.callbacks.probe._target_=card_probe.Probe", f"+tta.callbacks.probe.path={out / 'probe.json'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [str(console_script("tta-predict")), *args, *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "config": yaml.safe_load((out / ".hydra" / "config.yaml").read_text()),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "probe": json.loads((out / "probe.json").read_text()) if probe else None,
    }


SMALL = ["+trainer.limit_predict_batches=1", "data.batch_size=2", "data.num_workers=0"]


def assert_openai_clip_preprocessing(probe: dict, originals: tuple[int, int]) -> None:
    """OpenAI CLIP as the reference: QuickGELU, shorter side to 224 bicubic + centre crop, CLIP's
    mean/std in the model; the batch carries the images as decoded (uint8, their real size)."""
    assert probe["activations"] == ["QuickGELU"]
    assert probe["preprocessing"] == {"image_size": 224, "resize_mode": "shortest", "interpolation": "bicubic"}
    assert probe["mean"] == pytest.approx(OPENAI_MEAN) and probe["context_length"] == 77
    for batch in probe["batches"]:
        assert batch["image"][1:] == [3, 224, 224] and batch["original_dtype"] == "torch.uint8"
        assert all(shape == [3, originals[1], originals[0]] for shape in batch["original"])


def assert_imagenet_names(probe: dict) -> None:
    """CLIP's list as TPT prompts with it: 1000 names, "missile" and "sunglasses" twice."""
    assert probe["class_names"]["n"] == 1000 and probe["class_names"]["duplicates"] == ["missile", "sunglasses"]


def assert_fp16_card(card: str) -> None:
    """The card itself sets fp16 autocast (16-mixed), as the reference; the tier's runs are fp32."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        assert compose("predict", overrides=[f"experiment={card}", "trainer=gpu"]).trainer.precision == "16-mixed"


def assert_imagenet_a_names(probe: dict) -> None:
    assert probe["class_names"]["n"] == 200 and probe["class_names"]["duplicates"] == []


@pytest.mark.parametrize("card", ["tpt_imagenet_vit_b16", "tpt_imagenet_rn50"])
def test_tpt_imagenet_cards(card, trees, tmp_path):
    """On the card's ImageNet-A variant: its 200 classes keep the text tower's backward cheap (the
    1000 ImageNet names are checked by the zero-shot and STS cards)."""
    overrides = [f"data.root={trees['imagenet_a']}", "data.variant=imagenet_a", *SMALL, "tta.callbacks.tpt.n_views=10"]
    result = run_card(card, overrides, tmp_path)
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, PHOTO)
    assert_imagenet_a_names(probe)
    assert_fp16_card(card)
    assert probe["episodic"] == [
        {"method": "TPT", "n_views": 10, "views": "crop_flip", "images_per_step": 1, "grad_scaler": False}
    ]
    # the batch once (zero-shot), then each image's 10 views; 10% of them kept (1 of 10)
    assert probe["encoded"] == [[2, 224, 224], [10, 224, 224], [10, 224, 224]]
    assert probe["selected"] == [[10, 1], [10, 1]]
    assert result["metrics"]["n"] == 2 and result["metrics"]["method"] == "tpt"


def test_sts_card(trees, tmp_path):
    result = run_card(
        "sts_imagenet_vit_b16", [f"data.root={trees['imagenet']}", *SMALL, "tta.callbacks.sts.n_views=10"], tmp_path
    )
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, PHOTO)
    assert_imagenet_names(probe)
    assert_fp16_card("sts_imagenet_vit_b16")
    assert [e["n_views"] for e in probe["episodic"]] == [10]
    assert probe["encoded"] == [[2, 224, 224], [20, 224, 224]] and probe["selected"] == [[10, 1]]


def test_zero_shot_card(trees, tmp_path):
    result = run_card("zero_shot_imagenet_vit_b16", [f"data.root={trees['imagenet']}", *SMALL], tmp_path)
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, PHOTO)
    assert_imagenet_names(probe)
    assert_fp16_card("zero_shot_imagenet_vit_b16")
    assert probe["episodic"] == [] and probe["encoded"] == [[2, 224, 224]]


def test_cross_dataset_card_prompts_names_with_spaces_and_augmix_views(trees, tmp_path):
    result = run_card(
        "tpt_cross_dataset_vit_b16",
        [f"data.root={trees['food101']}", "data.dataset=food101", *SMALL, "tta.callbacks.tpt.n_views=10"],
        tmp_path,
    )
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, FOOD)
    assert_fp16_card("tpt_cross_dataset_vit_b16")
    names = probe["class_names"]
    assert names["n"] == 101 and names["with_underscore"] == 0 and names["first"][0] == "apple pie"
    assert probe["episodic"][0]["views"] == "augmix" and probe["selected"] == [[10, 1], [10, 1]]


#: Where the cards of ZERO, MTA and C-TPT run: the tree, its overrides and the original size. Their
#: ImageNet cards run on ImageNet-A (200 classes: 15 s less per run than the 1000 names, which the
#: zero-shot and STS cards check with the same ``class_list``).
WHERE = {
    "imagenet_a": (["data.variant=imagenet_a"], PHOTO),
    "food101": (["data.dataset=food101"], FOOD),
}


def run_views_card(card: str, method: str, where: str, trees: dict[str, Path], out: Path) -> dict:
    """The card on ``where``'s tree, two images, ten views, with the view-feature store off: cards that
    share model, data, views and seed (ZERO's and MTA's cross-dataset cards; C-TPT's and TPT's) would
    otherwise read each other's view features and encode none. The names and preprocessing asserted."""
    data, size = WHERE[where]
    overrides = [f"data.root={trees[where]}", *data, *SMALL, f"tta.callbacks.{method}.n_views=10", "view_store=null"]
    result = run_card(card, overrides, out)
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, size)
    assert_fp16_card(card)
    if where == "imagenet_a":
        assert_imagenet_a_names(probe)
        assert result["config"]["data"]["class_list"] == "clip"  # on ImageNet: the two duplicates kept
    else:
        names = probe["class_names"]
        assert names["n"] == 101 and names["with_underscore"] == 0 and names["first"][0] == "apple pie"
    assert result["metrics"]["n"] == 2 and result["metrics"]["method"] == method
    return result


@pytest.mark.parametrize(
    ("card", "where"),
    [
        ("zero_tta_imagenet_vit_b16", "imagenet_a"),
        ("mta_imagenet_vit_b16", "imagenet_a"),
        ("zero_tta_cross_dataset_vit_b16", "food101"),
        ("mta_cross_dataset_vit_b16", "food101"),
    ],
)
def test_zero_and_mta_cards(card, where, trees, tmp_path):
    """ZERO and MTA as their references run them: crop + flip views on every data set (the fine-grained
    ones too, unlike TPT's AugMix), no backward pass (both images' views encoded in one call, no
    confident-view selection of TPT's), seed 1 as their scripts. ZERO's probabilities are the vote
    shares of its int(10 * 0.3) = 3 kept views: 1 (3 votes), 2/3 (2 + 1) or 1/2 (a three-way tie and
    the tie-break's vote)."""
    method = card.split("_")[0]
    result = run_views_card(card, method, where, trees, tmp_path)
    probe, settings = result["probe"], result["config"]["tta"]["callbacks"][method]
    assert probe["episodic"] == [
        {"method": method.upper(), "n_views": 10, "views": "crop_flip", "images_per_step": 64, "grad_scaler": False}
    ]
    assert probe["encoded"] == [[2, 224, 224], [20, 224, 224]] and probe["selected"] == []
    assert result["config"]["seed"] == 1
    if method == "zero":
        assert (settings["gamma"], settings["tie_fallback"], settings["output"]) == (0.3, "reference", "votes")
        rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
        confidences = [float(row.split(",")[4]) for row in rows]
        assert len(confidences) == 2 and all(min(abs(c - s) for s in (1 / 2, 2 / 3, 1)) < 1e-5 for c in confidences)
    else:
        assert (settings["lambda_y"], settings["lambda_q"], settings["neighbour_fraction"]) == (0.2, 4.0, 0.3)


@pytest.mark.parametrize(
    ("card", "where", "lambda_term"),
    [("ctpt_imagenet_vit_b16", "imagenet_a", 20.0), ("ctpt_cross_dataset_vit_b16", "food101", 50.0)],
)
def test_ctpt_cards(card, where, lambda_term, trees, tmp_path):
    """C-TPT as its scripts: AugMix views on every data set (``--I_augmix`` on the natural shifts),
    lambda 20 there and 50 on the fine-grained sets, TPT's step otherwise (10% kept: 1 of 10; one
    image per step for the shared fp16 scaler; seed 0)."""
    result = run_views_card(card, "ctpt", where, trees, tmp_path)
    probe, settings = result["probe"], result["config"]["tta"]["callbacks"]["ctpt"]
    assert probe["episodic"] == [
        {"method": "CTPT", "n_views": 10, "views": "augmix", "images_per_step": 1, "grad_scaler": False}
    ]
    assert probe["encoded"] == [[2, 224, 224], [10, 224, 224], [10, 224, 224]]
    assert probe["selected"] == [[10, 1], [10, 1]]
    assert settings["lambda_term"] == lambda_term and result["config"]["seed"] == 0
    assert (settings["lr"], settings["steps"], settings["selection"], settings["ctx_init"]) == (
        5e-3,
        1,
        0.1,
        "a photo of a",
    )


def test_difftpt_card(trees, tmp_path):
    """The card with the tiny random image-variation pipeline in place of Stable Diffusion (860 M
    parameters: no CPU run of the real one), generating inline: the pre-pass would walk all 1000
    images. Candidates: 1 + 4 conventional + 5 diffusion = 10; the cosine filter keeps 7 + the
    original, the entropy filter 30% of those (2)."""
    generator = "tta.callbacks.difftpt.generator"
    result = run_card(
        "difftpt_imagenet_vit_b16",
        [
            f"data.root={trees['imagenet_a']}",
            "data.variant=imagenet_a",  # 200 classes: four steps of the text tower's backward stay cheap
            "+trainer.limit_predict_batches=1",
            "data.batch_size=1",
            "data.num_workers=0",
            "tta.callbacks.difftpt.n_views=5",
            "tta.callbacks.difftpt.pregenerate=false",
            f"{generator}.pretrained=tta-tiny-image-variation",
            f"{generator}.n_views=5",
            f"{generator}.num_inference_steps=2",
            f"{generator}.height=null",  # the tiny pipeline's native 32 px, not the card's 512
            f"{generator}.width=null",
            f"{generator}.output_size=32",
            f"{generator}.cache_dir={tmp_path / 'views'}",
        ],
        tmp_path,
    )
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, PHOTO)
    assert_imagenet_a_names(probe)
    assert_fp16_card("difftpt_imagenet_vit_b16")
    assert result["config"]["tta"]["callbacks"]["difftpt"]["generator"]["dtype"] == "float32"
    assert probe["encoded"] == [[1, 224, 224], [5, 224, 224], [5, 224, 224]]  # the image; conventional; diffusion
    assert probe["cosine_kept"] == [[10, 8]] and probe["selected"] == [[8, 2]]


def test_lame_card(trees, tmp_path):
    """The timm ResNet-50 of the card (random weights) on ImageNet-C's layout, one Dirichlet batch."""
    result = run_card(
        "lame_imagenet_c_noniid",
        [
            f"data.root={trees['imagenet_c']}",
            "data.corruptions=[fog]",
            "+trainer.limit_predict_batches=1",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.pretrained=false",
        ],
        tmp_path,
        cut=False,
    )
    probe = result["probe"]
    assert probe["preprocessing"]["image_size"] == 224 and probe["preprocessing"]["resize_mode"] == "shortest"
    assert_imagenet_names(probe)
    assert probe["batches"][0]["image"] == [4, 3, 224, 224]
    assert probe["batches"][0]["original"] == [[3, 224, 224]] * 4
    assert result["config"]["data"]["stream"] == "dirichlet" and result["metrics"]["method"] == "lame"


@pytest.mark.parametrize(
    ("card", "overrides"),
    [
        ("world_quick", ["data.n_per_domain=2", "data.domains=[clean,blur]"]),
        ("ttm_world", ["data.n_per_cell=2", "tta.callbacks.ttm.rounds=1", "tta.callbacks.ttm.epochs=1"]),
        ("search_world", ["data.n_episodes=1", "model.budget=6"]),
    ],
)
def test_world_cards(card, overrides, tmp_path):
    """The offline world's cards on the shipped tiny model (their real model), a few items each."""
    result = run_card(card, overrides, tmp_path, probe=False, cut=False)
    assert result["metrics"]["n"] >= 1


#: The online methods' card folders (one card per data set) and the cards of each that the tier runs:
#: one of the ImageNet family, one fine-grained.
ONLINE_FAMILIES = ("tda_vit_b16", "boostadapter_vit_b16", "dmn_vit_b16", "dota_vit_b16", "dpe_vit_b16")


def composed_card(card: str, overrides: list[str] = ()):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        return compose("predict", overrides=[f"experiment={card}", *overrides])


@pytest.mark.parametrize("family", ONLINE_FAMILIES)
@pytest.mark.parametrize("where", ["imagenet_a", "food101"])
def test_online_cards(family, where, trees, tmp_path):
    """An online method's card as its reference runs that data set: two images, one batch; the card's
    views (cut to 10 where it has more: the 10% most confident are one of them) read through the
    shared view encoder; its precision as the reference's (asserted on the composed card); the method's
    state carried from the first image to the second and saved with the run."""
    method = family.removesuffix("_vit_b16")
    card = f"{family}/{where}"
    composed = composed_card(card, ["trainer=gpu"])
    settings = composed.tta.callbacks[method]
    n_views = min(10, settings.n_views)
    size = WHERE[where][1]  # the card names the data set itself
    overrides = [f"data.root={trees[where]}", *SMALL, f"tta.callbacks.{method}.n_views={n_views}", "view_store=null"]
    result = run_card(card, overrides, tmp_path)
    probe = result["probe"]
    assert_openai_clip_preprocessing(probe, size)
    if where == "imagenet_a":
        assert_imagenet_a_names(probe)
    else:
        assert probe["class_names"]["n"] == 101
    (episodic,) = probe["episodic"]
    assert (episodic["n_views"], episodic["views"]) == (n_views, settings.views)
    assert result["metrics"]["n"] == 2 and result["metrics"]["method"] == method
    # views beyond the original are encoded by the view encoder; a one-view card reads the forward's features
    assert probe["encoded"] == ([[2, 224, 224], [2 * n_views, 224, 224]] if n_views > 1 else [[2, 224, 224]])
    assert len(list(tmp_path.glob("stream_state-*.safetensors"))) == 1
    assert composed.trainer.precision in ("16-mixed", "32-true")


def test_every_card_is_in_the_tier():
    from importlib.resources import files

    experiment = files("tta.configs").joinpath("experiment")
    cards = {p.name.removesuffix(".yaml") for p in experiment.iterdir() if p.name.endswith(".yaml")}
    assert {p.name for p in experiment.iterdir() if p.is_dir()} == set(ONLINE_FAMILIES)
    tested = {
        "tpt_imagenet_vit_b16",
        "tpt_imagenet_rn50",
        "sts_imagenet_vit_b16",
        "zero_shot_imagenet_vit_b16",
        "tpt_cross_dataset_vit_b16",
        "zero_tta_imagenet_vit_b16",
        "zero_tta_cross_dataset_vit_b16",
        "mta_imagenet_vit_b16",
        "mta_cross_dataset_vit_b16",
        "ctpt_imagenet_vit_b16",
        "ctpt_cross_dataset_vit_b16",
        "difftpt_imagenet_vit_b16",
        "lame_imagenet_c_noniid",
        "world_quick",
        "ttm_world",
        "search_world",
    }
    assert cards == tested


def test_siglip_preset_squashes_its_images_as_open_clip_says(monkeypatch, compose, image_tree):
    """SigLIP's own preprocessing (its webli tag: squash to 224, bicubic, mean/std 0.5) reaches the
    datamodule through tta-predict's fill of the data's null settings (issue 14). Random weights;
    the tokenizer (a Hugging Face download) is not needed for that and is left out."""
    from hydra.utils import instantiate

    import tta.models.factory as factory
    from tta.cli import with_model_preprocessing

    monkeypatch.setattr(factory.open_clip, "get_tokenizer", lambda name: None)
    cfg = compose(["model=siglip_b16", "model.vlm.load_weights=false"])
    vlm = instantiate(cfg.model.vlm)
    assert vlm.preprocessing == {"image_size": 224, "resize_mode": "squash", "interpolation": "bicubic"}
    assert vlm.mean.flatten().tolist() == [0.5, 0.5, 0.5] and vlm.std.flatten().tolist() == [0.5, 0.5, 0.5]
    data = with_model_preprocessing(compose(["data=image_folder", f"data.root={image_tree}"]).data, vlm.preprocessing)
    assert instantiate(data).preprocess.resize_mode == "squash"
