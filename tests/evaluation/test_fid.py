"""FID, KID and the FID Inception against their reference implementations.

Oracles: pytorch-fid (`calculate_frechet_distance`, `InceptionV3`, `get_activations`
and its statistics), torch-fidelity (`kid_features_to_metric`), clean-fid
(`make_resizer`, `kernel_distance`), PyTorch's `F.interpolate`; and closed forms. The
Inception runs with random weights (the real ones cannot be downloaded here): the torch
model is built and randomized by `fid_reference` (conftest.py), its state dict saved, and
ours loaded from that file.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from imagen_jax.evaluation import fid, folder, inception
from imagen_jax.weights import CheckpointError

FEATURE_RTOL = 1e-4  # max |ours - ref| / max |ref| over the pool3 features
DEVICES = 2  # the extractor's mesh in these tests: 2 of the 8 simulated CPU devices
ROOT = pathlib.Path(__file__).parents[2]


def random_stats(rng, d, n=None):
    """mu [d], sigma [d, d]: a covariance of n samples (singular if n <= d), or full rank."""
    a = rng.normal(size=(n or 2 * d, d)) * rng.uniform(0.5, 2.0, size=d)
    return rng.normal(size=d), np.cov(a, rowvar=False)


# ----------------------------------------------------------------------------------------------
# Fréchet distance, statistics, files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, n", [(8, None), (64, None), (64, 40)])
def test_frechet_distance_matches_pytorch_fid(d, n, reference):
    """Full-rank covariances, and rank-deficient ones (n samples < d dims, as with few
    images), against pytorch-fid's calculate_frechet_distance on the same statistics."""
    ref = reference("pytorch_fid.fid_score").calculate_frechet_distance
    rng = np.random.default_rng(d + (n or 0))
    (mu1, s1), (mu2, s2) = random_stats(rng, d, n), random_stats(rng, d, n)
    with warnings.catch_warnings():  # it passes scipy's deprecated sqrtm(disp=False)
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = float(ref(mu1, s1, mu2, s2))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-6 * max(1.0, expected)


def test_frechet_distance_offset_fix_matches_pytorch_fid(monkeypatch, reference):
    """When the product's root is not finite, both add 1e-6 to the diagonals. scipy's sqrtm
    is made to fail on the plain product (for both), as it does on singular products."""
    fid_score = reference("pytorch_fid.fid_score")
    import scipy.linalg

    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 16), random_stats(rng, 16)
    real_sqrtm, product, calls = scipy.linalg.sqrtm, s1 @ s2, []

    def sqrtm(a, disp=True, **kw):
        calls.append(a)
        root = np.full_like(a, np.inf) if np.array_equal(a, product) else real_sqrtm(a)
        return root if disp else (root, 0.0)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    expected = float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
    assert len(calls) == 4  # the plain product, then the offset one, on each side
    assert abs(ours - expected) < 1e-6 * expected


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    mu, sigma = random_stats(rng, 32)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert abs(got - expected) < 1e-9 * expected
    # Means only: the squared distance.
    assert (
        abs(fid.frechet_distance(mu1, np.eye(16), mu2, np.eye(16)) - np.sum((mu1 - mu2) ** 2))
        < 1e-9
    )
    # Not covariances (negative variance): the root is imaginary, which is refused.
    with pytest.raises(ValueError, match="imaginary part of 1"):
        fid.frechet_distance(mu1[:2], np.diag([1.0, -1.0]), mu2[:2], np.eye(2))
    with pytest.raises(ValueError, match="means differ"):
        fid.frechet_distance(mu1, np.eye(16), mu2[:8], np.eye(8))


