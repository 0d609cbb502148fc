"""Training public Stable Diffusion pipelines further (configs/sd_finetune.py,
`model.family = "pipeline"`), on tiny random pipelines of diffusers' real classes saved with
`save_pretrained`:

- the loss of one batch, noise and timesteps equals the formula of diffusers'
  train_text_to_image.py (eps with uniform weighting, v with Min-SNR-5) on the same weights
  within 1e-5, and its gradient equals torch autograd's within 1e-4 (relative, per tensor);
- the encoding of "" that a dropped caption gets equals the CLIP text model's;
- a full fine-tune exported as a pipeline copy samples in diffusers as it samples here, and
  an adapter run's LoRA file loaded by diffusers' `load_lora_weights` gives the images our
  merged UNet gives (both moved away from the base pipeline's images);
- adapters alone are trained and checkpointed; 8 devices (the batch over 8, the weights
  over 2: FSDP) equal one device; a resumed adapter run equals the uninterrupted one bitwise;
- bad input: another family's pipeline, a LoRA pattern that matches no layer, a resolution
  the UNet cannot take, an export into a non-empty directory.
"""

import json
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_same_tree, stage_config
from diffusers import training_utils
from flax.nnx import traversals
from tiny_diffusers import (
    sd2_pipeline,
    sd3_pipeline,
    sd_ddim,
    sd_pipeline,
    sdxl_pipeline,
    stage_1_pipeline,
    stage_2_pipeline,
    t5_tokenizer,
    tiny_t5,
)

from imagen_jax import training
from imagen_jax.demo.loading import find_model_dirs
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.models import lora as lora_lib
from imagen_jax.models import sd3_transformer, sd_unet
from imagen_jax.pipelines import deepfloyd, sd3
from imagen_jax.pipelines.public import load_latent_pipeline, public_job
from imagen_jax.text.config import encode_captions, make_text_encoder, text_width
from imagen_jax.training import export, pipeline_start, trainer
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib
from imagen_jax.training.input import make_input
from imagen_jax.training.text_cache import build_text_cache
from imagen_jax.weights import CheckpointError

PROMPTS = ["a red circle above a blue square", "two green stars"]
IMAGE_TOL = 1e-3  # float32 images in [0, 1], as tests/pipelines/test_latent_pipelines.py


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """{"sd": an SD 1.x pipeline (eps), "sd2": an SD 2.x one (v), both DDIM (a deterministic
    sampler; the trainer reads only the schedule and the prediction, and diffusers' scripts
    read the folder as a DDPMScheduler), "xl": the SDXL base, "sd3": SD 3 (with a T5),
    "if": IF stage I, "if2": IF stage II with its own T5} directories."""
    root = tmp_path_factory.mktemp("pipelines")
    sd_pipeline(root / "sd", sd_ddim())
    sd2_pipeline(root / "sd2")
    sdxl_pipeline(root / "xl")
    sd3_pipeline(root / "sd3")
    stage_1_pipeline(root / "if")
    tokenizer = t5_tokenizer()
    stage_2_pipeline(root / "if2", text_encoder=tiny_t5(7, len(tokenizer)), tokenizer=tokenizer)
    return {name: root / name for name in ("sd", "sd2", "xl", "sd3", "if", "if2")}


def _config(pipe, arg="", *, family="sd_finetune", **train):
    config = stage_config(family, f"runlocal,pipeline={pipe},{arg}", sample_every=0)
    for key, value in train.items():
        config.train[key] = value
    return config


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ----------------------------------------------------------------------------------------------
# The objective against diffusers' training script


@pytest.mark.parametrize("kind, snr_gamma", [("sd", 0.0), ("sd2", 5.0)])
def test_loss_and_gradient_match_diffusers_train_text_to_image(pipes, kind, snr_gamma):
    path = pipes[kind]
    config = _config(path, f"snr_gamma={snr_gamma},empty_prob=0")
    net = state_lib.make_network(config.model)
    encoder = make_text_encoder(config.text)
    text = encode_captions(encoder, PROMPTS)
    b = len(PROMPTS)
    latents = np.random.default_rng(0).normal(size=(b, 16, 16, 4)).astype(np.float32)
    batch = {"latents": latents, "text": text["text"], "text_mask": text["text_mask"]}
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(path)))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    loss_fn = step_lib.make_loss_fn(config, net, schedule, [])
    key = jax.random.key(7)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest, batch, key)

    # The draws of the step (`step.make_loss_fn`, `diffusion.diffusion_loss`), in numpy.
    _, key_loss, _ = jax.random.split(key, 3)
    key_t, key_eps = jax.random.split(key_loss)
    timesteps = np.asarray(jax.random.randint(key_t, (b,), 0, 1000))
    noise = np.asarray(jax.random.normal(key_eps, latents.shape))

    # diffusers/examples/text_to_image/train_text_to_image.py, its loss as written there.
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    lat, eps, t = nchw(latents), nchw(noise), torch.from_numpy(timesteps).long()
    noisy = scheduler.add_noise(lat, eps, t)
    if scheduler.config.prediction_type == "epsilon":
        target = eps
    else:
        target = scheduler.get_velocity(lat, eps, t)
    hidden = torch.from_numpy(np.asarray(text["text"]))
    pred = unet(noisy, t, hidden, return_dict=False)[0]
    if not snr_gamma:
        ref = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        weights = weights / (snr if scheduler.config.prediction_type == "epsilon" else snr + 1)
        ref = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        ref = (ref.mean(dim=list(range(1, len(ref.shape)))) * weights).mean()
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))

    ref.backward()
    worst = _gradient_error(grads, unet, net.cfg.unet)
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


