"""Images decode faithfully in every mode Pillow reads, or are refused with their path (issue: a
16-bit PNG decoded as a white image, silently).

8-bit modes decode as the reference methods load them (``Image.open(f).convert("RGB")``: alpha
dropped, EXIF orientation not applied); grey deeper than 8 bits keeps its high bits; float and
32-bit integer images are refused. Each file here is written with known pixels and checked value
by value; 16-bit PNG and every TIFF are written by hand (Pillow cannot write 16-bit RGB PNG, 12-bit
or premultiplied TIFF), so that their layout is the one named.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import run_script, winoground_tree
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from tta.callbacks import PredictionWriter
from tta.datamodules import EpisodeFolderDataModule, ImageFolderDataModule, WinogroundDataModule
from tta.datamodules.compositional import EmbeddedImage, decode_source
from tta.datamodules.preprocess import UnsupportedImageError, decode
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.world import CLASS_NAMES, render_domain

#: 16-bit samples: the 8-bit values 0, 100 and 255 widened (v * 257), and three that differ in the low byte only.
WIDE = np.array([0, 257 * 100, 65535, 0x12FF, 0x1280, 0x127F], np.uint16)
#: ... and what each decodes to: its high byte, as Pillow decodes 16-bit RGB PNG and TIFF.
HIGH_BYTES = [0, 100, 255, 0x12, 0x12, 0x12]


def png_16_bit(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """A PNG of 16-bit ``samples`` (``H x W x C``; colour type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def tiff(
    path: Path,
    samples: np.ndarray,
    photometric: int,
    sample_format: int = 1,
    extra_samples: tuple[int, ...] = (),
    bits: int | None = None,
    data: bytes | None = None,
    byte_order: str = "<",
) -> Path:
    """An uncompressed one-strip TIFF of ``samples`` (``H x W`` or ``H x W x C``) as their dtype
    stores them, or of ``data`` packed at ``bits`` per sample. ``sample_format``: 1 unsigned,
    2 signed, 3 float; ``extra_samples``: TIFF's ExtraSamples (1: premultiplied alpha)."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    bits = bits or samples.dtype.itemsize * 8
    data = data if data is not None else samples.astype(samples.dtype.newbyteorder(byte_order)).tobytes()
    short, long = f"{byte_order}H", f"{byte_order}I"
    tags = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [bits] * channels),
        (259, 3, [1]),
        (262, 3, [photometric]),
        (273, 4, [0]),  # the strip's offset, filled in below
        (277, 3, [channels]),
        (278, 4, [height]),
        (279, 4, [len(data)]),
        *([(338, 3, list(extra_samples))] if extra_samples else []),
        (339, 3, [sample_format] * channels),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    arrays, entries = b"", []
    for tag, kind, values in tags:  # values too long for the entry go after the IFD
        packed = b"".join(struct.pack(short if kind == 3 else long, v) for v in values)
        if len(packed) > 4:
            entries.append((tag, kind, len(values), struct.pack(long, 8 + ifd_size + len(arrays))))
            arrays += packed
        else:
            entries.append((tag, kind, len(values), packed.ljust(4, b"\0")))
    data_at = 8 + ifd_size + len(arrays)
    entries = [(t, k, n, struct.pack(long, data_at) if t == 273 else v) for t, k, n, v in entries]
    ifd = struct.pack(short, len(entries)) + b"".join(struct.pack(f"{byte_order}HHI", *e[:3]) + e[3] for e in entries)
    magic = b"II*\0" if byte_order == "<" else b"MM\0*"
    path.write_bytes(magic + struct.pack(long, 8) + ifd + b"\0\0\0\0" + arrays + data)
    return path


def save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def pixels(image: torch.Tensor) -> list[list[int]]:
    """``3 x H x W`` -> the RGB triples in row-major order."""
    return image.permute(1, 2, 0).reshape(-1, 3).tolist()


def grey(*values: int) -> list[list[int]]:
    return [[v, v, v] for v in values]


# --- 8-bit modes: as the references decode them ----------------------------------------------

RGB = np.array([[[10, 20, 30], [200, 100, 50], [255, 0, 128]]], np.uint8)
ALPHA = np.array([[[0], [128], [255]]], np.uint8)


def palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 255, 0, 128])
    image.putdata([0, 1, 2])
    return image


EIGHT_BIT = {
    # name: (writes the file into a folder, its mode as Pillow opens it, the RGB pixels expected)
    "grey": (lambda d: save(d / "a.png", Image.fromarray(RGB[..., 0])), "L", grey(10, 200, 255)),
    "RGB": (lambda d: save(d / "a.png", Image.fromarray(RGB)), "RGB", RGB[0].tolist()),
    # alpha dropped without compositing: the fully transparent pixel keeps its colour
    "RGBA": (
        lambda d: save(d / "a.png", Image.fromarray(np.concatenate([RGB, ALPHA], -1))),
        "RGBA",
        RGB[0].tolist(),
    ),
    "grey + alpha": (
        lambda d: save(d / "a.png", Image.fromarray(np.concatenate([RGB[..., :1], ALPHA], -1))),
        "LA",
        grey(10, 200, 255),
    ),
    "palette": (lambda d: save(d / "a.png", palette_image()), "P", RGB[0].tolist()),
    "palette, transparent entry": (
        lambda d: save(d / "a.png", palette_image(), transparency=0),
        "P",
        RGB[0].tolist(),
    ),
    "GIF, transparent entry": (lambda d: save(d / "a.gif", palette_image(), transparency=0), "P", RGB[0].tolist()),
    "1-bit": (lambda d: save(d / "a.png", Image.fromarray(RGB[..., 0] > 100)), "1", grey(0, 255, 255)),
    # Pillow's formula, as convert("RGB"): (255 - C) * (255 - K) / 255, rounded
    "CMYK TIFF": (
        lambda d: tiff(d / "a.tif", np.array([[[0, 0, 0, 128], [255, 0, 0, 0], [100, 50, 0, 50]]], np.uint8), 5),
        "CMYK",
        [[127, 127, 127], [0, 255, 255], [125, 165, 205]],
    ),
    "YCbCr TIFF": (
        lambda d: tiff(d / "a.tif", np.array([[[0, 128, 128], [128, 128, 128], [255, 128, 128]]], np.uint8), 6),
        "YCbCr",
        grey(0, 128, 255),
    ),
    # premultiplied alpha, unpremultiplied as convert("RGB") does for RGBa: 100 at alpha 128 is 199
    "RGB + premultiplied alpha TIFF": (
        lambda d: tiff(d / "a.tif", np.array([[[100, 50, 20, 128]]], np.uint8), 2, extra_samples=(1,)),
        "RGBA",
        [[199, 99, 39]],
    ),
    "grey + premultiplied alpha TIFF": (
        lambda d: tiff(d / "a.tif", np.array([[[100, 128], [30, 255]]], np.uint8), 1, extra_samples=(1,)),
        "La",
        grey(199, 30),
    ),
}


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8_bit_modes_decode_as_the_references(tmp_path, name):
    make, mode, expected = EIGHT_BIT[name]
    path = make(tmp_path)
    with Image.open(path) as image:
        assert image.mode == mode
    assert pixels(decode(path)) == expected
    if mode != "La":  # the references fail on La (Pillow cannot convert it to RGB); decode unpremultiplies it
        with Image.open(path) as image:
            assert torch.equal(decode(path), pil_to_tensor(image.convert("RGB")))


@pytest.mark.parametrize(("mode", "suffix"), [("CMYK", ".jpg"), ("LAB", ".tif"), ("RGB", ".jpg")])
def test_lossy_and_colour_space_modes_decode_as_the_references(tmp_path, mode, suffix):
    options = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}
    path = save(tmp_path / f"a{suffix}", Image.fromarray(RGB).convert(mode), **options)
    with Image.open(path) as image:
        assert image.mode == mode
        reference = pil_to_tensor(image.convert("RGB"))
    assert torch.equal(decode(path), reference)
    assert (decode(path).int() - torch.from_numpy(RGB).permute(2, 0, 1)).abs().max() <= 12  # near the pixels saved


def test_exif_orientation_is_not_applied_as_the_references(tmp_path):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(tmp_path / "a.png", Image.fromarray(stored), exif=exif)
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == 6
    assert torch.equal(decode(path), torch.from_numpy(stored).permute(2, 0, 1))  # 2 x 3 as stored, not 3 x 2


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_animated_and_multi_page_files_decode_their_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (4, 2), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = save(tmp_path / f"a{suffix}", frames[0], save_all=True, append_images=frames[1:])
    with Image.open(path) as image:
        assert image.n_frames == 2
    assert pixels(decode(path)) == [[255, 0, 0]] * 8


# --- deeper than 8 bits: the high bits ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "mode"),
    [
        ("16-bit grey PNG", lambda p: png_16_bit(p.with_suffix(".png"), WIDE.reshape(2, 3, 1), 0), "I;16"),
        ("16-bit grey TIFF", lambda p: tiff(p.with_suffix(".tif"), WIDE.reshape(2, 3), 1), "I;16"),
        (
            "16-bit grey TIFF, big-endian",
            lambda p: tiff(p.with_suffix(".tif"), WIDE.reshape(2, 3), 1, byte_order=">"),
            "I;16B",
        ),
        ("16-bit PGM", lambda p: write(p.with_suffix(".pgm"), b"P5 3 2 65535\n" + WIDE.astype(">u2").tobytes()), "I"),
    ],
)
def test_16_bit_grey_keeps_its_high_byte(tmp_path, name, make, mode):
    path = make(tmp_path / "a")
    with Image.open(path) as image:
        assert image.mode == mode
    decoded = decode(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 2, 3)
    assert pixels(decoded) == grey(*HIGH_BYTES)


def test_grey_of_other_depths_is_scaled_by_its_own_range(tmp_path):
    # a PGM of maxval 1023 (Pillow maps it onto 0..65535) and a 12-bit TIFF (Pillow: mode I;16, values up to 4095)
    pgm = write(tmp_path / "a.pgm", b"P5 3 1 1023\n" + np.array([0, 512, 1023], ">u2").tobytes())
    assert pixels(decode(pgm)) == grey(0, 128, 255)
    twelve_bit = [0, 2048, 4095, 0x7FF]
    packed = int("".join(f"{v:012b}" for v in twelve_bit), 2).to_bytes(6, "big")
    path = tiff(tmp_path / "a.tif", np.zeros((1, 4), np.uint16), 1, bits=12, data=packed)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    assert pixels(decode(path)) == grey(0, 128, 255, 127)


def test_16_bit_rgb_is_kept_by_pillow_and_decodes_alike_in_grey(tmp_path):
    """Pillow opens 16-bit RGB(A) PNG and TIFF as 8-bit RGB(A) by the high byte; 16-bit grey
    decodes the same way, so a picture gives the same tensor in either form."""
    wide_rgb = np.repeat(WIDE.reshape(2, 3, 1), 3, axis=-1)
    opaque = np.full((2, 3, 1), 0xFFFF, np.uint16)
    files = {
        "RGB": png_16_bit(tmp_path / "rgb.png", wide_rgb, 2),
        "RGBA": png_16_bit(tmp_path / "rgba.png", np.concatenate([wide_rgb, opaque], -1), 6),
        "grey + alpha": png_16_bit(tmp_path / "la.png", np.concatenate([WIDE.reshape(2, 3, 1), opaque], -1), 4),
        "RGB TIFF": tiff(tmp_path / "rgb.tif", wide_rgb, 2),
        "grey": png_16_bit(tmp_path / "grey.png", WIDE.reshape(2, 3, 1), 0),
    }
    for name, path in files.items():
        assert pixels(decode(path)) == grey(*HIGH_BYTES), name


# --- refused: no range to scale by -------------------------------------------------------------

REFUSED = {
    # name: (writes the file into a folder, what the refusal names)
    "float TIFF": (lambda d: tiff(d / "a.tif", np.array([[0, 0.5, 1]], np.float32), 1, sample_format=3), "mode F"),
    "32-bit integer TIFF": (lambda d: tiff(d / "a.tif", np.array([[0, 1000, 70000]], np.uint32), 1), "mode I"),
    "signed 16-bit TIFF": (
        lambda d: tiff(d / "a.tif", np.array([[-5, 0, 300]], np.int16), 1, sample_format=2),
        "mode I",
    ),
    "float PFM": (lambda d: write(d / "a.pfm", b"Pf\n3 1\n-1.0\n" + np.array([0, 0.5, 1], "<f4").tobytes()), "mode F"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_images_of_no_known_range_are_refused_naming_path_mode_and_fix(tmp_path, name):
    make, mode = REFUSED[name]
    path = make(tmp_path)
    with pytest.raises(UnsupportedImageError) as refused:
        decode(path)
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message
    assert str(path) in message and mode in message and "convert it to 8-bit RGB" in message


# --- every datamodule that reads files decodes with it ------------------------------------------


def scene_in_grey(n: int) -> tuple[np.ndarray, list[int]]:
    """``n`` scenes of the offline world, in 8-bit grey (ITU-R 601 luma), and their labels."""
    scenes = render_domain("clean", 3, n, seed=0)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    luma = (scenes.originals().float() * weights).sum(1).round().to(torch.uint8)
    return luma.numpy(), scenes.labels.tolist()


def test_a_16_bit_grey_folder_predicts_as_its_8_bit_copy(tmp_path):
    """Through the real entry point (ImageFolderDataModule + Trainer.predict + PredictionWriter):
    the same scenes as 8-bit and as 16-bit grey PNG give the same prediction rows (before the fix
    the 16-bit ones decoded nearly white)."""
    images, labels = scene_in_grey(6)
    vlm = create_vlm("tta-world-resnet")
    rows = {}
    for depth in (8, 16):
        root = tmp_path / f"grey{depth}"
        for k, (image, label) in enumerate(zip(images, labels)):
            folder = root / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            if depth == 8:
                Image.fromarray(image).save(folder / f"{k}.png")
            else:
                png_16_bit(folder / f"{k}.png", image[..., None].astype(np.uint16) * 257, 0)
        data = ImageFolderDataModule(root, domain="grey", image_size=vlm.image_size[0], batch_size=4)
        trainer = pl.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[PredictionWriter(tmp_path / f"run{depth}", seed=0)],
        )
        trainer.predict(ZeroShotClassifier(vlm), datamodule=data, return_predictions=False)
        rows[depth] = (tmp_path / f"run{depth}" / "predictions.csv").read_text().splitlines()
    assert len(rows[8]) == 1 + 6 and rows[16] == rows[8]


def test_a_refused_image_is_skipped_and_named_like_a_broken_one(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    Image.fromarray(RGB).save(root / "cat" / "good.png")
    tiff(root / "cat" / "float.tif", np.array([[0, 0.5, 1]], np.float32), 1, sample_format=3)
    data = ImageFolderDataModule(root, image_size=8, batch_size=4)
    data.setup("predict")
    (batch,) = list(data.predict_dataloader())
    assert batch["skipped_images"] == 1 and batch["skipped_paths"] == [str(root / "cat" / "float.tif")]
    assert len(batch["original"]) == 1


def test_tta_predict_stops_at_a_refused_image_with_one_line_naming_it_and_its_mode(tmp_path):
    root = tmp_path / "images"
    for folder in ("cat", "dog"):
        (root / folder).mkdir(parents=True)
        Image.fromarray(RGB).save(root / folder / "good.png")
    refused = tiff(root / "dog" / "float.tif", np.array([[0, 0.5, 1]], np.float32), 1, sample_format=3)
    args = [
        "data=image_folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.on_bad_image=error",
        "trainer.enable_progress_bar=false",
        "print_table=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = run_script("tta-predict", args, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"tta-predict: error: cannot decode the image {refused}: "), lines[0]
    assert "mode F" in lines[0] and "convert it to 8-bit RGB" in lines[0] and "data.on_bad_image=skip" in lines[0]


def test_group_files_decode_zip_members_with_it_and_skip_refused_ones(tmp_path):
    """Winoground's zip layout: a group whose images are one picture in 16-bit and in 8-bit grey
    PNG holds the same pixels twice; a group with a float image is skipped and counted, as a
    broken one is."""
    root = winoground_tree(tmp_path, layout="zip")
    image, _ = scene_in_grey(1)
    archive = root / "data" / "images.zip"
    with zipfile.ZipFile(archive) as old:
        members = {name: old.read(name) for name in old.namelist()}
    members["images/ex_0_img_0.png"] = png_16_bit(
        tmp_path / "wide.png", image[0, ..., None].astype(np.uint16) * 257, 0
    ).read_bytes()
    members["images/ex_0_img_1.png"] = save(tmp_path / "narrow.png", Image.fromarray(image[0])).read_bytes()
    members["images/ex_1_img_0.png"] = tiff(
        tmp_path / "f.tif", np.array([[0, 0.5]], np.float32), 1, sample_format=3
    ).read_bytes()
    with zipfile.ZipFile(archive, "w") as new:
        for name, content in members.items():
            new.writestr(name, content)
    wide = EmbeddedImage(archive, "images/ex_0_img_0.png")
    assert torch.equal(decode_source(wide), decode(tmp_path / "narrow.png"))
    with pytest.raises(UnsupportedImageError, match=r"images\.zip/images/ex_1_img_0\.png: .*mode F"):
        decode_source(EmbeddedImage(archive, "images/ex_1_img_0.png"))
    data = WinogroundDataModule(root, image_size=16, batch_size=8)
    data.setup("predict")
    (batch,) = list(data.predict_dataloader())
    assert batch["index"].tolist() == [0, 2] and batch["skipped_images"] == 1
    first = batch["images"][0]
    assert torch.equal(first[0], first[1])


def test_search_episodes_decode_with_it_and_refuse_with_a_value_error_naming_the_file(tmp_path):
    image, _ = scene_in_grey(1)
    area = image[0, :40, :60]
    root = tmp_path / "eps"
    root.mkdir()
    Image.fromarray(area).save(root / "narrow.png")
    png_16_bit(root / "wide.png", area[..., None].astype(np.uint16) * 257, 0)
    tiff(root / "float.tif", np.zeros((40, 60), np.float32), 1, sample_format=3)
    (root / "broken.png").write_bytes(b"not a png")

    def episodes(*images: str) -> EpisodeFolderDataModule:
        episode = {"query": "a red car.", "targets": [[5, 5]], "grid": [2, 3]}
        (root / "episodes.json").write_text(json.dumps([{"image": name, **episode} for name in images]))
        data = EpisodeFolderDataModule(root)
        data.setup("predict")
        return data

    narrow, wide = episodes("narrow.png", "wide.png").dataset
    assert torch.equal(narrow["image"], wide["image"])
    with pytest.raises(ValueError, match=r"float\.tif: .*mode F.*convert it to 8-bit RGB"):
        episodes("float.tif")
    with pytest.raises(ValueError, match=r"cannot decode the image .*broken\.png"):
        episodes("broken.png")
