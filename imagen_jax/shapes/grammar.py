"""Captions from prompt specs, and the parser that recovers a spec from a caption.

`caption(spec, rng)` words a `PromptSpec` with varied, natural phrasing: framings ("a photo
of ...", "there are ..."), synonyms for sizes ("big", "little") and relations ("over",
"beneath", "on the left and ... on the right"), colour as an adjective or after the noun
("a star that is green"), counts spelled out ("three"), and the background before or after
the objects. It never reorders the groups, so `parse_prompt(caption(spec, rng))` returns
the spec's constraints exactly (tested on thousands of random specs).

`parse_prompt(text)` reads every phrasing `caption` produces, and plain hand-written prompts
in the same vocabulary ("a red circle above a blue square", "3 stars on a white
background"); anything else raises ValueError naming the prompt. Accepted on top of what
`caption` writes: digits for counts, "grey", "colour(ed)", "an"/"a" regardless of the next
word, case and punctuation.
"""

from __future__ import annotations

import re

import numpy as np

from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    COLORS,
    INVERSE_RELATION,
    MAX_COUNT,
    PLURALS,
    RELATIONS,
    ObjectSpec,
    PromptSpec,
)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# "A on the left and B on the right": the sides of A and B for each relation of A to B.
SIDE_WORDS = {
    "left of": ("on the left", "on the right"),
    "right of": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}
FRAMES = ("a photo of", "an image of", "a picture of", "a drawing of")


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(group: ObjectSpec, rng: np.random.Generator, *, postfix_color: bool) -> str:
    """'a small red circle', 'three big stars', 'a star that is green', ..."""
    size = _choice(rng, SIZE_WORDS[group.size]) if group.size else None
    noun = group.shape if group.count == 1 else PLURALS[group.shape]
    after = ""
    words = [size, group.color, noun]
    if group.color and postfix_color:
        words = [size, noun]
        after = f" that {'is' if group.count == 1 else 'are'} {group.color}"
    phrase = " ".join(w for w in words if w)
    det = _article(phrase) if group.count == 1 else NUMBER_WORDS[group.count]
    return f"{det} {phrase}{after}"


def _sentence(spec: PromptSpec, rng: np.random.Generator) -> tuple[str, bool]:
    """The caption without its background; and whether it is a bare list of objects."""
    groups = spec.objects
    postfix = len(groups) == 1 and rng.random() < 0.15
    nps = [noun_phrase(g, rng, postfix_color=postfix) for g in groups]
    if spec.relation is not None:
        a, b = nps
        form = int(rng.integers(5))
        if form == 0:
            side_a, side_b = SIDE_WORDS[spec.relation]
            return f"{a} {side_a} and {b} {side_b}", False
        rel = _choice(rng, RELATION_WORDS[spec.relation])
        if form == 1:
            return f"{a} is {rel} {b}", False
        if form == 2:
            return f"there is {a} {rel} {b}", False
        if form == 3:
            return f"{_choice(rng, FRAMES)} {a} {rel} {b}", False
        return f"{a} {rel} {b}", True
    listed = " and ".join(nps)
    form = int(rng.integers(4))
    if form == 0:
        return f"{_choice(rng, FRAMES)} {listed}", False
    if form == 1:
        return f"there {'is' if groups[0].count == 1 else 'are'} {listed}", False
    if form == 2 and len(groups) == 1 and groups[0].count > 1:
        return f"exactly {listed}", False
    return listed, True


def caption(spec: PromptSpec, rng: np.random.Generator) -> str:
    """A natural-language prompt stating exactly the spec's constraints (not its task)."""
    text, bare = _sentence(spec, rng)
    if spec.background is None:
        return text
    bg = spec.background
    form = int(rng.integers(5 if bare else 4))
    if form == 0:
        return f"{text} on a {bg} background"
    if form == 1:
        return f"{text} against a {bg} background"
    if form == 2:
        return f"{text}, {bg} background"
    if form == 3:
        return f"{text} with a {bg} background"
    return f"a {bg} background with {text}"


# ----------------------------------------------------------------------------------------------
# Words the grammar's captions never use, which the parser reads (the wordings of
# `imagen_jax.shapes.wordings` use them)
# ----------------------------------------------------------------------------------------------

# Nouns that name a shape: (singular, plural) -> the shape.
SHAPE_SYNONYMS = {
    ("disc", "discs"): "circle",
    ("box", "boxes"): "square",
    ("plus sign", "plus signs"): "cross",
}
EXTRA_RELATION_WORDS = {"above": ("on top of",), "below": ("underneath",)}
# "A with B to its right": where B stands relative to A (the relation of B to A).
ITS_WORDS = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it", "over it", "on top of it"),
    "below": ("below it", "under it", "beneath it", "underneath it"),
}
# Framings before the objects, beyond FRAMES and "there is / are".
EXTRA_FRAMES = (
    "a rendering of",
    "an illustration of",
    "a scene showing",
    "here you can see",
    "we see",
)
# Joining two object groups, beyond "and".
JOINERS = ("as well as", "along with", "together with", "alongside", "with")
# Verbs between an object and its relation ("a circle placed left of a star").
LINKS = ("that is", "which is", "that sits", "placed", "positioned", "sitting", "located")

# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

_COLOR = "|".join(COLORS)
_BACKGROUND = "|".join(BACKGROUNDS)
_SIZE = "|".join(w for words in SIZE_WORDS.values() for w in words)
_NOUN = "|".join(sorted([*PLURALS, *PLURALS.values()], key=len, reverse=True))
_COUNT = "|".join(["a", "an", *NUMBER_WORDS.values(), r"\d+"])
_SIZE_OF = {w: name for name, words in SIZE_WORDS.items() for w in words}
_SINGULAR = {**{s: s for s in PLURALS}, **{p: s for s, p in PLURALS.items()}}
_COUNT_OF = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_RELATION_OF = {
    w: rel
    for table in (RELATION_WORDS, EXTRA_RELATION_WORDS)
    for rel, words in table.items()
    for w in words
}
_ITS_OF = {w: rel for rel, words in ITS_WORDS.items() for w in words}
# Side words (grammar's "A on the left and B on the right", the wordings' "on the left A, on
# the right B" and "left: A; right: B") -> which side.
_SIDE_OF = {
    "on the left": "left",
    "on the right": "right",
    "at the top": "top",
    "at the bottom": "bottom",
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
}
_SIDE_RELATION = {
    ("left", "right"): "left of",
    ("right", "left"): "right of",
    ("top", "bottom"): "above",
    ("bottom", "top"): "below",
}


