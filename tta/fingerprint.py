"""Fingerprints of a run's inputs that its settings do not name: the model's weights and the data's files.

A run key made of settings alone misses two ways in which a rerun can see other inputs under the
same names: new weights at the same path (a retrained model in the same ``local-dir:``) and a
data folder whose files changed between a stop and the rerun (files added shift every index).
:func:`weights_fingerprint` and :func:`files_fingerprint` give each a short plain-data value that
:class:`tta.callbacks.PredictionWriter` records in the run key (``inputs``), so that such a rerun
is refused instead of resumed into the old rows.

- Weights: the SHA-256 of the module's state dict (names, dtypes, shapes and bytes of every
  parameter and persistent buffer), whatever the weights came from (an open_clip tag, a
  checkpoint file, a shipped folder, random weights, or changes made in Python). It is computed
  once per module and kept until a tensor of the module is replaced or changed in place (torch's
  version counters say so): ViT-B/16's 150 M parameters hash in about a second on a CPU.
- Files: the sorted list of the files' paths (relative to the data root), sizes and modification
  times (whole seconds), hashed. No file is read: at ImageNet scale (50,000 files) this costs
  one ``stat`` per file. A file replaced in place by one of the same size and the same
  modification second is not seen; a copy of the folder that does not keep modification times
  (``cp -r`` rather than ``cp -p`` or ``rsync -a``) is seen as other data.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

#: module -> (the tensors' identities and versions when hashed, the digest)
_WEIGHT_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _tensor_states(module: torch.nn.Module) -> tuple:
    """What says whether a module's tensors are the ones hashed: their storage and in-place versions."""
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in module.state_dict().items())


def weights_fingerprint(module: torch.nn.Module) -> str:
    """``sha256:<16 hex>`` of ``module``'s state dict: equal for equal weights, whatever their source."""
    states = _tensor_states(module)
    cached = _WEIGHT_DIGESTS.get(module)
    if cached is not None and cached[0] == states:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy())
    value = f"sha256:{digest.hexdigest()[:16]}"
    _WEIGHT_DIGESTS[module] = (states, value)
    return value


def files_fingerprint(paths: Iterable[str | Path], root: str | Path | None = None) -> dict[str, Any]:
    """``{"files", "bytes", "listing"}`` of the files at ``paths``: how many, their total size, and
    ``sha256:<16 hex>`` of their sorted (path relative to ``root``, size, modification second) lines.
    A path that cannot be read counts with size -1 (it is reported as undecodable when loaded)."""
    lines, total = [], 0
    base = None if root is None else os.path.abspath(root)
    for path in paths:
        try:
            status = os.stat(path)
            size, modified = status.st_size, int(status.st_mtime)
        except OSError:
            size, modified = -1, 0
        total += max(size, 0)
        shown = os.path.relpath(os.path.abspath(path), base) if base is not None else str(path)
        lines.append(f"{shown}\t{size}\t{modified}\n")
    lines.sort()
    digest = hashlib.sha256("".join(lines).encode())
    return {"files": len(lines), "bytes": total, "listing": f"sha256:{digest.hexdigest()[:16]}"}
