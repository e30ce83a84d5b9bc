"""Generating expressions for a scene (docs/design.md, "The synthetic world", "Expressions").

Each generator reasons directly on the scene (counting attribute matches, sorting positions)
and returns `(expression, target_indices)` pairs. It does not call the semantic evaluator in
`language.py`; the tests check the two agree.

Expressions whose object is absent (the `*_absent` splits) are such expressions of another
split's scene, placed on a new scene (`absent_scene`) in which the semantic evaluator finds no
object for them: the same texts, present in one scene and absent from the other.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np

from diffprompt.training.data.synthetic.language import (
    DIRECTIONS,
    ORDINALS,
    RELATIONS,
    SIDES,
    TIE_MARGIN,
    Absolute,
    Attribute,
    Category,
    Description,
    Expression,
    Ordinal,
    Relation,
    evaluate,
)
from diffprompt.training.data.synthetic.world import Scene, SceneObject, sample_scene

ATTRIBUTE_FIELDS = ("shape", "color", "size")


def describe(obj: SceneObject, fields: Sequence[str]) -> Description:
    return Description(**{f: getattr(obj, f) for f in fields})


def _count(objects: Sequence[SceneObject], obj: SceneObject, fields: Sequence[str]) -> int:
    return sum(all(getattr(o, f) == getattr(obj, f) for f in fields) for o in objects)


def minimal_description(objects: Sequence[SceneObject], index: int, rng: np.random.Generator) -> Description | None:
    """The fewest attributes that single out objects[index]; None if even all three do not."""
    obj = objects[index]
    for n in (1, 2, 3):
        unique = [fields for fields in combinations(ATTRIBUTE_FIELDS, n) if _count(objects, obj, fields) == 1]
        if unique:
            return describe(obj, unique[int(rng.integers(len(unique)))])
    return None


def category_descriptions(objects: Sequence[SceneObject]) -> list[Description]:
    """Every "shape", "color shape" and "color" description with at least one match, sorted."""
    found = set()
    for o in objects:
        found.update({Description(shape=o.shape), Description(color=o.color, shape=o.shape), Description(color=o.color)})
    return sorted(found, key=lambda d: (d.color or "", d.shape or ""))


def group_descriptions(objects: Sequence[SceneObject]) -> list[Description]:
    """Descriptions used for "the leftmost X" etc.: category-level, plus "shape" (anything)."""
    return [Description(), *category_descriptions(objects)]


def category_queries(objects: Sequence[SceneObject]) -> list[tuple[Expression, list[int]]]:
    return [
        (Category(d), [i for i, o in enumerate(objects) if d.matches(o)]) for d in category_descriptions(objects)
    ]


def attribute_expressions(objects, rng) -> list[tuple[Expression, list[int]]]:
    out = []
    for i in range(len(objects)):
        d = minimal_description(objects, i, rng)
        if d is not None:
            out.append((Attribute(d), [i]))
    return out


def _clear_order(values: list[float], position: int) -> bool:
    """True if values (sorted) have a gap >= TIE_MARGIN on both sides of values[position]."""
    before = position == 0 or values[position] - values[position - 1] >= TIE_MARGIN
    after = position == len(values) - 1 or values[position + 1] - values[position] >= TIE_MARGIN
    return before and after


def _axis_value(obj: SceneObject, axis: str) -> float:
    return obj.center[0] if axis == "x" else obj.center[1]


def absolute_expressions(objects, rng) -> list[tuple[Expression, list[int]]]:
    out = []
    for d in group_descriptions(objects):
        members = [i for i, o in enumerate(objects) if d.matches(o)]
        if len(members) < 2:
            continue  # one match: an attribute expression would do
        for direction, (axis, pick) in DIRECTIONS.items():
            ordered = sorted(members, key=lambda i: _axis_value(objects[i], axis), reverse=pick is max)
            first, second = (_axis_value(objects[i], axis) for i in ordered[:2])
            if abs(first - second) >= TIE_MARGIN:
                out.append((Absolute(direction, d), [ordered[0]]))
    return out


def relation_expressions(objects, rng) -> list[tuple[Expression, list[int]]]:
    out = []
    for a, anchor in enumerate(objects):
        anchor_desc = minimal_description(objects, a, rng)
        if anchor_desc is None:
            continue
        for d in group_descriptions(objects):
            members = [i for i, o in enumerate(objects) if i != a and d.matches(o)]
            if len(members) < 2:
                continue  # the relation must be needed to tell candidates apart
            for relation in RELATIONS:
                hits = [i for i in members if _strictly(objects[i], relation, anchor)]
                if len(hits) == 1:
                    out.append((Relation(d, relation, anchor_desc), hits))
    return out


def _strictly(a: SceneObject, relation: str, b: SceneObject) -> bool:
    if relation == "left of":
        return a.box[2] <= b.box[0]
    if relation == "right of":
        return a.box[0] >= b.box[2]
    if relation == "above":
        return a.box[3] <= b.box[1]
    return a.box[1] >= b.box[3]


def ordinal_expressions(objects, rng) -> list[tuple[Expression, list[int]]]:
    out = []
    for d in group_descriptions(objects):
        members = [i for i, o in enumerate(objects) if d.matches(o)]
        for word, n in ORDINALS.items():
            if len(members) < n + (1 if n == 2 else 0):
                continue  # "second of two" is just "the rightmost": ask for at least three
            for side, (axis, descending) in SIDES.items():
                ordered = sorted(members, key=lambda i: _axis_value(objects[i], axis), reverse=descending)
                values = [_axis_value(objects[i], axis) for i in ordered]
                if descending:
                    values = [-v for v in values]
                if _clear_order(values, n - 1):
                    out.append((Ordinal(word, d, side), [ordered[n - 1]]))
    return out


GENERATORS = {
    "attribute": attribute_expressions,
    "absolute": absolute_expressions,
    "relation": relation_expressions,
    "ordinal": ordinal_expressions,
}


def sample_expressions(
    objects: Sequence[SceneObject], kinds: Sequence[str], per_image: int, rng: np.random.Generator
) -> list[tuple[Expression, list[int]]]:
    """Up to `per_image` REC expressions of the given kinds, preferring distinct kinds and targets."""
    pools = {k: GENERATORS[k](objects, rng) for k in kinds}
    chosen: list[tuple[Expression, list[int]]] = []
    used_targets: set[int] = set()
    kind_order = [k for k in rng.permutation(list(kinds)) if pools[k]]
    for k in kind_order:
        if len(chosen) >= per_image:
            break
        pool = [c for c in pools[k] if c[1][0] not in used_targets] or pools[k]
        expr, targets = pool[int(rng.integers(len(pool)))]
        chosen.append((expr, targets))
        used_targets.update(targets)
    return chosen


# ----------------------------------------------------------------------------- absent objects


def refers_to_nothing(expr: Expression, objects: Sequence[SceneObject]) -> bool:
    """True if no object of the scene fits `expr` (by the semantic evaluator), and the expression is
    not merely ambiguous: a relation's anchor must be unique or absent, not repeated."""
    if evaluate(expr, objects):
        return False
    if isinstance(expr, Relation):
        return sum(expr.anchor.matches(o) for o in objects) <= 1
    return True


