"""Preprocessing: decode, square crop + resize, low-res downsampling, against PIL and numpy."""

import io

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import CorruptRecordError, decode_image, downsample, resize_and_crop
from imagen_jax.data.preprocess import decode_image_and_size, image_header_size, preprocess_record


def bands(height, width):
    """An image whose column index is written in its red channel: crops are readable."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None]
    image[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    return image


def test_centre_crop_takes_the_middle_square():
    wide, tall = bands(10, 30), bands(30, 10)
    np.testing.assert_array_equal(resize_and_crop(wide, resolution=10), wide[:, 10:20])
    np.testing.assert_array_equal(resize_and_crop(tall, resolution=10), tall[10:20])


def test_resize_matches_pil_bicubic_of_the_square():
    image = bands(40, 60)
    got = resize_and_crop(image, resolution=16)
    want = np.asarray(Image.fromarray(image[:, 10:50]).resize((16, 16), Image.BICUBIC))
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)


def test_random_crop_is_a_seeded_window_along_the_long_side():
    image = bands(10, 40)
    offsets = []
    for seed in range(20):
        crop = resize_and_crop(image, resolution=10, rng=np.random.default_rng(seed))
        again = resize_and_crop(image, resolution=10, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(crop, again)
        offset = int(crop[0, 0, 0])
        np.testing.assert_array_equal(crop, image[:, offset : offset + 10])
        offsets.append(offset)
    assert len(set(offsets)) > 5 and min(offsets) >= 0 and max(offsets) <= 30


@pytest.mark.parametrize("method", ["bicubic", "box"])
def test_downsample_is_an_antialiased_average(method):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    image = np.repeat(np.repeat(blocks, 4, 0), 4, 1)  # [32, 32, 3], constant 4x4 blocks
    small = downsample(image, resolution=8, method=method)
    assert small.shape == (8, 8, 3) and small.dtype == np.uint8
    if method == "box":
        np.testing.assert_array_equal(small, blocks)
    # Antialiased: each output pixel is (close to) the mean of its footprint, not one sample.
    noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    footprint_mean = noise.reshape(8, 8, 8, 8, 3).mean((1, 3))
    error = np.abs(downsample(noise, resolution=8, method=method) - footprint_mean).mean()
    assert error < 20  # a point sample of uniform noise would be off by ~64 on average


def test_decode_rejects_garbage_and_truncated_files_naming_them():
    buf = io.BytesIO()
    Image.fromarray(bands(64, 64)).save(buf, format="JPEG")
    data = buf.getvalue()
    assert decode_image(data, name="ok.jpg").shape == (64, 64, 3)
    with pytest.raises(CorruptRecordError, match="cut.jpg"):
        decode_image(data[: len(data) // 2], name="cut.jpg")
    with pytest.raises(CorruptRecordError, match="junk.jpg"):
        decode_image(b"\xff\xd8\xff junk", name="junk.jpg")


def test_preprocess_record_makes_low_res_from_the_target():
    record = {"image": bands(30, 50), "caption": "c", "key": "k"}
    base = preprocess_record(record, resolution=16)
    assert set(base) == {"image", "caption", "key"}
    sr = preprocess_record(record, resolution=16, low_resolution=4)
    np.testing.assert_array_equal(sr["image"], base["image"])
    np.testing.assert_array_equal(sr["low_res"], downsample(base["image"], resolution=4))


def test_reduced_scale_jpeg_decode_stays_close_to_the_full_decode():
    y, x = np.mgrid[0:256, 0:320] / 256
    image = 128 + 100 * np.stack([np.sin(5 * x), np.cos(7 * y), np.sin(3 * (x + y))], -1)
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    full = decode_image(buf.getvalue(), name="a.jpg")
    small = decode_image(buf.getvalue(), name="a.jpg", min_size=32)
    assert full.shape == (256, 320, 3) and small.shape == (64, 80, 3)  # 1/4: short side >= 64
    a, b = (resize_and_crop(im, resolution=32).astype(int) for im in (full, small))
    assert np.abs(a - b).mean() < 1.5
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), name="a.png", min_size=32).shape == full.shape


def test_the_shown_size_survives_a_reduced_scale_decode_and_exif_rotation():
    """SDXL's size conditioning needs the image's size as shown: the header's, rotated by
    its EXIF orientation (6: 90 degrees), not the pixels of a reduced-scale decode."""
    stored = np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    image, size = decode_image_and_size(data, name="a.jpg", min_size=24)
    assert size == (320, 200) and image.shape == (80, 50, 3)  # shown 320 x 200, read at 1/4
    assert image_header_size(data, name="a.jpg") == (320, 200)
    record = {"image": image, "caption": "", "key": "a", "size": size}
    ids = preprocess_record(record, resolution=(24, 16), size_crop=True)["size_crop"]
    assert tuple(ids) == (320, 200, 1, 0, 24, 16)  # 75 of 80 rows kept: 2 above, 1 at 24 px
