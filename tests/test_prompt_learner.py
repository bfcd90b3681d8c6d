"""PromptLearner reproduces encode_text for every tower kind; the class-feature cache and logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, make_tiny_vlm

from tta.models import PromptLearner

CLASS_NAMES = [
    "cat",
    "red circle",
    "golden retriever puppy",
    "hippopotamus",
    "a very long class name made of many different words to stretch the prompt",
]


def reference_features(vlm, names):
    return vlm.encode_text(vlm.tokenize([f"a photo of a {n}." for n in names]))


def reference_for_template(vlm, template):
    with torch.no_grad():
        return vlm.encode_text(vlm.tokenize([template.format(n) for n in CLASS_NAMES]))


def test_initial_context_reproduces_encode_text(tiny_vlm):
    learner = PromptLearner(tiny_vlm, CLASS_NAMES)
    with torch.no_grad():
        features = learner.text_features(learner.initial_context)
        expected = reference_features(tiny_vlm, CLASS_NAMES)
    assert features.shape == (len(CLASS_NAMES), expected.shape[1])
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_batched_context_gives_one_feature_set_per_context(tiny_vlm):
    learner = PromptLearner(tiny_vlm, CLASS_NAMES)
    batch = 3
    with torch.no_grad():
        copies = learner.text_features(learner.initial_context.expand(batch, -1, -1))
        expected = reference_features(tiny_vlm, CLASS_NAMES)
    assert copies.shape == (batch, len(CLASS_NAMES), expected.shape[1])
    for b in range(batch):
        torch.testing.assert_close(copies[b], expected, atol=1e-5, rtol=0)

    # different contexts in one batch give what each gives alone
    contexts = learner.initial_context + 0.1 * torch.randn(batch, *learner.initial_context.shape)
    with torch.no_grad():
        batched = learner.text_features(contexts)
        for b in range(batch):
            torch.testing.assert_close(batched[b], learner.text_features(contexts[b]), atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)


def test_gradients_reach_the_context_only(tiny_vlm):
    learner = PromptLearner(tiny_vlm, CLASS_NAMES)
    context = learner.initial_context.clone().requires_grad_(True)
    image_features = F.normalize(torch.randn(2, learner.text_features(context).shape[-1]), dim=-1)
    logits = tiny_vlm.logits(image_features, learner.text_features(context))
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    entropy.backward()
    assert context.grad is not None
    assert context.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_vlm.parameters())


@pytest.mark.parametrize("name", TINY_MODELS)
def test_sequence_is_cut_only_under_a_causal_mask(name):
    vlm = make_tiny_vlm(name)
    learner = PromptLearner(vlm, CLASS_NAMES)
    context_length = vlm.tokenize(["x"]).shape[1]
    if name == "tta-tiny-sigmoid":
        assert not vlm.text_tower.causal
        assert learner.seq_len == context_length
    else:
        assert vlm.text_tower.causal
        assert learner.seq_len < context_length
        # still long enough to reach every prompt's pooled (end-of-text) token
        assert learner.seq_len == int(learner.pool_positions.max()) + 1


def test_tower_kinds_are_as_registered():
    from open_clip.model import CLIP, CustomTextCLIP

    assert type(make_tiny_vlm("tta-tiny-clip").model) is CLIP
    assert type(make_tiny_vlm("tta-tiny-customtext").model) is CustomTextCLIP
    sigmoid = make_tiny_vlm("tta-tiny-sigmoid")
    assert isinstance(sigmoid.model, CustomTextCLIP)
    assert sigmoid.logit_bias is not None
    assert sigmoid.text_tower.pool_type == "last"


def test_class_text_features_are_cached():
    vlm = make_tiny_vlm("tta-tiny-clip")
    templates = ("a photo of a {}.",)
    first = vlm.class_text_features(CLASS_NAMES, templates)
    assert vlm.class_text_features(list(CLASS_NAMES), list(templates)) is first

    other = vlm.class_text_features(CLASS_NAMES, ("a drawing of a {}.",))
    assert other is not first
    assert not torch.allclose(other, first)
    torch.testing.assert_close(other, reference_for_template(vlm, "a drawing of a {}."), atol=1e-6, rtol=0)


def test_template_ensemble_is_normalised_mean_of_normalised_features():
    vlm = make_tiny_vlm("tta-tiny-customtext")
    templates = ["a photo of a {}.", "a blurry photo of a {}.", "{}"]
    ensemble = vlm.class_text_features(CLASS_NAMES, templates)
    per_template = torch.stack([reference_for_template(vlm, t) for t in templates])
    expected = F.normalize(per_template.mean(0), dim=-1)
    torch.testing.assert_close(ensemble, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ensemble.norm(dim=-1), torch.ones(len(CLASS_NAMES)))


@pytest.mark.parametrize("name", ["tta-tiny-clip", "tta-tiny-sigmoid"])
def test_logits_are_scaled_cosines_plus_bias(name):
    vlm = make_tiny_vlm(name)
    with torch.no_grad():
        vlm.model.logit_scale.fill_(torch.tensor(5.0).log())
        if vlm.logit_bias is not None:
            vlm.model.logit_bias.fill_(-3.0)
    text = vlm.class_text_features(CLASS_NAMES, ["a photo of a {}."])
    images = F.normalize(torch.randn(4, text.shape[1]), dim=-1)
    bias = -3.0 if name == "tta-tiny-sigmoid" else 0.0
    expected = 5.0 * images @ text.T + bias
    torch.testing.assert_close(vlm.logits(images, text), expected, atol=1e-5, rtol=0)
    # batched text features: one set per image
    batched = vlm.logits(images.unsqueeze(1), text.expand(4, -1, -1)).squeeze(1)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)


def test_untruncated_prompt_learner_gives_the_same_features_on_full_sequences(shipped_vlm):
    names = ["red circle", "sea lion"]
    cut, full = PromptLearner(shipped_vlm, names), PromptLearner(shipped_vlm, names, truncate=False)
    assert full.seq_len == 32 > cut.seq_len
    assert torch.allclose(cut.text_features(cut.initial_context), full.text_features(full.initial_context), atol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_shared_prefix_gives_the_features_and_gradients_of_whole_prompts(name):
    vlm = make_tiny_vlm(name)
    shared, whole = PromptLearner(vlm, CLASS_NAMES), PromptLearner(vlm, CLASS_NAMES, share_prefix=False)
    # causal towers share the start token and context; SigLIP's bidirectional tower cannot
    assert shared.shares_prefix == (name != "tta-tiny-sigmoid") and not whole.shares_prefix
    contexts = shared.initial_context + 0.1 * torch.randn(3, *shared.initial_context.shape)
    weights = None
    grads = []
    for learner in (shared, whole):
        context = contexts.clone().requires_grad_(True)
        features = learner.text_features(context, checkpoint=learner is shared)
        weights = torch.randn_like(features) if weights is None else weights  # any loss of the features
        (features * weights).sum().backward()
        grads.append((features.detach(), context.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_the_shared_prefix_runs_once_per_context_not_once_per_class():
    vlm = make_tiny_vlm("tta-tiny-clip")
    tokens_seen = []
    first_block = vlm.text_tower._source.transformer.resblocks[0]
    first_block.ln_1.register_forward_hook(lambda module, args, out: tokens_seen.append(args[0].shape[:-1].numel()))
    learner = PromptLearner(vlm, CLASS_NAMES)
    n_contexts, n_classes = 3, len(CLASS_NAMES)
    n_shared = learner.ctx_start + learner.n_ctx  # start token + context
    with torch.no_grad():
        learner.text_features(learner.initial_context.expand(n_contexts, -1, -1))
    assert sum(tokens_seen) == n_contexts * n_shared + n_contexts * n_classes * (learner.seq_len - n_shared)
