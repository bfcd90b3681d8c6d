"""DMN-ZS: the training-free dynamic memory network, zero-shot (Zhang et al., CVPR 2024).

Online, no backward pass, no learned parts: a memory of ``memory_size`` test features per class,
filled with each sample under its pseudo-label and read by attention. As the reference (YBZh/DMN
c6c218c, ``dmn_main.py``, ``direct_inference`` with ``n_shot`` 0: ``scripts/run.sh``'s
training-free block, no few-shot static memory, the mapping parameters never trained), per sample:

1. text probabilities of every view, ``softmax(logit_scale * x_v . t_c)`` (``DualMem.get_text_prediction``);
2. the ``int(V * selection)`` views of lowest entropy ``-sum p log(p + 1e-6)`` (3 of 32 at 0.1:
   ``select_confident_samples``); their mean probability ``p`` gives the pseudo-label ``argmax p``
   and the sample's entropy ``-sum p log(p + 1e-8)`` (note the other epsilon);
3. the memory is written (``DualMem.update_memory_bank``): the ORIGINAL view's feature (view 0, not
   the kept views) goes to the pseudo-class's next free slot; when its ``memory_size`` slots are
   full, it replaces the slot of highest stored entropy if its own entropy is lower than that one,
   else it is dropped. Ties of the highest entropy: the last slot of an ascending sort (a stable
   sort here: the highest index; the reference's CUDA sort leaves ties unspecified);
4. the memory is read AFTER the write (``DualMem.get_image_pred``, ``similarity_weighted``), so the
   sample's own feature, when kept, is a slot of its pseudo-class with weight 1. Each class's
   slots plus its text feature as one more slot (``fixed_global_feat_vanilla``, the class text
   feature: ``clip/fix_clip.py`` ``get_text_features``) are weighted by
   ``exp(-beta * (1 - cos(x_0, slot)))`` and summed; the sum, L2-normalised, is the class's
   adaptive feature; memory logits ``logit_scale * cos(adaptive_c, x_0)``. An empty slot is zero
   and adds nothing, so a class without memory reads its text feature (memory logits = the text
   logits of view 0). Scaling a class's weights by a constant changes nothing (the sum is
   normalised): a softmax over the slots at temperature ``1 / beta`` gives the same logits;
5. the prediction (``direct_inference``'s ``weight_search``): ``p_text(view 0) + memory_weight *
   p_memory``, probabilities, not logits (beta1 = 1, the static memory's beta3 = 0). The reference
   picks ``memory_weight`` per data set from 13 values (0.001 to 1000) by the accuracy on the test
   labels; the cards carry the values its logs chose (``camera_ready_dmn_tf_searched_vit_0.txt``,
   ``camera_ready_dmn_tf_shift_0.txt``). The logits returned are ``log(p_text + memory_weight *
   p_memory)``, computed in log space (their softmax is the mixture divided by ``1 + memory_weight``).

Omitted because they cannot change a zero-shot result: the mapping parameters (``global_bias``,
``text_bias``... zeros when not trained; adding them and re-normalising is a no-op), the stored
predictions ``image_prediction_mem`` (never read here; 200 MB on ImageNet), the second
normalisation of the adaptive feature. Features are L2-normalised in float32 on entry (the
reference's CLIP runs in float32: ``convert_weights`` is commented out in its ``clip/model.py``,
and it normalises the query and every memory slot in float32 at each read); the memory stores
them normalised, so its read needs no normalisation of its own. ``logit_scale`` is the model's
(``pl_module.vlm.logit_scale``, 100 for CLIP ViT-B/16, the reference's ``model.logit_scale.exp()``).
Exact ties (views of equal entropy, classes of equal mean probability) go to the lower index; the
reference's CUDA ``argsort``/``max`` leave them unspecified.

The views are the callback's: the reference draws 31 (``-b 32``) with ``RandomResizedCrop`` at scale
0.5-1 + flip, AugMix on the fine-grained sets only (``data/datautils.py`` ``AugMixAugmenter``), and
ensembles each class's templates with CuPL's GPT-3 sentences (``--text_prompt tip_cupl``); this
project's crops draw scale 0.08-1 and its text features use the templates alone
(``configs/experiment/dmn_vit_b16``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta.methods.online import OnlineMethod

#: The reference's epsilons: in the view selection's entropy and in the stored sample entropy.
SELECTION_EPS = 1e-6
MEMORY_EPS = 1e-8


def n_dmn_kept(n_views: int, selection: float) -> int:
    """The reference's ``int(V * selection)`` views (3 of 32 at 0.1); 0 is refused (the reference's
    mean over no view is NaN)."""
    k = int(n_views * selection)
    if k < 1:
        raise ValueError(
            f"selection {selection} keeps int({n_views} * {selection}) = 0 of {n_views} views: "
            f"raise selection to at least 1/{n_views} or give more views"
        )
    return k


def confident_mean(probs: torch.Tensor, selection: float) -> torch.Tensor:
    """Mean probability (``C``) of the ``int(V * selection)`` views of lowest entropy
    ``-sum p log(p + 1e-6)`` among ``probs`` (``V x C``); ties keep the lower view index."""
    k = n_dmn_kept(probs.shape[0], selection)
    view_entropy = -(probs * torch.log(probs + SELECTION_EPS)).sum(-1)
    kept = torch.argsort(view_entropy, stable=True)[:k]
    return probs[kept].mean(0)


def adaptive_class_features(
    query: torch.Tensor, memory: torch.Tensor, text_features: torch.Tensor, beta: float
) -> torch.Tensor:
    """Each class's attention read of its slots and text feature (``C x D``, unit norm) for the
    normalised ``query`` (``D``); ``memory`` is ``C x M x D``, empty slots zero."""
    weights = torch.exp(-beta * (1 - torch.einsum("cmd,d->cm", memory, query)))
    text_weights = torch.exp(-beta * (1 - text_features @ query))
    read = torch.einsum("cm,cmd->cd", weights, memory) + text_weights.unsqueeze(1) * text_features
    return F.normalize(read, dim=-1)


def mix_probabilities(text_logits: torch.Tensor, memory_logits: torch.Tensor, memory_weight: float) -> torch.Tensor:
    """``log(softmax(text) + memory_weight * softmax(memory))`` in log space (finite where the
    probabilities underflow; ``memory_weight`` 0 gives the text log-probabilities)."""
    memory_term = memory_logits.log_softmax(-1) + (math.log(memory_weight) if memory_weight > 0 else -math.inf)
    return torch.logaddexp(text_logits.log_softmax(-1), memory_term)


class DMNState(OnlineMethod):
    """DMN-ZS's dynamic memory over one stream (see the module docstring).

    State: ``features`` (``C x memory_size x D`` float32, zero where empty), ``entropies``
    (``C x memory_size``, each slot's sample entropy) and ``counts`` (``C``, filled slots per
    class; slots fill in order, so a class's first ``counts[c]`` slots are its memory).
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        logit_scale: float,
        memory_size: int = 50,
        beta: float = 5.5,
        memory_weight: float = 1.0,
        selection: float = 0.1,
    ) -> None:
        if memory_size < 1 or beta < 0 or memory_weight < 0 or not 0 < selection <= 1:
            raise ValueError(
                f"need memory_size >= 1, beta >= 0, memory_weight >= 0 and 0 < selection <= 1; got "
                f"{memory_size}, {beta}, {memory_weight}, {selection}"
            )
        self.text = F.normalize(text_features.detach().float(), dim=-1)
        self.logit_scale, self.memory_size, self.beta = float(logit_scale), int(memory_size), float(beta)
        self.memory_weight, self.selection = float(memory_weight), float(selection)
        n_classes, dim = self.text.shape
        device = self.text.device
        # written in place at every step: plain tensors even when built under inference mode (Lightning's
        # predict runs there, and a resume builds the state at on_predict_start), which forbids that
        with torch.inference_mode(False):
            self.features = torch.zeros(n_classes, self.memory_size, dim, device=device)
            self.entropies = torch.zeros(n_classes, self.memory_size, device=device)
            self.counts = torch.zeros(n_classes, dtype=torch.int64, device=device)

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(view_features.detach().to(self.text.device, torch.float32), dim=-1)
        text_logits = self.logit_scale * x @ self.text.T  # V x C
        mean = confident_mean(text_logits.softmax(-1), self.selection)
        self.write(x[0], mean)
        return mix_probabilities(text_logits[0], self.memory_logits(x[0]), self.memory_weight)

    def write(self, feature: torch.Tensor, mean_probs: torch.Tensor) -> None:
        """``update_memory_bank``: ``feature`` (view 0) under the pseudo-label of ``mean_probs``."""
        label = int(mean_probs.argmax())
        sample_entropy = -(mean_probs * torch.log(mean_probs + MEMORY_EPS)).sum()
        filled = int(self.counts[label])
        if filled < self.memory_size:
            slot = filled
            self.counts[label] += 1
        elif bool((sample_entropy < self.entropies[label]).any()):
            slot = int(torch.sort(self.entropies[label], stable=True).indices[-1])  # the highest entropy
        else:
            return  # less confident than every stored sample of its class: dropped
        self.features[label, slot] = feature
        self.entropies[label, slot] = sample_entropy

    def memory_logits(self, query: torch.Tensor) -> torch.Tensor:
        """``get_image_pred``'s logits (``C``) for the normalised original-view feature ``query``."""
        return self.logit_scale * adaptive_class_features(query, self.features, self.text, self.beta) @ query

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "features": self.features.clone(),
            "entropies": self.entropies.clone(),
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"features": self.features, "entropies": self.entropies, "counts": self.counts}
        for name, own in expected.items():
            if name not in state or state[name].shape != own.shape:
                got = tuple(state[name].shape) if name in state else "nothing"
                raise ValueError(f"DMN state {name!r}: expected shape {tuple(own.shape)}, got {got}")
        with torch.inference_mode(False):  # plain copies, written in place later (see __init__)
            self.features = state["features"].to(self.text.device, torch.float32).clone()
            self.entropies = state["entropies"].to(self.text.device, torch.float32).clone()
            self.counts = state["counts"].to(self.text.device, torch.int64).clone()

    def size(self) -> int:
        return int(self.counts.sum())
