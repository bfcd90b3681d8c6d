"""DOTA: distributional test-time adaptation, online Gaussian class distributions (Han et al., NeurIPS 2025).

Training-free and online: every class keeps a Gaussian estimate of the test image features (a mean,
a covariance, a soft count), fitted on the stream with the zero-shot probabilities as soft labels;
a sample's logits are the zero-shot logits plus a weight times the Gaussian discriminant scores of
the statistics fitted so far. As the reference (skylineeeeen/DOTA bc67d44) computes it:

- the sample (``utils.py`` ``get_clip_logits_aug``): with one view, its features ``x`` and logits
  ``(scale * x) @ text.T``; with ``V > 1`` views (the ImageNet variants' 63 AugMix views and the
  original), the ``int(0.1 * V)`` views of lowest entropy (6 of 64) are kept, ``x`` is those views'
  features (not averaged), the zero-shot logits their mean, the soft labels each kept view's
  softmax. ``V`` from 2 to 9 keeps no view (the reference fails); the callback refuses it.
- order (``dota.py`` ``run_test_dota``): predict with the statistics so far, THEN ``fit`` the
  sample, THEN ``update`` the inverse covariance: a sample never sees its own statistics.
- scores (``DOTA.predict``): ``W = Lambda @ M`` (``M`` the means, ``D x C``), ``b = 0.5 *
  sum(M * W, 0)``, scores ``mean(x) @ W - b``: a shared-covariance Gaussian discriminant without
  priors.
- mixing: logits = zero-shot + ``min(rho * mean(counts) / k, eta)`` x scores, ``k`` the number of
  kept views (1 without views). The counts start at 1 and grow by ``k`` per sample in total, so the
  weight ramps as ``rho * (1 / k + n / C)`` over the ``n`` samples fitted until it reaches ``eta``.
- ``fit`` (``DOTA.fit``), soft labels ``y`` (``k x C``): ``mu <- (y.T @ x + c * mu) / (sum(y) + c)``;
  each class covariance ``Sigma <- (c * Sigma + sum_b y_b (x_b - mu)(x_b - mu)^T) / (c + sum(y))``
  around the OLD means (the ones before this sample's update); ``c <- c + sum(y)``.
- ``update`` (``DOTA.update``): ``Lambda = inv((1 - epsilon) * mean_k Sigma_k + epsilon * I)``, the
  unweighted mean over classes (classes with little mass weigh as much as the others).
- initialisation (``DOTA.__init__`` and ``main``): counts 1, covariances ``sigma * I``, and means a
  constant 0.001 (``main`` passes ``torch.full(..., 0.001)``, although the class's comment says it
  starts from the text features): every class has the same first scores, so the first sample gets
  its zero-shot probabilities (the logits shifted by one constant). The first ``Lambda`` is the
  pseudo-inverse of ``sigma * I`` (no epsilon).
  ``mean_init="text"`` starts the means at the text features instead (the comment's reading).
- precision: the reference loads CLIP with ``clip.load`` on CUDA, fp16 weights, so its features,
  text features, zero-shot logits, soft labels, ``Lambda`` (``.half()`` after the fp32 inverse)
  and the discriminant scores are fp16, and the final logits fp16; its means, counts and
  covariances are fp32 (the fp32 initial tensors promote the fp16 updates). ``compute_dtype=
  "float16"`` (the default) reproduces those dtypes whatever the trainer's precision (features
  that arrive in fp32 are rounded to fp16; the reference normalises them in fp16, a rounding
  apart); ``"float32"`` runs everything in fp32 (a fix for the fp16 rounding of the scores, whose
  terms grow towards ``1 / epsilon`` and cancel in ``x @ W - b``).
- scale: the reference multiplies by 100; here the model's ``logit_scale`` (100 for CLIP ViT-B/16).

Not kept: the reference also computes each sample's entropy and zero-shot prediction and never uses
them. Among views of equal fp16 entropy the lower index comes first (the reference's CUDA
``argsort`` promises no order among ties; a tie at the cut can change which view is kept).

Cost: the per-class covariances are ``C x D x D`` fp32 (1.05 GB for ImageNet's 1000 classes at
``D = 512``), updated in place at every sample, and part of :meth:`DOTAState.state_dict`.
"""

from __future__ import annotations

import torch

from tta.methods.online import OnlineMethod

#: ``compute_dtype`` values: the reference's fp16 (CUDA CLIP) or fp32 throughout.
COMPUTE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: ``mean_init`` values: the reference's constant (``dota.py`` ``main``) or the text features.
MEAN_INITS = ("constant", "text")
#: The reference's initial value of every mean coordinate (``dota.py`` ``main``: ``torch.full(..., 0.001)``).
CONSTANT_MEAN = 0.001
#: The fraction of the views kept by lowest entropy (``utils.py`` ``get_clip_logits_aug``).
KEPT_FRACTION = 0.1


def confident_views(logits: torch.Tensor, fraction: float = KEPT_FRACTION) -> torch.Tensor:
    """The ``int(V * fraction)`` views (``V x C`` logits -> indices) of lowest entropy, computed in the
    logits' dtype as the reference does, lowest first (ties: the lower index first)."""
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return torch.argsort(entropy, stable=True)[: int(len(logits) * fraction)]