def test_statistics_definition():
    x = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = fid.statistics(x)
    x64 = x.astype(np.float64)
    centred = x64 - x64.sum(axis=0) / 50
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x64.sum(axis=0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics(x[:1])


def test_stats_file_round_trip_and_compatibility(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = random_stats(rng, 8)
    ours = tmp_path / "ours.npz"
    fid.save_stats(ours, mu, sigma, num_images=123, resize="clean_fid")
    back = fid.load_stats(ours)
    np.testing.assert_array_equal(back["mu"], mu)
    np.testing.assert_array_equal(back["sigma"], sigma)
    assert back["num_images"] == 123 and back["resize"] == "clean_fid"
    with np.load(ours) as f:  # how pytorch-fid and clean-fid read a statistics file
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    theirs = tmp_path / "theirs.npz"  # as pytorch-fid's --save-stats writes one
    np.savez_compressed(theirs, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    back = fid.load_stats(theirs)
    np.testing.assert_array_equal(back["mu"], mu.astype(np.float32))
    assert "resize" not in back and "num_images" not in back

    feats = rng.normal(size=(5, 8)).astype(np.float32)
    fid.save_features(tmp_path / "f.npz", feats)
    np.testing.assert_array_equal(fid.load_features(tmp_path / "f.npz"), feats)
    np.save(tmp_path / "f.npy", feats)
    np.testing.assert_array_equal(fid.load_features(tmp_path / "f.npy"), feats)


def test_bad_stats_and_feature_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fid.load_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "m.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match=r"m\.npz.*\['sigma'\]"):
        fid.load_stats(tmp_path / "m.npz")
    np.savez(tmp_path / "s.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"s\.npz.*\(4,\).*\(3, 3\)"):
        fid.load_stats(tmp_path / "s.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="text.npz"):
        fid.load_stats(tmp_path / "text.npz")
    np.savez(tmp_path / "k.npz", other=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"k\.npz.*'feats'.*\['other'\]"):
        fid.load_features(tmp_path / "k.npz")


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def test_kid_matches_torch_fidelity(reference):
    """Same subsets (same seed), same unbiased MMD: mean and std agree to float64 rounding."""
    kid_ref = reference("torch_fidelity.metric_kid").kid_features_to_metric
    rng = np.random.default_rng(4)
    f1 = rng.normal(size=(40, 16))
    f2 = rng.normal(loc=0.3, size=(50, 16))
    kw = dict(num_subsets=7, subset_size=25, seed=11)
    mean, std = fid.kernel_inception_distance(f1, f2, **kw)
    expected = kid_ref(
        torch.from_numpy(f1),
        torch.from_numpy(f2),
        kid_subsets=7,
        kid_subset_size=25,
        rng_seed=11,
        verbose=False,
    )
    assert abs(mean - expected["kernel_inception_distance_mean"]) < 1e-12
    assert abs(std - expected["kernel_inception_distance_std"]) < 1e-12
    assert std > 0  # the subsets differ


def test_kid_matches_clean_fid_on_full_sets(reference):
    """clean-fid draws its subsets differently; with subsets as large as the sets every
    draw is a permutation, which MMD does not see, so the values must agree."""
    kernel_distance = reference("cleanfid.fid").kernel_distance
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(30, 12)), rng.normal(scale=1.2, size=(30, 12))
    mean, std = fid.kernel_inception_distance(f1, f2, num_subsets=3, subset_size=30)
    assert abs(mean - kernel_distance(f1, f2, num_subsets=3, max_subset_size=30)) < 1e-12
    assert std < 1e-12


def test_kid_explicit_formula_and_errors():
    """One subset = the whole sets: the unbiased MMD^2 as a double sum over pairs."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    mean, _ = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=6)
    assert abs(mean - (xx + yy - 2 * xy)) < 1e-12
    with pytest.raises(ValueError, match="subset_size 7 exceeds.*6 and 6"):
        fid.kernel_inception_distance(x, y, subset_size=7)
    with pytest.raises(ValueError, match="feature dims differ"):
        fid.kernel_inception_distance(x, y[:, :2], subset_size=6)


# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 80), (331, 420), (299, 299)])
def test_bilinear_resize_matches_torch(shape):
    """Up, down (no antialiasing, as F.interpolate) and identity."""
    x = np.random.default_rng(7).uniform(size=(1, *shape, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(inception.torch_bilinear_resize)(x))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    assert np.abs(ours - ref.permute(0, 2, 3, 1).numpy()).max() < 1e-5


def test_clean_fid_resize_matches_clean_fid(reference):
    resizer = reference("cleanfid.resize").make_resizer("PIL", False, "bicubic", (299, 299))
    image = np.random.default_rng(8).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    ours = inception.clean_fid_resize(image)
    assert ours.dtype == np.float32 and ours.shape == (299, 299, 3)
    np.testing.assert_array_equal(ours, resizer(image))


# ----------------------------------------------------------------------------------------------
# The Inception
# ----------------------------------------------------------------------------------------------


def images(n, shape=(64, 80), seed=9):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape, 3), dtype=np.uint8)


def write_pngs(directory, x):
    directory.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(x):
        Image.fromarray(im).save(directory / f"{i:03d}.png")
    return sorted(directory.glob("*.png"))


def relative_error(ours, ref):
    """max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"max relative error {err:.2e}")
    return err


def mesh_kw():
    """The extractor's mesh in these tests: 2 of the 8 simulated CPU devices, a batch of 2."""
    return dict(batch_size=DEVICES, devices=jax.local_devices()[:DEVICES])


@pytest.fixture(scope="session")
def ours(fid_reference):
    return inception.load_inception(fid_reference[1])


def test_folder_pytorch_fid_convention(fid_reference, tmp_path, monkeypatch, reference):
    """Three 64x80 PNGs through the folder evaluator (two batches of 2 sharded over 2
    devices, the last one padded) against pytorch-fid's own pipeline on the same files:
    `get_activations` (its image reading, ToTensor, InceptionV3 with resize_input and
    normalize_input) and its statistics (np.mean, np.cov of those activations). FID is
    taken between the folder's statistics and the reference file's (recorded here: at
    2048 dims scipy's sqrtm takes minutes on this machine; its math is tested above)."""
    model, path = fid_reference
    fid_score = reference("pytorch_fid.fid_score")
    files = write_pngs(tmp_path / "samples", images(3))
    with torch.no_grad():
        act = fid_score.get_activations(
            [str(f) for f in files], model, batch_size=3, dims=2048, device="cpu", num_workers=0
        )
    ref = tmp_path / "ref.npz"
    ref_mu, ref_sigma = np.full(2048, 0.5), np.eye(2048)
    fid.save_stats(ref, ref_mu, ref_sigma, num_images=7)
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: calls.append(args) or 42.0)
    stats, feats = tmp_path / "stats.npz", tmp_path / "feats.npz"
    result = folder.evaluate_folder(
        tmp_path / "samples",
        inception_path=path,
        ref_stats=ref,
        save_stats=stats,
        save_features=feats,
        **mesh_kw(),
    )
    assert result["num_images"] == 3 and result["resize"] == "pytorch_fid"
    assert relative_error(fid.load_features(feats), act) < FEATURE_RTOL
    saved = fid.load_stats(stats)
    assert relative_error(saved["mu"], np.mean(act, axis=0)) < FEATURE_RTOL
    assert relative_error(saved["sigma"], np.cov(act, rowvar=False)) < FEATURE_RTOL
    assert saved["num_images"] == 3 and saved["resize"] == "pytorch_fid"
    ((mu, sigma, mu2, sigma2),) = calls
    np.testing.assert_array_equal(mu, saved["mu"])
    np.testing.assert_array_equal(sigma, saved["sigma"])
    np.testing.assert_array_equal(mu2, ref_mu)
    np.testing.assert_array_equal(sigma2, ref_sigma)
    assert result["fid"] == 42.0 and result["ref_stats"] == str(ref)
    assert result["ref_num_images"] == 7


def test_inception_clean_fid_convention(fid_reference, ours, reference):
    """clean-fid's resize (its own make_resizer), then (x - 128) / 128 as its InceptionV3W,
    then pytorch-fid's network on the 299x299 input without its resize / normalization."""
    model, _ = fid_reference
    resizer = reference("cleanfid.resize").make_resizer("PIL", False, "bicubic", (299, 299))
    x = images(2, seed=10)
    resized = np.stack([resizer(im) for im in x])
    model.resize_input, model.normalize_input = False, False
    try:
        with torch.no_grad():
            out = model(torch.from_numpy((resized - 128) / 128).permute(0, 3, 1, 2))
    finally:
        model.resize_input, model.normalize_input = True, True
    extractor = inception.FeatureExtractor(ours, resize="clean_fid", **mesh_kw())
    assert relative_error(extractor(list(x)), out[0][:, :, 0, 0].numpy()) < FEATURE_RTOL


def test_extractor_rejects_bad_images(ours):
    extractor = inception.FeatureExtractor(ours, **mesh_kw())
    with pytest.raises(ValueError, match=r"image 1: expected uint8 \[H, W, 3\], got float32"):
        extractor([images(1)[0], np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="no images"):
        extractor([])


def test_convert_to_safetensors_and_load(fid_reference, ours, tmp_path):
    """The converter writes the same tensors, and the safetensors file loads to the same
    parameters as the .pth."""
    _, path = fid_reference
    out = tmp_path / "fid_inception.safetensors"
    inception.convert(str(path), str(out))
    state = torch.load(path, weights_only=True)
    converted = inception.read_weights(out)
    assert sorted(converted) == sorted(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(converted[name].read(), tensor.numpy())
    a = jax.tree.leaves(nnx.state(inception.load_inception(out)))
    b = jax.tree.leaves(nnx.state(ours))
    assert len(a) == len(b) == 470  # 94 BasicConv2d: conv weight, BN scale/bias/mean/var
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_bad_weights(fid_reference, tmp_path):
    _, path = fid_reference
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        inception.load_inception(tmp_path / "missing.pth")
    state = torch.load(path, weights_only=True)
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["Mixed_5b.branch_typo.conv.weight"] = torch.zeros(1)
    state["Mixed_7c.branch_pool.bn.running_var"] = torch.ones(7)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as e:
        inception.load_inception(bad)
    message = str(e.value)
    assert "bad.pth" in message
    assert (
        "1 missing: Mixed_6b.branch7x7_2.conv.weight (expected shape (128, 128, 1, 7))" in message
    )
    assert "1 unexpected: Mixed_5b.branch_typo.conv.weight" in message
    assert "Mixed_7c.branch_pool.bn.running_var: checkpoint (7,), expected (192,)" in message
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(CheckpointError, match="junk.pth"):
        inception.load_inception(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------------------------
# A folder of images, and eval/fid.py
# ----------------------------------------------------------------------------------------------


def test_folder_manifest_and_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in .*empty"):
        folder.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="absent"):
        folder.list_images(tmp_path / "absent")
    d = tmp_path / "with_manifest"
    write_pngs(d / "images", images(2, shape=(4, 4)))
    (d / "images" / "extra.png").write_bytes(b"")  # not listed, so not read
    lines = [{"file": "images/001.png", "prompt": "a"}, {"file": "images/000.png"}]
    (d / folder.MANIFEST).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert folder.list_images(d) == [d / "images/001.png", d / "images/000.png"]
    (d / folder.MANIFEST).write_text(json.dumps({"file": "images/009.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:1: .*009.png"):
        folder.list_images(d)
    with pytest.raises(ValueError, match="resize must be one of"):
        folder.evaluate_folder(d, inception_path="x", resize="bicubic")


def test_evaluate_folder_checks_inputs_first(tmp_path):
    """An empty folder, or a reference of another resize convention, fails before the
    weights (here a missing file) are read."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in .*empty"):
        folder.evaluate_folder(tmp_path / "empty", inception_path="missing.pth")
    write_pngs(tmp_path / "samples", images(1, shape=(4, 4)))
    stats = tmp_path / "ref.npz"
    fid.save_stats(stats, np.zeros(2048), np.eye(2048), resize="clean_fid")
    with pytest.raises(ValueError, match="resize='clean_fid', not 'pytorch_fid'"):
        folder.evaluate_folder(tmp_path / "samples", inception_path="missing.pth", ref_stats=stats)
    with pytest.raises(ValueError, match="holds 1 image: FID statistics need at least 2"):
        folder.evaluate_folder(tmp_path / "samples", inception_path="missing.pth", save_stats=stats)
    with pytest.raises(FileNotFoundError, match="missing.pth.*GitHub releases, tag fid_weights"):
        folder.evaluate_folder(tmp_path / "samples", inception_path="missing.pth")


def test_eval_main(fid_reference, ours, tmp_path):
    """eval/fid.py (a subprocess on 2 devices): KID of a folder against features of another
    (computed here), and the folder's statistics and features written; the JSON names the
    weights, the convention and the count. (--ref_stats is covered in-process above.)"""
    _, path = fid_reference
    extractor = inception.FeatureExtractor(ours, **mesh_kw())
    ref_feats = extractor(list(images(3, seed=13)))
    fid.save_features(tmp_path / "ref_feats.npz", ref_feats)
    write_pngs(tmp_path / "samples", images(2, seed=14))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval" / "fid.py"),
            f"--samples={tmp_path / 'samples'}",
            f"--inception={path}",
            f"--kid_ref_features={tmp_path / 'ref_feats.npz'}",
            f"--save_stats={tmp_path / 'stats.npz'}",
            f"--save_features={tmp_path / 'feats.npz'}",
            f"--json={tmp_path / 'result.json'}",
            "--batch_size=2",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(out.stdout) == result
    assert result["num_images"] == 2 and result["resize"] == "pytorch_fid"
    assert result["inception"] == {"path": str(path), "sha256": inception.file_sha256(path)}
    assert "fid" not in result
    feats = fid.load_features(tmp_path / "feats.npz")
    assert relative_error(feats, extractor(list(images(2, seed=14)))) < FEATURE_RTOL
    stats = fid.load_stats(tmp_path / "stats.npz")
    np.testing.assert_allclose(stats["mu"], feats.mean(axis=0), rtol=1e-6)
    kid = result["kid"]
    assert kid["subset_size"] == 2 and kid["num_subsets"] == 100 and kid["ref_num_images"] == 3
    expected = fid.kernel_inception_distance(feats, ref_feats, subset_size=2)
    assert (kid["mean"], kid["std"]) == pytest.approx(expected, rel=1e-9)
