"""Diffusion views for DiffTPT: image variations from diffusers' image-variation pipeline, cached on disk.

``DiffusionViewGenerator.views(images, seeds)`` returns ``B x n_views x 3 x S x S`` uint8 variations
of raw ``[0, 1]`` images, generated on the images' device in batches of ``batch_size`` views by
``StableDiffusionImageVariationPipeline`` (which conditions on the CLIP image embedding of the
image: it is resized to the pipeline's CLIP input size, 224 px for the real weights, and
CLIP-normalised here, because the pipeline passes tensor inputs to its image encoder as they are).

Weights (``pretrained``):

- a hub id with ``revision`` (DiffTPT's: ``lambdalabs/sd-image-variations-diffusers``, ``v2.0``),
  loaded from the local Hugging Face cache or downloaded;
- a local folder saved by ``save_pretrained`` (same layout as the hub repository);
- ``"tta-world-image-variation"``: the offline world's generator, shipped in ``tta/assets/`` (a
  tiny pipeline of the same classes, 32 px, trained on world scenes by
  ``python -m tta.world.train_generator``; the world's default for ``tta=difftpt``);
- ``"tta-tiny-image-variation"``: a tiny pipeline with RANDOM weights, built from small
  diffusers/transformers configs with a fixed seed (no download). Its "variations" are noise:
  it checks the plumbing offline (shapes, cache, batching), it is not a model.

Randomness and cache. View ``j`` of a sample whose seed is ``s`` (the per-sample seed the TTA
callbacks give, :func:`tta.callbacks.base.sample_seed`) starts from latents drawn on the CPU by
its own generator, seeded from ``(s, j)``: a sample's views do not depend on the batch it is in
or on the device, up to floating-point rounding (batched convolutions may round differently; one
uint8 level was seen on the CPU), and the cache fixes them at their first generation. With
``cache_dir`` set, each image's views are stored in one safetensors file
named by a SHA-256 over the image's bytes (the raw float32 tensor given to :meth:`views`), the
sample seed, the model identity and every generation setting, written atomically (temporary file
then rename). The stored tensor is uint8, and a fresh generation returns exactly the tensor it
stores, so a later read is bit-identical to the first run. Each file also carries its key and
the SHA-256 of its pixels (safetensors metadata), checked on every read: a file that cannot be
read, holds another key (another image's file copied or renamed into place) or whose pixels do
not match the checksum is regenerated and rewritten, with one warning naming it. Model identity: hub id + revision; for
a local folder, its resolved path + the name, size and modification time of every file in it
(re-saving weights into the same folder invalidates the cache without hashing gigabytes); for a
shipped pipeline, its name + the name and SHA-256 of every file in it (a few MB: the key follows
the weights, not where or when the package was installed); the tiny pipeline, its name and seed.
The dtype the pipeline runs in is part of the key (``"auto"`` resolved: float16 on CUDA, float32
elsewhere); the device otherwise is not (another GPU model may round differently, within the same
dtype).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tta.validation import OptionError, check_number

#: ``pretrained`` value of the tiny random pipeline (plumbing checks offline; not a model).
TINY_PIPELINE = "tta-tiny-image-variation"
#: ``pretrained`` value of the offline world's trained generator (``tta.world.train_generator``).
WORLD_PIPELINE = "tta-world-image-variation"
#: Pipelines shipped with the package, by their short name: the folder each is saved in.
SHIPPED_PIPELINES = {WORLD_PIPELINE: Path(__file__).resolve().parent.parent / "assets" / WORLD_PIPELINE}
#: DiffTPT's weights.
DIFFTPT_WEIGHTS = ("lambdalabs/sd-image-variations-diffusers", "v2.0")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_FORMAT = 2  # bump when the stored layout changes (2: key and checksum inside each file)

log = logging.getLogger(__name__)


def require_difftpt_extra() -> None:
    """One line naming the extra to install when diffusers or transformers is missing (they are
    not installed by default: only DiffTPT needs them)."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"DiffTPT needs diffusers and transformers ({error}): install the extra with pip install 'tta[difftpt]'"
        ) from error


def tiny_image_variation_pipeline(seed: int = 0):
    """A ``StableDiffusionImageVariationPipeline`` with tiny random weights: 32 px CLIP input,
    16 x 16 latents (32 px output), a two-block UNet. Built with a fixed seed, without download."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=16,
                projection_dim=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
            )
        )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionImageVariationPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=processor,
        requires_safety_checker=False,
    )


def _is_path(pretrained: str) -> bool:
    """A local folder rather than a hub id ("owner/name"): it exists, or it is written as a path."""
    return Path(pretrained).expanduser().exists() or pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1


def _folder_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    )


def _folder_digests(folder: Path) -> list[tuple[str, str]]:
    """Name and SHA-256 of every file of a (small, shipped) folder."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted((str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files)


