"""Public latent checkpoints in the demo: an SD 1.x / 2.x, SDXL (with an optional refiner)
or SD 3 directory in diffusers layout, generating through `sample.py --pipeline`'s own job.

A request runs `latent.LatentJob` (what `pipelines.public.public_job` builds for
`sample.py --pipeline=DIR [--refiner=DIR]`) through `jobs.run_job`, so its PNGs are those
`sample.py` writes for the same prompt, seed and settings. The pipelines are loaded once;
their compiled samplers are kept per (sampler settings, shape) by `LatentPipeline` itself.
Progress comes by step from inside the compiled loop; the images come when the job ends
(no predicted-image previews: those would cost a VAE decode each).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

from imagen_jax.demo.models import (
    MAX_GUIDANCE,
    MAX_STEPS,
    Cancelled,
    Progress,
    Request,
    RequestError,
    check_request_text,
    sampler_choices,
)
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.pipelines import jobs, latent, public

REFINER_START = 0.8  # sample.py's --refiner_start default


def size_multiple(pipe: latent.LatentPipeline) -> int:
    """What a latent pipeline's image sides must be multiples of: the VAE's downsampling
    times the denoiser's (SD 3: its patch size; a UNet: 2 per downsampling block)."""
    patch = getattr(pipe.unet_config, "patch_size", None)
    if patch:
        return pipe.vae_scale * int(patch)
    return pipe.vae_scale * 2 ** (len(pipe.unet_config.block_out_channels) - 1)


