"""The trainer's config groups: `model`, `data`, `optim`, `train`, `evals`, `mesh`;
`latent` (latent diffusion stages) and `vae_loss` (autoencoder training).

The `diffusion` and `sample` groups come from `imagen_jax.diffusion.config`, the `text`
group from `imagen_jax.text.config`. Each function
returns the group's defaults with `overrides` applied; an unknown key raises, as does an
unknown key given later on the command line (configs are locked by `train.py`).

`check_config(config)` rejects the values of the `train`, `optim` and `data` groups that
cannot work (`train.steps=-5`, `optim.lr=nan`, ...) with one line naming the key and value;
the trainers call it first, and so does `train.py`.

`model.family` picks the network: "imagen" (ImagenUNet, pixel stages; the default),
"sd_unet" (`models.latent_unet.LatentUNet`, our SDUNet, on a frozen VAE's latents), "mmdit"
(`models.latent_mmdit.LatentMMDiT`, our SD3 MMDiT, on a frozen VAE's latents) or "vae"
(`models.vae.AutoencoderKL`, trained by `training.vae_trainer`) or "git"
(`models.git.GitForCausalLM`, a captioner, trained by `training.caption_trainer`) or
"two_towers" (an image-text embedding model, `models.frozen_text_towers` or
`models.two_towers`, trained by `training.contrastive_trainer`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import ml_collections

from imagen_jax.config_utils import ConfigError
from imagen_jax.models import (
    frozen_text_towers,
    git,
    imagen_unet,
    latent_mmdit,
    latent_unet,
    sd3_transformer,
    sd_unet,
    vae,
)
from imagen_jax.models import two_towers as two_towers_lib
from imagen_jax.pipelines import diffusers_format
from imagen_jax.text import clip as clip_text
from imagen_jax.weights import CheckpointError

FAMILIES = ("imagen", "sd_unet", "mmdit", "pipeline", "vae", "git", "two_towers")
LATENT_FAMILIES = ("sd_unet", "mmdit", "pipeline")  # diffusion on a frozen VAE's latents
# The public pipeline families that `model.family = "pipeline"` trains further (DeepFloyd IF:
# stage I, in pixel space).
PIPELINE_FAMILIES = (
    "stable_diffusion",
    "stable_diffusion_xl",
    "stable_diffusion_3",
    "deepfloyd_if",
)
PIXEL_PIPELINES = ("deepfloyd_if",)
# The layers low-rank adapters train by default: the attention projections (for a pipeline,
# diffusers' train_text_to_image_lora's layers).
LORA_TARGETS = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
IMAGEN_LORA_TARGETS = r"(self|cross)_attn\.(q|kv|out)$"
# DeepFloyd IF's attention (added key / value projections of the text too), as diffusers'
# train_dreambooth_lora.py adapts it.
# SD 3: the joint attention's image and text projections (train_dreambooth_lora_sd3.py's).
SD3_LORA_TARGETS = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
IF_LORA_TARGETS = r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)$"
_MODEL_KEYS = ("family", "variant", "resolution", "low_resolution", "dtype", "param_dtype", "lora")
_UNET_FIELDS = tuple(f.name for f in dataclasses.fields(imagen_unet.UNetConfig))
_VAE_FIELDS = tuple(f.name for f in dataclasses.fields(vae.VAEConfig))
_GIT_FIELDS = tuple(f.name for f in dataclasses.fields(git.GitConfig))


def lora_config(targets: str) -> ml_collections.ConfigDict:
    """`model.lora`: low-rank adapters (`models.lora`) on the layers whose name (the
    parameter path without its leaf, dot-joined; diffusers' names for a pipeline) matches
    `targets`, the network's own weights frozen; rank 0 trains every weight."""
    return ml_collections.ConfigDict(
        dict(
            rank=0,  # 0: every weight trains; r > 0: adapters of rank r, the network frozen
            alpha=0.0,  # the adapters' scale is alpha / rank; 0 = rank (scale 1)
            targets=targets,  # a regex searched in each layer's name
        )
    )


def _with_lora(cfg: ml_collections.ConfigDict, lora) -> ml_collections.ConfigDict:
    """`cfg` with its `lora` group's keys replaced by those of the dict `lora`."""
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(cfg.lora))
    if unknown:
        raise KeyError(f"unknown model.lora config keys {unknown}; allowed: {sorted(cfg.lora)}")
    cfg.lora.update(lora)
    return cfg