def test_if_loss_and_gradient_match_diffusers_train_dreambooth(pipes):
    """DeepFloyd IF stage I in pixel space: with vlb_weight 0 the loss is diffusers'
    train_dreambooth.py's for IF (the eps half of the 6 output channels, MSE to the noise);
    the configs' vlb_weight 1 adds the variational-bound term, which trains the rest."""
    path = pipes["if"]
    config = _config(path, "empty_prob=0", family="if_finetune")
    assert config.train.loss.vlb_weight == 1.0 and "latent" not in config
    config.train.loss.vlb_weight = 0.0
    net = state_lib.make_network(config.model)
    encoder = make_text_encoder(config.text)
    text = encode_captions(encoder, PROMPTS)
    b = len(PROMPTS)
    images = np.random.default_rng(1).integers(0, 256, size=(b, 8, 8, 3), dtype=np.uint8)
    batch = {"image": images, "text": text["text"], "text_mask": text["text_mask"]}
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(path)))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    key = jax.random.key(5)
    loss_fn = step_lib.make_loss_fn(config, net, schedule, [])
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest, batch, key)
    config.train.loss.vlb_weight = 1.0
    with_vlb, aux = step_lib.make_loss_fn(config, net, schedule, [])(params, rest, batch, key)
    assert float(with_vlb) > float(loss) and "vlb" in aux

    _, key_loss, _ = jax.random.split(key, 3)
    key_t, key_eps = jax.random.split(key_loss)
    timesteps = np.asarray(jax.random.randint(key_t, (b,), 0, 1000))
    x0 = images.astype(np.float32) / 127.5 - 1.0
    noise = np.asarray(jax.random.normal(key_eps, x0.shape))
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    t = torch.from_numpy(timesteps).long()
    noisy = scheduler.add_noise(nchw(x0), nchw(noise), t)
    pred = unet(noisy, t, torch.from_numpy(np.asarray(text["text"])), return_dict=False)[0]
    if pred.shape[1] == 6:  # as train_dreambooth.py: the learned variance is dropped
        pred, _ = torch.chunk(pred, 2, dim=1)
    ref = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction="mean")
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))
    ref.backward()
    worst = _gradient_error(grads, unet, net.cfg.unet)
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


def test_if_stage_2_loss_and_gradient_match_the_super_resolution_pipeline_s_formula(pipes):
    """IF stage II: the input upscaled bilinearly (corners aligned) and noised by the
    image-noising scheduler at a level the UNet is told as its class label, concatenated to
    the noised image, as IFSuperResolutionPipeline builds it; the eps half of the output
    against the noise (diffusers' train_dreambooth.py for IF duplicates the noised image in
    place of the input, which is not how the pipeline samples: the pipeline's own
    construction is the reference)."""
    import torch.nn.functional as F

    path = pipes["if2"]
    config = _config(path, "empty_prob=0", family="if_sr_finetune")
    config.train.loss.vlb_weight = 0.0
    net = state_lib.make_network(config.model)
    assert net.low_res and net.upscales_low_res
    text = encode_captions(make_text_encoder(config.text), PROMPTS)
    b = len(PROMPTS)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(b, 16, 16, 3), dtype=np.uint8)
    low = rng.integers(0, 256, size=(b, 8, 8, 3), dtype=np.uint8)
    batch = {"image": images, "low_res": low, "text": text["text"], "text_mask": text["text_mask"]}
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(path)))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    loss_fn = step_lib.make_loss_fn(config, net, schedule, [])
    key = jax.random.key(9)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest, batch, key)

    key_cond, key_loss, _ = jax.random.split(key, 3)
    _, key_level, key_noise = jax.random.split(key_cond, 3)
    aug_t = jax.random.uniform(key_level, (b,), maxval=config.train.noise_aug.max_level)
    level = torch.from_numpy(np.floor(np.asarray(aug_t) * 1000).astype(np.int64))
    aug_noise = np.asarray(jax.random.normal(key_noise, (b, 16, 16, 3)))
    key_t, key_eps = jax.random.split(key_loss)
    timesteps = torch.from_numpy(np.asarray(jax.random.randint(key_t, (b,), 0, 1000))).long()
    x0 = images.astype(np.float32) / 127.5 - 1.0
    noise = np.asarray(jax.random.normal(key_eps, x0.shape))
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    noising = diffusers.DDPMScheduler.from_pretrained(path / "image_noising_scheduler")
    low_float = low.astype(np.float32) / 127.5 - 1.0
    upscaled = F.interpolate(nchw(low_float), (16, 16), mode="bilinear", align_corners=True)
    upscaled = noising.add_noise(upscaled, nchw(aug_noise), level)
    noisy = scheduler.add_noise(nchw(x0), nchw(noise), timesteps)
    hidden = torch.from_numpy(np.asarray(text["text"]))
    model_input = torch.cat([noisy, upscaled], dim=1)
    pred = unet(model_input, timesteps, hidden, class_labels=level, return_dict=False)[0]
    pred, _ = torch.chunk(pred, 2, dim=1)
    ref = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction="mean")
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))
    ref.backward()
    worst = _gradient_error(grads, unet, net.cfg.unet)
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


def _if_unet_inputs(stage: str) -> dict:
    """Fixed inputs of one call of the tiny IF UNets (NHWC): stage I x [2, 8, 8, 3]; stage II
    x [2, 16, 16, 6] (noise and the upscaled input) and its noise levels as class labels."""
    rng = np.random.default_rng(0)
    shape, level = ((2, 8, 8, 3), None) if stage == "I" else ((2, 16, 16, 6), [250, 40])
    x = rng.standard_normal(shape).astype(np.float32)
    text = rng.standard_normal((2, 77, 32)).astype(np.float32)
    return dict(x=x, t=np.array([10, 700]), text=text, level=level and np.array(level))


