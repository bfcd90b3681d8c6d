"""Shared fixtures: tiny models, a fake image-folder tree, Hydra composition, console scripts, and
``tta-predict`` runs in subprocesses with an uninterrupted reference run (the fault tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from tta.models import VisionLanguageModel, create_vlm

# tta-predict runs of the tests share one view store in a temporary folder, never the user's ~/.cache.
VIEW_STORE = tempfile.mkdtemp(prefix="tta-tests-view-store-")
os.environ["TTA_VIEW_STORE"] = VIEW_STORE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(VIEW_STORE, ignore_errors=True)


# The test models are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
# it makes every op wait for a core (several times slower overall).
torch.set_num_threads(1)

#: The three tiny tower kinds registered by the package (random weights, no download).
TINY_MODELS = ("tta-tiny-clip", "tta-tiny-customtext", "tta-tiny-sigmoid")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` (the GPU tier, ``pytest -m gpu``) are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the GPU tier: pytest -m gpu on a machine with one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def make_tiny_vlm(name: str, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return create_vlm(name)


@pytest.fixture(params=TINY_MODELS)
def tiny_vlm(request) -> VisionLanguageModel:
    """Each tiny tower kind in turn, freshly built (so caches and grads never leak between tests)."""
    return make_tiny_vlm(request.param)


@pytest.fixture(scope="session")
def shipped_vlm() -> VisionLanguageModel:
    return create_vlm("tta-world-resnet")


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A random image of ``mode`` ("RGB", "L", "RGBA") saved with PIL."""
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=g, dtype=torch.uint8)
    array = pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


#: Folder name -> image modes of the fake tree; sorted order is apple, golden_retriever, zebra_fish.
FAKE_TREE = {
    "zebra_fish": ("RGB", "RGB"),
    "apple": ("RGB", "L"),
    "golden_retriever": ("RGBA", "RGB", "RGB"),
}


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """``root/<class>/<img>.png`` with grayscale and RGBA images among the RGB ones."""
    root = tmp_path / "images"
    for k, (folder, modes) in enumerate(FAKE_TREE.items()):
        for i, mode in enumerate(modes):
            save_image(root / folder / f"img_{i}.png", mode, size=(40 + 8 * i, 30), seed=10 * k + i)
    return root


def class_tree(root: Path, folders: Sequence[str], per_folder: int = 1) -> Path:
    """``root/<folder>/img_<i>.jpg``: ``per_folder`` tiny images in each folder."""
    for k, folder in enumerate(folders):
        for i in range(per_folder):
            save_image(root / folder / f"img_{i}.jpg", size=(10, 8), seed=k * per_folder + i)
    return root


def split_tree(root: Path, dataset: str, split: str = "test") -> Path:
    """A fine-grained data set's folder in the split-file layout, one image per class."""
    from tta.datamodules.fine_grained import DATASETS, fine_grained_class_names

    _, image_dir, split_name = DATASETS[dataset]
    entries = [[f"c{label:03d}/0.jpg", label, name] for label, name in enumerate(fine_grained_class_names(dataset))]
    if dataset == "aircraft":  # images/<id>.jpg and "<id> <variant>" lines
        for path, label, _ in entries:
            save_image(root / image_dir / path.replace("/", "_"), size=(10, 8), seed=label)
        lines = [f"{path.replace('/', '_').removesuffix('.jpg')} {name}" for path, _, name in entries]
        (root / split_name.format(split=split)).write_text("\n".join(lines) + "\n")
    else:
        for path, label, _ in entries:
            save_image(root / image_dir / path, size=(10, 8), seed=label)
        (root / split_name).write_text(json.dumps({"train": entries[:1], "val": entries[:1], split: entries}))
    return root


