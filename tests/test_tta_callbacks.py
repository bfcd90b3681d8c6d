"""The episodic TTA callbacks inside ``Trainer.predict``: plumbing, reset, seeding, tower kinds."""

from __future__ import annotations

import hashlib

import pytest
import pytorch_lightning as pl
import torch

from tta.callbacks import STS, TPT, PredictionWriter, ViewAverage
from tta.callbacks.base import sample_seed
from tta.datamodules import WorldDataModule
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def predict(module, callbacks, batch_size=4, n=6, domains=("blur",), inference_mode=True, precision="32-true"):
    data = WorldDataModule(domains=list(domains), n_per_domain=n, batch_size=batch_size, seed=321)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        inference_mode=inference_mode,
        precision=precision,
    )
    batches = trainer.predict(module, datamodule=data)
    return {
        key: torch.cat([b[key] for b in batches])
        for key in ("logits", "logits_zs", "probs", "index")
        if key in batches[0]
    }, batches


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


@pytest.mark.parametrize("callback_cls", [TPT, STS, ViewAverage])
def test_adapted_outputs_replace_the_module_outputs(world_module, callback_cls):
    out, batches = predict(world_module, [callback_cls(n_views=8, seed=0)])
    assert {"logits_zs", "probs_zs", "adapt_ms"} <= set(batches[0])
    assert not torch.allclose(out["logits"], out["logits_zs"])
    assert torch.allclose(out["probs"], out["logits"].softmax(-1), atol=1e-6)
    assert (batches[0]["adapt_ms"] > 0).all()


def test_user_model_is_bitwise_unchanged_after_predict(world_module):
    before = state_hash(world_module)
    requires_grad = [p.requires_grad for p in world_module.parameters()]
    predict(world_module, [TPT(n_views=8, seed=0, steps=2)])
    predict(world_module, [STS(n_views=8, seed=0, steps=2)])
    assert state_hash(world_module) == before
    assert [p.requires_grad for p in world_module.parameters()] == requires_grad
    assert all(p.grad is None for p in world_module.parameters())


def test_episodic_reset_a_sample_does_not_see_the_samples_before_it(world_module):
    full, _ = predict(world_module, [TPT(n_views=8, seed=0)], batch_size=1, n=6)
    # the last three samples alone, in reverse order, one per batch
    data = WorldDataModule(domains=["blur"], n_per_domain=6, batch_size=1, seed=321)
    data.setup("predict")
    subset = torch.utils.data.Subset(data.dataset, [5, 4, 3])
    data.predict_dataloader = lambda: torch.utils.data.DataLoader(subset, batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[TPT(n_views=8, seed=0)])
    alone = torch.cat([b["logits"] for b in trainer.predict(world_module, datamodule=data)])
    by_index = full["logits"][full["index"].argsort()]  # the stream is shuffled; rows by sample index
    assert torch.allclose(alone, by_index[[5, 4, 3]], atol=1e-5)


@pytest.mark.parametrize("callback_cls", [TPT, STS])
def test_predictions_do_not_depend_on_batch_size(world_module, callback_cls):
    small, _ = predict(world_module, [callback_cls(n_views=8, seed=3, images_per_step=2)], batch_size=2)
    large, _ = predict(world_module, [callback_cls(n_views=8, seed=3)], batch_size=6)
    assert torch.equal(small["index"], large["index"])
    assert torch.allclose(small["logits"], large["logits"], atol=1e-5)
    assert torch.equal(small["logits"].argmax(-1), large["logits"].argmax(-1))


def test_same_seed_same_predictions_other_seed_other_views(world_module):
    first, _ = predict(world_module, [TPT(n_views=8, seed=1)])
    again, _ = predict(world_module, [TPT(n_views=8, seed=1)])
    other, _ = predict(world_module, [TPT(n_views=8, seed=2)])
    assert torch.equal(first["logits"], again["logits"])
    assert not torch.equal(first["logits"], other["logits"])


def test_seed_defaults_to_seed_everything(world_module):
    pl.seed_everything(7, verbose=False)
    implicit, _ = predict(world_module, [TPT(n_views=8)])
    explicit, _ = predict(world_module, [TPT(n_views=8, seed=7)])
    assert torch.equal(implicit["logits"], explicit["logits"])
    assert sample_seed(7, 3) != sample_seed(7, 4) != sample_seed(8, 3)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_works_with_and_without_inference_mode(world_module, inference_mode):
    out, _ = predict(world_module, [TPT(n_views=8, seed=0)], inference_mode=inference_mode)
    assert torch.isfinite(out["logits"]).all()


def test_inference_mode_gives_the_same_result_as_without(world_module):
    on, _ = predict(world_module, [TPT(n_views=8, seed=0)], inference_mode=True)
    off, _ = predict(world_module, [TPT(n_views=8, seed=0)], inference_mode=False)
    assert torch.allclose(on["logits"], off["logits"], atol=1e-6)


def test_bf16_autocast_reaches_the_callback_keeps_view_features_bf16_and_learnables_fp32(world_module):
    seen = {}

    class Probe(TPT):
        def adapt(self, pl_module, view_features):
            with self.autocast(view_features.device):
                seen["autocast"] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen["context"] = self.prompt.initial_context.dtype
            seen["view_features"] = view_features.dtype
            return super().adapt(pl_module, view_features)

    out, _ = predict(world_module, [Probe(n_views=8, seed=0)], precision="bf16-mixed", n=2, batch_size=2)
    assert torch.isfinite(out["logits"]).all()
    # the views' features stay in the autocast dtype; the learnable context is fp32
    assert seen == {"autocast": torch.bfloat16, "context": torch.float32, "view_features": torch.bfloat16}