class LatentDemoModel:
    """A diffusers-format latent pipeline (and an SDXL refiner) loaded once, generating
    requests as `DemoModel` does for stage directories."""

    shipped = False

    def __init__(
        self,
        name: str,
        dirs: Sequence[str],
        *,
        batch_size: int = 4,
        lock: threading.Lock | None = None,
    ):
        if not 1 <= len(dirs) <= 2:
            raise ValueError(f"a latent pipeline is one directory and an optional refiner: {dirs}")
        self.name, self.stage_dirs, self.batch_size = name, list(dirs), batch_size
        base_dir, lora = public.resolve_lora_export(dirs[0])  # a LoRA export: its base
        self.base = public.load_latent_pipeline(base_dir, lora=lora)
        self.refiner = public.load_latent_pipeline(dirs[1]) if len(dirs) > 1 else None
        if self.refiner is not None and not (self.base.xl and self.refiner.xl):
            raise ValueError(f"{dirs[1]}: a refiner follows an SDXL base ({dirs[0]})")
        self.pipes = [self.base] + ([self.refiner] if self.refiner else [])
        for k, pipe in enumerate(self.pipes):
            pipe.on_step = functools.partial(self._on_step, k)
        self.lock = lock or threading.Lock()
        self.multiple = size_multiple(self.base)
        self.resolution = int(self.base.unet_config.sample_size) * self.base.vae_scale
        self._progress = Progress()
        self._steps: list[int] = []
        self._settings: set = set()
        self.compilations = 0  # settings seen (each compiles its samplers on first use)

    # What the page offers ---------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.pipes)

    def stage_names(self) -> list[str]:
        return ["Base stage", "Refiner"][: self.num_stages]

    has_aug_level = False

    def defaults(self) -> list[dict]:
        """Each pipeline's scheduler settings (what a request without overrides runs)."""
        return [
            dict(p.sample.to_dict(), aug_level=0.0, resolution=self.resolution) for p in self.pipes
        ]

    def samplers(self) -> list[str]:
        return sampler_choices(self.base)

    def sizes(self) -> list[tuple[int, int]]:
        """The trained square, then 3:4, 4:3, 9:16 and 16:9 shapes of about its area, and
        the half and double squares, each side a multiple of `multiple`."""
        r, m = self.resolution, self.multiple
        out = [(r, r)]
        for a, b in ((3, 4), (4, 3), (9, 16), (16, 9)):
            h = max(m, round(r * (a / b) ** 0.5 / m) * m)
            w = max(m, round(r * (b / a) ** 0.5 / m) * m)
            out.append((h, w))
        out += [(r // 2, r // 2), (2 * r, 2 * r)]
        seen, sizes = set(), []
        for h, w in out:
            if (h, w) not in seen and self._size_error(h, w) is None:
                seen.add((h, w))
                sizes.append((h, w))
        return sizes

    def command_args(self) -> list[str]:
        """`sample.py`'s flags that name this model."""
        args = [f"--pipeline={self.stage_dirs[0]}"]
        if self.refiner is not None:
            args.append(f"--refiner={self.stage_dirs[1]}")
        return args

    # Requests ---------------------------------------------------------------------------

    def _size_error(self, h: int, w: int) -> str | None:
        m, lo, hi = self.multiple, max(self.multiple, self.resolution // 2), 2 * self.resolution
        if h % m or w % m or not (lo <= h <= hi and lo <= w <= hi):
            return (
                f"size {h}x{w}: height and width must be multiples of {m} from {lo} to {hi} "
                f"(this model's range)"
            )
        return None

    def _per_stage(self, request: Request) -> list[dict]:
        try:
            return jobs.parse_overrides(request.overrides, self.num_stages)
        except (ValueError, KeyError) as e:
            raise RequestError(str(e).strip("'\"")) from None

    def _fraction(self, k: int) -> dict:
        if self.refiner is None:
            return {}
        return dict(denoising_end=REFINER_START) if k == 0 else dict(denoising_start=REFINER_START)

    def check(self, request: Request) -> None:
        """Raises RequestError naming what is wrong with a request."""
        check_request_text(request)
        if request.edit is not None:
            if not self.edits:
                raise RequestError(f"{self.name} does not edit images (SD 3 does not yet)")
            if self.refiner is not None:
                raise RequestError(f"{self.name}: edit with the SDXL base alone, not its refiner")
            if request.edit.repaint_jump:
                raise RequestError(f"{self.name}: RePaint is for stage sets and DeepFloyd IF")
            try:
                request.edit.load()
            except ValueError as e:
                raise RequestError(str(e)) from None
        error = self._size_error(
            request.height or self.resolution, request.width or self.resolution
        )
        if error:
            raise RequestError(error)
        for k, (pipe, o) in enumerate(zip(self.pipes, self._per_stage(request), strict=True)):
            sample = pipe.settings(**o)
            if sample.steps > MAX_STEPS:
                raise RequestError(f"stage {k}: {sample.steps} steps; at most {MAX_STEPS}")
            if sample.guidance_scale > MAX_GUIDANCE:
                raise RequestError(
                    f"stage {k}: guidance {sample.guidance_scale}; at most {MAX_GUIDANCE}"
                )
            try:
                fraction = self._fraction(k)
                diffusion_config.make_sampling(pipe.diffusion, pipe.settings(**o, **fraction))
            except ValueError as e:
                raise RequestError(f"stage {k}: {e}") from None

    def _on_step(self, stage: int, step: int) -> None:
        steps = self._steps[stage] if stage < len(self._steps) else 0
        self._progress.on_step(stage, step + 1, steps)

    def notes(self, request: Request) -> list[str]:
        return []

    @property
    def edits(self) -> bool:
        """SD / SDXL edit (`LatentPipeline`: image-to-image, inpainting); SD 3 does not."""
        return isinstance(self.base, latent.LatentPipeline)

    def generate(self, request: Request, outdir: str, progress: Progress | None = None) -> dict:
        """Runs a request as `sample.py --pipeline` would (`jobs.run_job` into `outdir`),
        holding the device lock; returns the job's summary with the PNG paths ("files")."""
        self.check(request)
        per_stage = self._per_stage(request)
        with self.lock:
            try:
                job = latent.LatentJob(
                    self.base,
                    self.refiner,
                    refiner_start=REFINER_START,
                    height=request.height,
                    width=request.width,
                    overrides=[*per_stage, {}][:2],
                    edit=None if request.edit is None else request.edit.load(),
                )
            except ValueError as e:  # an inpainting checkpoint without a mask, ...
                raise RequestError(str(e)) from None
            setting = (tuple(request.overrides), request.height, request.width)
            if setting not in self._settings:
                self._settings.add(setting)
                self.compilations += 1
            self._progress = progress = progress or Progress()
            self._steps = [
                diffusion_config.make_sampling(
                    p.diffusion, p.settings(**o, **self._fraction(k))
                ).grid.num_steps
                for k, (p, o) in enumerate(zip(self.pipes, per_stage, strict=True))
            ]

            def run(items, seed):
                if progress.cancelled():
                    raise Cancelled()
                return job(items, seed)

            entries = [jobs.PromptEntry(request.prompt, request.negative_prompt)]
            try:
                summary = jobs.run_job(
                    run,
                    entries,
                    outdir,
                    images_per_prompt=request.num_images,
                    seed=request.seed,
                    batch_size=self.batch_size,
                    settings=job.settings(),
                    progress=False,
                )
            finally:
                self._progress = Progress()
        items = jobs.plan(entries, request.num_images)
        return dict(summary, files=[os.path.join(outdir, it.file) for it in items])
