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
