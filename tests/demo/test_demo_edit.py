"""The demo's editing tab over the tiny stages (conftest.py), driven with gradio_client: an
inpainting request's PNGs are byte for byte `sample.py --init_image --mask`'s for the files
the page wrote, the unpainted region is kept, and bad input is answered on the page while
the server goes on."""

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from imagen_jax.pipelines import jobs, sampling

NAME = "base+sr"


def _editor(tmp_path, *, painted=True):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    layer = np.zeros((16, 16, 4), np.uint8)
    if painted:
        layer[4:12, 6:14] = 255  # white strokes, opaque
    Image.fromarray(layer).save(tmp_path / "layer.png")
    value = {
        "background": handle_file(str(tmp_path / "image.png")),
        "layers": [handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }
    return image, layer[..., 3] > 0, value


def _edit(client, value, **over):
    args = dict(
        model=NAME, value=value, prompt="a red circle", negative="", seed=3, random_seed=False,
        images=2, strength=1.0, jump=0, resample=1,
    )  # fmt: skip
    args.update(over)
    return client.predict(*args.values(), api_name="/edit")


def test_inpainting_is_byte_for_byte_sample_py(server, stage_dirs, tmp_path):
    _, client, _ = server
    image, painted, value = _editor(tmp_path)
    gallery, files, info, seed = _edit(client, value)
    assert seed == 3 and len(files) == 2 and "--init_image=" in info and "--mask=" in info
    meta = jobs.read_metadata(files[0])
    edit = meta["edit"]
    summary = sampling.run_sampling_job(
        stages=stage_dirs, prompts=["a red circle"], prompts_file=None, negative_prompt="",
        images_per_prompt=2, seed=3, batch_size=2, outdir=str(tmp_path / "cli"), overrides=[],
        grid=False, init_image=edit["init_image"]["path"], mask=edit["mask"]["path"],
    )  # fmt: skip
    assert summary["made"] == 2
    for k, path in enumerate(files):
        with open(path, "rb") as f, open(tmp_path / f"cli/images/000000_00{k}.png", "rb") as g:
            assert f.read() == g.read(), f"image {k} differs from sample.py's"
        png = np.asarray(Image.open(path))
        np.testing.assert_array_equal(png[~painted], image[~painted])


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (dict(strength=1.5), "greater than maximum value 1"),  # the slider refuses it
        (dict(prompt=""), "enter a prompt"),
        (dict(value=None), "upload an image to edit"),
        (dict(jump=0, resample=3, strength=0.5), None),  # resample without jump: ignored
    ],
)
def test_bad_input_is_answered_and_the_server_goes_on(server, tmp_path, over, message):
    _, client, _ = server
    _, _, value = _editor(tmp_path)
    given = over.pop("value", value)
    if message is None:
        _, files, _, _ = _edit(client, given, **over)
        assert len(files) == 2
        return
    with pytest.raises(Exception, match=message):
        _edit(client, given, **over)
    _, files, _, _ = _edit(client, value, images=1)  # still serving
    assert len(files) == 1


def test_nothing_painted_is_image_to_image(server, tmp_path):
    _, client, _ = server
    _, _, value = _editor(tmp_path, painted=False)
    _, files, info, _ = _edit(client, value, strength=0.5, images=1)
    assert "nothing painted: image-to-image at strength 0.5" in info
    assert jobs.read_metadata(files[0])["edit"]["mask"] is None
