"""DeepFloyd IF from diffusers directories, sampled as a cascade: stage I (IFPipeline, 64 px)
and optionally stage II (IFSuperResolutionPipeline, 64 -> 256 px).

    cascade, stages = load_if_cascade("IF-I-XL-v1.0", "IF-II-L-v1.0")
    items = jobs.plan([jobs.PromptEntry("a photo of a kangaroo")], images_per_prompt=2)
    small, large = cascade(items, seed=0)  # uint8 [2, 64, 64, 3], [2, 256, 256, 3]

    python sample.py --pipeline=IF-I-XL-v1.0 --pipeline_sr=IF-II-L-v1.0 --prompt="..."

The stages are `IFStage`s run by `pipelines.cascade.Cascade`, the code that samples our own
cascades: row r of a batch draws all its noise from `jobs.image_key(seed, item, stage)`, so an
image does not depend on the batch it is placed in, and `jobs.run_job` drives the cascade.
The numerics are those of diffusers' IF pipelines:

- Text: T5 over 77 tokens, with the attention mask given to T5 (not to the UNet, which
  cross-attends to all 77 states). The unconditional input is the encoding of the negative
  prompt, or of "" without one. Prompts are lower-cased and stripped, as diffusers does with
  `clean_caption=False`; the caption cleaning of `clean_caption=True` (HTML, URLs, special
  punctuation, via bs4 / ftfy) is not done here.
- Each stage's scheduler config maps onto our sampler (`diffusers_format.scheduler_settings`:
  DDPM with the learned-range variance and dynamic thresholding for IF's). Classifier-free
  guidance acts on the eps channels; the variance channels come from the conditional branch.
- Stage II: stage I's image is upscaled bilinearly (align_corners=True, as diffusers'
  `F.interpolate`) to the stage II size, noised by the image-noising scheduler at `noise_level`
  (diffusers' default 250) with the row's augmentation noise, concatenated to the sample's
  channels, and `noise_level` is the UNet's class label. A stage II directory with a text
  encoder of its own encodes the prompts with it; without one (IF-II as published) it takes
  stage I's embeddings.

Every directory is checked from its JSON files before any weights are read: the pipeline
class (a stage II directory given as stage I and the other way round), the components, the
UNet (input and output channels, the noise-level embedding of stage II) and its text width
against the T5 that feeds it; each problem is a `CheckpointError` naming the file.

Not done here: diffusers' safety checker and watermark (applied to PIL outputs), and the
caption cleaning above. Between the stages the image is clipped to [-1, 1], which diffusers
does not do; with IF's dynamic thresholding the last DDPM step lands on the thresholded x0,
already in [-1, 1], so this changes nothing there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax import files
from imagen_jax.diffusion import adapter, losses
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.models import lora as lora_lib
from imagen_jax.models import sd_unet
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import diffusers_format
from imagen_jax.text.encoder import TextEncoder, load_text_encoder
from imagen_jax.text.tokenizer import TOKENIZER_FILE
from imagen_jax.weights import CheckpointError

STAGE_OF = {"IFPipeline": "I", "IFSuperResolutionPipeline": "II"}
MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens
# diffusers' defaults of a call: IFPipeline 100 steps, guidance 7; IFSuperResolutionPipeline
# 50 steps, guidance 4, noise_level 250.
DEFAULT_STEPS = {"I": 100, "II": 50}
DEFAULT_GUIDANCE = {"I": 7.0, "II": 4.0}
DEFAULT_NOISE_LEVEL = 250
_ROLE = {
    "I": "stage I (IFPipeline, the base; --pipeline)",
    "II": "stage II (IFSuperResolutionPipeline, super-resolution; --pipeline_sr)",
}


# diffusers' IFInpaintingSuperResolutionPipeline / IFImg2ImgSuperResolutionPipeline start
# stage II from the image at this strength (their default).
SR_EDIT_STRENGTH = 0.8


def is_if_pipeline(path: str | os.PathLike) -> bool:
    """Whether a diffusers directory holds a DeepFloyd IF pipeline (either stage)."""
    index = diffusers_format.read_model_index(path)
    return index["_class_name"] in STAGE_OF


def preprocess_prompt(text: str) -> str:
    """What IF encodes of a prompt: diffusers' text preprocessing with clean_caption=False."""
    return text.lower().strip()


def if_conditioning(encoder: TextEncoder, items) -> tuple[dict, dict]:
    """(cond, uncond) of the IF UNets for a batch of work items: the T5 states of the prompts
    and of the negative prompts ("" where none), [B, 77, D] each."""
    prompts = [preprocess_prompt(it.entry.prompt) for it in items]
    negatives = [preprocess_prompt(it.entry.negative_prompt) for it in items]
    states = encoder.encode(prompts + negatives).embeddings  # one call: [2B, L, D]
    b = len(items)
    return {"text": states[:b]}, {"text": states[b:]}