def _group(defaults: dict, overrides: dict, name: str, extra=()) -> ml_collections.ConfigDict:
    unknown = sorted(set(overrides) - set(defaults) - set(extra))
    if unknown:
        allowed = sorted(set(defaults) | set(extra))
        raise KeyError(f"unknown {name} config keys {unknown}; allowed: {allowed}")
    cfg = ml_collections.ConfigDict(defaults)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def model_config(**overrides) -> ml_collections.ConfigDict:
    """The stage's network: a variant of the `family`'s network, its resolutions and dtypes.

    family "imagen" (default): any other key is an `imagen_unet.UNetConfig` field overriding
    the variant (e.g. `text_dim=4096`, `channels=32`); `unet_config` builds the UNetConfig.
    family "sd_unet": `latent_unet_model_config`; "mmdit": `latent_mmdit_model_config`;
    family "vae": `vae_model_config`.
    """
    family = overrides.get("family", "imagen")
    if family == "sd_unet":
        return latent_unet_model_config(**overrides)
    if family == "mmdit":
        return latent_mmdit_model_config(**overrides)
    if family == "pipeline":
        return pipeline_model_config(**overrides)
    if family == "vae":
        return vae_model_config(**overrides)
    if family == "git":
        return git_model_config(**overrides)
    if family == "two_towers":
        return two_towers_model_config(**overrides)
    if family != "imagen":
        raise ValueError(f"model.family={family!r}; expected one of {FAMILIES}")
    defaults = dict(
        family="imagen",  # imagen | sd_unet | mmdit | vae
        variant="runlocal",  # imagen_unet.VARIANTS: runlocal | shapes_base | shapes_sr |
        #                      imagen_base_2b | imagen_sr256_600m | imagen_sr1024_400m
        resolution=64,  # the side of the images the stage generates
        low_resolution=0,  # super-resolution stages: the side of their input; 0 = base stage
        dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay param_dtype)
        param_dtype="float32",
        # Low-rank adapters on the frozen weights of `train.init_from` (rank 0: off).
        lora=lora_config(IMAGEN_LORA_TARGETS),
    )
    lora = overrides.pop("lora", None)
    return _with_lora(_group(defaults, overrides, "model", extra=_UNET_FIELDS), lora)


def latent_unet_model_config(**overrides) -> ml_collections.ConfigDict:
    """A latent diffusion stage's network (family "sd_unet"): a `latent_unet.VARIANTS` entry.

    `resolution` is the side of the images (the UNet runs on the VAE's latents of them);
    any other key is an `sd_unet.SDUNetConfig` field (e.g. `cross_attention_dim=384`, the
    text encoder's width) or `null_text_len`, overriding the variant.
    """
    defaults = dict(
        family="sd_unet",
        variant="runlocal",  # latent_unet.VARIANTS: runlocal | shapes_latent
        resolution=64,  # the side of the images; latents are resolution / f of the VAE
        low_resolution=0,  # must be 0: latent super-resolution stages are not implemented
        dtype="float32",
        param_dtype="float32",
    )
    return _group(defaults, overrides, "model", extra=latent_unet.VARIANT_FIELDS)


def latent_mmdit_model_config(**overrides) -> ml_collections.ConfigDict:
    """A latent diffusion stage's MMDiT (family "mmdit"): a `latent_mmdit.VARIANTS` entry.

    `resolution` is the side of the images (the MMDiT runs on the VAE's latents of them);
    any other key is an `sd3_transformer.SD3TransformerConfig` field (e.g.
    `joint_attention_dim=384`, the text encoder's width) or `null_text_len`.
    """
    defaults = dict(
        family="mmdit",
        variant="runlocal",  # latent_mmdit.VARIANTS: runlocal | shapes_mmdit
        resolution=64,  # the side of the images; latents are resolution / f of the VAE
        low_resolution=0,  # must be 0: latent super-resolution stages are not implemented
        dtype="float32",
        param_dtype="float32",
    )
    return _group(defaults, overrides, "model", extra=latent_mmdit.VARIANT_FIELDS)


