"""Tests for imagen_jax.shapes.tasks, splits and prompt_sets: scene structure per task, the
held-out split, and the checked-in evaluation prompts."""

import collections
import json

import numpy as np
import pytest

from imagen_jax.shapes import geometry, prompt_sets, splits, tasks
from imagen_jax.shapes.spec import COLORS, SHAPES, TASKS


def test_heldout_choice_keeps_every_colour_and_shape_in_training():
    pairs = splits.training_pairs()
    assert len(pairs) == 30 and len(splits.HELDOUT_PAIRS) == 6
    assert {c for c, _ in pairs} == set(COLORS) and {s for _, s in pairs} == set(SHAPES)
    for shape_a, rel, shape_b in splits.HELDOUT_CONFIGURATIONS:
        assert rel in ("left of", "above") and shape_a != shape_b
    assert splits.is_heldout_configuration("star", "right of", "circle")  # same picture
    assert not splits.is_heldout_configuration("star", "left of", "circle")


def test_training_scenes_never_contain_heldout_combinations():
    rng = np.random.default_rng(0)
    seen_pairs, seen_configs = set(), set()
    for i in range(3000):
        example = tasks.sample_example(rng, task=None if i % 2 else TASKS[i % 6])
        assert not splits.scene_heldout(example.scene), example
        assert not splits.spec_heldout(example.spec), example
        seen_pairs |= {(o.color, o.shape) for o in example.scene.objects}
        if example.spec.relation:
            a, b = example.spec.objects
            seen_configs.add(
                splits.canonical_configuration(a.shape, example.spec.relation, b.shape)
            )
    assert seen_pairs == set(splits.training_pairs())  # ... but everything else
    assert len(seen_configs) > 40


@pytest.mark.parametrize("task", TASKS)
def test_heldout_examples_always_contain_one(task):
    rng = np.random.default_rng(1)
    for _ in range(200):
        example = tasks.sample_example(rng, task=task, split="heldout")
        assert splits.spec_heldout(example.spec), example.spec
        assert splits.scene_heldout(example.scene), example.scene


@pytest.mark.parametrize("task", TASKS)
def test_task_structure(task):
    rng = np.random.default_rng(2)
    for _ in range(150):
        example = tasks.sample_example(rng, task=task, rich=False)
        spec, objects = example.spec, example.scene.objects
        assert spec.task == task and all(g.color for g in spec.objects)
        assert spec.background is None and all(g.size is None for g in spec.objects)
        if task in ("single_object", "colors"):
            assert len(objects) == 1
        elif task == "counting":
            assert 2 <= len(objects) <= 4
            assert len({(o.shape, o.color, o.size_name) for o in objects}) == 1
        else:
            assert len(objects) == 2 and objects[0].shape != objects[1].shape
            if task == "color_attr":
                assert objects[0].color != objects[1].color
            if task == "position":
                held = geometry.object_relations(*objects, threshold=tasks.RELATION_THRESHOLD)
                assert spec.relation in held
                assert geometry.object_relations(*objects, threshold=0.0) == {spec.relation}


def test_rich_captions_state_what_was_drawn():
    rng = np.random.default_rng(3)
    stated = collections.Counter()
    for _ in range(1000):
        example = tasks.sample_example(rng)
        spec, scene = example.spec, example.scene
        if spec.background:
            stated["background"] += 1
            assert spec.background == scene.background
        start = 0
        for g in spec.objects:
            drawn = scene.objects[start : start + g.count]
            start += g.count
            assert all(o.shape == g.shape for o in drawn)
            if g.size:
                stated["size"] += 1
                assert all(o.size_name == g.size for o in drawn)
            if g.color:
                assert all(o.color == g.color for o in drawn)
            else:
                stated["no color"] += 1
        assert start == len(scene.objects)
    assert min(stated.values()) > 30, stated


