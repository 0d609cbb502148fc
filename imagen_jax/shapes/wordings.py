"""Wordings of the shapes domain: caption templates beyond the grammar's, and a set of them
held out of training entirely.

A caption is built from four slots, each filled by a named template:

    sentence    how the object groups (and their relation) are put together
    object      how a group's colour and count are said ("a red circle", "a circle in red")
    background  how the background is said
    surface     case and a closing full stop

Three wording sets:

    "grammar"   `grammar.caption`: the phrasings the first shipped models were trained on.
    "train"     the grammar's forms and the templates below marked "train" (reversed
                orders, "with B to its right", "on the left A, on the right B", relative
                clauses, "X-colored", "in X", digits, shape and relation synonyms, ...).
    "heldout"   templates marked "heldout", which no training caption uses: every held-out
                caption has a held-out sentence template ("B has A to its left", "to the
                left of B there is A", "A placed left of B", "left: A; right: B", "B, and
                A to the left of it", "A together with B", "an illustration of A", ...),
                and its object and background slots take held-out forms ("a group of
                three stars", "a star painted red", "in front of a black background", "the
                background is black") where the spec has them, half of the time.

`caption(spec, rng, wordings)` words a spec; `compose` also returns the template names used,
so that tests can check that a held-out caption never used only training templates and a
training caption never a held-out one. Every caption parses (`grammar.parse_prompt`) back to
a spec with the same `canonical()` constraints: the scorer is unchanged. The templates are
listed in docs/shapes_domain.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from imagen_jax.shapes import grammar
from imagen_jax.shapes.spec import INVERSE_RELATION, PLURALS, ObjectSpec, PromptSpec

WORDINGS = ("grammar", "train", "heldout")

_SIDES = {  # (side of A, side of B) for each relation of A to B
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
_SIDE_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_TRAIN_FRAMES = (*grammar.FRAMES, "a rendering of")
_HELDOUT_FRAMES = ("an illustration of", "a scene showing", "here you can see", "we see")
assert set(_TRAIN_FRAMES + _HELDOUT_FRAMES) - set(grammar.FRAMES) == set(grammar.EXTRA_FRAMES)


def check_wordings(name: str) -> str:
    if name not in WORDINGS:
        raise ValueError(f"unknown wordings {name!r}; expected one of {WORDINGS}")
    return name


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------------
# Object phrases
# ----------------------------------------------------------------------------------------------


def _noun(group: ObjectSpec, rng: np.random.Generator) -> str:
    synonyms = [words for words, shape in grammar.SHAPE_SYNONYMS.items() if shape == group.shape]
    if synonyms and rng.random() < 0.15:
        singular, plural = synonyms[0]
        return singular if group.count == 1 else plural
    return group.shape if group.count == 1 else PLURALS[group.shape]


def _det(group: ObjectSpec, rng: np.random.Generator, form: str, first_word: str) -> str:
    if group.count == 1:
        return grammar._article(first_word)
    if form == "group":
        return f"a group of {grammar.NUMBER_WORDS[group.count]}"
    if form == "pair":
        return "a pair of"
    if form == "digits":
        return str(group.count)
    return grammar.NUMBER_WORDS[group.count]


# Colour forms: template name -> (split, words before the noun, words after it).
_COLOR_FORMS: dict[str, tuple[str, Callable[[str, bool], tuple[str, str]]]] = {
    "color_adjective": ("train", lambda c, one: (c, "")),
    "color_that_is": ("train", lambda c, one: ("", f"that {'is' if one else 'are'} {c}")),
    "color_hyphen": ("train", lambda c, one: (f"{c}-colored", "")),
    "color_in": ("train", lambda c, one: ("", f"in {c}")),
    "color_which_is": ("heldout", lambda c, one: ("", f"which {'is' if one else 'are'} {c}")),
    "color_painted": ("heldout", lambda c, one: ("", f"painted {c}")),
}
_COUNT_FORMS = {
    "count_word": "train",
    "count_digits": "train",
    "count_group": "heldout",
    "count_pair": "heldout",
}


def object_phrase(group: ObjectSpec, rng: np.random.Generator, split: str, used: list) -> str:
    """A group's words in a wording split's forms: held-out forms half of the time where the
    group has a colour or a count to say (always a training form otherwise)."""
    size = grammar._choice(rng, grammar.SIZE_WORDS[group.size]) if group.size else None
    before, after = "", ""
    if group.color:
        forms = [n for n, (s, _) in _COLOR_FORMS.items() if s == "train"]
        if split == "heldout" and rng.random() < 0.5:
            forms = [n for n, (s, _) in _COLOR_FORMS.items() if s == "heldout"]
        # The training forms: the adjective as often as the grammar uses it, the others alike.
        weights = np.array([3.0 if f == "color_adjective" else 1.0 for f in forms])
        form = forms[int(rng.choice(len(forms), p=weights / weights.sum()))]
        used.append(form)
        before, after = _COLOR_FORMS[form][1](group.color, group.count == 1)
    det_form = None
    if group.count > 1:
        forms = ["count_word", "count_digits"]
        if split == "heldout" and rng.random() < 0.5:
            forms = ["count_group"] + (["count_pair"] if group.count == 2 else [])
        det_form = _choice(rng, forms)
        used.append(det_form)
    words = " ".join(w for w in (size, before, _noun(group, rng)) if w)
    det = _det(group, rng, (det_form or "").removeprefix("count_"), words)
    return " ".join(w for w in (det, words, after) if w)


# ----------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------


def _rel(rng, relation: str) -> str:
    extra = grammar.EXTRA_RELATION_WORDS.get(relation, ())
    return _choice(rng, grammar.RELATION_WORDS[relation] + extra)


def _its(rng, relation: str) -> str:
    return _choice(rng, grammar.ITS_WORDS[relation])


@dataclasses.dataclass(frozen=True)
class Template:
    """A sentence template: its split, which specs it words, and the words (a, b: object
    phrases, None for b when there is one group; rel: the spec's relation)."""

    split: str
    applies: Callable[[PromptSpec], bool]
    words: Callable[[np.random.Generator, str, str | None, str | None], str]


def _related(spec: PromptSpec) -> bool:
    return spec.relation is not None


def _pair(spec: PromptSpec) -> bool:
    return spec.relation is None and len(spec.objects) == 2


def _listed(spec: PromptSpec) -> bool:
    return spec.relation is None


def _one(spec: PromptSpec) -> bool:
    return len(spec.objects) == 1


def _sides(rng, rel, a, b, *, fronted: bool, labels: bool = False) -> str:
    side_a, side_b = _SIDES[rel]
    if labels:
        return f"{side_a}: {a}; {side_b}: {b}"
    if fronted:
        return f"{_SIDE_PHRASE[side_a]} {a}, {_SIDE_PHRASE[side_b]} {b}"
    return f"{a} {_SIDE_PHRASE[side_a]} and {b} {_SIDE_PHRASE[side_b]}"


SENTENCES: dict[str, Template] = {
    # Relations (two single objects: A `rel` B).
    "rel_is": Template("train", _related, lambda r, rel, a, b: f"{a} is {_rel(r, rel)} {b}"),
    "rel_bare": Template("train", _related, lambda r, rel, a, b: f"{a} {_rel(r, rel)} {b}"),
    "rel_there": Template(
        "train", _related, lambda r, rel, a, b: f"there is {a} {_rel(r, rel)} {b}"
    ),
    "rel_frame": Template(
        "train",
        _related,
        lambda r, rel, a, b: f"{_choice(r, _TRAIN_FRAMES)} {a} {_rel(r, rel)} {b}",
    ),
    "rel_sides": Template(
        "train", _related, lambda r, rel, a, b: _sides(r, rel, a, b, fronted=False)
    ),
    "rel_reversed": Template(
        "train", _related, lambda r, rel, a, b: f"{b} is {_rel(r, INVERSE_RELATION[rel])} {a}"
    ),
    "rel_that_is": Template(
        "train", _related, lambda r, rel, a, b: f"{a} that is {_rel(r, rel)} {b}"
    ),
    "rel_with_its": Template(
        "train", _related, lambda r, rel, a, b: f"{a} with {b} {_its(r, INVERSE_RELATION[rel])}"
    ),
    "rel_fronted_sides": Template(
        "train", _related, lambda r, rel, a, b: _sides(r, rel, a, b, fronted=True)
    ),
    "rel_fronted_verb": Template(
        "train",
        _related,
        lambda r, rel, a, b: f"{_rel(r, rel)} {b} {_choice(r, ('sits', 'stands'))} {a}",
    ),
    "rel_with_it": Template(
        "train", _related, lambda r, rel, a, b: f"{b} with {a} {_rel(r, rel)} it"
    ),
    "rel_has_its": Template(
        "heldout", _related, lambda r, rel, a, b: f"{b} has {a} {_its(r, rel)}"
    ),
    "rel_fronted": Template(
        "heldout", _related, lambda r, rel, a, b: f"{_rel(r, rel)} {b} there is {a}"
    ),
    "rel_placed": Template(
        "heldout",
        _related,
        lambda r, rel, a, b: (
            f"{a} {_choice(r, ('placed', 'positioned', 'sitting'))} {_rel(r, rel)} {b}"
        ),
    ),
    "rel_labels": Template(
        "heldout", _related, lambda r, rel, a, b: _sides(r, rel, a, b, fronted=True, labels=True)
    ),
    "rel_and_it": Template(
        "heldout", _related, lambda r, rel, a, b: f"{b}, and {a} {_rel(r, rel)} it"
    ),
    # Lists of one or two groups.
    "list_bare": Template(
        "train", _listed, lambda r, rel, a, b: a if b is None else f"{a} and {b}"
    ),
    "list_frame": Template(
        "train",
        _listed,
        lambda r, rel, a, b: f"{_choice(r, _TRAIN_FRAMES)} {a if b is None else f'{a} and {b}'}",
    ),
    "list_both": Template("train", _pair, lambda r, rel, a, b: f"both {a} and {b}"),
    "list_as_well_as": Template("train", _pair, lambda r, rel, a, b: f"{a} as well as {b}"),
    "list_along_with": Template("train", _pair, lambda r, rel, a, b: f"{a} along with {b}"),
    "list_together_with": Template("heldout", _pair, lambda r, rel, a, b: f"{a} together with {b}"),
    "list_with": Template("heldout", _pair, lambda r, rel, a, b: f"{a} with {b}"),
    "list_alongside": Template("heldout", _pair, lambda r, rel, a, b: f"{a} alongside {b}"),
    "list_heldout_frame": Template(
        "heldout",
        _listed,
        lambda r, rel, a, b: f"{_choice(r, _HELDOUT_FRAMES)} {a if b is None else f'{a} and {b}'}",
    ),
}

# Background forms: name -> (split, words; `sentence` is the caption so far).
BACKGROUNDS: dict[str, tuple[str, Callable[[str, str], str]]] = {
    "bg_on": ("train", lambda s, bg: f"{s} on a {bg} background"),
    "bg_against": ("train", lambda s, bg: f"{s} against a {bg} background"),
    "bg_comma": ("train", lambda s, bg: f"{s}, {bg} background"),
    "bg_with": ("train", lambda s, bg: f"{s} with a {bg} background"),
    "bg_over": ("train", lambda s, bg: f"{s} over a {bg} background"),
    "bg_backdrop": ("train", lambda s, bg: f"{s} on a {bg} backdrop"),
    "bg_in_front": ("heldout", lambda s, bg: f"{s} in front of a {bg} background"),
    "bg_clause": ("heldout", lambda s, bg: f"{s}, and the background is {bg}"),
}


def _surface(text: str, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.25:
        text = text[0].upper() + text[1:]
    elif u < 0.3:
        text = text.title()
    return text + "." if rng.random() < 0.2 else text


def compose(spec: PromptSpec, rng: np.random.Generator, wordings: str) -> tuple[str, list[str]]:
    """A caption of `spec` in a wording set, and the names of the templates it used
    (grammar.caption's for "grammar", recorded as ["grammar"])."""
    check_wordings(wordings)
    if wordings == "grammar":
        return grammar.caption(spec, rng), ["grammar"]
    used: list[str] = []
    phrases = [object_phrase(g, rng, wordings, used) for g in spec.objects]
    if len(phrases) > 2:  # three groups: a plain list (the task samplers draw at most two)
        sentence_name = "list_bare"
        text = " and ".join(phrases)
    else:
        names = [n for n, t in SENTENCES.items() if t.split == wordings and t.applies(spec)]
        sentence_name = _choice(rng, names)
        a, b = phrases if len(phrases) == 2 else (phrases[0], None)
        text = SENTENCES[sentence_name].words(rng, spec.relation, a, b)
    used.insert(0, sentence_name)
    if spec.background is not None:
        names = [n for n, (s, _) in BACKGROUNDS.items() if s == wordings]
        name = _choice(rng, names)
        used.append(name)
        text = BACKGROUNDS[name][1](text, spec.background)
    return _surface(text, rng), used


def caption(spec: PromptSpec, rng: np.random.Generator, wordings: str = "train") -> str:
    """A caption of `spec` in a wording set ("grammar" | "train" | "heldout")."""
    return compose(spec, rng, wordings)[0]


def template_split(name: str) -> str:
    """The split ("train" | "heldout") of a template name `compose` records."""
    if name == "grammar":
        return "train"
    if name in SENTENCES:
        return SENTENCES[name].split
    if name in BACKGROUNDS:
        return BACKGROUNDS[name][0]
    if name in _COLOR_FORMS:
        return _COLOR_FORMS[name][0]
    if name in _COUNT_FORMS:
        return _COUNT_FORMS[name]
    raise ValueError(f"unknown template {name!r}")