def pipeline_model_config(**overrides) -> ml_collections.ConfigDict:
    """The UNet of a public pipeline directory in diffusers layout, trained further (family
    "pipeline"): its architecture is the directory's unet/config.json and its first weights
    the directory's; `expect` is the pipeline family the config is written for (the
    directory's model_index.json must say the same). `lora.rank > 0` trains low-rank
    adapters on the layers whose diffusers name matches `lora.targets` (`models.lora`), the
    UNet frozen; rank 0 trains every weight."""
    defaults = dict(
        family="pipeline",
        pipeline="",  # the pipeline directory (model_index.json, unet/, vae/, text_encoder/)
        expect="stable_diffusion",  # its family: stable_diffusion (SD 1.x / 2.x) |
        #             stable_diffusion_xl (the base) | stable_diffusion_3 | deepfloyd_if
        resolution=512,  # the side of the training images
        low_resolution=0,  # IF stage II: the input's side (64); else 0
        text_len=77,  # tokens of the text encoder's output (SD 3: 77 CLIP + the T5's)
        dtype="float32",
        param_dtype="float32",
        lora=lora_config(LORA_TARGETS),  # rank 0: full fine-tuning
    )
    lora = overrides.pop("lora", None)
    return _with_lora(_group(defaults, overrides, "model"), lora)


def is_latent_stage(model: ml_collections.ConfigDict) -> bool:
    """Whether the stage denoises a frozen VAE's latents (the latent families, and a
    pipeline of a latent family) rather than pixels."""
    family = model.get("family", "imagen")
    if family == "pipeline":
        return model.expect not in PIXEL_PIPELINES
    return family in LATENT_FAMILIES


def pipeline_network_config(model: ml_collections.ConfigDict):
    """The UNet config (`latent_unet.PipelineUNetConfig`; SD 3: the transformer's,
    `latent_mmdit.PipelineMMDiTConfig`) of `model.pipeline` (family "pipeline"), after
    checking that the directory is a pipeline of the family `model.expect` names."""
    if model.expect not in PIPELINE_FAMILIES:
        raise ValueError(
            f"model.expect={model.expect!r}: training public pipelines further is implemented "
            f"for {PIPELINE_FAMILIES}"
        )
    if not model.pipeline:
        raise FileNotFoundError("model.pipeline is empty: give a diffusers pipeline directory")
    index = diffusers_format.read_model_index(model.pipeline)
    family = diffusers_format.family_of(index, model.pipeline).name
    if family != model.expect:
        raise CheckpointError(
            f"model.pipeline={model.pipeline!r} is a {index.get('_class_name')} "
            f"({family}), but the config is for model.expect={model.expect!r}"
        )
    diffusers_format.check_components(model.pipeline, index, diffusers_format.FAMILIES[family])
    stage_2 = index.get("_class_name") == "IFSuperResolutionPipeline"
    if family == "deepfloyd_if" and stage_2 != bool(model.low_resolution):
        raise CheckpointError(
            f"model.pipeline={model.pipeline!r} is a {index.get('_class_name')} (IF stage "
            f"{'II' if stage_2 else 'I'}), but model.low_resolution={model.low_resolution} "
            f"{'' if model.low_resolution else 'does not '}makes it a super-resolution stage: "
            "use configs/if_sr_finetune.py for stage II, configs/if_finetune.py for stage I"
        )
    if stage_2:
        _check_if_noising(model.pipeline)
    if family == "stable_diffusion_3":
        folder = f"{model.pipeline}/transformer"
        hf = diffusers_format.read_json(f"{folder}/config.json", folder)
        try:
            transformer = sd3_transformer.SD3TransformerConfig.from_hf(hf)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder}/config.json: {e}") from e
        return latent_mmdit.PipelineMMDiTConfig(transformer, text_len=int(model.text_len))
    folder = f"{model.pipeline}/unet"
    hf = diffusers_format.read_json(f"{folder}/config.json", folder)
    try:
        unet = sd_unet.SDUNetConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    cfg = latent_unet.PipelineUNetConfig(
        unet, text_len=int(model.text_len), resolution=int(model.resolution), low_res=stage_2
    )
    if stage_2 and (unet.class_embed_type != "timestep" or unet.in_channels != 6):
        raise CheckpointError(
            f"{folder}/config.json: class_embed_type={unet.class_embed_type!r}, "
            f"in_channels={unet.in_channels}; IF stage II's UNet takes 'timestep' and 6"
        )
    settings = diffusers_format.read_json(f"{model.pipeline}/model_index.json", model.pipeline)
    if family == "stable_diffusion_xl" and (
        settings.get("requires_aesthetics_score") or cfg.pooled_dim <= 0
    ):
        raise CheckpointError(
            f"model.pipeline={model.pipeline!r}: its UNet takes no pooled text with 6 size / "
            "crop ids (the SDXL refiner's aesthetic-score ids?); the SDXL base is trained here"
        )
    return cfg