def _ours_if_unet(stage, inputs) -> np.ndarray:
    """Our loaded IF stage's UNet on `inputs` (`_if_unet_inputs`)."""
    args = (jnp.asarray(inputs["x"]), jnp.asarray(inputs["t"]), jnp.asarray(inputs["text"]))
    if inputs["level"] is None:
        return np.asarray(stage.model(*args))
    return np.asarray(stage.model(*args, class_labels=jnp.asarray(inputs["level"], jnp.float32)))


def _diffusers_if_unet(unet, inputs) -> np.ndarray:
    """diffusers' UNet2DConditionModel on `inputs`, NHWC out."""
    extra = {} if inputs["level"] is None else {"class_labels": torch.from_numpy(inputs["level"])}
    with torch.no_grad():
        out = unet(
            torch.from_numpy(inputs["x"].transpose(0, 3, 1, 2)),
            torch.from_numpy(inputs["t"]),
            torch.from_numpy(inputs["text"]),
            return_dict=False,
            **extra,
        )[0]
    return out.numpy().transpose(0, 2, 3, 1)


def _adapter_export(pipe, family: str, tmp_path):
    """The LoRA file directory of a one-step adapter run (rank 2, alpha 4) of `family`."""
    config = _config(pipe, "lora=2,alpha=4,lr=0.01", family=family, steps=1, checkpoint_every=1)
    training.train_and_evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "lora"
    export.export_pipeline(config, str(tmp_path / "run"), str(out))
    return out


def test_if_stage_2_fine_tune_exports_the_unet_diffusers_loads(pipes, tmp_path):
    config = _config(pipes["if2"], "lr=0.001", family="if_sr_finetune", steps=2, checkpoint_every=2)
    config.train.sample_every = 2  # the grid from the first batch's upscaled, noised inputs
    training.train_and_evaluate(config, str(tmp_path / "run"))
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    out = tmp_path / "export"
    export.export_pipeline(config, str(tmp_path / "run"), str(out))
    pipe = diffusers.IFSuperResolutionPipeline.from_pretrained(out)  # every component loads
    inputs = _if_unet_inputs("II")

    def ours(path):
        return _ours_if_unet(deepfloyd.load_if_stage(path, "II"), inputs)

    got = ours(str(out))
    np.testing.assert_allclose(got, _diffusers_if_unet(pipe.unet, inputs), atol=1e-4)
    assert np.abs(got - ours(str(pipes["if2"]))).max() > 1e-2  # the fine-tune moved the UNet


def test_if_text_width_is_the_t5_s_not_the_cross_attention_s(tmp_path):
    """IF projects its T5 states (encoder_hid_dim) to the cross-attention's width: the
    trainer's encoder check and the empty text use the T5 width."""
    stage_1_pipeline(tmp_path / "if48", text_width=48)
    config = _config(tmp_path / "if48", family="if_finetune")
    net = state_lib.make_network(config.model)
    assert (net.text_dim, net.cfg.unet.cross_attention_dim) == (48, 32)
    assert text_width(trainer.stage_text_encoder(config, net)) == 48


def test_if_fine_tune_exports_the_unet_diffusers_loads(pipes, tmp_path):
    config = _config(pipes["if"], "lr=0.001", family="if_finetune", steps=1, checkpoint_every=1)
    state, _ = training.train_and_evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "export"
    export.export_pipeline(config, str(tmp_path / "run"), str(out))
    pipe = diffusers.IFPipeline.from_pretrained(out)  # every component still loads
    theirs = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    net = state_lib.make_network(config.model)
    ema = traversals.flatten_mapping(_host(state.ema_params)["unet"])
    base = diffusers.UNet2DConditionModel.from_pretrained(pipes["if"] / "unet").state_dict()
    moved = 0
    for path_, src in sd_unet.hf_key_map(net.cfg.unet).items():
        np.testing.assert_array_equal(theirs[src.names[0]], src.to_checkpoint(ema[path_]))
        moved += int(not np.array_equal(theirs[src.names[0]], base[src.names[0]].numpy()))
    assert moved > len(ema) // 2


def _gradient_error(grads, unet, cfg, *, name="unet", key_map=None) -> float:
    """The largest |ours - torch's| of a tensor's gradient over max(|torch's|, 1e-3 |torch's
    whole gradient|): a gradient that is 0 or nearly so in exact arithmetic (a key bias
    before a softmax: 1e-8 of the whole) is float noise on both sides, about 1e-8 of the
    whole, whose size varies with the CPU's kernels. A wrong gradient is wrong by about its
    own size, so a tensor with a gradient above 1e-7 of the whole is still held to 1e-4."""
    theirs = {
        name: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
        for name, p in unet.named_parameters()
    }
    floor = 1e-3 * np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in theirs.values()))
    ours = traversals.flatten_mapping(_host(grads)[name])
    key_map = {k: v for k, v in (key_map or sd_unet.hf_key_map(cfg)).items() if k in ours}
    assert set(ours) == set(key_map)
    worst = 0.0
    for path, src in key_map.items():
        want, got = theirs[src.names[0]], src.to_checkpoint(ours[path])
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor)))
    return worst


