"""CLIP score: the image tower, the preprocessing and the score against their references.

Oracles: transformers' CLIPModel / CLIPVisionModel[WithProjection] (get_image_features,
get_text_features), its image processors (CLIPImageProcessorPil, and the torchvision
CLIPImageProcessor, to bound), PIL's bicubic resize, and torchmetrics' CLIPScore. The
models are tiny random CLIPs of the real architecture (`tiny_clip`), saved with
save_pretrained, with a tiny byte-level BPE CLIPTokenizer and a preprocessor_config.json.
"""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_two_towers
import torch
import transformers
from PIL import Image
from tokenizers import pre_tokenizers

from imagen_jax.evaluation import clip_score
from imagen_jax.images import ImageProcessor, resize_bicubic
from imagen_jax.models import vit
from imagen_jax.weights import CheckpointError

TOL = 1e-4  # embeddings: max |ours - transformers|, float32
SCORE_TOL = 1e-4  # scores (0..100): |ours - torchmetrics|
DEVICES = 2  # 2 of the 8 simulated CPU devices
ROOT = pathlib.Path(__file__).parents[2]
IMAGE_SIZE = 32
PROMPTS = [
    "a red circle above a blue square",
    "",
    "three green triangles",
    "Ünïcödé façade 東京",
    "a blue square left of a red circle",
    "tabs\tand spaces",
]


