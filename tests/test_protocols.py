"""Protocol cards: their published numbers, and ``tta-report --compare-published``."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tta.report import main, published_table


def fake_run(directory, card: str, data: str, accuracy: float, compose) -> None:
    """A finished run directory as tta-predict leaves it: metrics.json and .hydra/config.yaml."""
    cfg = compose([f"experiment={card}", "data.root=/data/x"])
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    metrics = {
        "method": "tpt",
        "model": "ViT-B-16",
        "data": data,
        "seed": 0,
        "n": 10,
        "accuracy": accuracy,
        "ece": 0.1,
        "ms_per_sample": 1.0,
        "peak_mem_mb": 1.0,
        "domains": {data: {"n": 10, "accuracy": accuracy, "ece": 0.1, "ms_per_sample": 1.0}},
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_compare_published_puts_runs_beside_their_cards(tmp_path, compose, capsys):
    fake_run(tmp_path / "0", "tpt_imagenet_vit_b16", "imagenet_a", 0.5, compose)
    fake_run(tmp_path / "1", "tpt_imagenet_vit_b16", "imagenet_v2", 0.64, compose)
    fake_run(tmp_path / "2", "tpt_cross_dataset_vit_b16", "dtd", 0.4, compose)
    table = published_table(tmp_path)
    assert "| tpt | ViT-B-16 | imagenet_a | 0 | 50.00 | 54.77 | -4.77 |" in table
    assert "| imagenet_v2 | 0 | 64.00 | 63.45 | +0.55 |" in table
    assert "| dtd | 0 | 40.00 | not published | - |" in table
    main([str(tmp_path), "--compare-published"])
    assert "-4.77" in capsys.readouterr().out and (tmp_path / "published.md").is_file()


def test_compare_published_without_a_card_says_what_to_do(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="run an experiment= protocol card"):
        published_table(tmp_path)


@pytest.mark.parametrize(
    ("card", "published"),
    [
        ("tpt_imagenet_vit_b16", [68.98, 54.77, 63.45, 77.06, 47.94]),
        ("tpt_imagenet_rn50", [60.74, 26.67, 54.70, 59.11, 35.09]),
        ("zero_shot_imagenet_vit_b16", [66.73, 47.87, 60.86, 73.98, 46.09]),
        ("sts_imagenet_vit_b16", [68.85, 61.23, 64.15, 77.13, 48.06]),
    ],
)
def test_imagenet_cards_carry_the_published_table(compose, card, published):
    """The numbers of shared/METHODS.md, keyed by the datamodules' names (ImageNet, -A, -V2, -R, -Sketch)."""
    cfg = compose([f"experiment={card}"])
    keys = ["imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"]
    assert [cfg.published.accuracy[k] for k in keys] == published
    assert cfg.seed == 0 and cfg.model.templates == ["a photo of a {}."]
    assert cfg.model.vlm.pretrained == "openai"


# --- what the published protocols need of the model, the class names and the precision ----------------


@pytest.mark.parametrize(
    ("preset", "name"), [("vit_b16_openai", "ViT-B-16-quickgelu"), ("rn50_openai", "RN50-quickgelu")]
)
def test_openai_presets_are_built_with_quick_gelu(compose, preset, name):
    import open_clip

    vlm = compose([f"model={preset}"]).model.vlm
    assert (vlm.name, vlm.pretrained) == (name, "openai")
    assert open_clip.get_model_config(name)["quick_gelu"] is True