# ----------------------------------------------------------------------------------------------
# A stage
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IFStage:
    """One loaded IF stage, in the form `cascade.Cascade` samples (see its module docstring)."""

    path: str
    stage: str  # I | II
    model: sd_unet.SDUNet
    unet: sd_unet.SDUNetConfig
    diffusion: ml_collections.ConfigDict
    sample: ml_collections.ConfigDict
    resolution: int  # the UNet's sample_size
    channels: int  # of the image (the UNet sees twice as many in stage II)
    encoder: TextEncoder | None = None  # None: the previous stage's prompt embeddings
    noising: ml_collections.ConfigDict | None = None  # stage II: image_noising_scheduler's
    noise_level: int = DEFAULT_NOISE_LEVEL  # stage II: the input's noise level (timestep)
    low_resolution: int = 0  # stage II: stage I's resolution, set when a cascade is made
    lora: str = ""  # a diffusers LoRA file merged into the UNet ("" = none)

    @property
    def super_resolution(self) -> bool:
        return self.stage == "II"

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (self.unet.num_blocks - 1)

    def network(self):
        """(apply_fn(state, z_t, t, cond), state): the UNet told the diffusers timestep, with
        stage II's noised low-resolution image concatenated to its input channels."""
        graphdef, state = nnx.split(self.model)

        def apply_fn(state, z_t, t, cond):
            unet = nnx.merge(graphdef, state)
            x = z_t
            if "low_res" in cond:
                x = jnp.concatenate([z_t, cond["low_res"].astype(z_t.dtype)], axis=-1)
            return unet(x, t, cond["text"], class_labels=cond.get("noise_level"))

        return apply_fn, state

    def low_res_conditioning(self, low_res, aug_keys, size) -> dict:
        """Stage I's images [B, h, w, C] -> the upscaled, noised input of this stage and its
        noise level, as IFSuperResolutionPipeline prepares them."""
        schedule = diffusion_config.make_schedule(self.noising)
        upscaled = adapter.resize_bilinear_aligned(jnp.asarray(low_res, jnp.float32), size)
        eps = jax.vmap(lambda k: jax.random.normal(k, upscaled.shape[1:]))(aug_keys)
        level = jnp.full((upscaled.shape[0],), self.noise_level, jnp.int32)
        alpha, sigma = schedule.alpha_sigma(level)
        noised = losses.add_noise(x0=upscaled, eps=eps, alpha_t=alpha, sigma_t=sigma)
        return {"low_res": noised, "noise_level": level.astype(jnp.float32)}

    def with_settings(self, sample_overrides: dict | None = None) -> IFStage:
        """This stage with keys of its sample group replaced, as `load_if_stage` would read
        it with those overrides; the network is shared, not copied."""
        if not sample_overrides:
            return self
        sample = diffusion_config.sample_config(**{**self.sample.to_dict(), **sample_overrides})
        return dataclasses.replace(self, sample=sample)

    def settings(self) -> dict:
        """What the metadata of an image records about this stage."""
        out = dict(
            path=self.path,
            pipeline="deepfloyd_if",
            stage=self.stage,
            resolution=self.resolution,
            sample=self.sample.to_dict(),
            diffusion=self.diffusion.to_dict(),
            own_text_encoder=self.encoder is not None,
            weights_sha256=files.folder_sha256(self.path),
        )
        if self.super_resolution:
            out.update(noise_level=self.noise_level, low_resolution=self.low_resolution)
        if self.lora:
            out.update(lora_lib.file_record(self.lora))
        return out


# ----------------------------------------------------------------------------------------------
# Checking a directory (JSON only) and loading it
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IFDirectory:
    """What an IF pipeline directory's JSON files say; read before any weights."""

    path: str
    stage: str  # I | II
    unet: sd_unet.SDUNetConfig
    channels: int
    text_width: int | None  # d_model of its own T5; None without a text encoder
    diffusion: ml_collections.ConfigDict
    sample: ml_collections.ConfigDict
    noising: ml_collections.ConfigDict | None  # stage II's image-noising schedule

    @property
    def unet_text_width(self) -> int:
        """The width of the text states the UNet takes (its encoder_hid_proj's input)."""
        return self.unet.encoder_hid_dim or self.unet.cross_attention_dim


def _text_fit_error(directory: IFDirectory, width: int, source: str) -> CheckpointError:
    unet = directory.unet
    key = "encoder_hid_dim" if unet.encoder_hid_dim is not None else "cross_attention_dim"
    return CheckpointError(
        f"{directory.path}/unet/config.json: {key}={directory.unet_text_width} does not fit "
        f"the T5 text encoder that feeds it ({source}: d_model={width})"
    )