class DiffusionViewGenerator:
    """Image variations per test image, generated on the device in batches, cached on disk.

    Args:
        pretrained: hub id, local folder, ``"tta-world-image-variation"`` (the offline world's
            generator) or ``"tta-tiny-image-variation"`` (see the module doc).
        revision: hub revision (ignored for a local folder, a shipped pipeline or the tiny pipeline).
        n_views: variations per image (DiffTPT: 63).
        guidance_scale: classifier-free guidance on the image embedding (DiffTPT: 3).
        num_inference_steps: denoising steps (diffusers' default 50).
        scheduler: a diffusers scheduler class name (e.g. ``"DDIMScheduler"``) built from the
            pipeline's scheduler config; ``None`` keeps the pipeline's own.
        height, width: generation size in pixels (``None``: the pipeline's native size, 512 for
            the real weights).
        output_size: side of the square views that are returned and stored (``None``: as
            generated); 224 suits CLIP and keeps the cache at ~150 KB per view.
        batch_size: views per pipeline call (memory bound; results do not depend on it).
        dtype: ``"auto"`` (float16 on CUDA, float32 elsewhere), ``"float16"``, ``"bfloat16"`` or
            ``"float32"``.
        cache_dir: folder of the on-disk cache (``None``: no cache).
        tiny_seed: weight seed of the tiny random pipeline.
    """

    def __init__(
        self,
        pretrained: str = DIFFTPT_WEIGHTS[0],
        revision: str | None = DIFFTPT_WEIGHTS[1],
        n_views: int = 63,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        output_size: int | None = 224,
        batch_size: int = 32,
        dtype: str = "auto",
        cache_dir: str | None = "~/.cache/tta/difftpt_views",
        tiny_seed: int = 0,
    ) -> None:
        check_number("n_views", n_views, 1, integer=True)  # variations per image
        check_number("guidance_scale", guidance_scale)
        check_number("num_inference_steps", num_inference_steps, 1, integer=True)
        check_number("batch_size", batch_size, 1, integer=True)  # views per pipeline call
        check_number("output_size", output_size, 1, integer=True, optional=True)  # side in pixels
        check_number("tiny_seed", tiny_seed, integer=True)
        for name, side in (("height", height), ("width", width)):  # pixels; the autoencoder halves them 3 times
            check_number(name, side, 8, integer=True, optional=True)
            if side is not None and side % 8:
                raise OptionError(name, f"must be a multiple of 8 (or null), got {side}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        require_difftpt_extra()
        if scheduler is not None:
            import diffusers

            if not scheduler.endswith("Scheduler") or not hasattr(diffusers, scheduler):
                raise ValueError(
                    f"scheduler must name a diffusers scheduler class such as 'DDIMScheduler' "
                    f"or 'PNDMScheduler' (or be None), got {scheduler!r}"
                )
        self.pretrained, self.revision = str(pretrained), revision
        self.local_folder: Path | None = None
        self._digests: list[tuple[str, str]] | None = None  # a shipped pipeline's file digests, read once
        if self.pretrained in SHIPPED_PIPELINES:
            folder = SHIPPED_PIPELINES[self.pretrained]
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"pretrained={self.pretrained!r}: the shipped pipeline is missing from {folder} (a broken "
                    f"install?): reinstall tta, or retrain it with python -m tta.world.train_generator --out {folder}"
                )
            self.local_folder = folder
        elif self.pretrained != TINY_PIPELINE and _is_path(self.pretrained):
            folder = Path(self.pretrained).expanduser().resolve()
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"pretrained={self.pretrained!r} is not a saved diffusers pipeline (no model_index.json in "
                    f"{folder}): give the folder written by StableDiffusionImageVariationPipeline.save_pretrained, "
                    f"a hub id such as {DIFFTPT_WEIGHTS[0]!r}, {WORLD_PIPELINE!r} for the offline world, or "
                    f"{TINY_PIPELINE!r} for the offline plumbing check"
                )
            self.local_folder = folder
        self.n_views, self.guidance_scale, self.num_inference_steps = (
            n_views,
            float(guidance_scale),
            num_inference_steps,
        )
        self.scheduler, self.height, self.width, self.output_size = scheduler, height, width, output_size
        self.batch_size, self.dtype, self.tiny_seed = batch_size, dtype, tiny_seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.pipeline = None
        self.n_generated = 0  # views generated by the pipeline since construction
        self.n_cached = 0  # images whose views were read from the cache

    # --- loading ----------------------------------------------------------------------------

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if torch.device(device).type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def load(self, device: torch.device | str = "cpu") -> DiffusionViewGenerator:
        """Load (once) the pipeline onto ``device`` and check the cache folder is writable."""
        device = torch.device(device)
        self._check_cache_dir()
        dtype = self.torch_dtype(device)
        if self.pipeline is None:
            self.pipeline = self._build_pipeline(dtype)
        if self.pipeline.unet.dtype != dtype:
            self.pipeline.to(dtype=dtype)
        self.pipeline.to(device)
        return self

    def _build_pipeline(self, dtype: torch.dtype):
        from diffusers import StableDiffusionImageVariationPipeline

        if self.pretrained == TINY_PIPELINE:
            pipeline = tiny_image_variation_pipeline(self.tiny_seed)
        else:
            source = str(self.local_folder) if self.local_folder is not None else self.pretrained
            revision = None if self.local_folder is not None else self.revision
            try:
                pipeline = StableDiffusionImageVariationPipeline.from_pretrained(
                    source, revision=revision, dtype=dtype, safety_checker=None, requires_safety_checker=False
                )
            except OSError as error:
                raise OSError(
                    f"could not load the image-variation pipeline {source!r} (revision {revision}): "
                    f"{error}. Without internet, download it once elsewhere, save it with "
                    "save_pretrained and give that folder as pretrained="
                ) from error
        if self.scheduler is not None:
            import diffusers

            pipeline.scheduler = getattr(diffusers, self.scheduler).from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _check_cache_dir(self) -> None:
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=".probe-"):
                pass
        except OSError as error:
            raise PermissionError(
                f"the diffusion view cache_dir {str(self.cache_dir)!r} is not a writable folder "
                f"({error}): give a writable cache_dir, or cache_dir=null to generate "
                "without a cache"
            ) from error

    # --- cache ------------------------------------------------------------------------------

    def model_identity(self) -> dict[str, Any]:
        if self.pretrained == TINY_PIPELINE:
            return {"model": TINY_PIPELINE, "tiny_seed": self.tiny_seed}
        if self.pretrained in SHIPPED_PIPELINES:
            if self._digests is None:
                self._digests = _folder_digests(self.local_folder)
            return {"model": self.pretrained, "files": self._digests}
        if self.local_folder is not None:
            return {"model": str(self.local_folder), "files": _folder_fingerprint(self.local_folder)}
        return {"model": self.pretrained, "revision": self.revision}

    def settings(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Every setting a view depends on, besides the image and the seed, for generation on ``device``
        (the device type only picks the dtype of ``dtype="auto"``)."""
        return {
            "format": CACHE_FORMAT,
            **self.model_identity(),
            "n_views": self.n_views,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
            "scheduler": self.scheduler,
            "height": self.height,
            "width": self.width,
            "output_size": self.output_size,
            "dtype": str(self.torch_dtype(torch.device(device))),
        }

    def cache_key(self, image: torch.Tensor, seed: int, settings: str) -> str:
        digest = hashlib.sha256(settings.encode())
        digest.update(str(int(seed)).encode())
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.numpy().tobytes())
        return digest.hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path, key: str) -> torch.Tensor | None:
        """The views stored under ``key``; ``None`` if there are none, or, with a warning naming the
        file, if the file does not verify (it is then regenerated and rewritten)."""
        try:
            with safe_open(path, framework="pt") as f:
                stored, views = f.metadata() or {}, f.get_tensor("views")
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            problem = f"unreadable: {error}"
        else:
            if stored.get("key") != key:
                problem = "it holds the views of another image or other settings"
            elif views.dtype != torch.uint8 or views.ndim != 4 or len(views) != self.n_views:
                problem = f"unexpected views {tuple(views.shape)} {views.dtype}"
            elif stored.get("sha256") != _pixels_digest(views):
                problem = "its pixels do not match their checksum"
            else:
                return views
        log.warning("DiffTPT view cache file %s is damaged (%s): regenerating it", path, problem)
        return None

    def _write(self, path: Path, key: str, views: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            views = views.contiguous()
            save_file({"views": views}, tmp, metadata={"key": key, "sha256": _pixels_digest(views)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def views(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """``B x n_views x 3 x S x S`` uint8 variations of raw ``[0, 1]`` images (``B x 3 x H x W``),
        on the images' device; cached views are read, the others generated and stored."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float B x 3 x H x W in [0, 1], got {tuple(images.shape)} {images.dtype}")
        if len(seeds) != len(images):
            raise ValueError(f"one seed per image: got {len(seeds)} seeds for {len(images)} images")
        device = images.device
        if self.pipeline is None:
            self.load(device)
        settings = json.dumps(self.settings(device), sort_keys=True)
        keys = [self.cache_key(im, s, settings) if self.cache_dir is not None else None for im, s in zip(images, seeds)]
        paths = [self.cache_path(key) if key is not None else None for key in keys]
        out: list[torch.Tensor | None] = [self._read(p, k) if p is not None else None for p, k in zip(paths, keys)]
        self.n_cached += sum(v is not None for v in out)
        missing = [b for b, v in enumerate(out) if v is None]
        if missing:
            generated = self._generate(images[missing], [seeds[b] for b in missing])
            for b, views in zip(missing, generated):
                out[b] = views
                if paths[b] is not None:
                    self._write(paths[b], keys[b], views)
        return torch.stack(out).to(device)

    def _generate(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Generate ``n_views`` per image in pipeline calls of ``batch_size`` views (CPU uint8)."""
        pipeline = self.pipeline
        dtype = pipeline.image_encoder.dtype
        condition = self.clip_condition(images).to(pipeline.device, dtype)
        pairs = [(b, j) for b in range(len(images)) for j in range(self.n_views)]
        chunks = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            generators = [torch.Generator("cpu").manual_seed(view_seed(seeds[b], j)) for b, j in chunk]
            result = pipeline(
                condition[[b for b, _ in chunk]],
                height=self.height,
                width=self.width,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                output_type="pt",
            ).images
            chunks.append(self._to_uint8(result))
            self.n_generated += len(chunk)
        return torch.cat(chunks).view(len(images), self.n_views, *chunks[0].shape[1:])

    @property
    def condition_size(self) -> tuple[int, int]:
        """The pipeline's CLIP input size (224 x 224 for DiffTPT's weights); needs :meth:`load`."""
        crop = self.pipeline.feature_extractor.crop_size
        return (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))

    def squash(self, originals: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """``B x 3 x h x w`` float: each image as loaded (uint8 ``3 x H x W``), whole, squashed to
        :attr:`condition_size` (bicubic, antialiased, no crop), as DiffTPT conditions on it."""
        return torch.stack(
            [
                F.interpolate(
                    original.to(device).float()[None] / 255,
                    size=self.condition_size,
                    mode="bicubic",
                    antialias=True,
                    align_corners=False,
                )[0].clamp(0, 1)
                for original in originals
            ]
        )

    def clip_condition(self, images: torch.Tensor) -> torch.Tensor:
        """The images as the pipeline's image encoder takes them: resized (bicubic) to its CLIP input
        size (a no-op for :meth:`squash`'s output) and normalised with its feature extractor's mean
        and std."""
        processor = self.pipeline.feature_extractor
        size = self.condition_size
        resized = images.float()
        if tuple(resized.shape[-2:]) != size:
            resized = F.interpolate(resized, size=size, mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(processor.image_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, device=images.device).view(1, 3, 1, 1)
        return (resized.clamp(0, 1) - mean) / std

    def _to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.output_size is not None and tuple(images.shape[-2:]) != (self.output_size,) * 2:
            images = F.interpolate(
                images, size=(self.output_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def fill_cache(
        self, batches: Iterable[dict[str, Any]], sample_seed: Callable[[int], int], device: torch.device | str = "cpu"
    ) -> int:
        """Pre-pass: generate (or find cached) the views of every image of ``batches`` (dicts with
        ``original``, the images as loaded, conditioned on through :meth:`squash`, or else ``image``,
        and ``index``, e.g. a datamodule's ``predict_dataloader()``); ``sample_seed`` maps a sample
        index to its seed. Returns the number of images. Needs ``cache_dir``."""
        if self.cache_dir is None:
            raise ValueError("fill_cache stores views in cache_dir: give a cache_dir")
        self.load(device)
        n = 0
        for batch in batches:
            if len(batch["index"]) == 0:
                continue
            seeds = [sample_seed(i) for i in batch["index"].tolist()]
            images = self.squash(batch["original"], device) if "original" in batch else batch["image"].to(device)
            self.views(images, seeds)
            n += len(seeds)
        return n


def _pixels_digest(views: torch.Tensor) -> str:
    return hashlib.sha256(views.contiguous().numpy().tobytes()).hexdigest()


def view_seed(sample_seed: int, view: int) -> int:
    """The latent seed of view ``view`` of a sample: a function of the sample's seed and the view only."""
    return (int(sample_seed) * 1_000_033 + int(view) + 1) % (2**63 - 1)
