"""The models a demo serves, from `demo.py --pipeline` paths: stage sets and DeepFloyd IF
(`DemoModel`, both cascades), and public latent pipelines in diffusers layout
(`LatentDemoModel`).

A path is a folder of stage directories (ordered by resolution), one stage directory, a
diffusers directory (SD 1.x / 2.x, SDXL, SD 3, DeepFloyd IF stage I), or a comma-separated
list, base first: of stage directories, of an SDXL base and its refiner, or of IF stages I
and II.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from imagen_jax import stages as stages_lib
from imagen_jax.demo.latent_models import LatentDemoModel
from imagen_jax.demo.models import DemoModel
from imagen_jax.pipelines import deepfloyd, public, sampling


def _is_diffusers(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def find_model_dirs(path: str) -> tuple[str, list[str]]:
    """(kind, directories) of a `--pipeline` path: kind "stages" (stage directories, base
    first), "if" (DeepFloyd IF stage I and an optional stage II) or "latent" (a diffusers
    latent pipeline and an optional refiner)."""
    if "," in path:
        dirs = [p.strip() for p in path.split(",") if p.strip()]
    elif (
        os.path.isfile(os.path.join(path, "stage.json"))
        or _is_diffusers(path)
        or public.resolve_lora_export(path)[1] is not None  # a LoRA export: of its base
    ):
        dirs = [path]
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    else:
        dirs = sorted(
            os.path.join(path, n)
            for n in os.listdir(path)
            if os.path.isfile(os.path.join(path, n, "stage.json"))
        )
        if not dirs:
            raise FileNotFoundError(
                f"{path} holds no stage directory (a folder with stage.json) and is no "
                "diffusers pipeline (a folder with model_index.json)"
            )
        dirs = sorted(dirs, key=lambda d: stages_lib.read_stage_resolution(d))
    base = public.resolve_lora_export(dirs[0])[0]
    if not _is_diffusers(base):
        return "stages", dirs
    if deepfloyd.is_if_pipeline(base):
        if len(dirs) > 2:
            raise ValueError(f"{path}: DeepFloyd IF is stage I and an optional stage II")
        return "if", dirs
    return "latent", dirs


def load_models(paths: Sequence[str], *, batch_size: int = 4, shipped: bool = True) -> dict:
    """{name: model}: the shipped model (if `shipped`) and one per path. A path that fails
    to load is logged with its error and left out; the others are served."""
    lock = threading.Lock()  # one device: one program at a time, across models
    models: dict = {}
    wanted = [("shipped (shapes cascade)", "stages", sampling.shipped_stages(), True)]
    wanted = wanted if shipped else []
    for path in paths:
        try:
            kind, dirs = find_model_dirs(path)
        except (OSError, ValueError) as e:
            logging.error("demo: %s is left out: %s", path, e)
            continue
        name = "+".join(os.path.basename(os.path.normpath(d)) for d in dirs)
        if os.path.isdir(path) and "," not in path and len(dirs) > 1:
            name = os.path.basename(os.path.normpath(path))
        wanted.append((name, kind, dirs, False))
    for name, kind, dirs, is_shipped in wanted:
        try:
            if kind == "latent":
                model = LatentDemoModel(name, dirs, batch_size=batch_size, lock=lock)
            else:
                model = DemoModel(
                    name,
                    dirs,
                    batch_size=batch_size,
                    shipped=is_shipped,
                    lock=lock,
                    deepfloyd_if=kind == "if",
                )
        except Exception as e:  # noqa: BLE001 - any load failure: named, the rest served
            logging.error("demo: %s is left out: %s: %s", name, type(e).__name__, e)
            continue
        while name in models:
            name += "'"
        models[name] = model
    return models
