"""Image-to-image and inpainting through the cascade (`cascade.Edit`) on the tiny stages
(`stage_dirs`, conftest.py: a base stage of 8 px and a super-resolution stage 8 -> 16 px)."""

import numpy as np
import pytest

from imagen_jax.images import resize_batch
from imagen_jax.pipelines import cascade as cascade_lib
from imagen_jax.pipelines import jobs, sampling


def _items(n=2):
    return [jobs.WorkItem(p, 0, jobs.PromptEntry(f"a red circle {p}")) for p in range(n)]


def _image_and_mask():
    image = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[:, 4:12, 6:14] = 1.0  # regenerate a square of the final images
    return image, mask


@pytest.fixture(scope="module")
def cascade(stage_dirs):
    return sampling.load_cascade(stage_dirs)[0]


def test_inpainting_keeps_the_unmasked_region_at_every_stage(cascade):
    image, mask = _image_and_mask()
    edit = cascade_lib.Edit(image, mask, repaint_jump=2, repaint_resample=2)
    base, final = cascade.sample(_items(), seed=3, edit=edit)
    keep = np.broadcast_to(mask[..., None] == 0, final.shape)
    np.testing.assert_array_equal(final[keep], image[keep])
    assert np.abs(final - image)[~keep].mean() > 0.1
    # The base stage keeps the image resized to its 8 px where the resized mask is 0.
    small = np.asarray(resize_batch(image, (8, 8)))
    small_mask = np.asarray(resize_batch(mask[..., None], (8, 8)))
    keep_small = np.broadcast_to(small_mask == 0, base.shape)
    assert keep_small.any() and not keep_small.all()
    np.testing.assert_array_equal(base[keep_small], small[keep_small])
    uint8 = cascade(_items(), seed=3, edit=edit)[-1]
    np.testing.assert_array_equal(uint8[keep], cascade_lib.to_uint8(image)[keep])


def test_strength_at_the_base_stage(cascade):
    image, _ = _image_and_mask()
    plain = cascade.sample(_items(), seed=4)
    same = cascade.sample(_items(), seed=4, edit=cascade_lib.Edit(image, strength=1.0))
    for a, b in zip(plain, same, strict=True):
        np.testing.assert_array_equal(a, b)
    small = np.asarray(resize_batch(image, (8, 8)))
    start = cascade.sample(_items(), seed=4, edit=cascade_lib.Edit(image, strength=0.0))[0]
    np.testing.assert_array_equal(start, small)
    halfway = cascade.sample(_items(), seed=4, edit=cascade_lib.Edit(image, strength=0.5))[0]
    assert np.abs(halfway - small).mean() > 1e-3 and np.abs(halfway - plain[0]).mean() > 1e-3


def test_bad_edits_are_named(cascade):
    image, mask = _image_and_mask()
    with pytest.raises(ValueError, match=r"edit mask has shape \(2, 8, 8\); expected"):
        cascade.sample(_items(), seed=0, edit=cascade_lib.Edit(image, mask[:, :8, :8]))
    with pytest.raises(ValueError, match=r"edit image has shape \(1, 16, 16, 3\)"):
        cascade.sample(_items(), seed=0, edit=cascade_lib.Edit(image[:1], mask[:1]))
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\], got 2"):
        cascade.sample(_items(), seed=0, edit=cascade_lib.Edit(image, strength=2))
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\], got min -1.0"):
        cascade.sample(_items(), seed=0, edit=cascade_lib.Edit(image, -mask))
