"""The models that ship with the repository, by name: what `sample.py --model=NAME` samples.

    shipped.stage_dirs()            # the default, "cascade": [.../base, .../sr]
    shipped.stage_dirs("latent")    # [.../latent], once it ships: one stage, its VAE inside

Each name maps to stage directories (`imagen_jax.stages`) under `checkpoints/shapes/`, base
first. A model registered before it ships (`released=False`) is refused in one line that
names its directory (a run in training may already keep its weights there, to resume from
in a later session: it is refused all the same). "latent" is a VAE + SD3-style MMDiT stage
exported from configs/shapes_mmdit.py with `python -m imagen_jax.training.export`.
"""

from __future__ import annotations

import dataclasses
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"
PROMPTS = ROOT / "prompts.txt"  # the shipped models' default prompts (the shapes domain)


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    stages: tuple[str, ...]  # folders under ROOT, base first
    about: str  # one line for --help
    released: bool = True  # False: registered, not shipped yet


MODELS = {
    "cascade": ShippedModel(("base", "sr"), "the shapes cascade, 32 px base then SR to 64 px"),
    "latent": ShippedModel(
        ("latent",),
        "a VAE + SD3-style MMDiT latent stage, 64 px and four wide or tall sizes (in training)",
        released=False,
    ),
}
DEFAULT = "cascade"


def describe() -> str:
    """The registry in one line, for --help."""
    return "; ".join(f"{name}: {m.about}" for name, m in MODELS.items())


def stage_dirs(name: str = DEFAULT) -> list[str]:
    """The stage directories of shipped model `name`, base first. An unknown name raises
    ValueError, a model whose directories are missing FileNotFoundError (one line each)."""
    if name not in MODELS:
        raise ValueError(f"--model={name!r}: the shipped models are {', '.join(MODELS)}")
    model = MODELS[name]
    dirs = [ROOT / folder for folder in model.stages]
    missing = [str(d) for d in dirs if not (d / "stage.json").is_file()]
    if not model.released:  # weights there are a run's resume point, still in training
        what = (
            f"{', '.join(missing)} holds no stage.json (export a trained run there with "
            "python -m imagen_jax.training.export, or give --stage)"
            if missing
            else f"{', '.join(map(str, dirs))} holds a run still in training (sample it with "
            "--stage=DIR, knowing it is unfinished)"
        )
        raise FileNotFoundError(f"--model={name} is not shipped yet: {what}")
    if missing:
        raise FileNotFoundError(
            f"the shipped model {name!r} is missing ({', '.join(missing)}); sample.py finds it "
            "in the repository's checkpoints/ folder: run it from a clone, or give --stage"
        )
    return [str(d) for d in dirs]