def vae_model_config(**overrides) -> ml_collections.ConfigDict:
    """An autoencoder to train (family "vae"): a `vae.VARIANTS` entry; any other key is a
    `vae.VAEConfig` field (e.g. `latent_channels=4`, `block_out_channels=(32, 64, 128)`)."""
    defaults = dict(
        family="vae",
        variant="runlocal",  # vae.VARIANTS: runlocal | shapes | sd
        resolution=64,  # the side of the training images
        dtype="float32",
        param_dtype="float32",
    )
    return _group(defaults, overrides, "model", extra=_VAE_FIELDS)


def git_model_config(**overrides) -> ml_collections.ConfigDict:
    """A captioner to train (family "git"): a `git.VARIANTS` entry at `resolution` (the
    image tower's image_size); any other key is a `git.GitConfig` field (`vision`: a dict of
    `vit.CLIPVisionConfig` fields), overriding the variant. `image_mean` / `image_std`
    normalise the uint8 images as the exported preprocessor_config.json says."""
    defaults = dict(
        family="git",
        variant="runlocal",  # git.VARIANTS: runlocal | runlocal_conv | shapes | shapes_conv
        resolution=64,  # the side of the training images (vision.image_size)
        image_mean=(0.5, 0.5, 0.5),  # pixels: (x / 255 - mean) / std
        image_std=(0.5, 0.5, 0.5),
        dtype="float32",
        param_dtype="float32",
    )
    return _group(defaults, overrides, "model", extra=_GIT_FIELDS)


_TOWERS_FIELDS = tuple(
    f.name for f in dataclasses.fields(frozen_text_towers.FrozenTextTowersConfig)
)


def two_towers_model_config(**overrides) -> ml_collections.ConfigDict:
    """An image-text embedding model to train (family "two_towers",
    `training/contrastive_trainer.py`): a `frozen_text_towers.VARIANTS` entry whose image
    tower sees `resolution` px. text_side "frozen": the `text` group's frozen encoder (its
    token embeddings) and a trained projection (`models.frozen_text_towers`); "tower": a
    CLIP / SigLIP text tower trained from scratch on the MiniLM WordPiece ids
    (`models.two_towers`; `text_tower` overrides its `clip.CLIPTextConfig` fields). Any other
    key is a `FrozenTextTowersConfig` field (`vision`: a dict of CLIPVisionConfig fields);
    `logit_bias` (SigLIP) must match `contrastive.loss` (sigmoid)."""
    defaults = dict(
        family="two_towers",
        variant="runlocal",  # frozen_text_towers.VARIANTS: runlocal | shapes
        text_side="frozen",  # frozen (text group's encoder + projection) | tower (trained)
        text_tower=ml_collections.ConfigDict(),  # text_side=tower: CLIPTextConfig overrides
        resolution=64,  # the side of the training images (vision.image_size)
        image_mean=(0.5, 0.5, 0.5),  # pixels: (x / 255 - mean) / std
        image_std=(0.5, 0.5, 0.5),
        dtype="float32",
        param_dtype="float32",
    )
    return _group(defaults, overrides, "model", extra=_TOWERS_FIELDS)


def contrastive_config(**overrides) -> ml_collections.ConfigDict:
    """The contrastive objective (`training/contrastive_step.py`)."""
    defaults = dict(
        loss="sigmoid",  # sigmoid (SigLIP; needs model.logit_bias) | softmax (CLIP)
        frozen_tower="",  # LiT: "" (train both) | image | text: that tower frozen (its
        #                  projection trains)
        hard_negatives=False,  # the batch's counterfactual captions (data.counterfactuals)
        #                        as extra negative texts (text_side=frozen only)
        max_length=24,  # text_side=tower: WordPiece tokens with [CLS] and [SEP]
    )
    return _group(defaults, overrides, "contrastive")