def clip_tokenizer():
    """A byte-level BPE CLIPTokenizer over a tiny vocabulary: every byte, every byte ending
    a word, a few merges, then the two special tokens (ids len - 2 and len - 1)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("b", "l"), ("a</w>", "b")]
    merges = [m for m in merges if "".join(m) not in vocab]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_configs(vocab: int) -> tuple[dict, dict]:
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_act="gelu",
    )
    return text, tiny_two_towers.vision_config("clip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(directory, transformers CLIPModel, CLIPTokenizer): a random CLIPModel saved with its
    tokenizer and a preprocessor_config.json (shortest edge and crop 32)."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tok = clip_tokenizer()
    text, vision = tiny_configs(len(tok))
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    tiny_two_towers.redraw(model, seed=6)  # a seed whose sample pairs' cosines have both signs
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    return clip_score.load_clip_scorer(
        tiny_clip[0], batch_size=DEVICES, devices=jax.local_devices()[:DEVICES]
    )


def smooth_image(h, w, seed=0):
    """uint8 [h, w, 3]: smooth colour waves plus a sharp-edged block (natural-ish content)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    f = rng.uniform(0.05, 0.4, size=(3, 2))
    img = np.stack([127 + 110 * np.sin(xx * a + c) * np.cos(yy * b) for c, (a, b) in enumerate(f)])
    img = np.moveaxis(img, 0, -1)
    img[h // 3 : h // 2, w // 4 : w // 2] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_images(n, seed=0):
    """n images of assorted sizes: down- and upscaled, square and not, and noise."""
    sizes = [(32, 32), (48, 40), (25, 60), (97, 64), (20, 20), (64, 33), (40, 90), (300, 200)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        noise = i % 3 == 2
        img = rng.integers(0, 256, (h, w, 3), np.uint8) if noise else smooth_image(h, w, seed + i)
        out.append(img)
    return out


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


class V4Features(torch.nn.Module):
    """transformers v5's CLIPModel.get_image_features / get_text_features return a
    BaseModelOutputWithPooling (the projected embedding in pooler_output); torchmetrics
    1.9.0 takes their result as v4's plain tensor (it calls `.norm` on it and fails). This
    gives it the v4 interface around the same model, nothing else changed."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids, attention_mask=attention_mask).pooler_output


# ----------------------------------------------------------------------------------------------
# The towers against transformers
# ----------------------------------------------------------------------------------------------


def test_embeddings_match_transformers(tiny_clip, scorer):
    """Image embeddings from the same pixel values, text embeddings from the same captions
    (our tokenizer's ids equal transformers' padding="max_length" ones), within 1e-4 of
    CLIPModel.get_image_features / get_text_features."""
    _, model, tok = tiny_clip
    pixels = np.random.default_rng(0).normal(size=(5, IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = pixels.astype(np.float32)
    ours = scorer.pixel_embeddings(pixels)
    batch = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_image = model.get_image_features(nchw(pixels)).pooler_output.numpy()
        ref_text = model.get_text_features(**batch).pooler_output.numpy()
    tokens = scorer.tokenizer(PROMPTS)
    np.testing.assert_array_equal(tokens.input_ids, batch["input_ids"].numpy())
    np.testing.assert_array_equal(tokens.attention_mask, batch["attention_mask"].numpy())
    errors = {
        "image": np.abs(ours - ref_image).max(),
        "text": np.abs(scorer.text_embeddings(PROMPTS) - ref_text).max(),
    }
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert ours.shape == (5, 16) and max(errors.values()) < TOL, errors


@pytest.mark.parametrize("cls", ["CLIPVisionModelWithProjection", "CLIPVisionModel"])
def test_vision_tower_matches_transformers(cls, tmp_path):
    """The standalone image towers: every hidden state, the last one, and the pooled output
    (image_embeds with the projection, pooler_output without)."""
    _, vision = tiny_configs(99)
    config = transformers.CLIPVisionConfig(**vision, projection_dim=12)
    torch.manual_seed(2)
    ref = getattr(transformers, cls)(config).eval()
    tiny_two_towers.redraw(ref, seed=3)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = vit.load_vision_model(tmp_path)
    assert (ours.visual_projection is None) == (cls == "CLIPVisionModel")
    pixels = np.random.default_rng(1).normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3))
    out = ours(jax.numpy.asarray(pixels, jax.numpy.float32))
    with torch.no_grad():
        want = ref(nchw(pixels.astype(np.float32)), output_hidden_states=True)
    pooled = want.image_embeds if cls.endswith("Projection") else want.pooler_output
    errors = {
        "pooled": np.abs(np.asarray(out.pooled) - pooled.numpy()).max(),
        "last": np.abs(np.asarray(out.last_hidden_state) - want.last_hidden_state.numpy()).max(),
        "hidden": max(
            np.abs(np.asarray(a) - b.numpy()).max()
            for a, b in zip(out.hidden_states, want.hidden_states, strict=True)
        ),
    }
    print(cls, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors
    with pytest.raises(ValueError, match="model takes 32x32"):
        ours(jax.numpy.zeros((1, 24, 24, 3)))


def test_strict_loading(tiny_clip, tmp_path):
    """A missing tensor of either tower is named; a text-only checkpoint is refused."""
    path, model, tok = tiny_clip
    from safetensors.numpy import load_file, save_file

    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    tensors = load_file(path / "model.safetensors")
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        clip_score.load_clip_model(tmp_path)
    assert "1 missing: vision_model.encoder.layers.1.mlp.fc2.bias" in str(e.value)
    assert "1 unexpected: vision_model.extra.weight" in str(e.value)
    text_only = tmp_path / "text_only"
    transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**tiny_configs(len(tok))[0], projection_dim=16)
    ).save_pretrained(text_only)
    with pytest.raises(CheckpointError, match="not a full CLIPModel"):
        clip_score.load_clip_model(text_only)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def test_resize_is_pils_bicubic():
    """resize_bicubic gives the installed PIL's uint8 image exactly, shrinking and enlarging,
    on both sides of Pillow 13's pass-order rule (H - h > 2 (W - w): vertical first; earlier
    releases always horizontal first), on smooth images and noise; sizes include 1 pixel and
    large factors."""
    rng = np.random.default_rng(0)
    cases = [(32, 32, 224, 224), (1, 7, 3, 1), (181, 50, 23, 47), (60, 200, 40, 130)]
    cases += [tuple(map(int, rng.integers(1, 160, 4))) for _ in range(40)]
    for i, (h_in, w_in, h, w) in enumerate(cases):
        noise = i % 2
        img = rng.integers(0, 256, (h_in, w_in, 3), np.uint8) if noise else smooth_image(h_in, w_in)
        want = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        np.testing.assert_array_equal(resize_bicubic(img, h, w), want, str(cases[i]))
    assert any(h_in - h > max(0, 2 * (w_in - w)) for h_in, w_in, h, w in cases)


@pytest.mark.parametrize("crop", [IMAGE_SIZE, 224])
def test_preprocessing_matches_transformers(crop):
    """Our pixel values equal those of transformers' PIL-backend CLIPImageProcessorPil, and
    stay within 2 levels (of 255) of its torchvision-backend CLIPImageProcessor, whose
    antialiased bicubic is torch's, not PIL's (measured: at most 2)."""
    kw = dict(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    pil = transformers.CLIPImageProcessorPil(**kw)
    ours = ImageProcessor.from_hf(pil.to_dict())
    images = sample_images(8, seed=3)
    want = pil(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = np.stack([ours(im) for im in images])
    assert got.dtype == np.float32 and got.shape == (8, crop, crop, 3)
    np.testing.assert_array_equal(got, want)
    tv = transformers.CLIPImageProcessor(**kw)
    tv_pixels = tv(images=[nchw(im) for im in images], return_tensors="pt")["pixel_values"]
    levels = np.abs(got - tv_pixels.numpy().transpose(0, 2, 3, 1)) * np.array(tv.image_std) * 255
    print(f"torchvision backend: max {levels.max():.2f} levels of 255")
    assert levels.max() < 2.0 + 1e-3


def test_preprocessor_config_variants():
    old = ImageProcessor.from_hf({"size": 224, "crop_size": 224})  # older files
    assert old == ImageProcessor()
    exact = ImageProcessor.from_hf(
        {"size": {"height": 20, "width": 30}, "do_center_crop": False, "do_normalize": False}
    )
    out = exact(np.full((7, 9, 3), 255, np.uint8))
    assert out.shape == (20, 30, 3) and np.allclose(out, 1.0)
    assert ImageProcessor().output_size(100, 300) == (224, 224)
    with pytest.raises(ValueError, match="only bicubic"):
        ImageProcessor.from_hf({"resample": 2})
    with pytest.raises(ValueError, match="smaller than the 224x224 center crop"):
        ImageProcessor(shortest_edge=None)(np.zeros((100, 300, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# The score
# ----------------------------------------------------------------------------------------------


def test_score_conventions():
    """clamp="mean" clamps the mean of 100 cos (torchmetrics' compute), "pair" each term."""
    image = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    text = np.array([[1.0, 1.0], [0.0, 5.0], [-1.0, 0.0]])  # cos: 1/sqrt(2), 1, -1
    np.testing.assert_allclose(clip_score.pair_scores(image, text), [100 / np.sqrt(2), 100, -100])
    assert clip_score.clip_score(image, text) == pytest.approx((100 / np.sqrt(2)) / 3)
    assert clip_score.clip_score(image, text, clamp="pair") == pytest.approx(
        (100 / np.sqrt(2) + 100) / 3
    )
    assert clip_score.clip_score(image[2:], text[2:]) == 0.0
    with pytest.raises(ValueError, match="clamp must be one of"):
        clip_score.clip_score(image, text, clamp="none")
    with pytest.raises(ValueError, match="non-empty"):
        clip_score.pair_scores(image[:0], text[:0])


def test_score_matches_torchmetrics(tiny_clip, scorer):
    """torchmetrics' CLIPScore on the same weights and the same images and captions. Its
    processor is transformers' PIL backend (our pixel values equal its, checked here), given
    with the model through the callable form of model_name_or_path: a string is accepted
    only if it names an OpenAI hub model, which it then downloads. The model is wrapped for
    torchmetrics 1.9's expectations of transformers v4 (V4Features)."""
    path, model, tok = tiny_clip
    tm_clip = pytest.importorskip("torchmetrics.multimodal.clip_score")
    image_processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    images = sample_images(6, seed=7)
    their_pixels = processor(images=[nchw(im) for im in images], return_tensors="np")
    ours_pixels = np.stack([scorer.processor(im) for im in images])
    np.testing.assert_array_equal(ours_pixels, their_pixels["pixel_values"].transpose(0, 2, 3, 1))

    metric = tm_clip.CLIPScore(model_name_or_path=lambda: (V4Features(model), processor))
    with torch.no_grad():
        metric.update([nchw(im) for im in images[:4]], PROMPTS[:4])  # two updates, summed
        metric.update([nchw(im) for im in images[4:]], PROMPTS[4:])
        want = float(metric.compute())
        pairs, _ = tm_clip._clip_score_update(
            [nchw(im) for im in images], PROMPTS, V4Features(model), processor
        )
    result = scorer.score(images, PROMPTS)
    image_embeds, text_embeds = scorer.image_embeddings(images), scorer.text_embeddings(PROMPTS)
    ours_pairs = clip_score.pair_scores(image_embeds, text_embeds)
    print(f"score {result['score']:.6f} vs torchmetrics {want:.6f}; pairs {ours_pairs.round(2)}")
    assert np.abs(ours_pairs - pairs.numpy()).max() < SCORE_TOL
    assert abs(result["score"] - want) < SCORE_TOL
    assert result["n"] == 6 and result["backbone"] == path.name and result["clamp"] == "mean"
    # The two conventions differ here: some pairs are negative, the mean is not.
    assert ours_pairs.min() < 0 < ours_pairs.mean()
    pair = scorer.score(images, PROMPTS, clamp="pair")["score"]
    assert pair == pytest.approx(np.maximum(pairs.numpy(), 0).mean(), abs=SCORE_TOL)
    assert pair > result["score"] + 1


def test_long_captions_keep_eos_and_warn(tiny_clip, scorer, caplog):
    """A caption over 77 tokens is cut to 77 with its end-of-text token kept and a warning
    logged; the embedding is transformers' for those ids (OpenAI's truncate=True)."""
    _, model, tok = tiny_clip
    prompts = ["a red circle above a blue square " * 6, "a red circle"]
    with caplog.at_level(logging.WARNING):
        got = scorer.text_embeddings(prompts)
    assert "Truncated 1 of 2 prompts to 77 tokens" in caplog.text
    batch = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch["input_ids"][0, -1] == tok.eos_token_id
    with torch.no_grad():
        want = model.get_text_features(**batch).pooler_output.numpy()
    assert np.abs(got - want).max() < TOL
    assert scorer.score(sample_images(2), prompts)["truncated_prompts"] == 1


def test_backbone_name(tmp_path):
    snapshot = tmp_path / "models--openai--clip-vit-large-patch14" / "snapshots" / "0123abcd"
    assert clip_score.backbone_name(snapshot, {}) == "openai/clip-vit-large-patch14"
    assert clip_score.backbone_name(tmp_path / "my-clip", {}) == "my-clip"
    hub = {"_name_or_path": "openai/clip-vit-base-patch32"}
    assert clip_score.backbone_name(tmp_path / "x", hub) == "openai/clip-vit-base-patch32"
    local = {"_name_or_path": str(tmp_path)}
    assert clip_score.backbone_name(tmp_path / "x", local) == "x"


# ----------------------------------------------------------------------------------------------
# A folder of samples, eval/clip_score.py, bad input
# ----------------------------------------------------------------------------------------------


def write_samples(folder: pathlib.Path, images, prompts) -> None:
    """sample.py's layout: images/{p:06d}_000.png and manifest.jsonl with extra fields."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for p, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        file = f"images/{p:06d}_000.png"
        Image.fromarray(image).save(folder / file)
        lines.append(dict(file=file, prompt=prompt, prompt_index=p, image_index=0, seed=0))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    Image.fromarray(images[0]).save(folder / "grid.png")  # beside, not among, the images


def test_evaluate_folder_and_main(tiny_clip, scorer, tmp_path):
    """The folder's score is the scorer's on the same images and prompts; eval/clip_score.py
    (a subprocess) prints and writes it as JSON."""
    path, _, _ = tiny_clip
    images = sample_images(3, seed=11)
    write_samples(tmp_path / "samples", images, PROMPTS[:3])
    want = scorer.score(images, PROMPTS[:3])
    result = clip_score.evaluate_folder(
        tmp_path / "samples", clip_path=path, batch_size=DEVICES, devices=jax.local_devices()[:2]
    )
    assert result["score"] == pytest.approx(want["score"], abs=1e-5)
    assert result["n"] == 3 and result["backbone"] == path.name
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "clip_score.py"),
            f"--samples={tmp_path / 'samples'}",
            f"--clip={path}",
            f"--json={tmp_path / 'result.json'}",
            "--backbone=tiny/clip",
            "--batch_size=2",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(out.stdout) == written
    assert written["score"] == pytest.approx(want["score"], abs=1e-5)
    assert (written["n"], written["backbone"], written["clamp"]) == (3, "tiny/clip", "mean")


def test_bad_folders(tmp_path):
    d = tmp_path / "samples"
    write_samples(d, sample_images(2), PROMPTS[:2])
    manifest = d / "manifest.jsonl"
    good = manifest.read_text()
    assert [p.name for p, _ in clip_score.read_pairs(d)] == ["000000_000.png", "000001_000.png"]
    (d / "images" / "000002_000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"does not match the folder: 1 image.*000002_000.png"):
        clip_score.read_pairs(d)
    (d / "images" / "000002_000.png").unlink()
    manifest.write_text(good + json.dumps({"file": "images/000009_000.png", "prompt": "x"}))
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:3: .*000009_000.png"):
        clip_score.read_pairs(d)
    manifest.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: .* listed again \(line 1\)"):
        clip_score.read_pairs(d)
    manifest.write_text(json.dumps({"file": "images/000000_000.png"}) + "\n")
    with pytest.raises(ValueError, match="string 'file' and 'prompt'"):
        clip_score.read_pairs(d)
    manifest.write_text("\n")
    with pytest.raises(ValueError, match="lists no images: CLIP score needs at least 1"):
        clip_score.read_pairs(d)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match='no manifest.jsonl .* "file" and "prompt"'):
        clip_score.read_pairs(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score.read_pairs(tmp_path / "absent")


def test_bad_model_dirs(tiny_clip, tmp_path):
    """Missing files are all named, with where CLIP weights are published; the folder is
    checked before the model."""
    path, _, _ = tiny_clip
    d = tmp_path / "clip"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((path / name).read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        clip_score.load_clip_scorer(d)
    message = str(e.value)
    assert "lacks model.safetensors (it has pytorch_model.bin" in message
    assert "preprocessor_config.json" in message and "openai/clip-vit-large-patch14" in message
    assert "Hugging Face hub" in message
    with pytest.raises(FileNotFoundError, match="does not exist.*openai/clip-vit-large-patch14"):
        clip_score.load_clip_scorer(tmp_path / "absent")
    samples = tmp_path / "samples"
    write_samples(samples, sample_images(1), PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        clip_score.evaluate_folder(samples, clip_path=d)
    (samples / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="lists no images"):
        clip_score.evaluate_folder(samples, clip_path=tmp_path / "absent")
    with pytest.raises(ValueError, match="clamp must be one of"):
        clip_score.evaluate_folder(samples, clip_path=path, clamp="max")


def test_scorer_input_errors(scorer):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(sample_images(2), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"image 1: expected a uint8 \[H, W, 3\] image"):
        scorer.image_embeddings([sample_images(1)[0], np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="no images"):
        scorer.image_embeddings([])
    with pytest.raises(TypeError, match="not one string"):
        scorer.text_embeddings("a red circle")


def test_clip_score_evaluator(tiny_clip, scorer):
    """The `clip_score` evaluator of `evals.metrics` gives the scorer's score and names its
    backbone."""
    from imagen_jax.evaluation import evaluators
    from imagen_jax.training import config as config_lib

    path, _, _ = tiny_clip
    images = sample_images(3, seed=12)
    evals = config_lib.evals_config(metrics=("clip_score",))
    evals.clip.path = str(path)
    (evaluator,) = evaluators.make_evaluators(evals)
    samples = evaluators.Samples(images, [{"prompt": p} for p in PROMPTS[:3]])
    want = scorer.score(images, PROMPTS[:3])["score"]
    assert evaluator(samples) == {"clip_score": pytest.approx(want, abs=1e-5)}
    assert evaluator.describe()["backbone"] == path.name
