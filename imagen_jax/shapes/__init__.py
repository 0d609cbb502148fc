"""The shapes domain: procedural scenes of coloured shapes with captions, mirroring the six
GenEval tasks, and the scorer that reads an image back. The project's embedded training
data and its compositional yardstick.

    from imagen_jax.shapes import parse_prompt, sample_scene, score
    from imagen_jax.shapes.render import render

    rng = np.random.default_rng(seed)
    scene, caption = sample_scene(rng)                 # the training mixture
    image = render(scene, 64)                          # uint8 [64, 64, 3]
    result = score(image, parse_prompt(caption))       # reads the image, checks the prompt

(The package exports `render` the module; the function is `render.render`.)

Modules: `spec` (scene and prompt dataclasses, the vocabulary and palette), `geometry`
(outlines, relations), `render`, `grammar` (captions and their parser), `splits` (the
held-out combinations), `tasks` (scene and prompt sampling per task), `scorer`,
`prompt_sets` (the checked-in evaluation prompts), `accuracy` (a folder of samples),
`relation_probe` (does a base stage read the relation word, and at which noise levels).
"""

from imagen_jax.shapes import render
from imagen_jax.shapes.grammar import caption, parse_prompt
from imagen_jax.shapes.prompt_sets import PromptRecord, load_prompts
from imagen_jax.shapes.scorer import Detection, Reading, Result, read_image, score
from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    TASKS,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
)
from imagen_jax.shapes.splits import SPLITS
from imagen_jax.shapes.tasks import Example, sample_example, sample_prompt_spec, sample_scene

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "Detection",
    "Example",
    "ObjectSpec",
    "PromptRecord",
    "PromptSpec",
    "Reading",
    "Result",
    "Scene",
    "SceneObject",
    "caption",
    "load_prompts",
    "parse_prompt",
    "read_image",
    "render",
    "sample_example",
    "sample_prompt_spec",
    "sample_scene",
    "score",
]