def two_towers_config(model: ml_collections.ConfigDict):
    """`models.frozen_text_towers.FrozenTextTowersConfig` (text_side "frozen") or
    `models.two_towers.TowersConfig` ("tower") of a two_towers model group."""
    overrides = _overrides(model)
    side = overrides.pop("text_side", "frozen")
    text_tower = overrides.pop("text_tower", None) or {}
    vision = {**dict(overrides.pop("vision", None) or {}), "image_size": model.resolution}
    cfg = frozen_text_towers.make_config(model.variant, vision=vision, **overrides)
    if side == "frozen":
        return cfg
    if side != "tower":
        raise ValueError(f"model.text_side={side!r}; expected frozen | tower")
    if cfg.image_tower != "vit":
        raise ValueError(
            f"model.text_side='tower' builds a CLIP / SigLIP model, whose image tower is a "
            f"ViT; model.variant={model.variant!r} has a {cfg.image_tower!r} image tower"
        )
    family = "siglip" if cfg.logit_bias else "clip"
    p = cfg.projection_dim
    vision = dataclasses.replace(
        cfg.vision, family=family, projection_dim=p if family == "clip" else None
    )
    text = dict(
        vocab_size=30522,  # the MiniLM WordPiece vocabulary (the project's tokenizer)
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        max_position_embeddings=64,
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
        eos_token_id=102,  # [SEP]: CLIP pools the first one
        projection_dim=p if family == "clip" else vision.hidden_size,
        family=family,
    )
    text = clip_text.CLIPTextConfig(**{**text, **dict(text_tower)}).checked()
    two_towers_lib.check_towers(family, text, vision)
    return two_towers_lib.TowersConfig(text=text, vision=vision, family=family)


def caption_loss_config(**overrides) -> ml_collections.ConfigDict:
    """The captioner's objective (`training/caption_step.py`)."""
    defaults = dict(
        max_length=32,  # caption tokens with [CLS] and [SEP]; longer captions are cut
        vocab="shapes",  # the softmax's tokens: shapes (the shapes grammar's) | "" (all)
        label_smoothing=0.0,  # of the next-token targets; 0 = plain cross-entropy
        sample_max_length=32,  # greedy captions of the periodic samples, [CLS] included
        cell_weight=0.0,  # > 0: plus this times the conv tower's per-cell classification
        #                   loss against the data's "cell_labels" (caption_step.cell_loss)
    )
    return _group(defaults, overrides, "caption_loss")


_GIT_MODEL_KEYS = ("image_mean", "image_std")  # also two_towers models


def _overrides(model: ml_collections.ConfigDict) -> dict:
    overrides = {k: v for k, v in model.items() if k not in _MODEL_KEYS + _GIT_MODEL_KEYS}
    for key, value in overrides.items():
        if isinstance(value, list):
            overrides[key] = tuple(value)
        elif isinstance(value, ml_collections.ConfigDict):
            overrides[key] = value.to_dict()
    return overrides


def unet_config(model: ml_collections.ConfigDict) -> imagen_unet.UNetConfig:
    return imagen_unet.make_config(model.variant, **_overrides(model))


def network_config(model: ml_collections.ConfigDict):
    """The dataclass config of `model`'s network: imagen_unet.UNetConfig,
    latent_unet.LatentUNetConfig, latent_mmdit.LatentMMDiTConfig or vae.VAEConfig, by
    `model.family`."""
    family = model.get("family", "imagen")
    if family == "sd_unet":
        return latent_unet.make_config(model.variant, **_overrides(model))
    if family == "mmdit":
        return latent_mmdit.make_config(model.variant, **_overrides(model))
    if family == "pipeline":
        return pipeline_network_config(model)
    if family == "vae":
        return vae.make_config(model.variant, **_overrides(model))
    if family == "git":
        return git.make_config(model.variant, image_size=model.resolution, **_overrides(model))
    if family == "two_towers":
        return two_towers_config(model)
    if family != "imagen":
        raise ValueError(f"model.family={family!r}; expected one of {FAMILIES}")
    return unet_config(model)


def latent_config(**overrides) -> ml_collections.ConfigDict:
    """The frozen VAE of a latent diffusion stage (`training/latent_space.py`)."""
    defaults = dict(
        vae="",  # a diffusers AutoencoderKL directory (a pipeline's vae/ folder; the VAE
        #          trainer writes WORKDIR/vae), or "random": an untrained tiny VAE (runlocal)
        sample_posterior=True,  # latents drawn from q(z | x) (as diffusers' scripts); False: mode
    )
    return _group(defaults, overrides, "latent")