def test_if_adapters_export_to_a_file_that_load_lora_weights_reads(pipes, tmp_path):
    """IF's adapters (its attention's projections, the text's added key and value too) in a
    diffusers LoRA file: IFPipeline.load_lora_weights gives the UNet output of ours merged."""
    out = _adapter_export(pipes["if"], "if_finetune", tmp_path)
    inputs = _if_unet_inputs("I")

    def ours(lora):
        return _ours_if_unet(deepfloyd.load_if_stage(pipes["if"], "I", lora=lora), inputs)

    pipe = diffusers.IFPipeline.from_pretrained(pipes["if"])
    pipe.load_lora_weights(str(out))
    got = ours(str(out))
    np.testing.assert_allclose(got, _diffusers_if_unet(pipe.unet, inputs), atol=1e-4)
    assert np.abs(got - ours(None)).max() > 1e-2  # the adapters changed the UNet


def test_if_stage_2_adapters_load_in_diffusers_and_sample_here_as_pipeline_sr(pipes, tmp_path):
    """Stage II's adapters in a diffusers LoRA file: IFSuperResolutionPipeline's
    load_lora_weights gives the UNet output of ours merged, and the export directory stands
    for stage II with its adapters where sample.py and the demo take --pipeline_sr."""
    out = _adapter_export(pipes["if2"], "if_sr_finetune", tmp_path)
    inputs = _if_unet_inputs("II")
    pipe = diffusers.IFSuperResolutionPipeline.from_pretrained(pipes["if2"])
    pipe.load_lora_weights(str(out))
    theirs = _diffusers_if_unet(pipe.unet, inputs)
    kind, dirs = find_model_dirs(f"{pipes['if']},{out}")
    assert kind == "if"
    cascade, settings = public_job(str(pipes["if"]), [], pipeline_sr=str(out))
    got = _ours_if_unet(cascade.stages[1].stage, inputs)
    np.testing.assert_allclose(got, theirs, atol=1e-4)
    base = _ours_if_unet(deepfloyd.load_if_stage(pipes["if2"], "II"), inputs)
    assert np.abs(got - base).max() > 1e-2
    assert settings["stages"][1]["lora"]["file"].startswith(str(out))  # the metadata names it
    assert "lora" not in settings["stages"][0]
    with pytest.raises(ValueError, match="stage II LoRA"):
        deepfloyd.load_if_stages(pipes["if"], lora_sr=str(out))


def _prior_config(pipe, **train):
    config = _config(pipe, "empty_prob=0", **train)
    config.data.prior_fraction = 0.5
    config.data.prior_source = "synthetic"
    config.data.prior_weight = 0.7
    return config


def test_prior_preservation_matches_diffusers_train_dreambooth(pipes):
    """Half of every batch from the prior source, after the instance half: the loss is
    train_dreambooth.py's, the instance MSE plus prior_loss_weight times the prior MSE."""
    config = _prior_config(pipes["sd"])
    data = make_input(config)
    batch = next(data)
    data.close()
    b = len(batch["caption"])
    np.testing.assert_allclose(batch["example_weight"], [2.0] * (b // 2) + [1.4] * (b // 2))
    net = state_lib.make_network(config.model)
    text = encode_captions(make_text_encoder(config.text), list(batch["caption"]))
    latents = np.random.default_rng(2).normal(size=(b, 16, 16, 4)).astype(np.float32)
    ours_batch = dict(text, latents=latents, example_weight=batch["example_weight"])
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(pipes["sd"])))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    key = jax.random.key(11)
    loss, _ = jax.jit(step_lib.make_loss_fn(config, net, schedule, []))(
        params, rest, ours_batch, key
    )

    _, key_loss, _ = jax.random.split(key, 3)
    key_t, key_eps = jax.random.split(key_loss)
    t = torch.from_numpy(np.asarray(jax.random.randint(key_t, (b,), 0, 1000))).long()
    noise = np.asarray(jax.random.normal(key_eps, latents.shape))
    unet = diffusers.UNet2DConditionModel.from_pretrained(pipes["sd"] / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(pipes["sd"] / "scheduler")
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    noisy = scheduler.add_noise(nchw(latents), nchw(noise), t)
    with torch.no_grad():
        pred = unet(noisy, t, torch.from_numpy(np.asarray(text["text"])), return_dict=False)[0]
    pred, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(nchw(noise), 2, dim=0)
    ref = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    prior = torch.nn.functional.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
    ref = ref + 0.7 * prior
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))


def test_prior_preservation_run_resumes_bitwise(pipes, tmp_path):
    config = _prior_config(pipes["sd"], steps=2, checkpoint_every=1)
    state, _ = training.train_and_evaluate(config, str(tmp_path / "run"))
    shutil.copytree(
        tmp_path / "run" / "checkpoints" / "1", tmp_path / "resumed" / "checkpoints" / "1"
    )
    resumed, _ = training.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert_same_tree(resumed, state)
    config.data.prior_fraction = 0.01  # no prior example in a batch of 8
    with pytest.raises(ValueError, match="data.prior_fraction=0.01"):
        training.train_and_evaluate(config, str(tmp_path / "bad"))