def can_be_absent(expr: Expression) -> bool:
    """False for "the leftmost shape" and "the second shape from the left": every scene has 3+ shapes."""
    return not (isinstance(expr, (Absolute, Ordinal)) and expr.what == Description())


def absent_scene(expressions: Sequence[Expression], n_objects: int, rng: np.random.Generator,
                 max_tries: int = 400) -> tuple[Scene, tuple[Expression, ...]]:
    """A new scene of `n_objects` objects in which none of `expressions` refers to anything.

    Scenes are drawn from `rng` until one has the same number of objects and no object for any of
    the expressions that can be absent; after `max_tries`, the drawn scene with the most of them
    absent is kept, with those. Returns (scene, the expressions absent from it).
    """
    wanted = [e for e in expressions if can_be_absent(e)]
    best: tuple[Scene, tuple[Expression, ...]] | None = None
    for _ in range(max_tries):
        scene = sample_scene(rng)
        if len(scene.objects) != n_objects:
            continue
        absent = tuple(e for e in wanted if refers_to_nothing(e, scene.objects))
        if best is None or len(absent) > len(best[1]):
            best = (scene, absent)
        if len(absent) == len(wanted):
            break
    if best is None:  # no scene with that many objects (never seen): the last one, nothing absent
        return scene, ()
    return best
