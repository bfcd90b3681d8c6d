"""Search-TTA: the loss, the weights, the planners, the session and its reset, the episode
datamodules, the runner and the callback inside ``Trainer.predict``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import make_tiny_vlm
from PIL import Image
from test_tta_callbacks import state_hash

from tta.callbacks import PredictionWriter, SearchTTA
from tta.datamodules import EpisodeFolderDataModule, WorldSearchDataModule
from tta.datamodules.search import collate_episodes
from tta.methods.search import (
    REFERENCE_SCALE,
    SearchTTASession,
    blur_map,
    cell_crops,
    choose_regions,
    elbow,
    greedy_step,
    kmeans_regions,
    lawnmower_order,
    map_calibration,
    negative_weights,
    planner_map,
    poisson_loss,
    ramp_lr,
    run_search,
    search_with_tta,
    zero_shot_scores,
)
from tta.tasks import SearchEpisodeRunner
from tta.world.search import SearchWorld, render_search_episode

#: A small world for tests: 6 x 6 cells of 32 px, dense enough that every episode has targets.
SMALL = SearchWorld(rows=6, cols=6, cell_px=32, n_sites=4, dense_rate=1.0, sparse_rate=0.1)


@pytest.fixture(scope="module")
def vlm():
    return make_tiny_vlm("tta-tiny-clip")


@pytest.fixture(scope="module")
def episode():
    return render_search_episode(3, world=SMALL)


# --- the math on hand-made tensors -------------------------------------------------------------


def test_poisson_loss_matches_a_hand_computed_case():
    rates = torch.tensor([0.5, 0.25, 0.8])
    counts = torch.tensor([2, 0, 1])
    weights = torch.tensor([0.1, 0.5, 1.0])
    # sum_i w-_i * lambda_i - 4 * k_i * log(lambda_i + 1e-6)
    expected = (0.1 * 0.5 + 0.5 * 0.25 + 1.0 * 0.8) - 4 * (2 * math.log(0.5 + 1e-6) + 1 * math.log(0.8 + 1e-6))
    assert poisson_loss(rates, counts, weights) == pytest.approx(expected, rel=1e-6)
    assert poisson_loss(rates, counts, weights, positive_weight=1.0) == pytest.approx(
        0.975 - (2 * math.log(0.5 + 1e-6) + math.log(0.8 + 1e-6)), rel=1e-6
    )


def test_negative_weights_grow_with_the_visited_share_of_each_region():
    regions = torch.tensor([0, 0, 0, 1, 1, 2])
    visited = torch.tensor([True, True, False, True, False, False])
    # region 0: 2 of 3 visited -> (2 / 9)^2; region 1: 1 of 2 -> (1 / 6)^2; region 2: none -> 0
    expected = torch.tensor([(2 / 9) ** 2] * 3 + [(1 / 6) ** 2] * 2 + [0.0])
    assert torch.allclose(negative_weights(regions, visited), expected)
    # a fully visited region weighs (1 / 3)^2: with the reference's factor 3 the cap at 1 never binds
    assert negative_weights(torch.tensor([0, 0]), torch.tensor([True, True])).tolist() == pytest.approx([1 / 9] * 2)


def test_lr_ramps_linearly_with_the_step_count():
    assert ramp_lr(0, 64) == pytest.approx(1e-6)
    assert ramp_lr(32, 64) == pytest.approx(5.5e-6)
    assert ramp_lr(64, 64) == pytest.approx(1e-5)
    assert ramp_lr(128, 64) == pytest.approx(1.9e-5)  # the reference's formula has no cap


def test_the_session_ramps_the_lr_over_the_grid_cells_not_the_budget(vlm, episode):
    # the reference: MIN_LR + (MAX_LR - MIN_LR) * step / number of grid cells (6 x 6 = 36 here)
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, lr_start=1e-4, lr_end=1e-3, update_every=100)
    for cell in range(10):
        session.observe([cell], [0])
    assert session.learning_rate() == pytest.approx(1e-4 + 9e-4 * 9 / 36)  # step 9: the tenth observed step


def test_every_step_of_the_history_is_a_loss_term_revisits_included(vlm, episode, monkeypatch):
    import tta.methods.search as search

    terms = []

    def recording_loss(rates, counts, weights, positive_weight=4.0, eps=1e-6):
        terms.append(counts.tolist())
        return poisson_loss(rates, counts, weights, positive_weight, eps)

    monkeypatch.setattr(search, "poisson_loss", recording_loss)
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, update_every=3)
    for cell, count in [(0, 2), (1, 0), (0, 2), (1, 0)]:  # a find, then revisits of both cells
        session.observe([cell], [count])
    # the find updates at once (one term); three steps later, four terms: a revisit finds nothing new
    assert terms == [[2.0], [2.0, 0.0, 0.0, 0.0]]


def clusters(n: int, per: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, 8, generator=g) * 5
    return torch.cat([c + 0.05 * torch.randn(per, 8, generator=g) for c in centres])


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 2), (3, 3), (7, 4)])
def test_regions_choose_k_in_1_to_4_per_episode(n, expected):
    # one blob stays one region; separated clusters get their k, capped at 4 as the reference caps it
    labels = choose_regions(clusters(n))
    assert len(set(labels.tolist())) == expected
    assert torch.equal(labels, choose_regions(clusters(n)))


def test_elbow_is_the_kneedle_rule():
    assert (
        elbow([2, 3, 4, 5, 6, 7, 8], [10.0, 4.0, 2.0, 1.6, 1.4, 1.3, 1.25]) == 4
    )  # by hand: the difference curve peaks at k = 4
    assert elbow([2, 3, 4], [3.0, 2.0, 1.0]) is None  # a straight line has no elbow
    assert elbow([2, 3], [1.0, 1.0]) is None


def test_kmeans_regions_separate_clusters_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(10, 4, generator=g) * 0.01 + 1, torch.randn(10, 4, generator=g) * 0.01 - 1])
    labels = kmeans_regions(features, k=2, seed=0)
    assert len(set(labels[:10].tolist())) == 1 and len(set(labels[10:].tolist())) == 1
    assert labels[0] != labels[10]
    assert torch.equal(kmeans_regions(features, 4, seed=5), kmeans_regions(features, 4, seed=5))


def test_planner_map_is_normalised_and_cells_are_row_major():
    image = torch.zeros(3, 4, 6)
    image[:, 2:, 3:] = 1.0  # bottom-right cell of a 2 x 2 grid
    crops = cell_crops(image, (2, 2), (8, 8))
    assert crops.shape == (4, 3, 8, 8)
    assert crops[3].min() == 1 and crops[:3].max() == 0
    values = planner_map(torch.tensor([0.2, 0.4, 0.6, 1.0]), (2, 2), blur=False)
    assert torch.allclose(values, torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert planner_map(torch.full((9,), 0.3), (3, 3)).eq(0).all()


def opencv_gaussian_blur(values: np.ndarray) -> np.ndarray:
    """``cv2.GaussianBlur(values, (5, 5), 0)`` written out: sigma 0.3 * ((5 - 1) / 2 - 1) + 0.8 = 1.1,
    OpenCV's default border (reflect without repeating the edge: numpy's "reflect")."""
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    kernel = np.exp(-((np.arange(5) - 2.0) ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(values, 2, mode="reflect")
    rows = np.stack([np.convolve(r, kernel, mode="valid") for r in padded])
    return np.stack([np.convolve(c, kernel, mode="valid") for c in rows.T]).T


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (24, 24)])
def test_blur_is_the_references_opencv_blur(shape):
    values = torch.rand(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = opencv_gaussian_blur(values.numpy())
    assert np.allclose(blur_map(values).numpy(), expected, atol=1e-12)


# --- planners ----------------------------------------------------------------------------------


@pytest.mark.parametrize("planner", ["greedy", "lawnmower"])
@pytest.mark.parametrize("budget", [0, 5, 40])
def test_planners_keep_to_the_budget_and_move_to_8_neighbours(planner, budget):
    counts = torch.zeros(5, 5, dtype=torch.long)
    counts[4, 4] = 2
    values = torch.rand(5, 5, generator=torch.Generator().manual_seed(1))
    result = run_search(counts, values, budget, planner)
    assert len(result.path) == budget + 1 and result.path[0] == (0, 0)
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1 for a, b in zip(result.path, result.path[1:]))
    assert result.found <= 2 and result.n_targets == 2


def test_greedy_walks_straight_to_the_best_cell_and_finds_its_targets():
    counts = torch.zeros(6, 6, dtype=torch.long)
    counts[4, 3] = 3
    values = torch.zeros(6, 6)
    values[4, 3] = 1.0
    result = run_search(counts, values, budget=10)
    assert result.path[4] == (4, 3)  # 4 moves: the Chebyshev distance
    assert result.found_steps == [4, 4, 4]
    assert (result.steps_to("first"), result.steps_to("middle"), result.steps_to("last")) == (4, 4, 4)
    assert result.found_fraction == 1.0


def test_greedy_never_returns_to_a_visited_cell_while_an_unvisited_one_is_next_to_it():
    visited = torch.zeros(3, 3, dtype=torch.bool)
    visited[0, 0] = visited[0, 1] = True
    assert greedy_step((0, 1), torch.zeros(3, 3), visited) != (0, 0)


def test_lawnmower_sweeps_rows_back_and_forth():
    assert lawnmower_order(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    counts = torch.zeros(3, 3, dtype=torch.long)
    result = run_search(counts, torch.zeros(3, 3), 8, "lawnmower")
    assert result.path == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0), (2, 0), (2, 1), (2, 2)]


def test_run_search_rejects_a_start_outside_the_grid_and_unknown_planners():
    with pytest.raises(ValueError, match="outside"):
        run_search(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3), 4, start=(3, 0))
    with pytest.raises(ValueError, match="planner must be one of"):
        run_search(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3), 4, planner="spiral")


# --- the world's episodes ----------------------------------------------------------------------


def test_world_episodes_are_seeded_and_counts_match_the_targets(episode):
    again = render_search_episode(3, world=SMALL)
    assert torch.equal(episode.image, again.image) and torch.equal(episode.counts, again.counts)
    assert episode.image.shape == (3, 6 * 32, 6 * 32)
    assert int(episode.counts.sum()) == len(episode.targets) > 0
    cells = (episode.targets // 32).long()
    assert torch.equal(torch.bincount(cells[:, 1] * 6 + cells[:, 0], minlength=36).view(6, 6), episode.counts)
    assert episode.query.startswith("a ") and episode.query.endswith(".")


def test_shifted_episodes_hide_the_same_targets(episode):
    blurred = render_search_episode(3, "blur", world=SMALL)
    assert torch.equal(blurred.counts, episode.counts)
    assert not torch.equal(blurred.image, episode.image)


def test_targets_are_denser_in_the_dense_region_type():
    world = SearchWorld(rows=12, cols=12, cell_px=16, dense_rate=0.5, sparse_rate=0.02)
    dense, sparse = [], []
    for seed in range(8):
        e = render_search_episode(seed, world=world)
        mask = e.regions == e.dense_type
        dense.append(e.counts[mask].float().mean())
        if (~mask).any():
            sparse.append(e.counts[~mask].float().mean())
    assert torch.stack(dense).mean() > 5 * torch.stack(sparse).mean()


# --- the session: observe, reset, the user's model ----------------------------------------------


def test_observe_drives_an_episode_without_lightning(vlm, episode):
    before = state_hash(vlm)
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, lr_start=1e-3, lr_end=1e-2, update_every=5)
    initial = session.map.clone()
    assert initial.shape == (6, 6) and initial.min() == 0 and initial.max() == 1
    # a robot loop: observe a cell, get the map, pick the next cell
    position, visited, found = (0, 0), torch.zeros(6, 6, dtype=torch.bool), 0
    for _ in range(12):
        count = int(episode.counts[position])
        found += 0 if visited[position] else count
        visited[position] = True
        values = session.observe([position[0] * 6 + position[1]], [count])
        position = greedy_step(position, values, visited)
    assert session.steps == 12 and len(session.history) == 12  # one entry per step, revisits included
    assert len(session.update_ms) >= 2  # every 5 steps at least
    assert not torch.allclose(session.map, initial)
    assert state_hash(vlm) == before
    assert all(not p.requires_grad and p.grad is None for p in vlm.parameters())


def test_a_new_find_triggers_an_update_and_an_empty_cell_does_not(vlm, episode):
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, update_every=20)
    empty = int((episode.counts.flatten() == 0).nonzero()[0])
    full = int((episode.counts.flatten() > 0).nonzero()[0])
    session.observe([empty], [0])
    assert len(session.update_ms) == 0
    session.observe([full], [int(episode.counts.flatten()[full])])
    assert len(session.update_ms) == 1
    session.observe([full], [int(episode.counts.flatten()[full])])  # seen before: no new find
    assert len(session.update_ms) == 1


def test_every_update_starts_from_the_original_weights(vlm, episode, monkeypatch):
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, lr_start=1e-2, lr_end=1e-2, update_every=1)
    checked = []
    real_step = torch.optim.Adam.step

    def checking_step(optimizer, *args, **kwargs):
        state = session.tower.state_dict()
        checked.append(all(torch.equal(state[k], v) for k, v in session.original_state.items()))
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", checking_step)
    for cell in range(3):
        session.observe([cell], [1])
        # after the step the working tower has moved away from the original
        assert not all(torch.equal(session.tower.state_dict()[k], v) for k, v in session.original_state.items())
    assert checked == [True, True, True]


def test_the_session_takes_an_image_query_and_rejects_bad_observations(vlm, episode):
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query_image)
    with pytest.raises(ValueError, match="one count per cell"):
        session.observe([0, 1], [0])
    with pytest.raises(ValueError, match="flat indices"):
        session.observe([36], [0])
    with pytest.raises(ValueError, match="query text is empty"):
        SearchTTASession(vlm, episode.image, (6, 6), " ")


def test_same_seed_same_search(vlm, episode):
    def search():
        session = SearchTTASession(vlm, episode.image, (6, 6), episode.query, lr_start=1e-3, lr_end=1e-2, seed=7)
        return search_with_tta(session, episode.counts, 10).path

    assert search() == search()


# --- the score map: the reference's scale, ViT patch tokens ------------------------------------


def test_the_map_of_a_clip_style_model_is_sigmoid_of_cos_over_0_07_without_bias(vlm, episode):
    cos = torch.tensor([0.2, 0.3])
    assert map_calibration(vlm, cos) == (pytest.approx(1 / 0.07), 0.0)
    scores = zero_shot_scores(vlm, episode.image, (6, 6), episode.query, cells="crops")
    session = SearchTTASession(vlm, episode.image, (6, 6), episode.query)
    assert (session.scale, session.bias) == (REFERENCE_SCALE, 0.0)
    with torch.no_grad():  # the regions: k chosen per episode in 1-4, not fixed at 4
        features = session.encoder(session.tower)
    assert torch.equal(session.regions, choose_regions(features, seed=0))
    assert len(session.regions.unique()) < 4  # this episode's cells split into fewer regions
    assert torch.allclose(session.initial_scores, scores, atol=1e-6)
    # a model with a logit bias (SigLIP-style) keeps its own sigmoid; "centred" is an option
    siglip = make_tiny_vlm("tta-tiny-sigmoid")
    assert map_calibration(siglip, cos) == (pytest.approx(float(siglip.logit_scale)), float(siglip.logit_bias))
    assert map_calibration(vlm, cos, bias="centred")[1] == pytest.approx(-REFERENCE_SCALE * 0.25)


@pytest.fixture(scope="module")
def vit():
    return make_tiny_vlm("tta-tiny-sigmoid")  # an open_clip ViT: 64 px input, 16 px patches -> 4 x 4 tokens


def count_images(tower: torch.nn.Module) -> list[int]:
    seen = []
    tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


def test_a_vit_scores_one_patch_token_per_cell_in_one_pass(vit):
    image = render_search_episode(3, world=SearchWorld(rows=4, cols=4, cell_px=32, n_sites=4)).image
    vlm = make_tiny_vlm("tta-tiny-sigmoid")
    seen = count_images(vlm.model.visual)
    scores = zero_shot_scores(vlm, image, (4, 4), "a red triangle.")
    assert scores.shape == (16,) and seen == [1]  # one image through the ViT, not 16 crops
    session = SearchTTASession(vlm, image, (4, 4), "a red triangle.", update_every=1)
    assert session.encoder.mode == "tokens" and session.map.shape == (4, 4)
    assert torch.allclose(session.initial_scores, scores, atol=1e-6)
    seen_copy = count_images(session.tower)
    session.observe([5], [1])
    assert seen_copy == [1, 1]  # the update: one pass for the loss, one for the new map
    crops = zero_shot_scores(vlm, image, (4, 4), "a red triangle.", cells="crops")
    assert crops.shape == (16,) and not torch.allclose(crops, scores)
    with pytest.raises(ValueError, match="patch-token grid"):
        zero_shot_scores(vlm, image, (8, 8), "a red triangle.")
    with pytest.raises(ValueError, match="needs an open_clip ViT"):
        zero_shot_scores(make_tiny_vlm("tta-tiny-clip"), image, (4, 4), "a red triangle.", cells="tokens")


# --- datamodules --------------------------------------------------------------------------------


def test_world_search_datamodule_yields_the_episode_contract():
    data = WorldSearchDataModule(
        domains=["clean", "noise"],
        n_episodes=2,
        image_size=32,
        grid=(6, 6),
        world={"n_sites": 4},
        query="image",
        batch_size=2,
    )
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"][0].shape == (3, 192, 192) and batch["grid"].tolist() == [[6, 6], [6, 6]]
    assert batch["query"] == [None, None] and batch["query_image"][0].shape == (3, 32, 32)
    assert batch["counts"][0].shape == (6, 6) and batch["start"].tolist() == [[0, 0], [0, 0]]
    assert batch["index"].tolist() == [0, 1] and batches[1]["domain"] == ["noise", "noise"]
    # the noise domain shows the clean episodes
    assert torch.equal(batches[1]["counts"][0], batch["counts"][0])


def write_episodes(root, episodes, size=(60, 40)):
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 60)).save(root / "area.png")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "example.png")
    (root / "episodes.json").write_text(json.dumps(episodes))
    return root


def test_episode_folder_reads_images_queries_and_counts_targets(tmp_path):
    root = write_episodes(
        tmp_path / "eps",
        [
            {"image": "area.png", "query": "a red car.", "targets": [[5, 5], [7, 6], [59, 39]], "grid": [2, 3]},
            {
                "image": "area.png",
                "query_image": "example.png",
                "targets": [],
                "grid": [4, 4],
                "start": [1, 2],
                "domain": "site b",
            },
        ],
    )
    data = EpisodeFolderDataModule(root)
    assert data.class_names == ["a red car.", "example"] and data.domains == ["user", "site b"]
    data.setup("predict")
    first, second = list(data.predict_dataloader())
    assert first["counts"][0].tolist() == [[2, 0, 0], [0, 0, 1]]
    assert first["image"][0].shape == (3, 40, 60) and first["query"] == ["a red car."]
    assert second["query"] == [None] and second["query_image"][0].shape == (3, 16, 16)
    assert second["start"].tolist() == [[1, 2]] and second["counts"][0].sum() == 0
    resized = EpisodeFolderDataModule(root, image_size=8)
    resized.setup("predict")
    assert resized.dataset[0]["image"].shape == (3, 16, 24)


def test_episode_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="episodes.json"):
        EpisodeFolderDataModule(tmp_path)
    root = write_episodes(tmp_path / "a", [{"image": "missing.png", "query": "x", "targets": [], "grid": [2, 2]}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        EpisodeFolderDataModule(root)
    root = write_episodes(tmp_path / "b", [{"image": "area.png", "targets": [], "grid": [2, 2]}])
    with pytest.raises(ValueError, match="exactly one of query"):
        EpisodeFolderDataModule(root)
    root = write_episodes(tmp_path / "c", [{"image": "area.png", "query": "x", "targets": [[60, 3]], "grid": [2, 2]}])
    data = EpisodeFolderDataModule(root)
    with pytest.raises(ValueError, match=r"outside the 60 x 40 image"):
        data.setup("predict")


# --- the runner and the callback in Trainer.predict ----------------------------------------------


def predict(module, callbacks, n=2):
    data = WorldSearchDataModule(n_episodes=n, image_size=64, grid=(5, 5), world={"n_sites": 4, "dense_rate": 1.0})
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    return trainer.predict(module, datamodule=data)


@pytest.fixture(scope="module")
def runner():
    return SearchEpisodeRunner(make_tiny_vlm("tta-tiny-clip"), budget=8)


def test_runner_predicts_episode_metrics_without_adaptation(runner):
    batches = predict(runner, [])
    out = batches[0]
    assert {"n_targets", "found", "steps_first", "steps_middle", "steps_last", "index", "domain"} <= set(out)
    assert int(out["found"][0]) <= int(out["n_targets"][0])
    assert "found_zs" not in out


def test_search_tta_callback_replaces_outputs_keeps_unadapted_and_leaves_the_model_unchanged(runner, tmp_path):
    before = state_hash(runner)
    batches = predict(runner, [SearchTTA(lr_start=1e-3, lr_end=1e-2, update_every=3, seed=0)])
    assert state_hash(runner) == before
    out = batches[0]
    assert {"found_zs", "steps_first_zs", "adapt_ms", "n_updates", "ms_per_update"} <= set(out)
    assert (out["adapt_ms"] > 0).all() and (out["n_updates"] >= 2).all()  # 9 steps, every 3 at least
    # the writer: one row per episode, metrics from the rows
    rows = [row for b in batches for row in runner.prediction_rows(b)]
    assert len(rows) == 2 and list(rows[0]) == list(runner.prediction_columns)
    writer = PredictionWriter(tmp_path, seed=0)
    predict(runner, [SearchTTA(lr_start=1e-3, lr_end=1e-2, update_every=3, seed=0), writer])
    with open(tmp_path / "predictions.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["found"] for r in written] == [str(r["found"]) for r in rows]  # same seed, same search
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "search_tta" and metrics["n"] == 2 and set(metrics["domains"]) == {"clean"}
    fractions = [int(b["found"][0]) / int(b["n_targets"][0]) for b in batches]
    assert metrics["found_fraction"] == pytest.approx(sum(fractions) / 2, abs=1e-5)
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 2
    assert metrics["ms_per_update"] > 0 and metrics["adapt_ms_per_sample"] > 0


def test_search_tta_needs_the_episode_runner():
    from tta.tasks import ZeroShotClassifier

    with pytest.raises(TypeError, match="SearchEpisodeRunner"):
        SearchTTA().on_predict_start(None, ZeroShotClassifier(make_tiny_vlm("tta-tiny-clip"), ["a", "b"]))
    with pytest.raises(ValueError, match="update_every"):
        SearchTTA(update_every=0)


def test_summary_counts_unreached_targets_as_empty_steps(runner):
    out = {
        "index": torch.tensor([0, 1]),
        "domain": ["clean", "clean"],
        "n_targets": torch.tensor([4, 0]),
        "found": torch.tensor([1, 0]),
        "steps_first": torch.tensor([3, -1]),
        "steps_middle": torch.tensor([-1, -1]),
        "steps_last": torch.tensor([-1, -1]),
    }
    rows = runner.prediction_rows(out)
    assert rows[0]["found_fraction"] == "0.250000" and rows[0]["steps_middle"] == ""
    assert rows[1]["found_fraction"] == ""
    strings = [{k: str(v) for k, v in r.items()} for r in rows]
    metrics = runner.summarize_predictions(strings)
    assert metrics["found_fraction"] == 0.25 and metrics["reached_first"] == 1 and metrics["steps_first"] == 3
    assert metrics["reached_middle"] == 0 and metrics["steps_middle"] is None


def test_collate_keeps_episodes_of_different_sizes():
    items = [
        {
            "image": torch.zeros(3, 4, 4),
            "query": "a",
            "query_image": None,
            "counts": torch.zeros(2, 2),
            "grid": (2, 2),
            "start": (0, 0),
            "index": 0,
            "domain": "d",
        },
        {
            "image": torch.zeros(3, 6, 8),
            "query": "b",
            "query_image": None,
            "counts": torch.zeros(3, 4),
            "grid": (3, 4),
            "start": (1, 1),
            "index": 1,
            "domain": "d",
        },
    ]
    batch = collate_episodes(items)
    assert [tuple(i.shape) for i in batch["image"]] == [(3, 4, 4), (3, 6, 8)]
    assert batch["grid"].tolist() == [[2, 2], [3, 4]]