def test_dropped_captions_get_the_clip_encoding_of_the_empty_prompt(pipes):
    import transformers

    config = _config(pipes["sd"])
    tokens = pipeline_start.empty_text(make_text_encoder(config.text), 77)["empty_text"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(pipes["sd"] / "tokenizer")
    model = transformers.CLIPTextModel.from_pretrained(pipes["sd"] / "text_encoder")
    ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).last_hidden_state.numpy()
    np.testing.assert_allclose(tokens, want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Runs: full and adapters, on 1 and 8 devices, exported


@pytest.fixture(scope="module")
def runs(pipes, tmp_path_factory):
    """Two steps of each kind of run on the SD pipeline: (state, workdir) by name."""
    out = {}
    kinds = {
        "full_1": ("lr=0.001", [("data", 1)], 2**18),
        "full_fsdp": ("lr=0.001", [("data", 4), ("fsdp", 2)], 0),
        "lora_8": ("lora=2,alpha=4,lr=0.01", [("data", -1)], 2**18),
    }
    for name, (arg, mesh, min_size) in kinds.items():
        config = _config(pipes["sd"], arg, steps=2, checkpoint_every=1, fsdp_min_size=min_size)
        config.mesh = mesh
        # Adam's step is about lr for any gradient far above eps: with eps at 1e-3 a
        # gradient near 0, summed in another order on 8 devices, moves its weight alike.
        config.optim.eps = 1e-3
        workdir = tmp_path_factory.mktemp(name)
        state, metrics = training.train_and_evaluate(config, str(workdir))
        out[name] = (state, workdir, config, metrics)
    return out


def test_adapters_alone_are_trained_and_checkpointed(runs, pipes):
    state, _, config, _ = runs["lora_8"]
    names = {path[-1] for path in traversals.flatten_mapping(_host(state.params))}
    assert names == {lora_lib.DOWN, lora_lib.UP}
    net = state_lib.make_network(config.model)
    # to_q, to_k, to_v and to_out.0 of attn1 and attn2 in 4 transformer blocks
    assert len(net.lora.paths) == 4 * 2 * 4
    assert all(p[-2] in ("to_q", "to_k", "to_v", 0) for p in net.lora.paths)
    flat = traversals.flatten_mapping(_host(state.params))
    ups = [x for p, x in flat.items() if p[-1] == lora_lib.UP]
    assert max(np.abs(u).max() for u in ups) > 1e-3  # up started at zero and has moved


def test_eight_devices_with_sharded_weights_match_one_device(runs):
    state, _, _, metrics = runs["full_fsdp"]  # the batch over 4 x 2 devices, the weights over 2
    ref, _, _, ref_metrics = runs["full_1"]
    spec = state.params["unet"]["conv_in"]["kernel"].sharding.spec
    assert "fsdp" in tuple(spec)
    assert len(ref.params["unet"]["conv_in"]["kernel"].sharding.device_set) == 1
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        _host(state.params),
        _host(ref.params),
    )


def test_resumed_adapter_run_matches_the_uninterrupted_one(runs, tmp_path):
    state, workdir, config, _ = runs["lora_8"]
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    resumed, _ = training.train_and_evaluate(config, str(tmp_path))
    assert_same_tree(resumed, state)


def test_an_adapter_run_does_not_resume_at_another_scale(runs, tmp_path):
    """The adapters' alpha changes no parameter's shape but every merged weight: a resume
    (or an export) with another one is refused, naming it."""
    _, workdir, config, _ = runs["lora_8"]
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    config = config.copy_and_resolve_references()
    config.model.lora.alpha = 8.0
    with pytest.raises(
        training.CheckpointMismatchError, match=r"lora\.alpha: checkpoint 4\.0, config 8\.0"
    ):
        training.train_and_evaluate(config, str(tmp_path))


def _sample_both(ours_dir, ref, *, lora=None):
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    want = ref(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
        output_type="np",
    ).images
    got = load_latent_pipeline(ours_dir, lora=lora)(
        PROMPTS, noise=noise, steps=3, guidance_scale=5.0
    ).images
    return got, want


def test_full_fine_tune_exports_a_pipeline_that_diffusers_samples_alike(runs, pipes, tmp_path):
    _, workdir, config, _ = runs["full_1"]
    out = tmp_path / "export"
    export.export_pipeline(config, str(workdir), str(out))
    record = json.loads((out / "finetune.json").read_text())
    assert record["step"] == 2 and record["ema"] is True
    base = diffusers.StableDiffusionPipeline.from_pretrained(pipes["sd"])
    tuned = diffusers.StableDiffusionPipeline.from_pretrained(out)
    got, want = _sample_both(out, tuned)
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL)
    _, before = _sample_both(pipes["sd"], base)
    assert np.abs(want - before).max() > 10 * IMAGE_TOL  # the fine-tune changed the images
    with pytest.raises(FileExistsError, match="already holds files"):
        export.export_pipeline(config, str(workdir), str(out))


def test_adapters_export_to_a_file_that_load_lora_weights_reads(runs, pipes, tmp_path):
    _, workdir, config, _ = runs["lora_8"]
    out = tmp_path / "lora"
    export.export_pipeline(config, str(workdir), str(out))
    assert (out / lora_lib.LORA_WEIGHTS_NAME).is_file()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(pipes["sd"])
    _, before = _sample_both(pipes["sd"], ref)
    ref.load_lora_weights(str(out))
    got, want = _sample_both(pipes["sd"], ref, lora=str(out))
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL)
    assert np.abs(want - before).max() > 10 * IMAGE_TOL  # the adapters changed the images
    # The export stands for its base pipeline with the adapters, in sample.py and the demo.
    job, settings = public_job(str(out), [], batch_size=2)
    assert job.base.path == str(pipes["sd"]) and job.base.lora.endswith(lora_lib.LORA_WEIGHTS_NAME)
    assert settings["stages"][0]["lora"]["sha256"]
    assert find_model_dirs(str(out)) == ("latent", [str(out)])


# ----------------------------------------------------------------------------------------------
# SDXL: two text encoders, the pooled text, size / crop ids