def vae_loss_config(**overrides) -> ml_collections.ConfigDict:
    """The autoencoder's loss (`training/vae_step.py`): reconstruction + KL only."""
    defaults = dict(
        reconstruction="l1",  # l1 | l2, per pixel value
        kl_weight=1e-6,  # on the KL summed over the latent, per pixel value (as LDM's 1e-6)
        sample_posterior=True,  # decode a sample of q(z | x); False: its mode
        latent_noise=0.0,  # > 0: decode z + u s std(z) n, u ~ U(0, 1) (vae_step.py)
    )
    return _group(defaults, overrides, "vae_loss")


def _check_if_noising(path: str) -> None:
    """The trainer noises IF stage II's input with the stage's own schedule: the pipeline's
    image_noising_scheduler must have the same (DDPM squaredcos_cap_v2, 1000 steps, as IF's
    have)."""
    main, _ = diffusers_format.scheduler_settings(f"{path}/scheduler")
    noising, _ = diffusers_format.scheduler_settings(f"{path}/image_noising_scheduler")
    keys = ("schedule", "num_train_timesteps", "beta_start", "beta_end")
    if any(main.get(k) != noising.get(k) for k in keys):
        raise CheckpointError(
            f"{path}/image_noising_scheduler: {[noising.get(k) for k in keys]} differs from "
            f"{path}/scheduler's {[main.get(k) for k in keys]} ({', '.join(keys)}); the trainer "
            "noises the input with the stage's own schedule"
        )


def data_config(**overrides) -> ml_collections.ConfigDict:
    """The input pipeline (`imagen_jax.data.make_pipeline`) and its source."""
    defaults = dict(
        source="synthetic",  # synthetic (in memory) | folder | tar | shapes
        path="",  # folder: the root; tar: a glob of shards
        split="train",  # shapes
        counterfactuals="",  # shapes: records also carry a caption of what the scene is
        #                      not, of these kinds ("relation", "colors", or both:
        #                      "relation,colors"); "" = none
        counterfactuals_mixed=False,  # shapes: each scene's kind picked among those that
        #                               apply, not the first (`tasks.counterfactual`)
        cell_labels=0,  # shapes: > 0, records carry "cell_labels" [n, n], the shape of each
        #                 cell of an n x n grid (a captioner's caption_loss.cell_weight)
        wordings="grammar",  # shapes: the captions' wording set (`shapes.wordings`):
        #                      grammar (the first models') | train (many more templates)
        task_weights="",  # shapes: the training mixture, e.g. "position:3,color_attr:2"
        #                   (tasks not named weigh 1); "" = the six tasks equally
        size=256,  # synthetic, shapes: number of examples
        resolution=64,  # must equal model.resolution
        low_resolution=0,  # super-resolution stages; must equal model.low_resolution
        low_res_method="bicubic",  # bicubic | box
        batch_size=64,  # global: over all processes
        seed=0,
        shuffle=True,
        random_crop=False,
        buckets="",  # aspect-ratio buckets "HxW,HxW,...": every image cropped to the one
        #              nearest its aspect ratio, every batch of one bucket (data/buckets.py);
        #              "auto" (or "auto:STEP") = SDXL-style buckets of resolution^2 pixels,
        #              sides multiples of 64 (STEP), those a batch cannot fill passed over;
        #              "" = resolution x resolution squares
        size_crop=False,  # batches carry "size_crop" [B, 6]: each image's original size,
        #                   crop corner and target size (SDXL's micro-conditioning)
        worker_count=-1,  # grain worker processes; 0 = threads in this process; -1 = by the
        #                   host's cores (none up to 4, then half the cores past 4, at most 8:
        #                   data.pipeline.auto_worker_count)
        # DreamBooth's prior preservation (Ruiz et al. 2023): this fraction of every batch
        # from a second source (`prior_source`: folder | tar | shapes | synthetic, at
        # `prior_path`), its loss weighted `prior_weight` (diffusers' --prior_loss_weight);
        # 0 = off
        prior_fraction=0.0,
        prior_source="folder",
        prior_path="",
        prior_weight=1.0,
    )
    return _group(defaults, overrides, "data")


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """The optimizer and its learning-rate schedule (`training/optim.py`)."""
    defaults = dict(
        optimizer="adamw",  # adamw | adafactor
        lr=1e-4,  # peak learning rate
        warmup_steps=1000,  # linear warm-up from 0
        decay="cosine",  # cosine | linear | constant (after the warm-up)
        end_lr_factor=0.0,  # final lr = lr * end_lr_factor (cosine, linear, cool-down)
        cooldown_steps=0,  # constant only: linear decay over the last N of train.steps
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip_norm=1.0,  # global-norm clipping; 0 = off
        accum_steps=1,  # gradient accumulation: micro-batches per step (a scan in the step)
    )
    return _group(defaults, overrides, "optim")


