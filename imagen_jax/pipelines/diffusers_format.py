"""Pipelines in diffusers' directory layout: `model_index.json` and its component folders.

    index = read_model_index(path)        # {"unet": ("diffusers", "UNet2DConditionModel"), ...}
    check_components(path, index, FAMILIES["stable_diffusion"])
    diffusion, sample = scheduler_settings(path + "/scheduler")

A pipeline directory holds `model_index.json` (its `_class_name` and one
`name: [library, class]` entry per component) and a folder per component (`unet/`, `vae/`,
`text_encoder[_2]/`, `tokenizer[_2]/`, `scheduler/`). Everything here is checked before
any weights are read: a missing folder, a component of another class (a UNet folder where
the VAE should be, an SDXL UNet in an SD 1.x pipeline) and an unsupported scheduler each
raise `CheckpointError` naming the file and the problem.

`scheduler_settings` maps a diffusers scheduler config onto our `diffusion` (schedule,
prediction, variance) and `sample` (sampler, spacing, offsets, thresholding) groups, so the
pipeline samples with the numerics that scheduler has, as one compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
from absl import logging

from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.weights import CheckpointError

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of pipeline: the model_index classes it accepts and its required components
    with the class each must have (`optional`: the classes of components that only some of
    its pipelines have, checked where a loader asks for them)."""

    name: str
    pipelines: tuple[str, ...]
    components: dict[str, tuple[str, ...]]
    optional: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