class DOTAState(OnlineMethod):
    """DOTA's class statistics over one stream (see the module doc for the reference's recipe).

    Args:
        text_features: ``C x D`` normalised class features (the model's template ensemble).
        logit_scale: the zero-shot logits' scale (the model's; the reference's 100 for CLIP).
        epsilon: shrinkage of the shared covariance towards the identity before inverting it.
        sigma: the initial covariance of every class, ``sigma * I``.
        eta: the largest weight of the Gaussian scores.
        rho: how fast that weight grows with the mean soft count.
        mean_init: ``"constant"`` (0.001 everywhere, the reference's ``main``) or ``"text"``.
        compute_dtype: ``"float16"`` (the reference's CUDA dtypes) or ``"float32"``.
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        logit_scale: float,
        epsilon: float = 1e-4,
        sigma: float = 0.002,
        eta: float = 0.2,
        rho: float = 0.005,
        mean_init: str = "constant",
        compute_dtype: str = "float16",
    ) -> None:
        if mean_init not in MEAN_INITS:
            raise ValueError(f"mean_init must be one of {MEAN_INITS}, got {mean_init!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        self.text = text_features.detach().to(self.dtype)
        self.scale, self.epsilon, self.eta, self.rho = float(logit_scale), epsilon, eta, rho
        n_classes, dim = self.text.shape
        device = self.text.device
        if mean_init == "constant":
            self.means = torch.full((n_classes, dim), CONSTANT_MEAN, device=device)
        else:
            self.means = self.text.float()
        self.counts = torch.ones(n_classes, device=device)
        with torch.inference_mode(False):  # updated in place by fit, also when built under inference mode
            self.covariances = (sigma * torch.eye(dim, device=device)).repeat(n_classes, 1, 1)
        # the first inverse: a pseudo-inverse in float64, without epsilon (DOTA.__init__)
        self.inverse = torch.linalg.pinv(self.covariances.mean(0).double()).to(self.dtype)
        self.fitted = torch.zeros((), dtype=torch.int64, device=device)

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        x = view_features.detach().to(self.dtype)
        logits = (self.scale * x) @ self.text.T  # the reference's `100. * features @ weights`: scale first
        if len(x) > 1:
            kept = confident_views(logits)
            if len(kept) == 0:
                raise ValueError(f"{len(x)} views keep int({KEPT_FRACTION} * {len(x)}) = 0: use 1 or at least 10")
            x, logits = x[kept], logits[kept]
            zero_shot = logits.mean(0, keepdim=True)
        else:
            zero_shot = logits
        soft_labels = logits.softmax(-1)
        # predict from the statistics so far, then learn from the sample (run_test_dota's order)
        weight = torch.clamp(self.rho * self.counts.mean() / len(x), max=self.eta)
        out = zero_shot + weight * self.scores(x.mean(0, keepdim=True))
        self.fit(x, soft_labels)
        self.update_inverse()
        return out[0].float()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """The Gaussian discriminant scores (``1 x D`` -> ``1 x C``) of the statistics so far, in the
        compute dtype: ``x @ W - 0.5 * sum(M * W, 0)``, ``W = Lambda @ M``."""
        means = self.means.T.to(self.dtype)
        projected = self.inverse @ means
        return features @ projected - 0.5 * (means * projected).sum(0)

    def fit(self, x: torch.Tensor, soft_labels: torch.Tensor) -> None:
        """One sample's kept views (``k x D``) and their soft labels (``k x C``) into the means, the
        covariances (around the old means) and the counts, in the reference's dtypes."""
        mass = soft_labels.sum(0)
        counts = self.counts.unsqueeze(1)
        means = (soft_labels.T @ x + counts * self.means) / (mass.unsqueeze(1) + counts)
        centred = x.unsqueeze(1) - self.means.unsqueeze(0)  # k x C x D, float32: the old means
        spread = torch.einsum("kci,kcj->cij", soft_labels.unsqueeze(2) * centred, centred)
        # in place: the same products and sums as (c * Sigma + spread) / (c + mass), one C x D x D less
        self.covariances.mul_(self.counts[:, None, None]).add_(spread).div_((self.counts + mass)[:, None, None])
        self.means, self.counts = means, self.counts + mass
        self.fitted = self.fitted + 1

    def update_inverse(self) -> None:
        """``Lambda = inv((1 - epsilon) * mean_k Sigma_k + epsilon * I)`` in float32, kept in the compute dtype."""
        shared = self.covariances.mean(0)
        eye = torch.eye(len(shared), device=shared.device)
        self.inverse = torch.linalg.inv((1 - self.epsilon) * shared + self.epsilon * eye).to(self.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "means": self.means,
            "counts": self.counts,
            "covariances": self.covariances,
            "inverse": self.inverse,
            "fitted": self.fitted,
        }
        return {name: tensor.clone().contiguous() for name, tensor in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.text.device
        self.means = state["means"].to(device, torch.float32)
        self.counts = state["counts"].to(device, torch.float32)
        # a copy outside inference mode (a resume loads under it): fit updates it in place
        with torch.inference_mode(False):
            self.covariances = state["covariances"].to(device, torch.float32, copy=True)
        self.inverse = state["inverse"].to(device, self.dtype)
        self.fitted = state["fitted"].to(device, torch.int64)

    def size(self) -> int:
        return int(self.fitted)