def train_config(**overrides) -> ml_collections.ConfigDict:
    """The loop: length, checkpoints, logging, samples, CFG dropout, EMA, augmentation."""
    defaults = dict(
        steps=100_000,
        seed=0,
        log_every=100,
        checkpoint_every=1000,
        keep_checkpoints=3,
        # A stage directory (imagen_jax.training.export) whose weights start a new run
        # (params and EMA; a fresh optimizer at step 0); ignored once the workdir holds a
        # checkpoint. "" = a random initialisation.
        init_from="",
        sample_every=5000,  # 0 = never; a PNG grid from the EMA weights
        num_samples=4,
        # Base stages: the prompts of the sample grid ("" is the unconditional image); SR
        # stages take the first batch's captions.
        sample_prompts=("",),
        cond_drop_prob=0.1,  # CFG dropout: the fraction of examples given the null text
        ema_decay=0.9999,
        ema_warmup_power=2.0 / 3.0,  # decay min(ema_decay, 1 - (1 + step)^-power); 0 = off
        noise_aug=ml_collections.ConfigDict(
            dict(
                max_level=0.5,  # SR stages: aug_t ~ U(0, max_level) per example
                sample_level=0.1,  # SR stages: the level used for the sample grid
            )
        ),
        loss=ml_collections.ConfigDict(  # keyword arguments of diffusion.diffusion_loss
            dict(
                time_sampling="uniform",  # uniform | stratified | logit_normal | mode
                logit_mean=0.0,
                logit_std=1.0,
                mode_scale=1.29,  # time_sampling=mode: SD 3's heavy-tail mode sampling
                weighting="uniform",  # uniform | min_snr | edm | sigma_sqrt | cosmap (flow)
                min_snr_gamma=5.0,
                sigma_data=0.5,
                loss_type="l2",  # l2 | l1 | huber
                huber_c=0.001,
                # diffusion.variance=learned_range: the weight of the variational-bound term
                # that trains the variance (1.0: Nichol & Dhariwal's L_hybrid at T = 1000)
                vlb_weight=0.0,
                # the loss on the x0 the prediction implies (flow: SD 3 scripts'
                # precondition_outputs); diffusion.losses.diffusion_loss
                x0_loss=False,
            )
        ),
        # Named auxiliary loss terms (`training/aux_losses.py`): NAME -> a group with `fn`
        # ("package.module:factory"), `weight` (0 = off) and the factory's arguments.
        aux_losses=ml_collections.ConfigDict(),
        sharding_rules=((".*", "fsdp"),),  # (regex, spec | "fsdp"); see parallel.py
        fsdp_min_size=2**18,  # parameters smaller than this stay replicated under "fsdp"
        progress=True,  # a tqdm bar on process 0's console
        # Resuming checks the checkpoint's recipe against this config (training/checkpoint.py):
        # the comma-separated keys (or groups) here may differ, e.g. "data.path,optim.lr".
        allow_changes="",
    )
    return _group(defaults, overrides, "train")


def evals_config(**overrides) -> ml_collections.ConfigDict:
    """Periodic evaluation of a base stage (`training/periodic_eval.py`): every `every` steps
    (0 = never) sample the prompts from the EMA weights through the sampling pipeline and
    run the evaluators of `metrics` (`imagen_jax.evaluation.evaluators`)."""
    defaults = dict(
        every=0,
        metrics=(),  # compositional | fid | clip_score
        # A prompt file (.txt or .jsonl), or "shapes:heldout" / "shapes:train": the shapes
        # evaluation prompts (the first `prompts_per_task` of each task).
        prompts="",
        prompts_per_task=4,
        images_per_prompt=1,
        batch_size=0,  # images per sampling batch; 0 = data.batch_size
        seed=0,  # the images' noise: (seed, prompt, image) only, as in sample.py
        fid=ml_collections.ConfigDict(
            dict(
                inception="",  # pt_inception-2015-12-05 .pth or its safetensors conversion
                reference="",  # .npz with mu, sigma (pytorch-fid / clean-fid layout)
                kid_reference="",  # .npz of reference features: adds KID
                resize="pytorch_fid",  # pytorch_fid (bilinear) | clean_fid (bicubic)
                batch_size=50,
            )
        ),
        clip=ml_collections.ConfigDict(dict(path="")),  # a Hugging Face CLIPModel directory
    )
    return _group(defaults, overrides, "evals")


