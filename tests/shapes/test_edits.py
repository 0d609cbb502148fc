"""The shapes inpainting tasks (`imagen_jax/shapes/edits.py`): each is solvable inside its
mask (the rendered target passes the scorer and equals the image outside the mask), the
original image fails the edited prompt, and the edit names a pair of the requested split."""

import numpy as np
import pytest

from imagen_jax.shapes import edits, grammar, splits
from imagen_jax.shapes.scorer import score


@pytest.mark.parametrize("kind", edits.KINDS)
@pytest.mark.parametrize("split", edits.EDIT_SPLITS)
def test_tasks_are_solvable_inside_their_masks(kind, split):
    rng = np.random.default_rng(0)
    for _ in range(12):
        task = edits.inpainting_task(rng, kind=kind, split=split, resolution=64)
        target = edits.render(task.target, 64)
        keep = task.keep
        assert 0.02 < task.mask.mean() < 0.5
        np.testing.assert_array_equal(target[keep], task.image[keep])
        assert score(target, task.spec).passed, task.prompt
        assert not score(task.image, task.spec).passed, task.prompt
        stated = grammar.parse_prompt(task.prompt)
        assert stated.canonical() == task.spec.constraints().canonical()
        old, new = task.scene.objects[task.edited], task.target.objects[task.edited]
        assert getattr(old, kind) != getattr(new, kind)
        assert ((new.color, new.shape) in splits.HELDOUT_PAIRS) == (split == "heldout")
        other = edits.footprint(task.scene, 1 - task.edited, 64)
        assert not (task.mask.astype(bool) & other).any()  # the other object is kept


def test_bad_task_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="inpainting kind 'size'"):
        edits.inpainting_task(rng, kind="size")
    with pytest.raises(ValueError, match="inpainting split 'validation'"):
        edits.inpainting_task(rng, kind="color", split="validation")
