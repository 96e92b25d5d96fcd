"""The procedural scenes of the LLaVA-576 yardstick: seeded, disjoint splits, answers true to the drawn scene."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tokenprune.zoo import scenes
from tokenprune.zoo.scenes import Question, chance_rates, make_scene, questions_for, split_scenes

SEEDS = split_scenes("train", 120)


def test_a_scene_is_a_pure_function_of_its_seed():
    a, b = make_scene(12345), make_scene(12345)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects and a.text == b.text
    assert questions_for(a) == questions_for(b)
    assert make_scene(12346).image.tobytes() != a.image.tobytes()


def test_splits_are_disjoint_and_bad_splits_are_refused():
    train, val, test = (set(split_scenes(s, 1000)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert split_scenes("test", 2, start=5) == [scenes.SPLIT_SEEDS["test"] + 5, scenes.SPLIT_SEEDS["test"] + 6]
    with pytest.raises(ValueError, match=r"valid: \['train', 'val', 'test'\]"):
        split_scenes("dev", 3)
    with pytest.raises(ValueError, match="outside"):
        split_scenes("train", 10, start=100_000_000 - 5)


@pytest.mark.parametrize("seed", SEEDS[:40])
def test_objects_fit_apart_and_sized_by_class(seed):
    scene = make_scene(seed)
    assert scene.image.size == (scenes.SIZE, scenes.SIZE) and scene.image.mode == "RGB"
    assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
    bounds = {name: (low, high) for name, low, high in scenes.SIZES}
    boxes = [o.box for o in scene.objects] + ([scene.text_box] if scene.text_box else [])
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= scenes.SIZE and 0 <= y0 < y1 <= scenes.SIZE and x1 - x0 == y1 - y0
        low, high = bounds[obj.size]
        assert low <= obj.side <= high
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # no two overlap


def test_every_answer_is_true_of_the_scene():
    """Each question re-answered from the object list by a separate, literal reading of its words."""
    asked = Counter()
    for seed in SEEDS:
        scene = make_scene(seed)
        objs = scene.objects
        named = Counter((o.colour, o.shape) for o in objs)

        def find(words: str, objs=objs, named=named):
            colour, shape = words.split()
            assert named[(colour, shape)] == 1, words  # the words name exactly one object
            return next(o for o in objs if (o.colour, o.shape) == (colour, shape))

        for q in questions_for(scene):
            asked[q.family] += 1
            words = q.question.rstrip("?").split()
            if q.family == "count":
                what = words[2]
                n = (
                    sum(o.colour == what for o in objs)
                    if words[3] == "shapes"
                    else sum(o.shape + "s" == what for o in objs)
                )
                assert q.answer == str(n)
            elif q.family == "exist":
                assert q.answer == ("yes" if named[(words[-2], words[-1])] else "no")
            elif q.family == "attribute":
                size, shape = words[-2], words[-1]
                match = [o for o in objs if (o.size, o.shape) == (size, shape)]
                assert len(match) == 1 and q.answer == match[0].colour
            elif q.family == "relation":
                a, b = find(" ".join(words[3:5])), find(" ".join(words[-2:]))
                dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
                expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                assert q.answer == expected and max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy))
            elif q.family == "position":
                x, y = find(" ".join(words[4:6])).centre
                assert q.answer == ("top" if y < 168 else "bottom") + "-" + ("left" if x < 168 else "right")
            elif q.family == "reading":
                assert scene.text is not None and q.answer == scene.text
            elif q.family == "compare":
                a, b = find(" ".join(words[4:6])), find(" ".join(words[-2:]))
                big = a if a.side > b.side else b
                assert q.answer == big.shape and max(a.side, b.side) >= 2 * min(a.side, b.side)
        if scene.text is None:
            assert all(q.family != "reading" for q in questions_for(scene))
    assert set(asked) == set(scenes.FAMILIES)  # every family is asked on these scenes


def test_answers_are_in_the_vocabulary_and_exist_is_balanced():
    vocabulary = set(scenes.answer_vocabulary())
    questions = [q for seed in SEEDS for q in questions_for(make_scene(seed))]
    assert {q.answer for q in questions} <= vocabulary
    rates = chance_rates(questions)
    assert set(rates) == set(scenes.FAMILIES) and rates["exist"] <= 0.6


def test_chance_rate_is_the_most_frequent_answers_share():
    qs = [Question("count", "q", a) for a in ("1", "1", "2", "3")] + [Question("exist", "q", "no")]
    assert chance_rates(qs) == {"count": 0.5, "exist": 1.0}


def test_questions_take_an_explicit_rng():
    scene = make_scene(99)
    assert questions_for(scene, random.Random(5)) == questions_for(scene, random.Random(5))
