"""The view-feature store: byte-identical predictions with and without it, one encoding per sample
for every view method of a key, a key that separates everything that changes a feature, and
damaged or foreign files recomputed with one warning naming them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file

import tta.callbacks.base as base
from tta.callbacks import CTPT, MTA, STS, TPT, ZERO, ViewAverage
from tta.cli import run_key
from tta.datamodules import WorldDataModule
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.view_store import ViewFeatureStore


@pytest.fixture(scope="module")
def world_module():
    return ZeroShotClassifier(create_vlm("tta-world-resnet"))


def predict(module, callback, batch_size=4, n=4, domains=("blur",), data_seed=321, precision="32-true"):
    data = WorldDataModule(domains=list(domains), n_per_domain=n, batch_size=batch_size, seed=data_seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        precision=precision,
    )
    batches = trainer.predict(module, datamodule=data)
    return torch.cat([b["logits"] for b in batches]), torch.cat([b["probs"] for b in batches])


@pytest.fixture
def encodings(monkeypatch):
    """How many samples' views the callbacks made and encoded (the store's misses)."""
    count = {"samples": 0}
    make_views = base.make_views

    def counting(originals, *args, **kwargs):
        count["samples"] += len(originals)
        return make_views(originals, *args, **kwargs)

    monkeypatch.setattr(base, "make_views", counting)
    return count


METHODS = {
    "views": lambda **kw: ViewAverage(**kw),
    "tpt": lambda **kw: TPT(**kw),
    "sts": lambda **kw: STS(**kw),
    "zero": lambda **kw: ZERO(**kw),
    "mta": lambda **kw: MTA(**kw),
    "ctpt": lambda **kw: CTPT(views="crop_flip", **kw),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_predictions_with_the_store_equal_those_without_byte_for_byte(world_module, method, tmp_path, encodings):
    make = METHODS[method]
    without = predict(world_module, make(n_views=8, seed=0))
    assert encodings["samples"] == 4
    cold = predict(world_module, make(n_views=8, seed=0, view_store=str(tmp_path)))
    assert encodings["samples"] == 8  # the first run with the store encodes (and writes)
    warm = predict(world_module, make(n_views=8, seed=0, view_store=str(tmp_path)))
    assert encodings["samples"] == 8  # the second reads: no view is made or encoded
    for run in (cold, warm):
        assert all(torch.equal(a, b) for a, b in zip(without, run))


def test_every_view_method_of_a_key_reads_the_views_one_encoded(world_module, tmp_path, encodings):
    predict(world_module, TPT(n_views=8, seed=0, view_store=str(tmp_path)))
    assert encodings["samples"] == 4
    for method in ("views", "sts", "zero", "mta", "ctpt"):
        callback = METHODS[method](n_views=8, seed=0, view_store=str(tmp_path))
        stored = predict(world_module, callback)
        assert callback.store.read_count == 4 and callback.store.written == 0
        assert all(torch.equal(a, b) for a, b in zip(stored, predict(world_module, METHODS[method](n_views=8, seed=0))))
    assert encodings["samples"] == 4 + 5 * 4  # only the runs without the store encoded again


def test_batch_size_and_stream_order_share_the_views(world_module, tmp_path):
    predict(world_module, ZERO(n_views=8, seed=0, view_store=str(tmp_path)), batch_size=4)
    callback = ZERO(n_views=8, seed=0, view_store=str(tmp_path))
    stored = predict(world_module, callback, batch_size=2)
    assert callback.store.read_count == 4
    assert all(torch.equal(a, b) for a, b in zip(stored, predict(world_module, ZERO(n_views=8, seed=0), batch_size=2)))


@pytest.mark.parametrize(
    ("change", "other"),
    [
        ("seed", {"callback": {"seed": 1}}),
        ("number of views", {"callback": {"n_views": 6}}),
        ("view kind", {"callback": {"views": "augmix"}}),
        ("data seed", {"predict": {"data_seed": 322}}),
        ("domain", {"predict": {"domains": ("noise",)}}),
        ("precision", {"predict": {"precision": "bf16-mixed"}}),
    ],
)
def test_what_changes_a_feature_changes_the_key(world_module, tmp_path, change, other):
    first = ZERO(n_views=8, seed=0, view_store=str(tmp_path))
    predict(world_module, first)
    second = ZERO(**({"n_views": 8, "seed": 0} | other.get("callback", {})), view_store=str(tmp_path))
    predict(world_module, second, **other.get("predict", {}))
    assert second.store.folder != first.store.folder, change
    assert second.store.read_count == 0 and second.store.written == 4
    key = json.loads((second.store.folder / "key.json").read_text())
    assert {"weights", "normalisation", "image_size", "data", "views", "seed", "precision", "device"} <= set(key)


def test_other_weights_are_another_key(tmp_path):
    trained = ZeroShotClassifier(create_vlm("tta-world-resnet"))
    changed = ZeroShotClassifier(create_vlm("tta-world-resnet"))
    with torch.no_grad():
        next(changed.vlm.parameters()).mul_(1.01)
    first, second = (ZERO(n_views=8, seed=0, view_store=str(tmp_path)) for _ in range(2))
    predict(trained, first)
    predict(changed, second)
    assert second.store.folder != first.store.folder and second.store.read_count == 0


def _damage_cases(store: Path) -> dict[str, callable]:
    def truncate(files):
        files[0].write_bytes(files[0].read_bytes()[:40])

    def foreign_image(files):
        shutil.copyfile(files[1], files[0])  # another sample's file under this sample's name

    def flipped_feature(files):
        stored = load_file(files[0])
        stored["features"][0, 0] += 1  # the checksum in the metadata no longer matches
        from safetensors import safe_open

        with safe_open(files[0], framework="pt") as f:
            metadata = f.metadata()
        save_file(stored, files[0], metadata=metadata)

    return {"unreadable": truncate, "another image": foreign_image, "checksum": flipped_feature}


@pytest.mark.parametrize("damage", ["unreadable", "another image", "checksum"])
def test_a_damaged_or_foreign_file_is_recomputed_with_one_warning_naming_it(
    world_module, tmp_path, damage, caplog, encodings
):
    clean = predict(world_module, ZERO(n_views=8, seed=0, view_store=str(tmp_path)))
    files = sorted(tmp_path.rglob("*.safetensors"), key=lambda p: int(p.stem))
    _damage_cases(tmp_path)[damage](files)
    callback = ZERO(n_views=8, seed=0, view_store=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tta.view_store"):
        again = predict(world_module, callback)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tta.view_store"]
    assert len(warnings) == 1 and str(files[0]) in warnings[0] and "recomputing" in warnings[0]
    assert callback.store.recomputed == 1 and callback.store.read_count == 3 and callback.store.written == 1
    assert all(torch.equal(a, b) for a, b in zip(clean, again))
    fixed = ZERO(n_views=8, seed=0, view_store=str(tmp_path))
    predict(world_module, fixed)
    assert fixed.store.read_count == 4  # rewritten whole


def test_a_file_of_another_key_is_refused(tmp_path):
    one = ViewFeatureStore(tmp_path, {"seed": 0})
    other = ViewFeatureStore(tmp_path, {"seed": 1})
    features = torch.randn(8, 16)
    one.write(3, "digest", features)
    Path(other.path(3)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(one.path(3), other.path(3))
    assert one.read(3, "digest", 8, torch.float32).equal(features)
    assert other.read(3, "digest", 8, torch.float32) is None and other.recomputed == 1


def test_an_unwritable_store_is_one_line_naming_the_option(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError, match="view_store"):
        ViewFeatureStore(blocked / "store", {"seed": 0})


def test_the_store_is_on_in_the_cli_for_every_view_method_and_not_in_the_run_key(compose):
    for method in ("views", "tpt", "sts", "zero", "mta", "ctpt", "difftpt"):
        cfg = compose([f"tta={method}"])
        assert next(iter(cfg.tta.callbacks.values())).view_store == cfg.view_store
    cfg = compose(["tta=[zero,mta]"])
    assert cfg.view_store  # on by default: TTA_VIEW_STORE, else ~/.cache/tta/view_features
    key = run_key(cfg)
    assert "view_store" not in key
    assert all("view_store" not in callback for callback in key["tta"]["callbacks"].values())
    assert run_key(compose(["tta=[zero,mta]", "view_store=null"])) == key


def test_many_damaged_files_are_named_up_to_a_limit_then_counted(world_module, tmp_path, caplog, monkeypatch):
    import tta.view_store as view_store

    monkeypatch.setattr(view_store, "WARNED_FILES", 2)
    predict(world_module, ZERO(n_views=8, seed=0, view_store=str(tmp_path)))
    for path in tmp_path.rglob("*.safetensors"):
        path.write_bytes(b"damaged")
    callback = ZERO(n_views=8, seed=0, view_store=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tta.view_store"):
        predict(world_module, callback)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tta.view_store"]
    assert len(warnings) == 3 and "further damaged files" in warnings[-1]
    assert callback.store.recomputed == 4 and "4 damaged files recomputed" in callback.store.summary()