def cifar10_c_tree(root: Path, corruptions: Sequence[str], per_severity: int = 4) -> Path:
    """A CIFAR-10-C folder: ``<corruption>.npy`` (5 severities x ``per_severity`` images, each image
    filled with its severity x 40 + its row) and ``labels.npy``."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    n = 5 * per_severity
    np.save(root / "labels.npy", np.arange(n) % 10)
    for corruption in corruptions:
        images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
        for row in range(n):
            images[row] = (row // per_severity) * 40 + row % per_severity
        np.save(root / f"{corruption}.npy", images)
    return root


def winoground_tree(root: Path, n: int = 3, layout: str = "parquet") -> Path:
    """A copy of Winoground as the Hugging Face hub lays it out (``facebook/winoground``):

    - ``parquet``: ``data/test-00000-of-00001.parquet`` with the card's columns, images embedded
      as the ``Image`` feature stores them (a struct of ``bytes`` and ``path``);
    - ``zip``: the older ``data/examples.jsonl`` + ``data/images.zip`` (members ``images/ex_<i>_img_<j>.png``);
    - ``unzipped``: ``data/examples.jsonl`` + ``data/images/ex_<i>_img_<j>.png``.
    """
    data = root / "data"
    examples = []
    for i in range(n):
        example = {
            "id": i,
            "image_0": f"ex_{i}_img_0",
            "image_1": f"ex_{i}_img_1",
            "caption_0": f"a mug left of a cat {i}",
            "caption_1": f"a cat left of a mug {i}",
            "tag": ["Object", "Relation"][i % 2],
            "secondary_tag": "",
            "num_main_preds": 1,
            "collapsed_tag": ["Object", "Relation"][i % 2],
        }
        for j in range(2):
            save_image(data / "images" / f"ex_{i}_img_{j}.png", size=(12, 10), seed=10 * i + j)
        examples.append(example)
    if layout == "unzipped":
        (data / "examples.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")
        return root
    images = {p.stem: p.read_bytes() for p in (data / "images").glob("*.png")}
    shutil.rmtree(data / "images")
    if layout == "zip":
        (data / "examples.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")
        with zipfile.ZipFile(data / "images.zip", "w") as archive:
            for name, content in images.items():
                archive.writestr(f"images/{name}.png", content)
        return root
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("id", pa.int32()), ("image_0", image), ("image_1", image)]
        + [(k, pa.string()) for k in ("caption_0", "caption_1", "tag", "secondary_tag")]
        + [("num_main_preds", pa.int32()), ("collapsed_tag", pa.string())]
    )
    rows = [
        {**e, **{k: {"bytes": images[e[k]], "path": f"{e[k]}.png"} for k in ("image_0", "image_1")}} for e in examples
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / "test-00000-of-00001.parquet")
    return root


def mmvp_vlm_tree(root: Path, pairs: int = 2) -> Path:
    """An MMVP-VLM copy: ``Questions.csv`` + ``MLLM_VLM Images/<Type>/<id>.jpg``, consecutive rows paired."""
    rows = ["Question ID,Type,Statement"]
    for p in range(pairs):
        kind = ["Orientation and Direction", "Color and Appearance"][p % 2]
        for j in range(2):
            qid = 2 * p + j + 1
            save_image(root / "MLLM_VLM Images" / kind / f"{qid}.jpg", size=(12, 10), seed=qid)
            rows.append(f'{qid},{kind},"The dog is facing {["left", "right"][j]}, pair {p}"')
    (root / "Questions.csv").write_text("\n".join(rows) + "\n")
    return root


def sugarcrepe_tree(root: Path, files: Sequence[str] = ("replace_rel", "swap_att"), n: int = 2) -> Path:
    """A SugarCrepe copy: ``<file>.json`` per kind over ``val2017/<filename>``."""
    for f, stem in enumerate(files):
        items = {}
        for i in range(n):
            name = f"{stem}_{i:012d}.jpg"
            save_image(root / "val2017" / name, size=(12, 10), seed=10 * f + i)
            items[str(i)] = {
                "filename": name,
                "caption": f"a dog on a sofa {i}",
                "negative_caption": f"a sofa on a dog {i}",
            }
        (root / f"{stem}.json").write_text(json.dumps(items))
    return root


def whatsup_tree(
    root: Path, files: Sequence[str] = ("controlled_images_dataset",), n: int = 2, options: int = 4
) -> Path:
    """A What'sUp repository (``amitakamath/whatsup_vlms``): ``data/<file>.json``, correct caption first.
    ``coco_qa_*`` / ``vg_qa_*`` files list ``[image_id, correct, wrong]`` over ``data/val2017/<id:012d>.jpg``
    / ``data/vg_images/<id>.jpg``; the others ``{image_path, caption_options}`` with paths relative to
    the repository (``data/controlled_images/<name>.jpeg``)."""
    data = root / "data"
    for f, stem in enumerate(files):
        items = []
        for i in range(n):
            if stem.startswith(("coco_qa", "vg_qa")):
                image_id = 397133 + 10 * f + i
                folder, name = (
                    ("val2017", f"{image_id:012d}.jpg") if stem.startswith("coco") else ("vg_images", f"{image_id}.jpg")
                )
                save_image(data / folder / name, size=(12, 10), seed=10 * f + i)
                items.append([image_id, f"a mug above a table {i}", f"a mug below a table {i}"])
                continue
            path = f"data/controlled_images/{stem}_{i}.jpeg"
            save_image(root / path, size=(12, 10), seed=10 * f + i)
            relations = ["on", "under", "left of", "right of"][:options]
            items.append({"image_path": path, "caption_options": [f"a mug {r} a table" for r in relations]})
        (data / f"{stem}.json").write_text(json.dumps(items))
    return root


def fake_data_overrides(data: DictConfig, tmp_path: Path, image_tree: Path) -> list[str]:
    """Overrides that point a data config whose ``root`` is mandatory at a small fake tree of its layout."""
    from tta.datamodules.imagenet import imagenet_classes

    target = data._target_.rsplit(".", 1)[-1]
    root = tmp_path / "fake_data"
    if target == "ImageNetDataModule":
        class_tree(root, imagenet_classes(data.variant)[0])
    elif target == "ImageNetV2DataModule":
        class_tree(root, [str(k) for k in range(1000)])
    elif target == "ImageNetCDataModule":
        for severity in data.severities:
            class_tree(root / "fog" / str(severity), imagenet_classes("imagenet")[0])
        return [f"data.root={root}", "data.corruptions=[fog]"]
    elif target == "CIFAR10CDataModule":
        cifar10_c_tree(root, ["fog"])
        return [f"data.root={root}", "data.corruptions=[fog]"]
    elif target == "WinogroundDataModule":
        winoground_tree(root)
    elif target == "MMVPVLMDataModule":
        mmvp_vlm_tree(root)
    elif target == "SugarCrepeDataModule":
        sugarcrepe_tree(root, data.files)
    elif target == "WhatsUpDataModule":
        whatsup_tree(root, data.files)
    elif target == "FineGrainedDataModule":
        split_tree(root, data.dataset, data.split)
    elif target == "EpisodeFolderDataModule":
        save_image(root / "area.png", size=(32, 32))
        episodes = [{"image": "area.png", "query": "a red circle.", "targets": [[3, 4]], "grid": [2, 2]}]
        (root / "episodes.json").write_text(json.dumps(episodes))
    else:
        root = image_tree
    return [f"data.root={root}"]


@pytest.fixture
def compose() -> Callable[..., object]:
    """``compose(overrides)``: the ``predict`` config of the package with Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        yield lambda overrides=(): hydra_compose("predict", overrides=list(overrides))