def test_openai_weights_in_a_gelu_architecture_get_quick_gelu_with_a_warning(tmp_path):
    """A checkpoint file of OpenAI's (named so, or a TorchScript archive) loaded into an
    architecture with plain GELU: the model is built with QuickGELU, and the warning names the fix."""
    import open_clip
    import torch

    from tta.models import create_vlm
    from tta.models.factory import is_openai_file

    plain = create_vlm("tta-tiny-clip")
    assert not isinstance(plain.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    weights = tmp_path / "tiny-openai.pt"
    torch.save(plain.model.state_dict(), weights)
    with pytest.warns(UserWarning, match="QuickGELU.*tta-tiny-clip-quickgelu"):
        vlm = create_vlm("tta-tiny-clip", str(weights))
    assert isinstance(vlm.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    # the weights are loaded as they are: only the activation changes
    assert torch.equal(vlm.model.token_embedding.weight, plain.model.token_embedding.weight)
    other = tmp_path / "mine.pt"
    torch.save(plain.model.state_dict(), other)
    assert not is_openai_file(other)
    scripted = tmp_path / "ViT-model.pt"  # OpenAI's distribution format: a TorchScript archive
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    assert is_openai_file(scripted)


def test_imagenet_class_names_are_clips_list_duplicates_included():
    from tta.datamodules.imagenet import imagenet_classes

    _, names = imagenet_classes("imagenet")
    assert names.count("missile") == 2 and names.count("sunglasses") == 2
    _, unique = imagenet_classes("imagenet", "unique")
    assert len(set(unique)) == 1000 and "projectile missile" in unique and "dark glasses" in unique
    assert sum(a != b for a, b in zip(names, unique)) == 2


def test_fine_grained_class_names_have_spaces_not_underscores():
    from tta.datamodules.fine_grained import DATASETS, fine_grained_class_names

    assert not any("_" in name for dataset in DATASETS for name in fine_grained_class_names(dataset))
    assert fine_grained_class_names("food101")[0] == "apple pie"
    assert "Apply Eye Makeup" in fine_grained_class_names("ucf101")


PUBLISHED_CARDS = [
    "tpt_imagenet_vit_b16",
    "tpt_imagenet_rn50",
    "sts_imagenet_vit_b16",
    "zero_shot_imagenet_vit_b16",
    "tpt_cross_dataset_vit_b16",
    "difftpt_imagenet_vit_b16",
    "zero_tta_imagenet_vit_b16",
    "zero_tta_cross_dataset_vit_b16",
    "mta_imagenet_vit_b16",
    "mta_cross_dataset_vit_b16",
    "ctpt_imagenet_vit_b16",
    "ctpt_cross_dataset_vit_b16",
]


@pytest.mark.parametrize("card", PUBLISHED_CARDS)
def test_published_cards_run_in_fp16_as_the_reference(compose, card):
    """fp16 autocast (16-mixed), even over trainer=gpu's bf16; a TPT/C-TPT/DiffTPT card steps one image
    at a time, so the run's one GradScaler sees the reference's sequence of steps."""
    for overrides in ([f"experiment={card}"], [f"experiment={card}", "trainer=gpu"]):
        cfg = compose(overrides)
        assert cfg.trainer.precision == "16-mixed"
    for name, callback in cfg.tta.callbacks.items():
        if name in ("tpt", "ctpt", "difftpt"):
            assert callback.images_per_step == 1
    if "class_list" in cfg.data:
        assert cfg.data.class_list == "clip"
    assert compose(["trainer=gpu"]).trainer.precision == "bf16-mixed"  # the fast choice, documented


def test_difftpt_card_has_the_references_candidates_and_pipeline_dtype(compose):
    cfg = compose(["experiment=difftpt_imagenet_vit_b16"]).tta.callbacks.difftpt
    assert cfg.n_views + cfg.generator.n_views == 128  # 1 + 64 conventional + 63 diffusion
    assert cfg.generator.dtype == "float32" and cfg.cosine_fraction == 0.8 and cfg.selection == 0.3


def test_sts_predicts_from_the_kept_views_average_at_the_papers_lr_and_steps(compose):
    """As the paper's text is reported (docs/protocols.md): one AdamW step at lr 5e-3, the prediction
    averaged over the kept views; the card says the same."""
    from tta.callbacks import STS

    for cfg in (compose(["tta=sts"]).tta.callbacks.sts, compose(["experiment=sts_imagenet_vit_b16"]).tta.callbacks.sts):
        assert (cfg.final, cfg.lr, cfg.steps, cfg.selection) == ("kept_average", 5e-3, 1, 0.1)
    assert STS().final == "kept_average"
