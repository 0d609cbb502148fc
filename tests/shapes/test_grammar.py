"""Tests for imagen_jax.shapes.grammar: captions are varied, and the parser inverts them."""

import collections

import numpy as np
import pytest

from imagen_jax.shapes import grammar, tasks
from imagen_jax.shapes.spec import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    TASKS,
    ObjectSpec,
    PromptSpec,
)


def random_spec(rng: np.random.Generator) -> PromptSpec:
    """Any spec the grammar can word: 1-3 groups, any counts, optional attributes."""

    def maybe(options, p=0.5):
        return options[rng.integers(len(options))] if rng.random() < p else None

    related = rng.random() < 0.4
    n = 2 if related else int(rng.integers(1, 4))
    groups = tuple(
        ObjectSpec(
            SHAPES[rng.integers(len(SHAPES))],
            color=maybe(tuple(COLORS), 0.8),
            count=1 if related else int(rng.integers(1, 7)),
            size=maybe(SIZES, 0.3),
        )
        for _ in range(n)
    )
    return PromptSpec(
        groups,
        relation=RELATIONS[rng.integers(4)] if related else None,
        background=maybe(tuple(BACKGROUNDS), 0.4),
    )


def test_parse_inverts_caption_on_random_specs():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        spec = random_spec(rng)
        text = grammar.caption(spec, rng)
        assert grammar.parse_prompt(text) == spec, text


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_parse_inverts_the_task_samplers_captions(split):
    rng = np.random.default_rng(1)
    for i in range(1200):
        example = tasks.sample_example(rng, task=TASKS[i % 6], split=split, rich=i % 2 == 0)
        assert grammar.parse_prompt(example.caption) == example.spec.constraints()


def test_captions_are_varied():
    spec = PromptSpec(
        (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of", "black"
    )
    rng = np.random.default_rng(2)
    texts = collections.Counter(grammar.caption(spec, rng) for _ in range(2000))
    assert len(texts) >= 40, texts.most_common(5)
    assert texts.most_common(1)[0][1] < 0.1 * 2000
    counted = PromptSpec((ObjectSpec("star", "green", count=3),))
    texts = {grammar.caption(counted, rng) for _ in range(500)}
    assert {"three green stars", "there are three green stars"} <= texts
    assert any("that are green" in t for t in texts)


def test_articles_and_numbers():
    rng = np.random.default_rng(3)
    texts = {
        grammar.caption(PromptSpec((ObjectSpec("circle", "orange"),)), rng) for _ in range(300)
    }
    assert "an orange circle" in texts
    assert not any("a orange" in t for t in texts)
    texts = {grammar.caption(PromptSpec((ObjectSpec("cross", count=4),)), rng) for _ in range(300)}
    assert "four crosses" in texts


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "A red circle above a blue square.",
            PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "above"),
        ),
        (
            "3 stars on a white background",
            PromptSpec((ObjectSpec("star", count=3),), background="white"),
        ),
        (
            "a grey background with two big green hearts",
            PromptSpec((ObjectSpec("heart", "green", 2, "large"),), background="gray"),
        ),
        (
            "there are two yellow stars and a circle",
            PromptSpec((ObjectSpec("star", "yellow", 2), ObjectSpec("circle"))),
        ),
        ("a cross colored orange", PromptSpec((ObjectSpec("cross", "orange"),))),
        (
            "a circle on the right and a star on the left",
            PromptSpec((ObjectSpec("circle"), ObjectSpec("star")), "right of"),
        ),
        (
            "a small triangle beneath a large heart",
            PromptSpec(
                (ObjectSpec("triangle", size="small"), ObjectSpec("heart", size="large")), "below"
            ),
        ),
        ("a photo of a purple square", PromptSpec((ObjectSpec("square", "purple"),))),
    ],
)
def test_hand_written_prompts(text, expected):
    assert grammar.parse_prompt(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a red circle near a blue square", "cannot read"),
        ("", "names no object"),
        ("two red circle", "does not agree"),
        ("a purple elephant", "cannot read"),
        ("a red blue circle", "cannot read"),
        ("a circle on a black background on a white background", "background twice"),
        ("seven stars", "cannot read"),
        ("9 stars", "outside 1..6"),
        ("two circles to the left of a square", "two single objects"),
        ("a circle on the left and a square on the left", "not opposite sides"),
    ],
)
def test_unparseable_prompts_are_named(text, reason):
    with pytest.raises(ValueError, match=reason) as info:
        grammar.parse_prompt(text)
    assert repr(text) in str(info.value)