def embedding_evals_config(**overrides) -> ml_collections.ConfigDict:
    """Periodic evaluation of an embedding model (family "two_towers",
    `training/contrastive_trainer.py`): every `every` steps (0 = never) the evaluators of
    `metrics` (`imagen_jax.evaluation.retrieval`) on the EMA weights."""
    defaults = dict(
        every=0,
        metrics=("zero_shot", "retrieval", "hard_negatives"),
        splits=("heldout", "train"),  # the shapes scenes' splits
        size=120,  # scenes per split (hard_negatives: per task of its three)
        seed=0,  # the scenes: the same at every evaluation
        wordings="grammar",  # the captions' wording set (shapes.wordings)
        batch_size=64,  # images or texts per compiled call
    )
    return _group(defaults, overrides, "evals")


def default_mesh() -> list[tuple[str, int]]:
    return [("data", -1)]  # add ("fsdp", n) to shard parameters and optimizer state


# (key, lowest, highest, kind) of the numbers `check_config` checks; a bound of None is open,
# a tuple (bound,) excludes the bound. kind "int": a whole number; "real": a finite number.
_NUMBER_RULES = (
    ("train.steps", 1, None, "int"),
    ("train.log_every", 1, None, "int"),
    ("train.checkpoint_every", 1, None, "int"),
    ("train.keep_checkpoints", 1, None, "int"),
    ("train.sample_every", 0, None, "int"),
    ("train.num_samples", 1, None, "int"),
    ("train.fsdp_min_size", 0, None, "int"),
    ("train.cond_drop_prob", 0, 1, "real"),
    ("train.ema_decay", 0, 1, "real"),
    ("train.ema_warmup_power", 0, None, "real"),
    ("train.noise_aug.max_level", 0, 1, "real"),
    ("train.noise_aug.sample_level", 0, 1, "real"),
    ("vae_loss.kl_weight", 0, None, "real"),
    ("vae_loss.latent_noise", 0, None, "real"),
    ("optim.lr", (0,), None, "real"),
    ("optim.warmup_steps", 0, None, "int"),
    ("optim.end_lr_factor", 0, None, "real"),
    ("optim.cooldown_steps", 0, None, "int"),
    ("optim.b1", 0, (1,), "real"),
    ("optim.b2", 0, (1,), "real"),
    ("optim.eps", 0, None, "real"),
    ("optim.weight_decay", 0, None, "real"),
    ("optim.grad_clip_norm", 0, None, "real"),
    ("optim.accum_steps", 1, None, "int"),
    ("data.batch_size", 1, None, "int"),
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError, one line naming the key and its value, on the first number of the
    `train`, `optim`, `data` and `vae_loss` groups that cannot work: a run of `train.steps <=
    0` (which would end at once, successfully, having trained nothing), a batch of no images, a
    learning rate that is not positive and finite, a probability outside [0, 1], ...
    Keys a config does not have are skipped."""
    for key, low, high, kind in _NUMBER_RULES:
        group, *path = key.split(".")
        value = config.get(group)
        for part in path:
            value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
        if value is not None:
            problem = _number_problem(value, low, high, kind)
            if problem:
                raise ConfigError(f"invalid config value {key}={value!r}: {problem}")


def _number_problem(value, low, high, kind: str) -> str | None:
    """Why `value` is not a number of `kind` in the range [low, high] (None if it is)."""
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return "must be a whole number"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return "must be a number"
    if not math.isfinite(value):
        return "must be finite"
    if low is not None:
        bound, strict = (low[0], True) if isinstance(low, tuple) else (low, False)
        if value < bound or (strict and value == bound):
            return f"must be {'>' if strict else '>='} {bound}"
    if high is not None:
        bound, strict = (high[0], True) if isinstance(high, tuple) else (high, False)
        if value > bound or (strict and value == bound):
            return f"must be {'<' if strict else '<='} {bound}"
    return None
