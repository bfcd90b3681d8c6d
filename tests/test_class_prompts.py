"""``model.class_prompts``: sentences per class (CuPL's files, as DMN-ZS and DPE read them) ensembled
with the templates, looked up by name, refused by name when a class is missing, and part of the run key."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tta.callbacks.writer import run_inputs
from tta.datamodules import WorldDataModule
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.world import CLASS_NAMES

TEMPLATES = ["a photo of a {}.", "a {}."]


@pytest.fixture(scope="module")
def vlm():
    return create_vlm("tta-world-resnet")


def sentences_file(tmp_path, names, per_class=lambda k: k % 3 + 1, rename=lambda name: name):
    """A CuPL-style file: class k gets ``per_class(k)`` sentences (different counts: the mean is per class)."""
    data = {rename(n): [f"a drawing of a {n}, number {j}." for j in range(per_class(k))] for k, n in enumerate(names)}
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(data))
    return path, data


def test_each_class_ensembles_its_templates_and_its_own_sentences(vlm, tmp_path):
    """The references' clip_classifier: per class, the normalised mean of the normalised embeddings of the
    templates filled with its name and its sentences (a per-class mean: counts differ between classes)."""
    names = list(CLASS_NAMES[:6])
    path, data = sentences_file(tmp_path, names)
    module = ZeroShotClassifier(vlm, class_names=names, templates=TEMPLATES, class_prompts=str(path))
    got = module.text_features()
    for c, name in enumerate(names):
        texts = [t.format(name) for t in TEMPLATES] + data[name]
        expected = F.normalize(vlm.encode_text(vlm.tokenize(texts)).mean(0), dim=-1)
        assert torch.allclose(got[c], expected, atol=1e-5)
    plain = ZeroShotClassifier(vlm, class_names=names, templates=TEMPLATES).text_features()
    assert not torch.allclose(got, plain, atol=1e-3)


def test_classes_are_found_with_spaces_for_underscores_and_any_case(vlm, tmp_path):
    names = ["red_circle", "Blue Square"]
    path, _ = sentences_file(tmp_path, ["red circle", "blue square"])
    module = ZeroShotClassifier(vlm, class_names=names, class_prompts=str(path))
    assert [len(s) for s in module.sentences_per_class()] == [1, 2]


def test_a_missing_class_or_a_bad_file_is_refused_by_name(vlm, tmp_path):
    path, _ = sentences_file(tmp_path, ["red circle"])
    module = ZeroShotClassifier(vlm, class_names=["red circle", "green star"], class_prompts=str(path))
    with pytest.raises(ValueError, match=r"has no sentences for the class 'green star'.*give the file"):
        module.text_features()
    # from the datamodule's names, before any run (tta-predict checks it before it writes anything)
    data = WorldDataModule(domains=["clean"], n_per_domain=1)
    with pytest.raises(ValueError, match="has no sentences for the class"):
        ZeroShotClassifier(vlm, class_prompts=str(path)).check_datamodule(data)
    with pytest.raises(ValueError, match=r"model.class_prompts: cannot read .*nowhere.json"):
        ZeroShotClassifier(vlm, class_prompts=str(tmp_path / "nowhere.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object of class name -> list of sentences"):
        ZeroShotClassifier(vlm, class_prompts=str(tmp_path / "list.json"))


def test_the_files_content_is_in_the_run_key(vlm, tmp_path):
    path, data = sentences_file(tmp_path, CLASS_NAMES)
    module = ZeroShotClassifier(vlm, class_prompts=str(path))
    before = run_inputs(module, None)["prompts"]
    data[CLASS_NAMES[0]].append("one more sentence.")
    path.write_text(json.dumps(data))
    assert run_inputs(ZeroShotClassifier(vlm, class_prompts=str(path)), None)["prompts"] != before
    assert "prompts" not in run_inputs(ZeroShotClassifier(vlm), None)  # runs without a file keep their key