def _unet_config(path: str, stage: str) -> tuple[sd_unet.SDUNetConfig, int]:
    """The UNet's config and the image channels, checked for the stage."""
    file = os.path.join(path, "unet", "config.json")
    try:
        unet = sd_unet.SDUNetConfig.from_hf(diffusers_format.read_json(file, "unet"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    noise_input = unet.class_embed_type == "timestep"
    if stage == "I":
        if unet.class_embed_type is not None or unet.num_class_embeds is not None:
            raise CheckpointError(
                f"{file}: the UNet has a class embedding (class_embed_type="
                f"{unet.class_embed_type!r}), the noise-level input of a super-resolution "
                "UNet; a stage I UNet has none (an IF stage II UNet in a stage I pipeline?)"
            )
        return unet, unet.in_channels
    if not noise_input or unet.in_channels % 2:
        raise CheckpointError(
            f"{file}: a stage II UNet takes the noisy image and the upscaled one "
            f"(in_channels even, got {unet.in_channels}) and their noise level "
            f"(class_embed_type='timestep', got {unet.class_embed_type!r}): an IF stage I "
            "UNet in a super-resolution pipeline?"
        )
    return unet, unet.in_channels // 2


def _check_tokenizer(path: str) -> None:
    folder = os.path.join(path, "tokenizer")
    if not os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
        raise CheckpointError(
            f"{folder} has no {TOKENIZER_FILE} (IF ships the slow T5 tokenizer's spiece.model); "
            "write it once where transformers is installed: "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )


def _t5_width(path: str) -> int:
    config = diffusers_format.read_json(
        os.path.join(path, "text_encoder", "config.json"), "text encoder"
    )
    return int(config.get("d_model", 0))


def inspect_if_pipeline(path: str | os.PathLike, stage: str) -> IFDirectory:
    """Checks an IF pipeline directory for use as `stage` ("I" | "II") from its JSON files
    alone. Raises CheckpointError naming the file and the problem."""
    path = os.fspath(path)
    index = diffusers_format.read_model_index(path)
    family = diffusers_format.family_of(index, path)
    cls = index["_class_name"]
    if cls not in STAGE_OF:
        raise CheckpointError(
            f"{path} is a {cls}, not a DeepFloyd IF pipeline ({' or '.join(STAGE_OF)})"
        )
    if STAGE_OF[cls] != stage:
        raise CheckpointError(
            f"{path} is DeepFloyd IF {_ROLE[STAGE_OF[cls]]}; it was given as {_ROLE[stage]}"
        )
    own_text = stage == "I" or "text_encoder" in index
    extra = ("text_encoder", "tokenizer") if own_text else ()
    if stage == "II":
        extra += ("image_noising_scheduler",)
    diffusers_format.check_components(path, index, family, extra=extra)
    if own_text:
        _check_tokenizer(path)
    unet, channels = _unet_config(path, stage)
    diffusion, sample = diffusers_format.scheduler_settings(os.path.join(path, "scheduler"))
    want_out = 2 * channels if diffusion.variance == "learned_range" else channels
    if unet.out_channels != want_out:
        raise CheckpointError(
            f"{path}/unet/config.json: out_channels={unet.out_channels}, but the scheduler's "
            f"variance ({diffusion.variance}) on {channels}-channel images needs {want_out}"
        )
    if not isinstance(unet.sample_size, int):
        raise CheckpointError(
            f"{path}/unet/config.json: sample_size={unet.sample_size!r}; IF stages need one "
            "int (the square resolution the stage samples)"
        )
    noising = None
    if stage == "II":
        noising, _ = diffusers_format.scheduler_settings(
            os.path.join(path, "image_noising_scheduler")
        )
        if noising.schedule not in diffusion_config.DISCRETE:
            raise CheckpointError(
                f"{path}/image_noising_scheduler: a {noising.schedule} schedule; noising the "
                f"input needs a discrete one ({', '.join(diffusion_config.DISCRETE)})"
            )
    directory = IFDirectory(
        path=path,
        stage=stage,
        unet=unet,
        channels=channels,
        text_width=_t5_width(path) if own_text else None,
        diffusion=diffusion,
        sample=sample,
        noising=noising,
    )
    if own_text and directory.text_width != directory.unet_text_width:
        raise _text_fit_error(directory, directory.text_width, f"{path}/text_encoder")
    return directory


def load_if_stage(
    directory: IFDirectory | str | os.PathLike,
    stage: str | None = None,
    *,
    dtype=jnp.float32,
    sample_overrides: dict | None = None,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    lora: str | None = None,
) -> IFStage:
    """One IF stage (a checked `IFDirectory`, or a path and its stage "I" | "II"): the UNet,
    its own T5 encoder if it has one, and its scheduler's settings with diffusers' default
    steps and guidance (replaced by `sample_overrides`); lora: a diffusers LoRA file (or
    its directory) merged into the UNet (`models.lora.apply_diffusers_lora`)."""
    if not isinstance(directory, IFDirectory):
        if stage is None:
            raise ValueError("give the stage ('I' or 'II') of a directory path")
        directory = inspect_if_pipeline(directory, stage)
    noising = directory.noising
    if noising is not None and not 0 <= noise_level < noising.num_train_timesteps:
        raise ValueError(
            f"noise_level must be in [0, {noising.num_train_timesteps}), got {noise_level}"
        )
    sample = directory.sample.to_dict()
    sample.update(
        steps=DEFAULT_STEPS[directory.stage], guidance_scale=DEFAULT_GUIDANCE[directory.stage]
    )
    sample.update(sample_overrides or {})
    path = directory.path
    encoder = None
    if directory.text_width is not None:
        encoder = load_text_encoder(
            os.path.join(path, "text_encoder"), "t5", max_length=MAX_LENGTH, dtype=dtype
        )
    model, unet = sd_unet.load_unet(os.path.join(path, "unet"), dtype)
    lora_file = lora_lib.apply_diffusers_lora(model, lora) if lora else ""
    return IFStage(
        path=path,
        stage=directory.stage,
        model=model,
        unet=unet,
        diffusion=directory.diffusion,
        sample=diffusion_config.sample_config(**sample),
        resolution=int(unet.sample_size),
        channels=directory.channels,
        encoder=encoder,
        noising=noising,
        noise_level=int(noise_level),
        lora=lora_file,
    )


def check_stage_pair(base: IFDirectory, sr: IFDirectory) -> None:
    """Stage II fits after stage I: the same image channels, and without a text encoder of
    its own, a UNet that takes stage I's T5 states."""
    if sr.channels != base.channels:
        raise CheckpointError(
            f"{sr.path} upsamples {sr.channels}-channel images; {base.path} makes "
            f"{base.channels}-channel ones"
        )
    if sr.text_width is None and sr.unet_text_width != base.text_width:
        raise _text_fit_error(
            sr, base.text_width, f"stage I's {base.path}/text_encoder, as stage II has none"
        )


def load_if_stages(
    stage_1: str | os.PathLike,
    stage_2: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    overrides: Sequence[dict] = ({}, {}),
    noise_level: int = DEFAULT_NOISE_LEVEL,
    lora: str | None = None,
    lora_sr: str | None = None,
) -> list[IFStage]:
    """IF stage I and optionally stage II, both directories checked, alone and together,
    before any weights are read (the stages of `load_if_cascade`); lora, lora_sr: diffusers
    LoRA files (or their directories) merged into stage I's and stage II's UNets."""
    if lora_sr and stage_2 is None:
        raise ValueError(f"a stage II LoRA ({lora_sr}) needs a stage II pipeline directory")
    directories = [inspect_if_pipeline(stage_1, "I")]
    if stage_2 is not None:
        directories.append(inspect_if_pipeline(stage_2, "II"))
        check_stage_pair(*directories)
    overrides = list(overrides) + [{}] * (len(directories) - len(overrides))
    stages = [
        load_if_stage(
            d,
            dtype=dtype,
            sample_overrides=o,
            noise_level=noise_level,
            lora=(lora, lora_sr)[i],
        )
        for i, (d, o) in enumerate(zip(directories, overrides, strict=False))
    ]
    for prev, nxt in zip(stages, stages[1:], strict=False):
        nxt.low_resolution = prev.resolution
    return stages


def load_if_cascade(
    stage_1: str | os.PathLike,
    stage_2: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    overrides: Sequence[dict] = ({}, {}),
    noise_level: int = DEFAULT_NOISE_LEVEL,
    mesh=None,
    size: tuple[int, int] | None = None,
    lora: str | None = None,
    lora_sr: str | None = None,
) -> tuple[cascade_lib.Cascade, list[IFStage]]:
    """(Cascade, its stages) of IF stage I and optionally stage II. Both directories are
    checked, alone and together, before any weights are read. overrides: per stage, `sample`
    group keys (steps, guidance_scale, sampler, ...); noise_level: stage II's; mesh and size:
    as `Cascade`'s; lora, lora_sr: as `load_if_stages`'."""
    stages = load_if_stages(
        stage_1,
        stage_2,
        dtype=dtype,
        overrides=overrides,
        noise_level=noise_level,
        lora=lora,
        lora_sr=lora_sr,
    )
    cascade = cascade_lib.Cascade(
        stages, stages[0].encoder, mesh=mesh, size=size, conditioning=if_conditioning
    )
    return cascade, stages
