"""Compositional benchmarks as datamodules: k x k groups (Winoground-style) and 1 x k multiple choice.

The group batch contract: every ``predict_dataloader`` yields dicts

- ``images``: float tensor ``B x m x 3 x H x W`` in [0, 1], RGB, **not normalised**, at
  ``image_size``: the ``m`` images of each group (``m = k`` for k x k groups, ``m = 1`` for
  1 x k multiple choice);
- ``captions``: list of ``B`` lists of ``k`` str; for k x k groups image ``i`` goes with caption
  ``i``; for 1 x k items the first caption is the correct one;
- ``index``: long tensor ``B``, the group's index in the prediction set (stable across runs);
- ``domain``: list of ``B`` str (a shift of the offline world, or the benchmark / file name);
- ``kind``: list of ``B`` str, what the captions differ by (a swap kind, a tag, a file name).

- ``skipped_images``: int, groups of the batch left out because an image failed to decode (or
  was refused: ``tta.datamodules.preprocess.decode``).

Every batch of one datamodule has the same ``m`` and ``k``. File readers check the layout and
that every listed image exists when they are built (so a wrong path fails before a model
loads).
Each datamodule exposes ``domains``, ``kinds``, ``name`` and ``image_size``; ``class_names``
is empty (these are not classification sets). Images are resized to ``image_size`` as the
model's preprocessing says (``resize_mode``, ``interpolation``: SigLIP squashes, CLIP crops the
centre; see ``tta.datamodules.preprocess``).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from tta.datamodules.preprocess import Preprocess, decode
from tta.datamodules.streams import StreamDataModule
from tta.status import SlowStep
from tta.validation import check_number
from tta.world import DOMAINS, check_domain
from tta.world.groups import SWAP_KINDS, check_swap_kind, render_groups


def collate_groups(groups: list[dict | None], image_size: int) -> dict[str, Any]:
    """Stack the groups that decoded (``None`` marks one that did not); ``skipped_images`` counts
    the groups left out (the prediction writer sums them into ``metrics.json``)."""
    kept = [g for g in groups if g is not None]
    return {
        "images": torch.stack([g["images"] for g in kept]) if kept else torch.zeros(0, 1, 3, image_size, image_size),
        "captions": [list(g["captions"]) for g in kept],
        "index": torch.tensor([g["index"] for g in kept], dtype=torch.long),
        "domain": [g["domain"] for g in kept],
        "kind": [g["kind"] for g in kept],
        "skipped_images": len(groups) - len(kept),
    }


class GroupDataModule(StreamDataModule):
    """Base of the group datamodules: a dataset of groups read in index order.

    Built on :class:`~tta.datamodules.streams.StreamDataModule` (whole batches dealt to DDP
    ranks, resumable); :meth:`whole_set_dataloader` reads every group whatever the rank or
    resume point, for set-level methods (TTM) that must see the whole prediction set.
    """

    class_names: list[str] = []

    def __init__(
        self,
        name: str,
        domains: Sequence[str],
        kinds: Sequence[str],
        image_size: int,
        batch_size: int,
        num_workers: int,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("num_workers", num_workers, 0, integer=True)
        self.name, self.domains, self.kinds = name, list(domains), list(kinds)
        self.preprocess = Preprocess(image_size, resize_mode, interpolation)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.dataset: Dataset | None = None
        self.order: torch.Tensor | None = None

    def build_dataset(self) -> Dataset:
        """The dataset of groups: item ``i`` is a dict of the contract for one group, or ``None``."""
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset()
            self.order = torch.arange(len(self.dataset))

    @override
    def collate_fn(self) -> Callable[[list[dict | None]], dict[str, Any]]:
        return partial(collate_groups, image_size=self.image_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return super().predict_dataloader()

    def whole_set_dataloader(self) -> DataLoader:
        """Every group of the prediction set in index order (no rank split, no resume)."""
        self.setup("predict")
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )


class _TensorGroups(Dataset):
    def __init__(
        self,
        images: torch.Tensor,
        captions: list[list[str]],
        domains: list[str],
        kinds: list[str],
        preprocess: Preprocess,
    ) -> None:
        self.images, self.captions, self.domains, self.kinds = images, captions, domains, kinds
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {
            "images": torch.stack([self.preprocess(image) for image in self.images[i]]),
            "captions": self.captions[i],
            "index": i,
            "domain": self.domains[i],
            "kind": self.kinds[i],
        }


class WorldGroupsDataModule(GroupDataModule):
    """2 x 2 compositional groups of the offline world (see ``tta.world.groups``).

    ``n_per_cell`` groups for each swap kind in ``kinds`` and each domain in ``domains`` at
    ``severity``; a domain may carry its own severity as ``"name@severity"`` ("noise@1"). The same
    ``seed`` gives the same scenes in every domain. Groups are ordered by domain, then kind.
    """

    def __init__(
        self,
        kinds: Sequence[str] | str = SWAP_KINDS,
        domains: Sequence[str] | str = ("clean",),
        severity: int = 3,
        n_per_cell: int = 100,
        seed: int = 10_000,
        image_size: int = 64,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 50,
        num_workers: int = 0,
    ) -> None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        domains = list(DOMAINS) if domains == "all" else [domains] if isinstance(domains, str) else list(domains)
        if not kinds or not domains:
            raise ValueError(
                f"kinds and domains must not be empty: kinds from {list(SWAP_KINDS)}, "
                f"domains from {list(DOMAINS)} (optionally 'name@severity')"
            )
        for kind in kinds:
            check_swap_kind(kind)
        self.cells = [self._parse_domain(d, severity) for d in domains]
        if len(set(domains)) != len(domains) or len(set(kinds)) != len(kinds):
            raise ValueError(f"domains {domains} or kinds {kinds} repeat an entry: list each once")
        check_number("severity", severity, 1, 5, integer=True)
        check_number("n_per_cell", n_per_cell, 1, integer=True)
        check_number("seed", seed, integer=True)
        super().__init__(
            "world_groups", domains, kinds, image_size, batch_size, num_workers, resize_mode, interpolation
        )
        self.severity, self.n_per_cell, self.seed = int(severity), int(n_per_cell), int(seed)

    @staticmethod
    def _parse_domain(domain: str, severity: int) -> tuple[str, int]:
        name, _, level = str(domain).partition("@")
        check_domain(name)
        level = int(level) if level else int(severity)
        if not 1 <= level <= 5:
            raise ValueError(f"severity of {domain!r} must be in 1..5, got {level}")
        return name, level

    @override
    def build_dataset(self) -> Dataset:
        images, captions, domains, kinds = [], [], [], []
        cells = len(self.cells) * len(self.kinds)
        with SlowStep(f"rendering {cells * self.n_per_cell:,} world groups", total=cells, unit="cells") as step:
            for label, (domain, severity) in zip(self.domains, self.cells):
                for kind in self.kinds:
                    groups = render_groups(kind, self.n_per_cell, self.seed, domain, severity)
                    images.append((groups.images * 255).round().to(torch.uint8))
                    captions += groups.captions
                    domains += [label] * self.n_per_cell
                    kinds += groups.kinds
                    step.advance()
        return _TensorGroups(torch.cat(images), captions, domains, kinds, self.preprocess)


@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored inside another file: a cell of a parquet column (a Hugging Face ``Image``
    feature, a struct of ``bytes`` and ``path``; ``row`` >= 0), or a member of a zip archive
    (``row`` = -1)."""

    container: Path
    key: str  # the parquet column, or the zip member
    row: int = -1

    def read(self) -> bytes:
        if self.row < 0:
            with zipfile.ZipFile(self.container) as archive:
                return archive.read(self.key)
        cell = _parquet_column(self.container, self.key)[self.row].as_py()
        if cell.get("bytes") is None:  # the feature may point at a file beside the parquet instead
            return (self.container.parent / cell["path"]).read_bytes()
        return cell["bytes"]

    def __str__(self) -> str:
        """What errors call it: the member's path in the zip archive, or the parquet cell."""
        return f"{self.container}/{self.key}" if self.row < 0 else f"{self.container} ({self.key}, row {self.row})"

    def is_file(self) -> bool:
        return self.container.is_file()