def _sdxl_reference_text(path, captions):
    """diffusers' train_text_to_image_sdxl.py's encode_prompt: both encoders' penultimate
    hidden states concatenated, the last encoder's first output as the pooled text."""
    import transformers

    embeds = []
    for i, cls in (
        ("", transformers.CLIPTextModel),
        ("_2", transformers.CLIPTextModelWithProjection),
    ):
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path / f"tokenizer{i}")
        model = cls.from_pretrained(path / f"text_encoder{i}")
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.concat(embeds, dim=-1), pooled.view(len(captions), -1)


def test_sdxl_loss_and_gradient_match_diffusers_train_text_to_image_sdxl(pipes):
    path = pipes["xl"]
    config = _config(path, "empty_prob=0", family="sdxl_finetune")
    assert config.text.kind == "sdxl" and config.data.size_crop
    net = state_lib.make_network(config.model)
    text = encode_captions(make_text_encoder(config.text), PROMPTS)
    ref_text, ref_pooled = _sdxl_reference_text(path, PROMPTS)
    np.testing.assert_allclose(text["text"], ref_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(text["text_pooled"], ref_pooled.numpy(), atol=1e-5)
    b = len(PROMPTS)
    latents = np.random.default_rng(0).normal(size=(b, 16, 16, 4)).astype(np.float32)
    # (original height, width, crop top, left, target height, width) per image
    size_crop = np.array([[40, 56, 0, 6, 32, 32], [96, 32, 21, 0, 32, 32]], np.int32)
    batch = {"latents": latents, **text, "size_crop": size_crop}
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(path)))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    loss_fn = step_lib.make_loss_fn(config, net, schedule, [])
    key = jax.random.key(3)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest, batch, key)
    plain = dict(batch, size_crop=np.tile([[32, 32, 0, 0, 32, 32]], (b, 1)))
    assert abs(float(loss_fn(params, rest, plain, key)[0]) - float(loss)) > 1e-6  # ids are seen

    _, key_loss, _ = jax.random.split(key, 3)
    key_t, key_eps = jax.random.split(key_loss)
    timesteps = np.asarray(jax.random.randint(key_t, (b,), 0, 1000))
    noise = np.asarray(jax.random.normal(key_eps, latents.shape))
    # diffusers/examples/text_to_image/train_text_to_image_sdxl.py, its loss as written there.
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(path / "scheduler")
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    t = torch.from_numpy(timesteps).long()
    noisy = scheduler.add_noise(nchw(latents), nchw(noise), t)

    def compute_time_ids(original_size, crops_coords_top_left):
        return torch.tensor([list(original_size + crops_coords_top_left + (32, 32))])

    add_time_ids = torch.cat(
        [compute_time_ids(tuple(r[:2]), tuple(r[2:4])) for r in size_crop.tolist()]
    )
    added = {"time_ids": add_time_ids, "text_embeds": ref_pooled}
    pred = unet(noisy, t, ref_text, added_cond_kwargs=added, return_dict=False)[0]
    ref = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction="mean")
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))
    ref.backward()
    worst = _gradient_error(grads, unet, net.cfg.unet)
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


def test_sdxl_dropped_captions_get_both_encodings_of_the_empty_prompt(pipes):
    config = _config(pipes["xl"], family="sdxl_finetune")
    empty = pipeline_start.empty_text(make_text_encoder(config.text), 77)
    want_text, want_pooled = _sdxl_reference_text(pipes["xl"], [""])
    np.testing.assert_allclose(empty["empty_text"], want_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(empty["empty_pooled"], want_pooled.numpy(), atol=1e-5)


def _sample_xl(ours_dir, ref, *, lora=None):
    noise = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    want = ref(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
        output_type="np",
    ).images
    got = load_latent_pipeline(ours_dir, lora=lora)(
        PROMPTS, noise=noise, steps=3, guidance_scale=5.0, height=32, width=32
    ).images
    return got, want


@pytest.mark.parametrize("arg", ["lr=0.001", "lora=2,alpha=4,lr=0.01"])
def test_sdxl_fine_tune_exports_what_diffusers_samples_alike(pipes, tmp_path, arg):
    """A full fine-tune (a pipeline copy; on photos in aspect-ratio buckets) and adapters
    (load_lora_weights) of the SDXL base, each trained 2 steps on images with size / crop
    ids, sample in diffusers as ours do."""
    config = _config(pipes["xl"], arg, family="sdxl_finetune", steps=2, checkpoint_every=2)
    config.optim.eps = 1e-3
    if "lora" not in arg:  # photos of three shapes in aspect-ratio buckets
        from PIL import Image

        rng = np.random.default_rng(0)
        for i, (h, w) in enumerate([(48, 80), (80, 48), (64, 64)] * 2):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"{i}.png")
            (tmp_path / f"{i}.txt").write_text(PROMPTS[i % 2])
        config.data.update(source="folder", path=str(tmp_path), buckets="24x40,40x24,32x32")
        config.data.batch_size = 2
        config.mesh = [("data", 2)]  # of the 8 test devices
        data = make_input(config)
        assert len({next(data)["image"].shape for _ in range(3)}) == 3  # a batch a bucket
    training.train_and_evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "export"
    export.export_pipeline(config, str(tmp_path / "run"), str(out))
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(pipes["xl"])
    _, before = _sample_xl(pipes["xl"], base)
    if "lora" in arg:
        base.load_lora_weights(str(out))
        got, want = _sample_xl(pipes["xl"], base, lora=str(out))
    else:
        got, want = _sample_xl(out, diffusers.StableDiffusionXLPipeline.from_pretrained(out))
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL)
    assert np.abs(want - before).max() > 10 * IMAGE_TOL  # the fine-tune changed the images