def test_sampling_is_seeded():
    a = [tasks.sample_scene(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    with pytest.raises(ValueError, match="unknown task"):
        tasks.sample_scene(np.random.default_rng(0), task="counting_stars")
    with pytest.raises(ValueError, match="unknown split"):
        tasks.sample_scene(np.random.default_rng(0), split="test")


def test_task_weights_set_the_mixture():
    weights = tasks.parse_task_weights("position:3.5, color_attr:2.5")
    assert weights == {**dict.fromkeys(TASKS, 1.0), "position": 3.5, "color_attr": 2.5}
    assert tasks.parse_task_weights("") is None
    n = 4000
    drawn = collections.Counter(
        tasks.sample_example(np.random.default_rng([1, i]), task_weights=weights).spec.task
        for i in range(n)
    )
    for task in TASKS:  # 3 standard deviations of a binomial count
        p = weights[task] / sum(weights.values())
        assert abs(drawn[task] - n * p) < 3 * np.sqrt(n * p * (1 - p)), (task, drawn)
    only = tasks.sample_example(np.random.default_rng(0), task_weights={"counting": 1.0})
    assert only.spec.task == "counting"  # tasks left out of the mapping weigh 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("pos:3", "bad task weight 'pos:3'"),
        ("position=3", "bad task weight 'position=3'"),
        ("position:x", "task weight 'position:x' .* is not a number"),
        ("position:-1", "must be finite, >= 0"),
        (",".join(f"{t}:0" for t in TASKS), "not all 0"),
    ],
)
def test_bad_task_weights_name_the_entry(text, match):
    with pytest.raises(ValueError, match=match):
        tasks.parse_task_weights(text)


@pytest.mark.parametrize("name", prompt_sets.PROMPT_SETS)
def test_prompt_files_are_checked_in_and_regenerate_identically(name, tmp_path):
    packaged = prompt_sets.packaged_path(name)
    fresh = tmp_path / packaged.name
    prompt_sets.write(prompt_sets.generate(name), fresh)
    assert packaged.read_bytes() == fresh.read_bytes(), (
        "rerun `python -m imagen_jax.shapes.make_prompts`"
    )


@pytest.mark.parametrize("name", prompt_sets.PROMPT_SETS)
def test_prompt_files_content(name):
    split, wording = prompt_sets.PROMPT_SETS[name]
    records = prompt_sets.load_prompts(name)
    per_task = collections.Counter(r.task for r in records)
    least = prompt_sets.VALIDATION_PER_TASK if name == "validation" else 50
    assert set(per_task) == set(TASKS) and min(per_task.values()) >= least, per_task
    for task in TASKS:
        texts = [r.prompt for r in records if r.task == task]
        assert len(set(texts)) == len(texts)
    for r in records:
        assert r.split == split and r.wording == wording
        assert bool(splits.spec_heldout(r.spec)) == (split == "heldout"), r
    assert len(prompt_sets.load_prompts(name, "counting")) == per_task["counting"]


def test_malformed_prompt_file_lines_name_file_and_line(tmp_path):
    good = prompt_sets.load_prompts("train")[0].to_json()
    cases = {
        "{not json": "malformed prompt line",
        json.dumps({"prompt": "a red circle", "task": "colors"}): "missing keys \\['spec'\\]",
        json.dumps({"prompt": "a red circle", "task": "colours", "spec": {}}): "unknown task",
        json.dumps(
            {"prompt": "a red circle", "task": "colors", "spec": {"objects": [{"shape": "square"}]}}
        ): "is not what the prompt states",
        json.dumps(
            {
                "prompt": "a red hexagon",
                "task": "colors",
                "spec": {"objects": [{"shape": "circle"}]},
            }
        ): "cannot parse prompt 'a red hexagon'",
    }
    for line, message in cases.items():
        path = tmp_path / "prompts.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=message) as info:
            prompt_sets.read(path)
        assert f"{path}:3:" in str(info.value)
