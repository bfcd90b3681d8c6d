"""Test-stream orders: permutations, determinism, and the imbalance each protocol promises."""

from __future__ import annotations

import pytest
import torch

from tta.datamodules import WorldDataModule
from tta.datamodules.streams import stream_order


def dominant_share(labels: torch.Tensor, chunk: int) -> float:
    """Mean over chunks of the most frequent class's share."""
    chunks = labels[: len(labels) // chunk * chunk].view(-1, chunk)
    return torch.stack([torch.bincount(c).max() for c in chunks]).float().mean().item() / chunk


@pytest.fixture(scope="module")
def labels():
    return torch.randint(0, 30, (1920,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["iid", "sorted", "dirichlet"])
def test_every_stream_is_a_seeded_permutation(labels, kind):
    order = stream_order(labels, kind, seed=1, chunk_size=64)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert torch.equal(order, stream_order(labels, kind, seed=1, chunk_size=64))


def test_streams_differ_in_imbalance_as_promised(labels):
    iid = dominant_share(labels[stream_order(labels, "iid", seed=0)], 64)
    dirichlet = dominant_share(labels[stream_order(labels, "dirichlet", seed=0, alpha=0.1, chunk_size=64)], 64)
    mild = dominant_share(labels[stream_order(labels, "dirichlet", seed=0, alpha=100.0, chunk_size=64)], 64)
    ordered = labels[stream_order(labels, "sorted")]
    assert torch.equal(ordered, labels.sort().values)
    assert iid < 0.15 and mild < 0.2 < 0.3 < dirichlet


def test_iid_seeds_differ(labels):
    assert not torch.equal(stream_order(labels, "iid", seed=0), stream_order(labels, "iid", seed=1))


def test_bad_stream_settings_are_refused(labels):
    with pytest.raises(ValueError, match="stream"):
        stream_order(labels, "shuffled")
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        WorldDataModule(n_per_domain=4, stream="dirichlet", dirichlet_alpha=0)


def test_world_stream_keeps_domains_apart_and_indices_stable():
    kwargs = dict(domains=["clean", "blur"], n_per_domain=40, batch_size=8)
    streams = {}
    for kind in ("iid", "sorted", "dirichlet"):
        datamodule = WorldDataModule(stream=kind, **kwargs)
        datamodule.setup("predict")
        batches = list(datamodule.predict_dataloader())
        streams[kind] = batches
        domains = [d for b in batches for d in b["domain"]]
        assert domains == ["clean"] * 40 + ["blur"] * 40  # one domain after the other
    sorted_labels = torch.cat([b["label"] for b in streams["sorted"]])
    assert torch.equal(sorted_labels[:40], sorted_labels[:40].sort().values)
    # the same sample keeps its index and pixels whatever the stream
    iid = {int(i): im for b in streams["iid"] for i, im in zip(b["index"], b["image"])}
    for b in streams["dirichlet"]:
        for i, im in zip(b["index"], b["image"]):
            assert torch.equal(iid[int(i)], im)