def test_sdxl_data_records_original_size_and_crop_as_train_text_to_image_sdxl(tmp_path):
    """Centre crops of non-square images: the original size exactly, the crop corner in the
    resized image as the script's Resize + CenterCrop computes it (within a pixel: it
    resizes first, we crop first and resize once)."""
    from PIL import Image

    from imagen_jax import data as data_lib

    sizes = [(40, 56), (96, 32), (33, 70), (32, 32)]
    for i, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    it = data_lib.make_pipeline(
        data_lib.ImageFolderSource(str(tmp_path)),
        batch_size=4,
        resolution=32,
        seed=0,
        shuffle=False,
        size_crop=True,
    )
    batch = next(it)
    for key, ids in zip(batch["key"], batch["size_crop"], strict=True):
        h, w = sizes[int(key.rsplit("/", 1)[-1].split(".")[0])]
        scale = 32 / min(h, w)
        rh, rw = int(h * scale), int(w * scale)  # torchvision's Resize(32) of the shorter side
        top, left = max(0, round((rh - 32) / 2)), max(0, round((rw - 32) / 2))
        assert tuple(ids[:2]) == (h, w) and tuple(ids[4:]) == (32, 32)
        assert abs(ids[2] - top) <= 1 and abs(ids[3] - left) <= 1, (key, ids, top, left)


# ----------------------------------------------------------------------------------------------
# SD 3: the MMDiT, rectified flow, three text encoders


def _sd3_reference_text(path, captions, t5_len):
    """diffusers' train_dreambooth_sd3.py's encode_prompt: both CLIPs' penultimate hidden
    states concatenated (pooled: their projections), zero-padded to the T5's width, then the
    T5's last hidden state on the sequence axis."""
    import transformers

    clip_embeds, pooled = [], []
    for i in ("", "_2"):
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path / f"tokenizer{i}")
        model = transformers.CLIPTextModelWithProjection.from_pretrained(path / f"text_encoder{i}")
        ids = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        pooled.append(out[0])
        clip_embeds.append(out.hidden_states[-2])
    tokenizer = transformers.T5TokenizerFast.from_pretrained(path / "tokenizer_3")
    t5 = transformers.T5EncoderModel.from_pretrained(path / "text_encoder_3")
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=t5_len,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        t5_embeds = t5(ids)[0]
    clip = torch.cat(clip_embeds, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_embeds], dim=-2), torch.cat(pooled, dim=-1)


@pytest.mark.parametrize(
    "scheme, precondition",
    [("", -1), ("mode", 0), ("cosmap", 1), ("sigma_sqrt", 0)],
)
def test_sd3_loss_and_gradient_match_diffusers_train_dreambooth_sd3(pipes, scheme, precondition):
    """The script's objective for its --weighting_scheme (default logit_normal) and
    --precondition_outputs (default 1), its time densities and weights from diffusers'
    training_utils."""
    path = pipes["sd3"]
    arg = f"empty_prob=0,t5_len=16,scheme={scheme},precondition={precondition}"
    config = _config(path, arg, family="sd3_finetune")
    assert config.text.kind == "sd3"
    scheme = scheme or "logit_normal"
    precondition = precondition != 0  # the script's default: 1
    net = state_lib.make_network(config.model)
    encoder = make_text_encoder(config.text)
    text = encode_captions(encoder, PROMPTS)
    ref_text, ref_pooled = _sd3_reference_text(path, PROMPTS, 16)
    np.testing.assert_allclose(text["text"], ref_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(text["text_pooled"], ref_pooled.numpy(), atol=1e-5)
    empty = pipeline_start.empty_text(encoder, 77 + 16)
    want_text, want_pooled = _sd3_reference_text(path, [""], 16)
    np.testing.assert_allclose(empty["empty_text"], want_text.numpy(), atol=1e-5)
    np.testing.assert_allclose(empty["empty_pooled"], want_pooled.numpy(), atol=1e-5)
    b = len(PROMPTS)
    latents = np.random.default_rng(0).normal(size=(b, 16, 16, 4)).astype(np.float32)
    batch = {"latents": latents, **text}
    params = jax.tree.map(jnp.asarray, pipeline_start.pipeline_params(net, str(path)))
    _, rest = state_lib.init_params_and_rest(net, jax.random.key(0))
    schedule = diffusion_config.make_schedule(config.diffusion)
    loss_fn = step_lib.make_loss_fn(config, net, schedule, [])
    key = jax.random.key(11)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest, batch, key)

    # The step's draws: the scheme's time u (diffusers' density from the same normal or
    # uniform draws), the scheduler's shift (3) applied to it.
    _, key_loss, _ = jax.random.split(key, 3)
    key_t, key_eps = jax.random.split(key_loss)
    draw = jax.random.normal if scheme == "logit_normal" else jax.random.uniform
    with torch.random.fork_rng():
        values = torch.from_numpy(np.asarray(draw(key_t, (b,))))
        replace = "normal" if scheme == "logit_normal" else "rand"
        original = getattr(torch, replace)
        setattr(torch, replace, lambda *a, **k: values.clone())
        try:
            u = training_utils.compute_density_for_timestep_sampling(
                scheme, b, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
            )
        finally:
            setattr(torch, replace, original)
    u = u.numpy().astype(np.float64)
    shift = config.diffusion.flow_shift
    assert shift == 3.0
    sigma = torch.from_numpy((shift * u / (1 + (shift - 1) * u)).astype(np.float32))
    noise = np.asarray(jax.random.normal(key_eps, latents.shape))
    # diffusers/examples/dreambooth/train_dreambooth_sd3.py, its loss as written there.
    transformer = diffusers.SD3Transformer2DModel.from_pretrained(path / "transformer")
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    model_input, eps = nchw(latents), nchw(noise)
    sigmas = sigma.view(b, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * eps
    pred = transformer(
        hidden_states=noisy,
        timestep=sigma * 1000,
        encoder_hidden_states=ref_text,
        pooled_projections=ref_pooled,
        return_dict=False,
    )[0]
    if precondition:  # the script's preconditioning: x0 = z - sigma * pred, onto x0
        pred = pred * (-sigmas) + noisy
    weighting = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas=sigmas)
    target = model_input if precondition else eps - model_input
    ref = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(b, -1), 1)
    ref = ref.mean()
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref)), (float(loss), float(ref))
    ref.backward()
    key_map = sd3_transformer.hf_key_map(net.cfg.transformer)
    worst = _gradient_error(grads, transformer, None, name="transformer", key_map=key_map)
    assert worst < 1e-4, f"worst relative gradient error {worst:.2e}"


