"""Named auxiliary loss terms, added to the denoising loss when a config turns them on.

    config.train.aux_losses.NAME = ml_collections.ConfigDict(dict(
        fn="imagen_jax.proj.shapes.losses:layout",  # module:factory, imported by name
        weight=1.0,                                   # 0 = off
        ...))                                         # the factory's keyword arguments

The generic step knows no term: it imports each factory by the name its config gives, so
research code (`imagen_jax/proj/`) plugs in without the library importing it. A factory is
called once per step function,

    term = factory(net, schedule=schedule, diffusion=config.diffusion, **kwargs)

(None: the term has nothing to do for this network), and the term once per
(micro-)batch, inside the differentiated loss:

    loss, metrics = term(model, x0, batch, key)

(model: the merged network; x0: what the stage generates, [-1, 1] images or latents; batch:
the device batch; key: the term's own key). Terms run in the order of their names and get
keys `fold_in(loss_key, 1 + i)`; the step adds `weight * loss` and logs `metrics`
(replicated scalars).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import ml_collections


@dataclasses.dataclass(frozen=True)
class AuxTerm:
    name: str
    weight: float
    term: Callable


def _factory(name: str, fn: str) -> Callable:
    module, _, attr = str(fn).partition(":")
    if not module or not attr:
        raise ValueError(
            f"train.aux_losses.{name}.fn={fn!r}: expected 'package.module:factory', e.g. "
            "'imagen_jax.proj.shapes.losses:layout'"
        )
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"train.aux_losses.{name}.fn={fn!r} cannot be imported: {e}") from e


def make_terms(config: ml_collections.ConfigDict, net, schedule) -> list[AuxTerm]:
    """The terms of `config.train.aux_losses` whose weight is not 0, in name order."""
    groups = config.train.get("aux_losses", None) or {}
    terms = []
    for name in sorted(groups.keys()):
        cfg = dict(groups[name])
        if "fn" not in cfg or "weight" not in cfg:
            raise ValueError(f"train.aux_losses.{name} needs 'fn' and 'weight'; it has {cfg}")
        fn, weight = cfg.pop("fn"), float(cfg.pop("weight"))
        if weight == 0:
            continue
        factory = _factory(name, fn)
        term = factory(net, schedule=schedule, diffusion=config.diffusion, **cfg)
        if term is not None:  # the factory found nothing to add for this network
            terms.append(AuxTerm(name, weight, term))
    return terms
