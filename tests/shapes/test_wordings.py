"""Tests for imagen_jax.shapes.wordings: every wording parses back to its spec, the
held-out templates never word a training caption, and the held-out-wording prompt sets."""

import collections

import numpy as np
import pytest
from test_grammar import random_spec

from imagen_jax.data.shapes_source import ShapesSource
from imagen_jax.shapes import grammar, prompt_sets, tasks, wordings
from imagen_jax.shapes.spec import TASKS, ObjectSpec, PromptSpec


@pytest.mark.parametrize("name", ["train", "heldout"])
def test_parse_reads_every_wording_back_to_its_spec(name):
    rng = np.random.default_rng(10)
    used = collections.Counter()
    for _ in range(3000):
        spec = random_spec(rng)
        text, names = wordings.compose(spec, rng, name)
        used.update(names)
        assert grammar.parse_prompt(text).canonical() == spec.canonical(), text
    # Every sentence and background template of the set was drawn.
    for table in (wordings.SENTENCES, wordings.BACKGROUNDS):
        for template in table:
            if wordings.template_split(template) == name:
                assert used[template] > 0, template


def test_held_out_templates_never_word_a_training_caption():
    rng = np.random.default_rng(11)
    for _ in range(3000):
        spec = random_spec(rng)
        _, names = wordings.compose(spec, rng, "train")
        assert all(wordings.template_split(n) == "train" for n in names), names
        _, names = wordings.compose(spec, rng, "heldout")
        if len(spec.objects) <= 2:  # the sentence itself is always a held-out template
            assert wordings.template_split(names[0]) == "heldout", names
    with pytest.raises(ValueError, match="held-out templates are for evaluation"):
        ShapesSource(wordings="heldout")
    with pytest.raises(ValueError, match="unknown wordings 'casual'"):
        wordings.caption(random_spec(rng), rng, "casual")


def test_the_training_mixture_in_train_wordings():
    """The task samplers' captions (and counterfactual captions, worded alike) in the train
    wordings parse back to the examples' specs, and go beyond the grammar's forms."""
    rng = np.random.default_rng(12)
    captions = []
    for i in range(600):
        example = tasks.sample_example(
            rng, task=TASKS[i % 6], wordings="train", with_counterfactual=True
        )
        stated = grammar.parse_prompt(example.caption)
        assert stated.canonical() == example.spec.constraints().canonical(), example.caption
        if example.counterfactual:
            other = tasks.counterfactual(example.spec, training=True)
            assert grammar.parse_prompt(example.counterfactual).canonical() == (
                other.constraints().canonical()
            )
        captions.append(example.caption.lower())
    for beyond_the_grammar in (" to its ", " as well as ", "-colored ", " in green", "both "):
        assert any(beyond_the_grammar in c for c in captions), beyond_the_grammar


def _spec(*objects, relation=None, background=None):
    return PromptSpec(tuple(objects), relation=relation, background=background)


RED_CIRCLE, BLUE_STAR = ObjectSpec("circle", "red"), ObjectSpec("star", "blue")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "a red circle with a blue star to its right",
            _spec(RED_CIRCLE, BLUE_STAR, relation="left of"),
        ),
        (
            "a blue star has a red circle to its left",
            _spec(RED_CIRCLE, BLUE_STAR, relation="left of"),
        ),
        (
            "to the left of a blue star there is a red circle",
            _spec(RED_CIRCLE, BLUE_STAR, relation="left of"),
        ),
        (
            "Left: a red circle; right: a blue star.",
            _spec(RED_CIRCLE, BLUE_STAR, relation="left of"),
        ),
        (
            "on the right a blue star, on the left a red circle",
            _spec(BLUE_STAR, RED_CIRCLE, relation="right of"),
        ),
        (
            "a blue star, and a red circle on top of it",
            _spec(RED_CIRCLE, BLUE_STAR, relation="above"),
        ),
        (
            "a red circle placed underneath a blue star",
            _spec(RED_CIRCLE, BLUE_STAR, relation="below"),
        ),
        ("a red circle with a blue star", _spec(RED_CIRCLE, BLUE_STAR)),
        ("a red-colored disc together with a star painted blue", _spec(RED_CIRCLE, BLUE_STAR)),
        ("a group of three boxes which are green", _spec(ObjectSpec("square", "green", 3))),
        ("a pair of plus signs in purple", _spec(ObjectSpec("cross", "purple", 2))),
        (
            "4 hearts in total, and the background is gray",
            _spec(ObjectSpec("heart", count=4), background="gray"),
        ),
        ("we see a red circle in front of a white backdrop", _spec(RED_CIRCLE, background="white")),
    ],
)
def test_hand_written_wordings(text, expected):
    assert grammar.parse_prompt(text).canonical() == expected.canonical()


def test_heldout_wording_set_rewords_the_heldout_set_line_for_line():
    reported = prompt_sets.load_prompts("heldout")
    reworded = prompt_sets.load_prompts("heldout_wording")
    assert len(reworded) == len(reported)
    for a, b in zip(reported, reworded, strict=True):
        assert (a.spec, a.task, a.split) == (b.spec, b.task, b.split)
        assert a.prompt != b.prompt and b.wording == "heldout"
    validation = prompt_sets.load_prompts("validation")
    assert not {r.prompt for r in validation} & {r.prompt for r in reworded}
    assert {r.task for r in validation} == set(TASKS)