def _sample_sd3(ours_dir, ref, *, lora=None):
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    want = ref(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=5.0,
        max_sequence_length=16,
        latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
        output_type="np",
    ).images
    got = sd3.load_sd3_pipeline(ours_dir, max_sequence_length=16, lora=lora)(
        PROMPTS, noise=noise, steps=3, guidance_scale=5.0
    ).images
    return got, want


@pytest.mark.parametrize("arg", ["lr=0.001", "lora=2,alpha=4,lr=0.05"])
def test_sd3_fine_tune_exports_what_diffusers_samples_alike(pipes, tmp_path, arg):
    """A full fine-tune (a pipeline copy whose transformer/ diffusers loads) and adapters on
    the joint attention (load_lora_weights) of SD 3, each trained 2 steps, sample in
    diffusers' StableDiffusion3Pipeline as ours do, and differ from the base."""
    config = _config(
        pipes["sd3"], f"{arg},t5_len=16", family="sd3_finetune", steps=2, checkpoint_every=2
    )
    config.optim.eps = 1e-3
    training.train_and_evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "export"
    export.export_pipeline(config, str(tmp_path / "run"), str(out))
    base = diffusers.StableDiffusion3Pipeline.from_pretrained(pipes["sd3"])
    _, before = _sample_sd3(pipes["sd3"], base)
    if "lora" in arg:
        net = state_lib.make_network(config.model)
        assert {p[-2] for p in net.lora.paths} >= {"add_q_proj", "to_add_out", "to_q"}
        base.load_lora_weights(str(out))
        got, want = _sample_sd3(pipes["sd3"], base, lora=str(out))
    else:
        got, want = _sample_sd3(out, diffusers.StableDiffusion3Pipeline.from_pretrained(out))
    np.testing.assert_allclose(got, want, atol=IMAGE_TOL)
    assert np.abs(want - before).max() > 10 * IMAGE_TOL  # the fine-tune changed the images


def test_sd3_trains_from_a_text_cache_as_from_its_encoders(pipes, tmp_path, caplog):
    """The T5 need not run every step: a cache of the data's captions (CLIPs and T5 joint
    tokens and the pooled text) gives the run of the live encoders."""
    config = _config(pipes["sd3"], "t5_len=16", family="sd3_finetune", steps=1, log_every=1)
    _, live = training.train_and_evaluate(config, str(tmp_path / "live"))
    build_text_cache(config, str(tmp_path / "cache"), dtype="float32")
    config.text.cache = str(tmp_path / "cache")
    with caplog.at_level("INFO"):
        _, cached = training.train_and_evaluate(config, str(tmp_path / "cached"))
    assert "Text from the cache" in caplog.text
    np.testing.assert_allclose(cached["loss"], live["loss"], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_an_if_stage_given_for_the_other_stage_is_named(pipes):
    with pytest.raises(CheckpointError, match="IFSuperResolutionPipeline.*if_sr_finetune"):
        state_lib.make_network(_config(pipes["if2"], family="if_finetune").model)
    with pytest.raises(CheckpointError, match="IFPipeline .IF stage I.*low_resolution=8"):
        state_lib.make_network(_config(pipes["if"], family="if_sr_finetune").model)


def test_sd3_schemes_are_named_and_refused_elsewhere(pipes):
    with pytest.raises(ValueError, match="scheme='cosine'"):
        _config(pipes["sd3"], "scheme=cosine", family="sd3_finetune")
    with pytest.raises(ValueError, match="are SD 3's"):
        _config(pipes["sd"], "scheme=mode")


def test_the_sdxl_refiner_is_refused_by_name(pipes, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(pipes["xl"], refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["requires_aesthetics_score"] = True
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refiner"):
        state_lib.make_network(_config(refiner, family="sdxl_finetune").model)


def test_a_pipeline_of_another_family_is_named(pipes, tmp_path):
    other = tmp_path / "xl"
    shutil.copytree(pipes["sd"], other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="StableDiffusionXLPipeline.*model.expect"):
        state_lib.make_network(_config(other).model)


def test_a_lora_pattern_that_matches_no_layer_is_named(pipes):
    config = _config(pipes["sd"], "lora=2")
    config.model.lora.targets = r"to_nothing$"
    with pytest.raises(ValueError, match=r"lora.targets='to_nothing\$' matches no layer"):
        state_lib.make_network(config.model)


def test_a_resolution_the_unet_cannot_take_is_named(pipes, tmp_path):
    config = _config(pipes["sd"], "res=34")  # latents of 17 px; the UNet halves once
    with pytest.raises(ValueError, match="model.resolution=34"):
        training.train_and_evaluate(config, str(tmp_path))
