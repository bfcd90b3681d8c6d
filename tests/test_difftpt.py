"""DiffTPT: the cached diffusion view generator (tiny random pipeline), the filters, the callback."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionImageVariationPipeline
from test_tta_callbacks import state_hash

from tta.augment import TINY_PIPELINE, DiffusionViewGenerator
from tta.callbacks import DiffTPT
from tta.datamodules import WorldDataModule
from tta.methods.difftpt import cosine_filter, difftpt_adapt
from tta.methods.entropy import n_confident
from tta.models import create_vlm
from tta.models.prompt import PromptLearner
from tta.tasks import ZeroShotClassifier


def tiny_generator(cache_dir=None, **kwargs) -> DiffusionViewGenerator:
    settings = dict(n_views=3, num_inference_steps=2, output_size=None, batch_size=4)
    return DiffusionViewGenerator(TINY_PIPELINE, cache_dir=cache_dir, **{**settings, **kwargs})


@pytest.fixture
def pipeline_calls(monkeypatch) -> list[int]:
    """The batch size of every image-variation pipeline call."""
    calls: list[int] = []
    original = StableDiffusionImageVariationPipeline.__call__

    def counting(self, image, *args, **kwargs):
        calls.append(len(image))
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionImageVariationPipeline, "__call__", counting)
    return calls


def images(n: int = 2, seed: int = 0, size: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- the generator ------------------------------------------------------------------------------


def test_views_have_one_uint8_stack_per_image_in_batches_of_batch_size(pipeline_calls):
    views = tiny_generator().views(images(2), [5, 6])
    assert views.shape == (2, 3, 3, 32, 32) and views.dtype == torch.uint8  # tiny pipeline: 32 px
    assert pipeline_calls == [4, 2]  # 6 views in calls of at most batch_size=4
    assert not torch.equal(views[0, 0], views[0, 1])  # each view has its own latent seed
    resized = tiny_generator(output_size=24).views(images(1), [5])
    assert resized.shape == (1, 3, 3, 24, 24)


def test_the_cache_serves_a_rerun_bit_identically_without_generating(tmp_path, pipeline_calls):
    first_generator = tiny_generator(tmp_path)
    first = first_generator.views(images(3), [1, 2, 3])
    assert first_generator.n_generated == 9 and len(list(tmp_path.rglob("*.safetensors"))) == 3
    calls = len(pipeline_calls)
    rerun = tiny_generator(tmp_path)  # a new run: nothing in memory
    again = rerun.views(images(3), [1, 2, 3])
    assert len(pipeline_calls) == calls and rerun.n_generated == 0 and rerun.n_cached == 3
    assert torch.equal(first, again)  # what the first run returned is what the cache returns
    uncached = tiny_generator().views(images(3), [1, 2, 3])
    assert torch.equal(uncached, first)  # and the cache did not change the views


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 9},
        {"image": 1},
        {"guidance_scale": 1.5},
        {"num_inference_steps": 3},
        {"scheduler": "DDIMScheduler"},
        {"tiny_seed": 1},
    ],
)
def test_cache_key_covers_image_seed_model_and_settings(tmp_path, change):
    tiny_generator(tmp_path).views(images(1), [4])
    kwargs = {k: v for k, v in change.items() if k not in ("seed", "image")}
    generator = tiny_generator(tmp_path, **kwargs)
    generator.views(images(1, seed=change.get("image", 0)), [change.get("seed", 4)])
    assert generator.n_cached == 0 and generator.n_generated == 3


def test_a_local_folder_loads_and_its_files_are_part_of_the_key(tmp_path):
    from tta.augment.diffusion import tiny_image_variation_pipeline

    folder = tmp_path / "saved"
    tiny_image_variation_pipeline().save_pretrained(folder)
    local = DiffusionViewGenerator(str(folder), cache_dir=None, n_views=3, num_inference_steps=2, output_size=None)
    assert torch.equal(local.views(images(1), [4]), tiny_generator().views(images(1), [4]))
    key = local.settings()
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + " ")
    assert local.settings() != key
    assert local.settings("cuda")["dtype"] == "torch.float16" and key["dtype"] == "torch.float32"


def test_fill_cache_pre_pass_then_prediction_reads_only(tmp_path, pipeline_calls):
    generator = tiny_generator(tmp_path)
    batches = [
        {"image": images(2), "index": torch.tensor([0, 1])},
        {"image": images(1, seed=1), "index": torch.tensor([7])},
    ]
    assert generator.fill_cache(batches, lambda i: 100 + i) == 3
    assert generator.n_generated == 9
    calls = len(pipeline_calls)
    generator.views(images(1, seed=1), [107])
    assert len(pipeline_calls) == calls and generator.n_cached == 1


def test_generator_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusionViewGenerator(str(tmp_path / "no_such_folder"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cache_dir"):
        tiny_generator(blocker / "cache").load()
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionViewGenerator(TINY_PIPELINE, scheduler="NoSuchThing")
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        DiffusionViewGenerator(TINY_PIPELINE, height=30)
    with pytest.raises(ValueError, match="one seed per image"):
        tiny_generator().views(images(2), [1])
    with pytest.raises(ValueError, match="cache_dir"):
        DiffTPT(tiny_generator(), pregenerate=True)


# --- the filters ----------------------------------------------------------------------------


def test_filter_counts_127_candidates_to_101_then_30():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(2, 127, 16), dim=-1)
    logits = torch.randn(2, 127, 10)
    for reading in ("logits", "features"):
        kept = cosine_filter(features, n_conventional=63, fraction=0.8, reading=reading, logits=logits)
        assert kept.shape == (2, 1 + 100 if reading == "logits" else 1 + 50 + 50)
        assert (kept[:, 0] == 0).all() and all(len(set(row.tolist())) == kept.shape[1] for row in kept)
    assert n_confident(101, 0.3) == 30


def test_the_two_cosine_readings():
    # diffusion views (5..8) far from the original: the logit ranking drops them, the feature
    # reading keeps its share of each kind
    features = torch.zeros(1, 9, 4)
    features[0, :5, 0] = 1
    features[0, 5:, 1] = 1
    features[0, 5:, 0] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    features[0, 1:5] += torch.tensor([0.1, 0.2, 0.3, 0.4]).unsqueeze(1) * torch.tensor([0, 0, 1.0, 0])
    features = torch.nn.functional.normalize(features, dim=-1)
    logits = features @ torch.eye(4)
    by_logits = cosine_filter(features, 4, 0.5, "logits", logits)
    assert by_logits.tolist() == [[0, 1, 2, 3, 4]]  # the 4 conventional views are the most similar
    by_features = cosine_filter(features, 4, 0.5, "features")
    assert by_features.tolist() == [[0, 1, 2, 5, 6]]  # the 2 most similar of each kind
    with pytest.raises(ValueError, match="logit"):
        cosine_filter(features, 4, 0.5, "logits")


def test_difftpt_adapt_selects_from_the_cosine_kept_set_and_predicts_on_the_original():
    torch.manual_seed(0)
    vlm = create_vlm("tta-tiny-clip")
    prompt = PromptLearner(vlm, ["cat", "dog", "car"], "a photo of a")
    features = torch.nn.functional.normalize(torch.randn(2, 21, vlm.model.text_projection.shape[1]), dim=-1)
    adapted = difftpt_adapt(prompt, features, vlm.logits, n_conventional=10, steps=2)
    logits = vlm.logits(features, prompt.text_features(prompt.initial_context))
    kept = cosine_filter(features, 10, 0.8, "logits", logits)
    assert adapted.selected.shape == (2, n_confident(kept.shape[1], 0.3))
    assert all(set(s.tolist()) <= set(k.tolist()) for s, k in zip(adapted.selected, kept))
    with torch.no_grad():
        tuned = vlm.logits(features[:, :1], prompt.text_features(adapted.variables))[:, 0]
    assert torch.allclose(adapted.logits, tuned, atol=1e-5)


# --- the callback ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def predict(module, callback, n=4):
    data = WorldDataModule(domains=["blur"], n_per_domain=n, batch_size=2, seed=321)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback]
    )
    batches = trainer.predict(module, datamodule=data)
    return torch.cat([b["logits"] for b in batches]), batches


def test_difftpt_predicts_end_to_end_reproducibly_without_changing_the_model(world_module, tmp_path, pipeline_calls):
    before = state_hash(world_module)
    callback = DiffTPT(tiny_generator(tmp_path, output_size=64), n_views=8, steps=2, seed=0)
    logits, batches = predict(world_module, callback)
    assert {"logits_zs", "adapt_ms"} <= set(batches[0]) and logits.shape == (4, len(world_module.class_names))
    assert not torch.allclose(logits, torch.cat([b["logits_zs"] for b in batches]))
    assert callback.generator.n_generated == 4 * 3
    assert state_hash(world_module) == before
    assert all(p.grad is None for p in world_module.parameters())
    calls = len(pipeline_calls)
    cached, _ = predict(world_module, DiffTPT(tiny_generator(tmp_path, output_size=64), n_views=8, steps=2, seed=0))
    assert len(pipeline_calls) == calls and torch.equal(cached, logits)  # same seed, same predictions
    uncached, _ = predict(world_module, DiffTPT(tiny_generator(None, output_size=64), n_views=8, steps=2, seed=0))
    assert torch.equal(uncached, logits)
    other, _ = predict(world_module, DiffTPT(tiny_generator(None, output_size=64), n_views=8, steps=2, seed=1))
    assert not torch.equal(other, logits)


def test_pregenerate_fills_the_cache_before_adapting(world_module, tmp_path):
    callback = DiffTPT(tiny_generator(tmp_path), n_views=4, steps=1, pregenerate=True, reading="features", seed=0)
    predict(world_module, callback)
    assert callback.generator.n_generated == 4 * 3 and callback.generator.n_cached == 4
    assert callback.generation_s > 0


def test_pregenerate_needs_a_datamodule(world_module, tmp_path):
    data = WorldDataModule(domains=["blur"], n_per_domain=2, batch_size=2, seed=321)
    data.setup("predict")
    callback = DiffTPT(tiny_generator(tmp_path), n_views=4, pregenerate=True, seed=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback])
    with pytest.raises(ValueError, match="datamodule"):
        trainer.predict(world_module, dataloaders=data.predict_dataloader())


def test_diffusion_views_condition_on_the_whole_image_squashed_not_the_centre_crop(world_module, tmp_path):
    """The reference conditions the image-variation model on the full image squashed to its CLIP
    input (224 x 224 for the real weights, 32 here), bicubic, no crop: a wide image's red left
    edge, which the model's centre crop cuts away, is in the conditioning image."""
    from PIL import Image

    from tta.datamodules import ImageFolderDataModule

    wide = torch.zeros(40, 120, 3, dtype=torch.uint8)
    wide[:, :, 2] = 255
    wide[:, :20] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # the left sixth is red
    for folder in ("a", "b"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(wide.numpy()).save(tmp_path / "data" / folder / "x.png")
    data = ImageFolderDataModule(tmp_path / "data", image_size=64, batch_size=2)
    callback = DiffTPT(tiny_generator(), n_views=2, steps=1, seed=0)
    conditions = []
    real_views = callback.generator.views
    callback.generator.views = lambda images, seeds: conditions.append(images) or real_views(images, seeds)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback])
    module = ZeroShotClassifier(world_module.vlm)
    module.class_names = None
    trainer.predict(module, datamodule=data)
    assert data.dataset[0]["image"][0].max() < 0.05  # the model's input: the blue centre crop
    (condition,) = conditions
    assert condition.shape == (2, 3, 32, 32)  # the tiny pipeline's CLIP input, the whole image squashed
    assert condition[:, 0, :, :4].min() > 0.9 and condition[:, 2, :, :4].max() < 0.1  # the red edge is there


