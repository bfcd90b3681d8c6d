"""DiffTPT's generator for the offline world: the recipe, the shipped folder, what its views depict, the configs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tta.augment.diffusion import (
    DIFFTPT_WEIGHTS,
    SHIPPED_PIPELINES,
    TINY_PIPELINE,
    WORLD_PIPELINE,
    DiffusionViewGenerator,
)
from tta.world import train_generator


def weights(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("vae", "unet", "image_encoder")
        for key, value in getattr(pipeline, name).state_dict().items()
    }


def test_the_recipe_is_seeded_end_to_end():
    """Two runs of the same seed give the same weights, bit for bit; another seed other weights."""
    settings = dict(steps=2, vae_steps=2, batch_size=4, warmup=1, log_every=1, scale_scenes=8)
    first, log = train_generator.train(seed=0, **settings)
    again, _ = train_generator.train(seed=0, **settings)
    other, _ = train_generator.train(seed=1, **settings)
    a, b, c = weights(first), weights(again), weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert [row["stage"] for row in log["curve"]] == ["vae", "vae", "unet", "unet"]
    assert log["train_cpu_s"] > 0 and log["vae_scaling_factor"] > 0


def test_the_recipe_writes_a_folder_the_generator_loads(tmp_path):
    out = tmp_path / "generator"
    quick = ["--steps", "1", "--vae-steps", "1", "--batch-size", "2", "--eval-every", "0", "--eval-scenes", "0"]
    train_generator.main(["--out", str(out), *quick])
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 1 and log["command"].startswith("python -m tta.world.train_generator --out")
    generator = DiffusionViewGenerator(pretrained=str(out), n_views=2, num_inference_steps=1, cache_dir=None)
    views = generator.views(torch.rand(1, 3, 32, 32), [0])
    assert views.shape == (1, 2, 3, 224, 224) and views.dtype == torch.uint8


def test_the_recipe_names_a_bad_option():
    with pytest.raises(ValueError, match="--steps"):
        train_generator.main(["--out", "unused", "--steps", "0"])


def test_the_shipped_generator_loads_by_its_short_name_and_keys_the_cache_on_its_files():
    folder = SHIPPED_PIPELINES[WORLD_PIPELINE]
    assert (folder / "training_log.json").is_file()
    generator = DiffusionViewGenerator(pretrained=WORLD_PIPELINE, n_views=3, num_inference_steps=2, output_size=64)
    views = generator.views(torch.rand(2, 3, 32, 32), [1, 2])
    assert views.shape == (2, 3, 3, 64, 64) and views.dtype == torch.uint8
    assert generator.pipeline.unet.dtype == torch.float32  # fp16 files, loaded in fp32 on the CPU
    identity = generator.model_identity()
    assert identity["model"] == WORLD_PIPELINE and "revision" not in identity
    shipped = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert [name for name, _ in identity["files"]] == shipped  # every file's content is in the key
    assert sum(p.stat().st_size for p in folder.rglob("*")) < 10_000_000


def test_the_world_generators_views_depict_the_scenes_object_and_random_views_do_not(shipped_vlm):
    """On 10 unseen clean scenes, 8 views each (10 denoising steps, the world default), the world model
    classifies at least 10% of the world generator's views as the scene's class (16 of 80 here; 13-18% on
    the benchmark's scenes: the issue's goal of half is missed, docs/world.md), 3x chance; of the random
    pipeline's, at most 5%. A generator at chance (1/30) reaches 8 of 80 with probability 0.6%."""

    def share(pretrained: str) -> float:
        generator = DiffusionViewGenerator(
            pretrained=pretrained, n_views=8, num_inference_steps=10, output_size=64, cache_dir=None
        ).load()
        return train_generator.view_class_share(generator, shipped_vlm, n_scenes=10, seed=54_321)["class"]

    assert share(WORLD_PIPELINE) >= 0.1
    assert share(TINY_PIPELINE) <= 0.05


def test_tta_difftpt_composes_with_the_world_generator_and_the_card_with_stable_diffusion(compose):
    from hydra.utils import instantiate

    world = compose(["tta=difftpt"]).tta.callbacks.difftpt.generator
    assert (world.pretrained, world.revision) == (WORLD_PIPELINE, None)
    assert (world.height, world.width, world.output_size, world.n_views) == (32, 32, 64, 63)
    assert world.num_inference_steps == 50  # the reference's (diffusers' default), whatever the generator
    generator = instantiate(world, cache_dir=None)
    assert generator.local_folder == SHIPPED_PIPELINES[WORLD_PIPELINE]
    card = compose(["experiment=difftpt_imagenet_vit_b16"]).tta.callbacks.difftpt.generator
    assert (card.pretrained, card.revision) == DIFFTPT_WEIGHTS
    assert (card.height, card.width, card.output_size, card.num_inference_steps) == (512, 512, 224, 50)
