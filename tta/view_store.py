"""The view-feature store: each sample's normalised view features, encoded once, read by every later run.

A view method's main cost is making and encoding its views (on the world, 37 of TPT's 47 ms a
sample); a sweep that compares K view methods would pay it K times. With a store, the first run
that needs a sample's views writes their features (``V x D``, view 0 the model's input) and every
later run with the same key reads them instead of cropping and encoding: the features read are
the bytes the first run computed, so its predictions are those of a run without the store.

**The key** (``key.json`` in the key's folder) holds everything that changes a feature: the
model's weights (their SHA-256) and input normalisation, the data set (its reader's class and
every setting that changes a sample, the fingerprint of the files it reads), the view recipe
(kind and number), the run seed, the precision and the device type. Each sample's file is named by its index
and holds, besides the features, the key's digest, the index, the sample's digest (SHA-256 of
the image as loaded) and the features' SHA-256. A file that is
unreadable, foreign (another key, index or image) or damaged is recomputed and rewritten, with
one warning naming it. Files are written whole and renamed into place, so that parallel runs
(a Hydra multirun, DDP processes) can share a store.

**Size**: ``V x D`` numbers per sample in the views' dtype (float32, or float16/bfloat16 under
mixed precision): 64 x 512 x 2 bytes = 64 KiB a sample for ViT-B/16 under fp16 autocast, about
3.3 GB for ImageNet's 50,000 validation images per seed and view recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # bump when the layout or the key changes
_UMASK = os.umask(0)
os.umask(_UMASK)
#: Damaged files named one by one in a run; the rest are counted in its summary line.
WARNED_FILES = 5
#: Samples per subfolder (a flat folder of 50,000 files is slow to list on network disks).
FOLDER_SIZE = 1000


def sample_digest(original: torch.Tensor) -> str:
    """SHA-256 of a sample's image as loaded (its model input follows from it and the key's
    preprocessing)."""
    pixels = original.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(pixels.shape)}{pixels.dtype}".encode())
    digest.update(pixels.view(torch.uint8).numpy() if pixels.numel() else b"")
    return digest.hexdigest()


def _features_digest(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy()).hexdigest()


class ViewFeatureStore:
    """The view features of one key under ``root`` (see the module's notes).

    Args:
        root: the store's folder (shared by every key: each key has a subfolder named by its digest).
        key: plain data naming everything that changes a feature (see
            ``tta.callbacks.base.EpisodicTTA.open_view_store``).
    """

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.root = Path(root).expanduser()
        self.key = {"format": STORE_FORMAT, **key}
        text = json.dumps(self.key, sort_keys=True, indent=1, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()
        self.folder = self.root / self.digest[:24]
        self._folder = str(self.folder)
        self._made: set[str] = set()  # subfolders known to exist
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            key_file = self.folder / "key.json"
            if not key_file.is_file() or key_file.read_text() != text:
                _write_atomically(key_file, lambda path: Path(path).write_text(text))
        except OSError as error:
            raise OSError(
                f"the view store {str(self.root)!r} is not a writable folder ({error}): give a writable "
                "view_store, or view_store=null to encode the views in every run"
            ) from error
        self.read_count = self.written = self.recomputed = self.bytes_written = 0

    def path(self, index: int) -> str:
        """The file of sample ``index`` (a string: this runs once per sample, pathlib's objects cost more)."""
        return os.path.join(self._folder, f"{index // FOLDER_SIZE:05d}", f"{index}.safetensors")

    def read(self, index: int, digest: str, n_views: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Sample ``index``'s features (``n_views x D``), or ``None`` when not stored yet or, with a
        warning naming the file, when the file does not verify (the caller recomputes and rewrites)."""
        path = self.path(index)
        try:
            with safe_open(path, framework="pt") as f:
                stored, features = f.metadata() or {}, f.get_tensor("features")
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            problem = f"unreadable: {error}"
        else:
            if stored.get("key") != self.digest:
                problem = "it holds features of another model, data set, view recipe, seed or precision"
            elif stored.get("index") != str(index) or stored.get("sample") != digest:
                problem = "it holds the views of another image"
            elif features.dtype != dtype or features.ndim != 2 or len(features) != n_views:
                problem = f"unexpected features {tuple(features.shape)} {features.dtype}"
            elif stored.get("sha256") != _features_digest(features):
                problem = "its features do not match their checksum"
            else:
                self.read_count += 1
                return features
        self.recomputed += 1
        if self.recomputed <= WARNED_FILES:
            log.warning("view store file %s is damaged (%s): recomputing it", path, problem)
            if self.recomputed == WARNED_FILES:
                log.warning(
                    "view store %s: further damaged files are recomputed silently (counted at the end)", self.folder
                )
        return None

    def write(self, index: int, digest: str, features: torch.Tensor) -> None:
        """Store sample ``index``'s features (``V x D``), written whole and renamed into place."""
        features = features.detach().to("cpu").contiguous()
        metadata = {"key": self.digest, "index": str(index), "sample": digest, "sha256": _features_digest(features)}
        path = self.path(index)
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        _write_atomically(Path(path), lambda tmp: save_file({"features": features}, tmp, metadata=metadata))
        self.written += 1
        self.bytes_written += features.numel() * features.element_size()

    def summary(self) -> str:
        """One line: what this run read and wrote."""
        return (
            f"view store {self.folder}: {self.read_count} samples' views read, {self.written} encoded and "
            f"written ({self.bytes_written / 2**20:.1f} MiB)"
            + (f", {self.recomputed} damaged files recomputed" if self.recomputed else "")
        )


def _write_atomically(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # a plain file's permissions (mkstemp's are 0600): stores can be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_hits(
    store: ViewFeatureStore, indices: Sequence[int], digests: Sequence[str], n_views: int, dtype: torch.dtype
) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The stored features by position in the batch, and the positions to encode."""
    found: dict[int, torch.Tensor] = {}
    missing = []
    for position, (index, digest) in enumerate(zip(indices, digests)):
        features = store.read(index, digest, n_views, dtype)
        if features is None:
            missing.append(position)
        else:
            found[position] = features
    return found, missing