def test_damaged_cache_files_are_regenerated_with_a_warning_naming_them(world_module, tmp_path, caplog):
    """A damaged header, randomised pixels under an intact header, and another image's valid file
    in place: each is found on read, named in one warning, and regenerated, so the predictions are
    those of the intact cache."""
    settings = dict(n_views=8, steps=2, seed=0)
    logits, _ = predict(world_module, DiffTPT(tiny_generator(tmp_path, output_size=64), **settings))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4
    header, pixels, swapped, other = files
    data = bytearray(header.read_bytes())
    data[:8] = b"\xff" * 8  # the header's length field
    header.write_bytes(bytes(data))
    data = bytearray(pixels.read_bytes())
    size = 3 * 3 * 64 * 64  # the views: 3 x 3 x 64 x 64 uint8, after the header
    data[-size:] = (
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    pixels.write_bytes(bytes(data))
    swapped.write_bytes(other.read_bytes())

    generator = tiny_generator(tmp_path, output_size=64)
    with caplog.at_level("WARNING", logger="tta.augment.diffusion"):
        again, _ = predict(world_module, DiffTPT(generator, **settings))
    assert torch.equal(again, logits)
    assert generator.n_generated == 3 * 3 and generator.n_cached == 1
    warned = [r.getMessage() for r in caplog.records if "DiffTPT view cache file" in r.getMessage()]
    assert len(warned) == 3
    for path, reason in ((header, "unreadable"), (pixels, "checksum"), (swapped, "another image")):
        assert any(str(path) in w and reason in w and "regenerating" in w for w in warned), (path, warned)
    rewritten = tiny_generator(tmp_path, output_size=64)
    predict(world_module, DiffTPT(rewritten, **settings))
    assert rewritten.n_generated == 0 and rewritten.n_cached == 4  # the regenerated files verify