ImageSource = Path | EmbeddedImage


@lru_cache(maxsize=4)
def _parquet_column(path: Path, column: str):
    """One column of a parquet file, read once per process (Winoground's images: ~370 MB in all)."""
    return _pyarrow_parquet(path).read_table(path, columns=[column]).column(column)


def _pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(
            f"{path} is a parquet file and reading it needs pyarrow: pip install pyarrow (or tta[parquet])"
        ) from error
    return pyarrow.parquet


def decode_source(source: ImageSource) -> torch.Tensor:
    """The image of a file, or of the bytes of an :class:`EmbeddedImage`, as
    :func:`~tta.datamodules.preprocess.decode` decodes it (RGB ``uint8 3 x H x W``)."""
    if isinstance(source, EmbeddedImage):
        return decode(str(source), io.BytesIO(source.read()))
    return decode(source)


@dataclass(frozen=True)
class GroupFiles:
    """One group on disk: its images (files or embedded), its captions (contract order), domain and kind."""

    images: tuple[ImageSource, ...]
    captions: tuple[str, ...]
    domain: str
    kind: str


class _FileGroups(Dataset):
    def __init__(self, groups: Sequence[GroupFiles], preprocess: Preprocess) -> None:
        self.groups, self.preprocess = list(groups), preprocess

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict | None:
        group = self.groups[i]
        try:
            pixels = [self.preprocess(decode_source(source)) for source in group.images]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):  # ValueError: UnsupportedImageError too
            return None
        return {
            "images": torch.stack(pixels),
            "captions": list(group.captions),
            "index": i,
            "domain": group.domain,
            "kind": group.kind,
        }


