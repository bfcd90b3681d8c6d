"""What the run key's fingerprints cost at ImageNet scale (issue 22): the data files' listing
(``tta.fingerprint.files_fingerprint``) over 50,000 files in 1,000 class folders, and the weights
(``weights_fingerprint``) of ViT-B/16 (random weights, 150 M parameters), first and cached, next to
what the run does anyway (scanning the folder; reading every file's bytes, the content digest that
was not chosen).

    python benchmarks/run_key_cpu.py [--files 50000] [--out benchmarks/results/run_key_cpu.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tta.fingerprint import files_fingerprint, weights_fingerprint


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_tree(root: Path, n_files: int, classes: int, size: int) -> list[Path]:
    """``root/<class>/<i>.jpg``: ``n_files`` files of ``size`` random bytes (an ImageNet JPEG's mean size)."""
    paths = []
    payload = os.urandom(size)
    for i in range(n_files):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(payload[: size - 8] + i.to_bytes(8, "little"))
        paths.append(path)
    return paths


def content_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--file-kb", type=int, default=110, help="bytes per file, in kB (ImageNet val: ~110 kB)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = make_tree(root, args.files, 1000, args.file_kb * 1000)
        scan = seconds(lambda: sorted(p for d in root.iterdir() for p in d.iterdir() if p.is_file()))
        listing = seconds(lambda: files_fingerprint(paths, root))
        content = seconds(lambda: content_digest(paths))  # from the page cache: a lower bound
        rows += [
            (f"scan the folder ({args.files:,} files; what the datamodule does anyway)", scan),
            (f"files_fingerprint: sorted paths, sizes, mtimes ({args.files:,} stat calls)", listing),
            (f"content digest of every file ({args.files * args.file_kb / 1e6:.1f} GB, page cache warm)", content),
        ]
    from tta.models import create_vlm

    vlm = create_vlm("ViT-B-16-quickgelu", pretrained=None)
    parameters = sum(p.numel() for p in vlm.parameters())
    first = seconds(lambda: weights_fingerprint(vlm))
    again = seconds(lambda: weights_fingerprint(vlm))
    rows += [
        (f"weights_fingerprint, ViT-B/16 ({parameters / 1e6:.0f} M parameters), first call", first),
        ("weights_fingerprint, same model again (cached: versions checked)", again),
    ]
    lines = [
        f"Run key fingerprints on this CPU (1 thread; {os.cpu_count()} cores, Python {sys.version.split()[0]}):",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {what} | {value:.3f} |" for what, value in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
