"""End to end: ``tta.cli.run`` and the ``tta-predict`` / ``tta-report`` console scripts."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from conftest import run_script

from tta.cli import run

#: The columns predictions.csv and timing.csv are documented to have (tta.callbacks.PredictionWriter).
COLUMNS = ["index", "domain", "label", "pred", "confidence", "pred_zs", "confidence_zs"]
TIMING_COLUMNS = ["index", "ms", "adapt_ms"]
METRIC_KEYS = {"method", "model", "data", "seed", "n", "accuracy", "ece", "ms_per_sample", "peak_mem_mb", "domains"}


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from hydra import compose, initialize_config_module

    out = tmp_path_factory.mktemp("run")
    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=["data.n_per_domain=20", "data.domains=[clean,blur]", "trainer.enable_progress_bar=false"],
        )
    returned = run(cfg, out)
    return out, returned


def test_run_writes_one_row_per_sample(run_dir):
    out, _ = run_dir
    header, rows = read_csv(out / "predictions.csv")
    assert header == COLUMNS
    timing_header, timing = read_csv(out / "timing.csv")
    assert timing_header == TIMING_COLUMNS and [t["index"] for t in timing] == [r["index"] for r in rows]
    assert all(float(t["ms"]) >= 0 and float(t["adapt_ms"]) == 0 for t in timing)
    assert len(rows) == 40
    assert [r["domain"] for r in rows] == ["clean"] * 20 + ["blur"] * 20
    assert len({r["index"] for r in rows}) == 40
    for r in rows:
        assert 0 <= int(r["pred"]) < 30 and 0 <= int(r["label"]) < 30
        assert 0 < float(r["confidence"]) <= 1
        assert r["pred_zs"] == "" and r["confidence_zs"] == ""  # no TTA callback ran


def test_run_writes_metrics(run_dir):
    out, returned = run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    assert set(metrics) >= METRIC_KEYS
    assert metrics["method"] == "none"
    assert metrics["model"] == "tta-world-resnet"
    assert metrics["data"] == "world"
    assert metrics["seed"] == 0
    assert metrics["n"] == 40
    assert list(metrics["domains"]) == ["clean", "blur"]
    for name, values in [("all", metrics), *metrics["domains"].items()]:
        assert 0 <= values["accuracy"] <= 1, name
        assert 0 <= values["ece"] <= 1, name
    for values in metrics["domains"].values():
        assert {"n", "accuracy", "ece", "ms_per_sample"} <= set(values)
        assert values["n"] == 20
    assert metrics["ms_per_sample"] > 0 and metrics["peak_mem_mb"] > 0


def test_metrics_agree_with_predictions(run_dir):
    out, returned = run_dir
    _, rows = read_csv(out / "predictions.csv")
    for domain, values in returned["domains"].items():
        picked = [r for r in rows if r["domain"] == domain]
        correct = sum(r["pred"] == r["label"] for r in picked)
        assert values["accuracy"] == pytest.approx(correct / len(picked))
    assert returned["accuracy"] == pytest.approx(sum(r["pred"] == r["label"] for r in rows) / len(rows))


def test_shipped_model_recognises_clean_scenes(run_dir):
    _, metrics = run_dir
    assert metrics["domains"]["clean"]["accuracy"] >= 0.9


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("script") / "run"
    result = run_script(
        "tta-predict", ["experiment=world_quick", "data.domains=[clean]", f"hydra.run.dir={out}"], cwd=out.parent
    )
    return out, result


def test_tta_predict_console_script(script_run):
    out, result = script_run
    assert result.returncode == 0, result.stderr
    assert (out / "predictions.csv").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 100  # experiment=world_quick: 100 scenes per domain
    assert list(metrics["domains"]) == ["clean"]
    assert "clean" in result.stdout  # the per-domain table


def test_tta_report_console_script(script_run):
    if importlib.util.find_spec("tta.report") is None:
        pytest.skip("tta.report is not written yet")
    out, predicted = script_run
    assert predicted.returncode == 0, predicted.stderr
    result = run_script("tta-report", [str(out)], cwd=out.parent)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout
    assert (out / "report.md").is_file() and (out / "report.png").is_file()


def test_a_cards_method_options_are_left_out_under_tta_none(compose, caplog):
    from tta.callbacks import TTM
    from tta.cli import tta_callbacks

    assert [type(c) for c in tta_callbacks(compose(["experiment=ttm_world"]))] == [TTM]
    with caplog.at_level("WARNING"):
        assert tta_callbacks(compose(["experiment=ttm_world", "tta=none"])) == []
    assert "tta.callbacks.ttm sets options of a method that tta= does not select" in caplog.text