class GroupFilesDataModule(GroupDataModule):
    """Base of the file readers: a list of :class:`GroupFiles` read from ``index_files`` (the
    files that list the groups and their captions), checked when built."""

    #: The groups (their images and captions) are in the run key as the fingerprint of the index
    #: and image files (``inputs.data``); ``setting`` only names the config key in messages.
    argument_attributes = {"groups": None, "index_files": None, "setting": None}

    def __init__(
        self,
        groups: Sequence[GroupFiles],
        name: str,
        image_size: int,
        batch_size: int,
        num_workers: int,
        setting: str = "data.root",
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        index_files: Sequence[Path] = (),
    ) -> None:
        groups = list(groups)
        if not groups:
            raise ValueError(f"no groups found for {name}: check {setting}")
        shapes = {(len(g.images), len(g.captions)) for g in groups}
        if len(shapes) != 1:
            raise ValueError(
                f"{name} mixes group shapes {sorted(shapes)} (images, captions): every group "
                "of one datamodule needs the same shape; read the files separately"
            )
        missing = [str(p) for g in groups for p in g.images if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed by {name} are missing, e.g. {missing[:3]}: "
                f"check {setting} (the images must lie where the index file says)"
            )
        domains = list(dict.fromkeys(g.domain for g in groups))
        kinds = list(dict.fromkeys(g.kind for g in groups))
        super().__init__(name, domains, kinds, image_size, batch_size, num_workers, resize_mode, interpolation)
        self.groups, self.index_files = groups, [Path(p) for p in index_files]

    @override
    def build_dataset(self) -> Dataset:
        return _FileGroups(self.groups, self.preprocess)

    @override
    def input_files(self) -> list[Path]:
        images = [s.container if isinstance(s, EmbeddedImage) else s for g in self.groups for s in g.images]
        return list(dict.fromkeys([*self.index_files, *images]))


def _root(root: str | Path, name: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name} folder {path} does not exist: set data.root to the folder holding the {name} files"
        )
    return path