def _alternatives(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


def _synonym_rules():
    rules = []
    for (singular, plural), shape in SHAPE_SYNONYMS.items():
        rules.append((re.compile(rf"\b{plural}\b"), PLURALS[shape]))
        rules.append((re.compile(rf"\b{singular}\b"), shape))
    return rules


_SYNONYMS = _synonym_rules()
_NP = re.compile(
    rf"^(?:exactly )?(?P<det>{_COUNT}) "
    rf"(?:(?P<size>{_SIZE}) )?(?:(?P<color>{_COLOR}) (?:colored )?)?(?:(?P<size2>{_SIZE}) )?"
    rf"(?P<noun>{_NOUN})"
    rf"(?: (?:that (?:is|are)|which (?:is|are)|colored|painted|in) (?P<color2>{_COLOR}))?$"
)
_BG_PREFIX = re.compile(rf"^(?:a |an |the )?(?P<bg>{_BACKGROUND}) background with ")
_BG_ANYWHERE = re.compile(
    rf"(?: (?:on|against|with|over|in front of)(?: a| an| the)?)? (?P<bg>{_BACKGROUND}) "
    r"background\b"
)
_BG_CLAUSE = re.compile(rf"(?: and)? the background is (?P<bg>{_BACKGROUND})\b")
_FRAME = re.compile(
    r"^(?:(?:a|an) (?:photo|picture|drawing|image) (?:of|with)|there (?:is|are)|"
    + _alternatives(EXTRA_FRAMES)
    + r") "
)
_SIDE = _alternatives(_SIDE_OF)
_SIDES = re.compile(rf"^(?P<a>.+?) (?P<sa>{_SIDE}) and (?P<b>.+?) (?P<sb>{_SIDE})$")
_FRONT_SIDES = re.compile(rf"^(?P<sa>{_SIDE}) (?P<a>.+?) (?:and )?(?P<sb>{_SIDE}) (?P<b>.+)$")
_REL = _alternatives(_RELATION_OF)
_ITS = _alternatives(_ITS_OF)
_WITH_ITS = re.compile(rf"^(?P<a>.+?) with (?P<b>.+?) (?P<its>{_ITS})$")
_HAS_ITS = re.compile(rf"^(?P<b>.+?) has (?P<a>.+?) (?P<its>{_ITS})$")
_AND_IT = re.compile(rf"^(?P<b>.+?) and (?P<a>.+?) (?:(?:is|sits) )?(?P<rel>{_REL}) it$")
_WITH_IT = re.compile(rf"^(?P<b>.+?) with (?P<a>.+?) (?P<rel>{_REL}) it$")
_FRONT_RELATION = re.compile(
    rf"^(?P<rel>{_REL}) (?P<b>.+?) (?:there (?:is|are)|sits|stands) (?P<a>.+)$"
)
_RELATION = re.compile(
    rf"^(?P<a>.+?) (?:(?:is|are|{_alternatives(LINKS)}) )?(?P<rel>{_REL}) (?P<b>.+)$"
)
_JOIN = re.compile(rf" (?:and|{_alternatives(JOINERS)}) ")


def _normalize(text: str) -> str:
    text = text.lower().replace("grey", "gray").replace("colour", "color")
    text = re.sub(r"[.,;:!?\"'()]", " ", text).replace("-", " ").replace("backdrop", "background")
    text = " ".join(text.split())
    for pattern, word in _SYNONYMS:
        text = pattern.sub(word, text)
    return text


def _parse_group(phrase: str, fail) -> ObjectSpec:
    phrase = re.sub(r"^a pair of ", "two ", re.sub(r"^a group of ", "", phrase))
    phrase = re.sub(r" in total$", "", phrase)
    m = _NP.match(phrase)
    if not m:
        fail(f"cannot read {phrase!r} as an object (e.g. 'a red circle', 'three small stars')")
    det, noun = m["det"], m["noun"]
    count = int(det) if det.isdigit() else _COUNT_OF[det]
    if not 1 <= count <= MAX_COUNT:
        fail(f"count {count} is outside 1..{MAX_COUNT}")
    if (count == 1) != (noun in PLURALS):
        fail(f"{det!r} does not agree with {noun!r}")
    if m["size"] and m["size2"]:
        fail(f"two sizes in {phrase!r}")
    if m["color"] and m["color2"]:
        fail(f"two colors in {phrase!r}")
    size = m["size"] or m["size2"]
    return ObjectSpec(
        _SINGULAR[noun],
        color=m["color"] or m["color2"],
        count=count,
        size=_SIZE_OF[size] if size else None,
    )


def _objects_and_relation(s: str, fail) -> tuple[list[str], str | None]:
    """The object phrases of a sentence without its background and framing, and the
    relation of the first to the second (None: a list of groups)."""
    for pattern in (_SIDES, _FRONT_SIDES):
        if m := pattern.match(s):
            sides = (_SIDE_OF[m["sa"]], _SIDE_OF[m["sb"]])
            if sides not in _SIDE_RELATION:
                fail(f"{m['sa']!r} and {m['sb']!r} are not opposite sides")
            return [m["a"], m["b"]], _SIDE_RELATION[sides]
    if m := _WITH_ITS.match(s):  # B stands `its` of A
        return [m["a"], m["b"]], INVERSE_RELATION[_ITS_OF[m["its"]]]
    if m := _HAS_ITS.match(s):  # A stands `its` of B
        return [m["a"], m["b"]], _ITS_OF[m["its"]]
    for pattern in (_AND_IT, _WITH_IT, _FRONT_RELATION, _RELATION):
        if m := pattern.match(s):
            return [m["a"], m["b"]], _RELATION_OF[m["rel"]]
    return _JOIN.split(re.sub(r"^both ", "", s)), None


def parse_prompt(text: str) -> PromptSpec:
    """The constraints a prompt states, as a PromptSpec (task None); ValueError if unreadable.

    The grammar's own captions parse to their spec exactly; other wordings (objects named
    in another order, "A with B to its right") to a spec with the same `canonical()`."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {text!r}")

    def fail(reason: str):
        raise ValueError(f"cannot parse prompt {text!r}: {reason}")

    s = _normalize(text)
    background = None
    if m := _BG_PREFIX.match(s):
        background, s = m["bg"], s[m.end() :]
    for pattern in (_BG_ANYWHERE, _BG_CLAUSE):
        if m := pattern.search(" " + s):
            if background is not None:
                fail("it names the background twice")
            background = m["bg"]
            s = (" " + s)[: m.start()] + (" " + s)[m.end() :]
            s = " ".join(s.split())
    if _BG_ANYWHERE.search(" " + s) or _BG_CLAUSE.search(" " + s):
        fail("it names the background twice")
    s = _FRAME.sub("", s, count=1)
    if not s:
        fail("it names no object")
    phrases, relation = _objects_and_relation(s, fail)
    groups = tuple(_parse_group(p, fail) for p in phrases)
    if relation is not None and any(g.count != 1 for g in groups):
        fail("a relation can only relate two single objects")
    assert relation is None or relation in RELATIONS
    return PromptSpec(groups, relation=relation, background=background)


def out_of_domain_note(prompts) -> str | None:
    """A note on the prompts the grammar cannot read (a model of the shapes domain knows
    nothing else); None when it reads them all."""
    unknown = []
    for prompt in prompts:
        try:
            parse_prompt(prompt)
        except ValueError:
            unknown.append(prompt)
    if not unknown:
        return None
    return (
        f"note: {len(unknown)} of {len(prompts)} prompts are outside the shapes domain "
        f"(e.g. {unknown[0]!r}): the model was trained only on coloured shapes (circle, "
        "square, triangle, star, heart, cross), their colours, sizes, counts, positions "
        "and background; it makes an image anyway"
    )