@pytest.mark.parametrize("name", ["tta-tiny-clip", "tta-tiny-customtext", "tta-tiny-sigmoid"])
@pytest.mark.parametrize("callback_cls", [TPT, STS])
def test_every_tower_kind(name, callback_cls):
    torch.manual_seed(0)
    module = ZeroShotClassifier(create_vlm(name))
    before = state_hash(module)
    out, _ = predict(module, [callback_cls(n_views=8, seed=0)], n=3)
    assert out["logits"].shape == (3, 30) and torch.isfinite(out["logits"]).all()
    assert state_hash(module) == before


def test_writer_records_adapted_and_zero_shot_predictions(world_module, tmp_path):
    writer = PredictionWriter(tmp_path, seed=0)
    out, _ = predict(world_module, [TPT(n_views=8, seed=0), writer])
    assert writer.metrics["method"] == "tpt"
    assert writer.metrics["adapt_ms_per_sample"] > 0
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    header, first = lines[0].split(","), dict(zip(lines[0].split(","), lines[1].split(",")))
    assert "pred_zs" in header and first["pred_zs"] != ""
    timing = (tmp_path / "timing.csv").read_text().splitlines()
    assert float(timing[1].split(",")[2]) > 0  # adapt_ms
    assert int(first["pred"]) == int(out["logits"][0].argmax())
    assert int(first["pred_zs"]) == int(out["logits_zs"][0].argmax())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_views": 0}, "n_views"),
        ({"views": "mixup"}, "views"),
        ({"images_per_step": 0}, "images_per_step"),
        ({"lr": 0}, "lr"),
        ({"selection": 0}, "selection"),
    ],
)
def test_tpt_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TPT(**kwargs)


def test_sts_arguments_are_validated():
    with pytest.raises(ValueError, match="final"):
        STS(final="mean")
    with pytest.raises(ValueError, match="lam"):
        STS(lam=-1)


def test_callback_refuses_a_module_without_a_vision_language_model():
    class Plain(pl.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {}

    data = WorldDataModule(domains=["clean"], n_per_domain=2, batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[TPT(n_views=4)])
    with pytest.raises(TypeError, match="ZeroShotClassifier"):
        trainer.predict(Plain(), datamodule=data)


def test_a_batch_whose_images_all_failed_to_decode_passes_through(world_module, tmp_path):
    from conftest import class_tree

    from tta.datamodules import ImageFolderDataModule

    root = class_tree(tmp_path / "data", ["apple", "pear"], per_folder=2)
    for bad in (root / "pear").iterdir():
        bad.write_bytes(b"not an image")  # the whole second batch (sorted stream, batch 2) fails
    data = ImageFolderDataModule(
        root, image_size=64, batch_size=2, stream="sorted", class_names=["red circle", "green circle"]
    )
    writer = PredictionWriter(tmp_path / "run", seed=0)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[TPT(n_views=4, seed=0), writer]
    )
    batches = trainer.predict(world_module, datamodule=data)
    assert [len(b["index"]) for b in batches] == [2, 0]
    assert writer.metrics["n"] == 2 and writer.metrics["skipped_images"] == 2
    assert len((tmp_path / "run" / "predictions.csv").read_text().splitlines()) == 3


def test_one_grad_scaler_for_the_whole_run_under_fp16(monkeypatch):
    """The reference keeps ONE GradScaler(init_scale=1000) for its run, so the scale it reaches and
    the steps it skips carry over from image to image; a fresh scaler per batch would not."""
    from types import SimpleNamespace

    import tta.callbacks.tpt as tpt_callback

    seen = []
    real = tpt_callback.tpt_adapt

    def spy(*args, **kwargs):
        seen.append(kwargs["scaler"])
        # fp16 kernels are not the point here: the step runs in fp32 on fp32 view features
        prompt, view_features, *rest = args
        return real(prompt, view_features.float(), *rest, **{**kwargs, "scaler": None, "autocast": None})

    monkeypatch.setattr(tpt_callback, "tpt_adapt", spy)
    from tta.world import CLASS_NAMES

    world_module = ZeroShotClassifier(create_vlm("tta-world-resnet"), class_names=list(CLASS_NAMES))
    callback = TPT(n_views=4, seed=0, images_per_step=1)
    callback.on_predict_start(SimpleNamespace(precision="16-mixed"), world_module)
    assert isinstance(callback.grad_scaler, torch.amp.GradScaler) and callback.grad_scaler.get_scale() == 1000
    data = WorldDataModule(domains=["blur"], n_per_domain=4, batch_size=2, seed=321)
    data.setup("predict")
    for batch in data.predict_dataloader():
        callback.process_batch(world_module, {}, batch)
    assert len(seen) == 4 and all(scaler is callback.grad_scaler for scaler in seen)
    callback.on_predict_start(SimpleNamespace(precision="bf16-mixed"), world_module)
    assert callback.grad_scaler is None  # bf16 needs no loss scaling


def test_views_need_the_images_as_loaded(world_module):
    callback = TPT(n_views=4, seed=0)
    data = WorldDataModule(domains=["blur"], n_per_domain=2, batch_size=2)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    del batch["original"]
    with pytest.raises(KeyError, match="'original'"):
        callback.process_batch(world_module, {}, batch)