def _index_file(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``root/name`` and ``root/data/name`` that exists, for each name in turn (a
    data set's repository keeps its files in ``data/``; either folder may be the root)."""
    for name in names:
        for folder in (root, root / "data"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"no {what} in {root} or {root / 'data'}: expected one of {list(names)}; set data.root to the "
        f"folder that holds it (found {sorted(p.name for p in root.iterdir())[:10]})"
    )


def _image_path(folder: Path, stem: str, extensions: Sequence[str] = (".png", ".jpg", ".jpeg")) -> Path:
    """``folder/stem`` if it has an extension or exists, else the first ``stem + ext`` that exists."""
    direct = folder / stem
    if direct.suffix or direct.is_file():
        return direct
    for ext in extensions:
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return folder / (stem + extensions[0])  # reported as missing


#: The columns of Winoground's examples (the hub card's features; ``tag`` is optional here).
WINOGROUND_KEYS = ("image_0", "image_1", "caption_0", "caption_1")


class WinogroundDataModule(GroupFilesDataModule):
    """Winoground's 2 x 2 groups, read from either layout of the Hugging Face copy
    (``facebook/winoground``; ``root`` is the copy's folder or its ``data/`` folder):

    - the parquet layout: ``data/test-00000-of-00001.parquet`` (every ``test-*.parquet`` shard),
      columns ``id, image_0, image_1, caption_0, caption_1, tag, secondary_tag, num_main_preds,
      collapsed_tag`` with the images embedded (needs ``pyarrow``);
    - the older layout: ``data/examples.jsonl`` (one JSON object per line with the same keys,
      ``image_0``/``image_1`` naming ``ex_<i>_img_<j>``) and ``data/images.zip``, read as it is or
      unzipped into ``data/images/<name>.png`` (``image_dir``).

    ``kind`` is the example's ``tag`` ("Object", "Relation", "Both") where present.
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "images",
        domain: str = "winoground",
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 50,
        num_workers: int = 0,
    ) -> None:
        self.root, self.image_dir, self.domain = _root(root, "Winoground"), image_dir, domain
        shards = sorted(self.root.glob("test-*.parquet")) or sorted(self.root.glob("data/test-*.parquet"))
        if shards:
            groups, index_files = [g for shard in shards for g in self._parquet_groups(shard, domain)], shards
        else:
            index = _index_file(
                self.root, ["examples.jsonl"], "examples.jsonl (nor a data/test-*.parquet of the hub copy)"
            )
            groups, index_files = self._jsonl_groups(index, image_dir, domain), [index]
        super().__init__(
            groups,
            "winoground",
            image_size,
            batch_size,
            num_workers,
            resize_mode=resize_mode,
            interpolation=interpolation,
            index_files=index_files,
        )

    @staticmethod
    def _parquet_groups(path: Path, domain: str) -> list[GroupFiles]:
        parquet = _pyarrow_parquet(path)
        columns = parquet.read_schema(path).names
        missing = [k for k in WINOGROUND_KEYS if k not in columns]
        if missing:
            raise ValueError(f"{path} is not Winoground's parquet: it lacks the columns {missing} (found {columns})")
        table = parquet.read_table(path, columns=["caption_0", "caption_1", *(["tag"] if "tag" in columns else [])])
        captions = table.select(["caption_0", "caption_1"]).to_pylist()
        tags = table.column("tag").to_pylist() if "tag" in columns else ["winoground"] * len(captions)
        return [
            GroupFiles(
                (EmbeddedImage(path, "image_0", row), EmbeddedImage(path, "image_1", row)),
                (c["caption_0"], c["caption_1"]),
                domain,
                str(tag),
            )
            for row, (c, tag) in enumerate(zip(captions, tags))
        ]

    @staticmethod
    def _jsonl_groups(index: Path, image_dir: str, domain: str) -> list[GroupFiles]:
        folder, archive = index.parent / image_dir, index.parent / "images.zip"
        members: set[str] = set()
        if not folder.is_dir() and archive.is_file():
            with zipfile.ZipFile(archive) as opened:
                members = set(opened.namelist())

        def image(name: str) -> ImageSource:
            if members:
                for member in (f"images/{name}.png", f"{name}.png", f"images/{name}", name):
                    if member in members:
                        return EmbeddedImage(archive, member)
                return archive / f"images/{name}.png"  # reported as missing
            return _image_path(folder, name)

        groups = []
        for line_no, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                groups.append(
                    GroupFiles(
                        (image(item["image_0"]), image(item["image_1"])),
                        (item["caption_0"], item["caption_1"]),
                        domain,
                        str(item.get("tag", "winoground")),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{index} line {line_no} is not a Winoground example ({error!r}): each line needs "
                    "a JSON object with image_0, image_1, caption_0, caption_1"
                ) from error
        return groups


class MMVPVLMDataModule(GroupFilesDataModule):
    """MMVP-VLM-style 2 x 2 groups, laid out as the public release: ``root/Questions.csv`` with a
    header and columns ``Question ID, Type, Statement``, and images
    ``root/MLLM_VLM Images/<Type>/<Question ID>.jpg``. Rows come in pairs (1-2, 3-4, ...): the two
    statements and the two images of a pair form a group; ``kind`` is the pair's ``Type`` (the
    visual pattern).
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "MLLM_VLM Images",
        domain: str = "mmvp_vlm",
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 50,
        num_workers: int = 0,
    ) -> None:
        self.root, self.image_dir, self.domain = _root(root, "MMVP-VLM"), image_dir, domain
        index = _index_file(self.root, ["Questions.csv"], "Questions.csv")
        with index.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if not rows or len(rows[0]) < 3:
            raise ValueError(f"{index} needs a header and rows 'Question ID, Type, Statement'")
        rows = rows[1:]
        if len(rows) % 2:
            raise ValueError(
                f"{index} has {len(rows)} statements: MMVP-VLM pairs consecutive rows, so the count must be even"
            )
        groups = []
        for first, second in zip(rows[0::2], rows[1::2]):
            (id_0, type_0, text_0), (id_1, type_1, text_1) = first[:3], second[:3]
            if type_0 != type_1:
                raise ValueError(
                    f"{index}: rows {id_0} and {id_1} form a pair but have types {type_0!r} and "
                    f"{type_1!r}; MMVP-VLM pairs consecutive rows of one type"
                )
            folder = self.root / image_dir / type_0.strip()
            groups.append(
                GroupFiles(
                    (
                        _image_path(folder, id_0.strip(), (".jpg", ".png")),
                        _image_path(folder, id_1.strip(), (".jpg", ".png")),
                    ),
                    (text_0, text_1),
                    domain,
                    type_0.strip(),
                )
            )
        super().__init__(
            groups,
            "mmvp_vlm",
            image_size,
            batch_size,
            num_workers,
            resize_mode=resize_mode,
            interpolation=interpolation,
            index_files=[index],
        )


