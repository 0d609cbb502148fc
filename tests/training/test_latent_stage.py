"""A latent stage from training to sample.py: a runlocal SD3-style MMDiT run
(configs/shapes_mmdit.py:runlocal, on an untrained random VAE) evaluated periodically,
exported as a stage directory (its VAE copied in), loaded strictly and sampled by sample.py's
code path; its images equal a direct sampling of the run's in-memory EMA weights."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from imagen_jax import stages
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.adapter import model_fn
from imagen_jax.images import to_uint8
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.shapes.spec import TASKS
from imagen_jax.text.config import make_text_encoder
from imagen_jax.training import export, latent_space, train_and_evaluate
from imagen_jax.training import periodic_eval as evaluation
from imagen_jax.training import state as state_lib
from imagen_jax.weights import CheckpointError

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, float32 stage dir, float16 stage dir) of a 2-step run with a
    periodic evaluation at step 2."""
    root = tmp_path_factory.mktemp("latent")
    config = tiny("shapes_mmdit", steps=2)
    config.evals.every = 2
    config.evals.prompts_per_task = 1
    config.evals.batch_size = 4
    workdir = str(root / "run")
    train_and_evaluate(config, workdir)
    f32 = export.export_stage(config, workdir, str(root / "f32"), storage_dtype="float32")
    f16 = export.export_stage(config, workdir, str(root / "f16"))  # the default: float16
    return config, workdir, f32, f16


def _job(stage_dir, outdir, **kw):
    args = dict(
        stages=[stage_dir],
        prompts=PROMPTS,
        prompts_file=None,
        negative_prompt="",
        images_per_prompt=2,
        seed=3,
        batch_size=3,  # 4 images: a full batch and a padded one
        outdir=str(outdir),
        overrides=[],
        grid=False,
    )
    return sampling.run_sampling_job(**{**args, **kw})


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _pngs(outdir) -> list[np.ndarray]:
    names = sorted(os.listdir(os.path.join(outdir, "images")))
    return [np.asarray(Image.open(os.path.join(outdir, "images", n))) for n in names]