_CLIP_TEXT = ("CLIPTextModel",)
FAMILIES = {
    "stable_diffusion": Family(
        "stable_diffusion",
        (
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
        ),
        {
            "unet": ("UNet2DConditionModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": _CLIP_TEXT,
            "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "scheduler": (),
        },
    ),
    "stable_diffusion_xl": Family(
        "stable_diffusion_xl",
        (
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
        ),
        {
            "unet": ("UNet2DConditionModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "scheduler": (),
        },  # the base also has text_encoder / tokenizer; the refiner has none
    ),
    "stable_diffusion_3": Family(
        "stable_diffusion_3",
        ("StableDiffusion3Pipeline",),
        {
            "transformer": ("SD3Transformer2DModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModelWithProjection",),
            "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
            "scheduler": ("FlowMatchEulerDiscreteScheduler",),
        },
        # The T5 encoder may be left out (model_index lists it as null): zeros take its place.
        optional={
            "text_encoder_3": ("T5EncoderModel",),
            "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
        },
    ),
    "deepfloyd_if": Family(
        "deepfloyd_if",
        ("IFPipeline", "IFSuperResolutionPipeline"),
        {
            "unet": ("UNet2DConditionModel",),
            "scheduler": (),
        },
        # Stage I has a T5 text encoder and its tokenizer (stage II may); stage II
        # (IFSuperResolutionPipeline) has the scheduler that noises its low-resolution input.
        optional={
            "text_encoder": ("T5EncoderModel",),
            "tokenizer": ("T5Tokenizer", "T5TokenizerFast"),
            "image_noising_scheduler": (),
        },
    ),
}


def read_json(file: str, what: str) -> dict:
    if not os.path.isfile(file):
        raise CheckpointError(f"{what}: {file} does not exist")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data


def read_model_index(path: str | os.PathLike) -> dict:
    """`model_index.json` of a pipeline directory: {"_class_name": ..., component:
    (library, class)} (components that are null in the file are left out)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    data = read_json(os.path.join(path, MODEL_INDEX), f"{path} is not a diffusers pipeline")
    index = {"_class_name": data.get("_class_name", "")}
    for name, value in data.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        index[name] = tuple(value)
    return index


def family_of(index: dict, path: str) -> Family:
    cls = index["_class_name"]
    for family in FAMILIES.values():
        if cls in family.pipelines:
            return family
    known = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise CheckpointError(f"{path}/{MODEL_INDEX}: pipeline class {cls!r} is not one of {known}")


def component_class(path: str, name: str) -> str:
    """The `_class_name` a component folder's config records (tokenizers: their
    tokenizer_config.json's `tokenizer_class`; schedulers: scheduler_config.json)."""
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: component {name!r} is missing (no folder {folder})")
    if name.startswith("tokenizer"):
        file = os.path.join(folder, "tokenizer_config.json")
        return read_json(file, f"tokenizer {folder}").get("tokenizer_class", "")
    if name == "scheduler" or name.endswith("_scheduler"):
        return read_json(os.path.join(folder, SCHEDULER_CONFIG), f"scheduler {folder}").get(
            "_class_name", ""
        )
    config = read_json(os.path.join(folder, "config.json"), f"component {folder}")
    if name.startswith("text_encoder"):
        return (config.get("architectures") or [""])[0]
    return config.get("_class_name", "")


def check_components(path: str, index: dict, family: Family, extra=()) -> None:
    """Every component the family needs (and `extra`) is listed, present, and of its class."""
    for name in (*family.components, *extra):
        if name not in index:
            raise CheckpointError(
                f"{path}/{MODEL_INDEX} lists no {name!r}, which a {family.name} pipeline needs"
            )
        expected = family.components.get(name) or family.optional.get(name, ())
        found = component_class(path, name)
        if expected and found not in expected:
            raise CheckpointError(
                f"{os.path.join(path, name)} holds a {found or 'unknown'} model; a "
                f"{family.name} pipeline needs {' or '.join(expected)} there"
            )


# ----------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------

SAMPLER_OF = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    # PLMS (PNDM with skip_prk_steps) is not implemented: its schedule is sampled with DDIM.
    "PNDMScheduler": "ddim",
}
# The UniPCMultistepScheduler settings that `unipc` is (diffusers' defaults).
_UNIPC_SETTINGS = dict(
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    disable_corrector=[],
    lower_order_final=True,
    final_sigmas_type="zero",
    use_flow_sigmas=False,
)
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCE = {
    None: "fixed_small",
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range",
}


def _unsupported(file: str, key: str, value, supported) -> CheckpointError:
    return CheckpointError(f"{file}: {key}={value!r} is not supported (supported: {supported})")


def scheduler_settings(
    folder: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(diffusion group, sample group) equal in numerics to the scheduler config in `folder`."""
    folder = os.fspath(folder)
    file = os.path.join(folder, SCHEDULER_CONFIG)
    cfg = read_json(file, f"scheduler {folder}")
    cls = cfg.get("_class_name", "")
    if cls not in SAMPLER_OF:
        raise _unsupported(file, "_class_name", cls, sorted(SAMPLER_OF))
    if cls == "PNDMScheduler":
        logging.warning("%s: PNDM (PLMS) is not implemented; sampling its schedule with DDIM", file)
    if cfg.get("trained_betas") is not None:
        raise _unsupported(file, "trained_betas", "a list", "null")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise _unsupported(file, "prediction_type", prediction, sorted(_PREDICTION))
    sampler = SAMPLER_OF[cls]
    if cls == "FlowMatchEulerDiscreteScheduler":
        if cfg.get("use_dynamic_shifting"):
            raise _unsupported(file, "use_dynamic_shifting", True, "false")
        diffusion = diffusion_config.diffusion_config(
            schedule="flow",
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
            flow_shift=float(cfg.get("shift", 1.0)),
            prediction="flow",
            model_space="flow",
        )
        return diffusion, diffusion_config.sample_config(sampler=sampler, spacing="linspace")
    beta_schedule = cfg.get("beta_schedule", "linear")
    if beta_schedule not in diffusion_config.DISCRETE:
        raise _unsupported(file, "beta_schedule", beta_schedule, diffusion_config.DISCRETE)
    variance = cfg.get("variance_type")
    if variance not in _VARIANCE:
        raise _unsupported(file, "variance_type", variance, sorted(k for k in _VARIANCE if k))
    diffusion = diffusion_config.diffusion_config(
        schedule=beta_schedule,
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        beta_start=cfg.get("beta_start", 0.0001),
        beta_end=cfg.get("beta_end", 0.02),
        zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        prediction=_PREDICTION[prediction],
        variance=_VARIANCE[variance],
    )
    sample = diffusion_config.sample_config(
        sampler=sampler,
        spacing=cfg.get("timestep_spacing", "leading"),
        steps_offset=int(cfg.get("steps_offset", 0)),
        set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        karras=bool(cfg.get("use_karras_sigmas", False)),
    )
    if cls == "DPMSolverMultistepScheduler":
        algorithm = cfg.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise _unsupported(file, "algorithm_type", algorithm, "dpmsolver++, sde-dpmsolver++")
        order = cfg.get("solver_order", 2)
        if order not in (2, 3) or (order == 3 and algorithm != "dpmsolver++"):
            raise _unsupported(file, "solver_order", order, "2, or 3 with dpmsolver++")
        sample.sampler = "dpmpp_2m" if algorithm == "dpmsolver++" else "dpmpp_2m_sde"
        if order == 3:
            sample.sampler = "dpmpp_3m"
    if cls == "UniPCMultistepScheduler":
        for key, value in _UNIPC_SETTINGS.items():
            if cfg.get(key, value) != value:
                raise _unsupported(file, key, cfg[key], value)
    if cfg.get("thresholding"):  # as diffusers: thresholding replaces clip_sample
        sample.dynamic_threshold = float(cfg.get("dynamic_thresholding_ratio", 0.995))
        sample.threshold_max = float(cfg.get("sample_max_value", 1.0))
    elif cls in ("DDIMScheduler", "DDPMScheduler") and cfg.get("clip_sample", True):
        sample.clip_x0 = float(cfg.get("clip_sample_range", 1.0))
    return diffusion, sample