class SugarCrepeDataModule(GroupFilesDataModule):
    """SugarCrepe's 1 x 2 multiple choice, as its repository (``RAIVNLab/sugar-crepe``) lays it
    out: ``data/<file>.json`` per hard-negative kind (``{id: {"filename", "caption",
    "negative_caption"}}``, e.g. ``replace_rel.json``; ``root`` is the repository or its ``data/``
    folder) over an image folder ``image_dir`` (COCO val2017, which the repository does not ship;
    relative to ``root`` unless absolute). Options are ``[caption, negative_caption]``; ``kind``
    and ``domain`` are the file's name (without .json).
    """

    def __init__(
        self,
        root: str | Path,
        files: Sequence[str] = (
            "replace_att",
            "replace_obj",
            "replace_rel",
            "swap_att",
            "swap_obj",
            "add_att",
            "add_obj",
        ),
        image_dir: str = "val2017",
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 50,
        num_workers: int = 0,
    ) -> None:
        self.root, self.files, self.image_dir = _root(root, "SugarCrepe"), [str(f) for f in files], image_dir
        images = (self.root / image_dir).expanduser()
        groups, index_files = [], []
        for stem in files:
            stem = str(stem).removesuffix(".json")
            path = _index_file(self.root, [f"{stem}.json"], f"{stem}.json")
            index_files.append(path)
            try:
                items = json.loads(path.read_text())
                groups += [
                    GroupFiles((images / item["filename"],), (item["caption"], item["negative_caption"]), stem, stem)
                    for item in items.values()
                ]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(
                    f"{path} is not SugarCrepe's layout ({error!r}): expected a JSON object "
                    "{id: {filename, caption, negative_caption}}"
                ) from error
        super().__init__(
            groups,
            "sugarcrepe",
            image_size,
            batch_size,
            num_workers,
            resize_mode=resize_mode,
            interpolation=interpolation,
            index_files=index_files,
        )