def _direct(config, workdir, items, seed) -> np.ndarray:
    """The images of `items` sampled straight from the run's restored EMA weights and its
    random VAE, without the stage directory or the cascade: per-image keys as the job
    contract states (noise from fold_in(key, 0), the sampler's from fold_in(key, 2))."""
    params, net, _ = export.restore_ema(config, workdir)
    graph = net.graphdef
    schedule = diffusion_config.make_schedule(config.diffusion)
    sampling_cfg = diffusion_config.make_sampling(config.diffusion, config.sample)

    def apply_fn(state, z, t, cond):
        return model_fn(nnx.merge(graph, *state), schedule=schedule)(z, t, cond)

    run = samplers.compile_sampler(
        apply_fn,
        sampler=sampling_cfg.sampler,
        sampler_options=sampling_cfg.sampler_options,
        **sampling_cfg.denoiser_options,
    )
    cond, uncond = cascade_lib.imagen_conditioning(make_text_encoder(config.text), items)
    keys = jnp.stack([jobs.image_key(seed, it, 0) for it in items])
    vae, _ = latent_space.load_frozen_vae(config.latent.vae, seed=config.train.seed)
    f = vae.config.downsample_factor
    r = config.model.resolution
    shape = (r // f, r // f, vae.config.latent_channels)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    grid = sampling_cfg.grid
    scale = jnp.float32(config.sample.guidance_scale)
    latents = run(
        (params, net.abstract_rest), grid.init_sigma * z, grid, cond, uncond, scale, step_keys
    )
    return to_uint8(jnp.clip(vae.images_from_latents(latents), -1.0, 1.0))


def test_periodic_evaluation_of_a_latent_stage(run):
    config, workdir, f32, _ = run
    report = _read_json(os.path.join(workdir, "evals", "step_00000002.json"))
    assert report["num_images"] == len(TASKS)
    assert 0.0 <= report["metrics"]["compositional/heldout/overall"] <= 1.0
    lines = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [x["step"] for x in lines if "eval/compositional/heldout/overall" in x] == [2]
    sheet = np.asarray(Image.open(os.path.join(workdir, "evals", "step_00000002.png")))
    res = config.model.resolution
    assert sheet.shape == (res, len(TASKS) * res, 3)
    # The evaluation's images are sample.py's images of the exported EMA weights: the
    # run's mesh spans the 8 simulated devices (batch 4 padded to 8), this one. Since the
    # samplers' editing options, the two compiled programs round one value in about a
    # thousand differently (a uint8 level); more than that is a real difference.
    cascade, _ = sampling.load_cascade([f32])
    entries, _ = evaluation.eval_prompts(config.evals)
    (images,) = cascade(jobs.plan(entries, 1)[:4], config.evals.seed)[-1:]
    for i, image in enumerate(images):
        diff = np.abs(image.astype(int) - sheet[:, i * res : (i + 1) * res].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_export_writes_a_self_contained_latent_stage(run):
    config, workdir, f32, f16 = run
    meta = _read_json(os.path.join(f16, "stage.json"))
    assert meta["family"] == "mmdit" and "unet" not in meta
    assert meta["network"]["patch_size"] == 2 and meta["network"]["null_text_len"] == 2
    assert meta["sample"]["sampler"] == "flow_euler" and meta["diffusion"]["schedule"] == "flow"
    assert meta["text"] == config.text.to_dict()
    assert meta["identity"] == {"workdir": workdir, "step": 2, "vae": "an untrained random VAE"}
    assert sorted(os.listdir(os.path.join(f16, "vae"))) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert {v.dtype for v in load_file(os.path.join(f16, "params.safetensors")).values()} == {
        np.dtype(np.float16)
    }
    stage = stages.load_stage(f16)
    assert isinstance(stage, stages.LatentStage)
    assert (stage.channels, stage.vae_factor, stage.downsampling_factor) == (4, 2, 4)
    assert stage.with_settings({"steps": 2}).sample.steps == 2 and stage.sample.steps == 4
    with pytest.raises(ValueError, match="is a base stage"):
        stage.with_settings(aug_level=0.1)


def test_a_run_starts_from_an_exported_latent_stage(run, tmp_path):
    """train.init_from reads a latent stage directory (its VAE the stage's own copy): the
    new run's first step (learning rate 0 at the start of the warm-up) keeps its weights."""
    config, _, f32, _ = run
    again = config.copy_and_resolve_references()
    again.train.init_from, again.latent.vae = f32, os.path.join(f32, "vae")
    again.train.steps = again.train.checkpoint_every = 1
    again.optim.warmup_steps = 10
    again.evals.every = 0
    train_and_evaluate(again, str(tmp_path / "run"))
    out = export.export_stage(
        again, str(tmp_path / "run"), str(tmp_path / "out"), storage_dtype="float32"
    )
    want = load_file(os.path.join(f32, "params.safetensors"))
    got = load_file(os.path.join(out, "params.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    again.train.init_from = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a stage directory"):
        train_and_evaluate(again, str(tmp_path / "other"))


def test_sample_py_images_equal_direct_sampling_of_the_ema_weights(run, tmp_path):
    config, workdir, f32, f16 = run
    _job(f32, tmp_path / "f32")
    _job(f16, tmp_path / "f16")
    entries = [jobs.PromptEntry(p) for p in PROMPTS]
    direct = _direct(config, workdir, jobs.plan(entries, 2), seed=3)
    got32, got16 = np.stack(_pngs(tmp_path / "f32")), np.stack(_pngs(tmp_path / "f16"))
    assert got32.shape == (4, 16, 16, 3)
    # float32 storage: the same weights in programs compiled apart (equal here; within one
    # level is the contract). float16 storage rounds the weights (relative 5e-4): within
    # one level and 0.01 on average here, tested within a few.
    assert np.abs(got32.astype(int) - direct).max() <= 1
    diff16 = np.abs(got16.astype(int) - direct)
    assert diff16.max() <= 4 and diff16.mean() < 0.1, (diff16.max(), diff16.mean())
    manifest = _read_jsonl(tmp_path / "f16" / "manifest.jsonl")
    stage = manifest[0]["stages"][0]
    assert stage["family"] == "mmdit" and stage["vae_sha256"]
    assert (stage["height"], stage["width"]) == (16, 16)


def test_batch_size_does_not_change_the_images(run, tmp_path):
    _, _, f32, _ = run
    _job(f32, tmp_path / "b1", batch_size=1)
    _job(f32, tmp_path / "b3")
    for one, three in zip(_pngs(tmp_path / "b1"), _pngs(tmp_path / "b3"), strict=True):
        assert np.abs(one.astype(int) - three).max() <= 1


def test_non_square_sizes_and_a_size_that_does_not_fit(run, tmp_path):
    _, _, f32, _ = run
    _job(f32, tmp_path / "wide", images_per_prompt=1, height=16, width=32)
    assert {image.shape for image in _pngs(tmp_path / "wide")} == {(16, 32, 3)}
    with pytest.raises(ValueError, match=r"16x18 .*not a multiple of 4 \(the VAE's factor 2"):
        _job(f32, tmp_path / "bad", height=16, width=18)


def test_a_corrupt_latent_stage_is_refused_by_name(run, tmp_path):
    _, _, f32, _ = run
    stage_dir = tmp_path / "stage"
    shutil.copytree(f32, stage_dir)
    weights = stage_dir / "params.safetensors"
    flat = load_file(weights)
    key = sorted(flat)[0]
    save_file({k: v for k, v in flat.items() if k != key}, weights)
    with pytest.raises(ValueError, match=rf"do not fit its MMDiT config:\n  missing {key} "):
        stages.load_stage(str(stage_dir))
    save_file({**flat, key: flat[key][..., :1]}, weights)
    with pytest.raises(ValueError, match=rf"{key}: file \("):
        stages.load_stage(str(stage_dir))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        stages.load_stage(str(stage_dir))
    shutil.copy(os.path.join(f32, "params.safetensors"), weights)
    shutil.rmtree(stage_dir / "vae")
    with pytest.raises(FileNotFoundError, match="a latent stage without its VAE"):
        stages.load_stage(str(stage_dir))
    with pytest.raises(ValueError, match="aug_level=0.2: .* is a base stage"):
        stages.load_stage(f32, aug_level=0.2)


def _random_latent_unet_stage(stage_dir: str, seed: int):
    """(the network, the random VAE) of a stage of configs/shapes_latent.py's SD UNet with
    random weights from `seed`, saved as stage_dir."""
    config = tiny("shapes_latent")
    net = state_lib.make_network(config.model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), net.abstract_params
    )
    vae, _ = latent_space.load_frozen_vae("random", seed=0)
    stages.save_latent_stage(
        stage_dir,
        family="sd_unet",
        network=net.cfg,
        params=params,
        vae=vae,
        diffusion=config.diffusion,
        sample=config.sample,
        resolution=config.model.resolution,
        text=config.text.to_dict(),
    )
    return net, vae


def test_a_latent_unet_stage_round_trips_and_samples(tmp_path):
    """The other latent family (configs/shapes_latent.py's SD UNet): its config, with tuple
    fields, survives stage.json, and sample.py samples it at a non-square size."""
    stage_dir = str(tmp_path / "stage")
    net, _ = _random_latent_unet_stage(stage_dir, seed=0)
    stage = stages.load_stage(stage_dir)
    assert stage.network_config == net.cfg and stage.downsampling_factor == 4
    _job(stage_dir, tmp_path / "out", images_per_prompt=1, height=8, width=24)
    assert {image.shape for image in _pngs(tmp_path / "out")} == {(8, 24, 3)}
    with pytest.raises(ValueError, match=r"8x10 .*\(the VAE's factor 2 times the UNet's"):
        _job(stage_dir, tmp_path / "bad", height=8, width=10)


def test_a_latent_stage_edits_in_its_latent_space(tmp_path):
    """Image-to-image and inpainting of a latent stage (`cascade.Edit`): the image encoded
    by the stage's VAE; strength 0 and a mask that keeps everything give the VAE's
    reconstruction of the image, a mask that regenerates everything plain sampling."""
    stage_dir = str(tmp_path / "stage")
    _, vae = _random_latent_unet_stage(stage_dir, seed=1)
    rng = np.random.default_rng(1)
    cascade, _ = sampling.load_cascade([stage_dir])
    items = [jobs.WorkItem(i, 0, jobs.PromptEntry(p)) for i, p in enumerate(PROMPTS)]
    size = cascade.sizes[-1]
    image = rng.uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    graph, state = nnx.split(vae)
    latents = cascade_lib.encode_images(graph, state, image)
    reconstruction = np.clip(np.asarray(cascade_lib.decode_latents(graph, state, latents)), -1, 1)
    keep_all = cascade_lib.Edit(image, np.zeros((2, *size), np.float32))
    (out,) = cascade.sample(items, 3, edit=keep_all)
    np.testing.assert_allclose(out, reconstruction, atol=1e-5)
    (out,) = cascade.sample(items, 3, edit=cascade_lib.Edit(image, None, strength=0.0))
    np.testing.assert_allclose(out, reconstruction, atol=1e-5)
    (plain,) = cascade.sample(items, 3)
    (out,) = cascade.sample(items, 3, edit=cascade_lib.Edit(image, np.ones((2, *size))))
    np.testing.assert_allclose(out, plain, atol=1e-5)
    (half,) = cascade.sample(items, 3, edit=cascade_lib.Edit(image, None, strength=0.5))
    assert np.abs(half - plain).max() > 0.05 and np.abs(half - reconstruction).max() > 0.05