def console_script(name: str) -> Path:
    """A console script of the package, installed next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"console script {name} is not installed in {path.parent}")
    return path


def run_script(name: str, args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script with a fixed terminal environment and capture its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [str(console_script(name)), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- tta-predict runs in subprocesses (the fault tests) ------------------------------------------

#: One thread per process, so that runs compare bit for bit (see test_runs_at_scale.py).
ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"OMP_NUM_THREADS": "1"}
#: TPT makes each batch take long enough to act between batches; 12 batches of 4. Without the view
#: store: views read from a store another test filled would make the batches too quick to act between.
RUN = [
    "tta=tpt",
    "view_store=null",
    "tta.callbacks.tpt.n_views=8",
    "data.domains=[clean]",
    "data.n_per_domain=48",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
    "print_table=false",
]
BATCHES = 12
HEADER = b"index,domain,label,pred,confidence,pred_zs,confidence_zs\n"


def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(console_script("tta-predict")), *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def tta_predict(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    process = start(args, cwd, **kwargs)
    out, err = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def batches_done(run: Path) -> int:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
        return len(json.loads((run / "progress.json").read_text())["batches"])
    return 0


def wait_for_batches(run: Path, n: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while batches_done(run) < n:
        assert process.poll() is None, f"the run ended before batch {n}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no batch {n} in {run} after 10 minutes"
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path: to show that nothing was written."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    """The run was refused with one line on stderr (exit 2, no traceback) that holds ``expected``."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tta-predict: error: "), done.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of :data:`RUN`, the one every interrupted run must end up equal to."""
    root = tmp_path_factory.mktemp("reference")
    done = tta_predict([*RUN, f"hydra.run.dir={root / 'run'}"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert batches_done(root / "run") == BATCHES
    return root / "run"