#: What'sUp's question files over COCO and Visual Genome: the image folder beside the JSON files and
#: the file name of an image id, as the reference loader builds them.
WHATSUP_QA_IMAGES = {"coco_qa": ("val2017", "{:0>12}.jpg"), "vg_qa": ("vg_images", "{}.jpg")}


class WhatsUpDataModule(GroupFilesDataModule):
    """What'sUp's 1 x k multiple choice, as its repository (``amitakamath/whatsup_vlms``) lays it
    out: the JSON files in ``data/`` (``root`` is the repository or its ``data/`` folder), the
    correct caption first.

    - ``controlled_images_dataset`` / ``controlled_clevr_dataset``: a list of ``{"image_path",
      "caption_options"}`` (4 options) whose paths are relative to the repository
      (``data/controlled_images/<name>.jpeg``);
    - ``coco_qa_one_obj`` / ``coco_qa_two_obj`` / ``vg_qa_one_obj`` / ``vg_qa_two_obj``: a list of
      ``[image_id, correct_caption, wrong_caption]`` over ``data/val2017/<id, 12 digits>.jpg``
      (COCO) and ``data/vg_images/<id>.jpg`` (Visual Genome).

    ``kind`` and ``domain`` are the file's name. Files with different option counts (4 and 2) go
    in separate runs.
    """

    def __init__(
        self,
        root: str | Path,
        files: Sequence[str] = ("controlled_images_dataset",),
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 50,
        num_workers: int = 0,
    ) -> None:
        self.root, self.files = _root(root, "WhatsUp"), [str(f) for f in files]
        groups, index_files = [], []
        for stem in files:
            stem = str(stem).removesuffix(".json")
            path = _index_file(self.root, [f"{stem}.json"], f"{stem}.json")
            index_files.append(path)
            qa = next((v for k, v in WHATSUP_QA_IMAGES.items() if stem.startswith(k)), None)
            try:
                items = json.loads(path.read_text())
                groups += [self._question(item, path.parent, qa, stem) for item in items]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as error:
                layout = (
                    "a JSON list of [image_id, correct_caption, wrong_caption]"
                    if qa
                    else "a JSON list of {image_path, caption_options}"
                )
                raise ValueError(f"{path} is not What'sUp's layout ({error!r}): expected {layout}") from error
        super().__init__(
            groups,
            "whatsup",
            image_size,
            batch_size,
            num_workers,
            resize_mode=resize_mode,
            interpolation=interpolation,
            index_files=index_files,
        )

    @staticmethod
    def _question(item: Any, folder: Path, qa: tuple[str, str] | None, stem: str) -> GroupFiles:
        if qa is not None:
            image_id, correct, wrong = item
            return GroupFiles((folder / qa[0] / qa[1].format(image_id),), (correct, wrong), stem, stem)
        # relative to the repository ("data/controlled_images/..."), i.e. the parent of data/
        relative = Path(item["image_path"])
        candidates = [folder.parent / relative, folder / relative]
        image = next((c for c in candidates if c.is_file()), candidates[0])
        return GroupFiles((image,), tuple(item["caption_options"]), stem, stem)
