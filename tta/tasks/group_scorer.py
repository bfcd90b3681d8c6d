"""Scoring compositional groups as a LightningModule: what TTM adapts and the writer records."""

from __future__ import annotations

import json
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.metrics.groups import group_match_margin, group_score, image_score, multiple_choice_correct, text_score
from tta.models.vlm import VisionLanguageModel
from tta.tasks.base import OverVLM
from tta.validation import check_finite

#: Per-group metrics of a k x k group (1 x k items have only ``text_score``: the correct option wins).
GROUP_METRICS = ("text_score", "image_score", "group_score", "group_match")


def check_group_batch(batch: dict[str, Any]) -> None:
    """Clear errors for a batch that breaks the group contract (see ``tta.datamodules.compositional``)."""
    missing = {"images", "captions", "index", "domain"} - set(batch)
    if missing:
        raise KeyError(
            f"batch lacks {sorted(missing)}: a group datamodule must yield dicts with images "
            "(B x m x 3 x H x W), captions, index and domain (see tta.datamodules.compositional)"
        )
    images, captions = batch["images"], batch["captions"]
    if images.ndim != 5:
        raise ValueError(f"group images must be B x m x 3 x H x W, got shape {tuple(images.shape)}")
    if len(captions) != len(images) or any(len(c) != len(captions[0]) for c in captions):
        raise ValueError("captions must be a list of B lists of k captions (the same k for every group)")


def group_rows(scores: torch.Tensor, prefix: str = "") -> list[dict[str, Any]]:
    """Per-group metric values (0/1, ``None`` where a metric does not apply) and the margin, from
    the scores in the precision they arrive in."""
    scores = scores.detach().cpu()
    if scores.shape[1] == 1:  # 1 x k multiple choice: correct option minus the best other
        correct = multiple_choice_correct(scores[:, 0])
        others = scores[:, 0, 1:].amax(1)
        return [
            {
                f"{prefix}text_score": int(c),
                f"{prefix}image_score": None,
                f"{prefix}group_score": None,
                f"{prefix}group_match": None,
                f"{prefix}margin": f"{m:.4f}",
            }
            for c, m in zip(correct.tolist(), (scores[:, 0, 0] - others).tolist())
        ]
    values = {"text_score": text_score(scores), "image_score": image_score(scores), "group_score": group_score(scores)}
    margin = group_match_margin(scores)
    values["group_match"] = margin > 0
    return [
        {**{f"{prefix}{name}": int(v[i]) for name, v in values.items()}, f"{prefix}margin": f"{float(margin[i]):.4f}"}
        for i in range(len(scores))
    ]


def _mean(rows: list[dict[str, str]], column: str) -> float | None:
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    return sum(values) / len(values) if values else None


class GroupScorer(OverVLM, pl.LightningModule):
    """Score each group's images against its captions with a vision-language model.

    ``predict_step`` returns, per batch of the group contract:

    - ``scores`` (``B x m x k``): ``logit_scale * cos(image, caption) (+ logit_bias)``, rows images,
      columns captions, in logit units;
    - ``index`` (B long), ``domain`` and ``kind`` (lists of B str).

    TTM (``tta.callbacks.TTM``) swaps in an adapted copy of ``vlm`` for the prediction and adds
    ``scores_zs``, the unadapted scores. ``prediction_rows`` / ``summarize_predictions`` turn the
    outputs into one CSV row per group and the metrics text/image/group score and group match,
    overall and per domain (with ``*_zs`` twins when ``scores_zs`` is present).
    """

    def __init__(self, vlm: VisionLanguageModel) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, images: torch.Tensor, captions: list[list[str]]) -> torch.Tensor:
        """``B x m x k`` scores of ``B x m x 3 x H x W`` images against ``B`` lists of ``k`` captions."""
        b, m = images.shape[:2]
        k = len(captions[0])
        flat_images = images.flatten(0, 1)
        self.vlm.check_images(flat_images)
        image_features = self.vlm.encode_image(flat_images).view(b, m, -1)
        text_features = self.vlm.encode_text(self.vlm.tokenize([c for group in captions for c in group]))
        return self.vlm.logits(image_features, text_features.view(b, k, -1))

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        check_group_batch(batch)
        kinds = batch.get("kind") or [""] * len(batch["index"])
        if len(batch["index"]) == 0:
            return {"scores": torch.zeros(0, 1, 1), "index": batch["index"], "domain": [], "kind": []}
        scores = self(batch["images"], batch["captions"])
        hint = (
            "check the model's weights, run in full precision (trainer.precision=32-true), or, after TTM, lower "
            "its learning rate (tta.callbacks.ttm.lr)"
        )
        check_finite(scores, batch["index"], "the model", self._trainer, batch_idx, hint)
        return {
            "scores": scores,
            "index": batch["index"],
            "domain": list(batch["domain"]),
            "kind": list(kinds),
        }

    # the writer interface ------------------------------------------------------------------
    prediction_columns: tuple[str, ...] = (
        "index",
        "domain",
        "kind",
        "shape",
        *GROUP_METRICS,
        "margin",
        *(f"{m}_zs" for m in GROUP_METRICS),
        "margin_zs",
        "scores",
    )

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per group; ``*_zs`` columns are empty unless a callback left ``scores_zs``."""
        scores = outputs["scores"]
        rows = group_rows(scores)
        unadapted = group_rows(outputs["scores_zs"], "zs:") if "scores_zs" in outputs else [{}] * len(rows)
        out = []
        for i, (row, zs) in enumerate(zip(rows, unadapted)):
            row = {**row, **{f"{k[3:]}_zs": v for k, v in zs.items()}}
            out.append(
                {
                    "index": int(outputs["index"][i]),
                    "domain": outputs["domain"][i],
                    "kind": outputs["kind"][i],
                    "shape": f"{scores.shape[1]}x{scores.shape[2]}",
                    **{c: row.get(c) for c in self.prediction_columns if c in row},
                    "scores": json.dumps([[round(v, 4) for v in r] for r in scores[i].float().tolist()]),
                }
            )
        return out

    def summarize_predictions(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        """Mean text/image/group score and group match (fractions; ``None`` where no row has the
        metric) and their ``*_zs`` twins, overall, per domain and per kind."""
        columns = [*GROUP_METRICS, *(f"{m}_zs" for m in GROUP_METRICS)]

        def summary(subset: list[dict[str, str]]) -> dict[str, Any]:
            out: dict[str, Any] = {"n": len(subset)}
            for column in columns:
                value = _mean(subset, column)
                if value is not None or not column.endswith("_zs"):
                    out[column] = value
            return out

        result = summary(rows)
        result["headline"] = "group_score"  # what tta-report tabulates and plots
        result["domains"] = {
            d: summary([r for r in rows if r["domain"] == d]) for d in dict.fromkeys(r["domain"] for r in rows)
        }
        result["kinds"] = {
            k: summary([r for r in rows if r["kind"] == k]) for k in dict.fromkeys(r["kind"] for r in rows)
        }
        return result

    def progress_values(self, row: dict[str, str]) -> dict[str, float | None]:
        """Running GroupScore on the progress bar (the text score of 1 x k items)."""
        value = row.get("group_score") or row.get("text_score")
        return {"group": float(value) if value not in (None, "") else None}
