"""The expression language of the synthetic world: grammar, text rendering, parsing, meaning.

An expression is a small tree (dataclasses below). `to_text` writes it in lower case,
`parse` reads such text back, and `evaluate` is the *semantic evaluator*: it interprets an
expression on a scene and returns the indices of every object it can denote. The generator in
`expressions.py` builds expressions by its own reasoning; tests check that the evaluator,
reading only the text, finds exactly the generator's target (one object for every
non-category expression).

Geometry: object positions are box centres; an extreme or an ordinal position counts as
unambiguous only if the next candidate is at least `TIE_MARGIN` px further along the axis.
"A left of B" means A's box ends before B's box starts (x1_A <= x0_B), and likewise for the
other relations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

from diffprompt.training.data.synthetic.world import COLORS, SHAPES, SIZES, SceneObject

TIE_MARGIN = 4.0  # px between box centres for "leftmost" / "second from the left" to be clear
NOUN_ANY = "shape"  # the noun used when the shape is not part of a description
DIRECTIONS = {"leftmost": ("x", min), "rightmost": ("x", max), "topmost": ("y", min), "bottommost": ("y", max)}
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = {"second": 2, "third": 3}
SIDES = {"left": ("x", False), "right": ("x", True), "top": ("y", False), "bottom": ("y", True)}


# ----------------------------------------------------------------------------- expression trees


@dataclass(frozen=True)
class Description:
    """A conjunction of attributes; None means "any". Renders as "[size] [color] shape-or-noun"."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    def text(self) -> str:
        words = [w for w in (self.size, self.color) if w] + [self.shape or NOUN_ANY]
        return " ".join(words)

    def matches(self, obj: SceneObject) -> bool:
        return all(
            want is None or want == have
            for want, have in ((self.size, obj.size), (self.color, obj.color), (self.shape, obj.shape))
        )


@dataclass(frozen=True)
class Category:
    """Detection-style query: every matching object is a target ("star", "red star", "red shape")."""

    what: Description


@dataclass(frozen=True)
class Attribute:
    """"the small blue square": the fewest attributes that single the object out."""

    what: Description


@dataclass(frozen=True)
class Absolute:
    """"the leftmost red shape"."""

    direction: str  # key of DIRECTIONS
    what: Description


@dataclass(frozen=True)
class Relation:
    """"the square left of the red circle": `what` in `relation` to the unique `anchor`."""

    what: Description
    relation: str  # one of RELATIONS
    anchor: Description


@dataclass(frozen=True)
class Ordinal:
    """"the second star from the left"."""

    ordinal: str  # key of ORDINALS
    what: Description
    side: str  # key of SIDES


Expression = Union[Category, Attribute, Absolute, Relation, Ordinal]

KIND_OF = {Category: "category", Attribute: "attribute", Absolute: "absolute", Relation: "relation", Ordinal: "ordinal"}


def kind_of(expr: Expression) -> str:
    return KIND_OF[type(expr)]


# ----------------------------------------------------------------------------- text


def to_text(expr: Expression) -> str:
    """Lower-case English for an expression tree."""
    if isinstance(expr, Category):
        return expr.what.text()
    if isinstance(expr, Attribute):
        return f"the {expr.what.text()}"
    if isinstance(expr, Absolute):
        return f"the {expr.direction} {expr.what.text()}"
    if isinstance(expr, Relation):
        return f"the {expr.what.text()} {expr.relation} the {expr.anchor.text()}"
    if isinstance(expr, Ordinal):
        return f"the {expr.ordinal} {expr.what.text()} from the {expr.side}"
    raise TypeError(f"not an expression: {expr!r}")


def _alt(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_DESC = rf"(?:({_alt(SIZES)}) )?(?:({_alt(COLORS)}) )?({_alt((*SHAPES, NOUN_ANY))})"
_PATTERNS = [
    ("category", re.compile(rf"^{_DESC}$")),
    ("attribute", re.compile(rf"^the {_DESC}$")),
    ("absolute", re.compile(rf"^the ({_alt(DIRECTIONS)}) {_DESC}$")),
    ("relation", re.compile(rf"^the {_DESC} ({_alt(RELATIONS)}) the {_DESC}$")),
    ("ordinal", re.compile(rf"^the ({_alt(ORDINALS)}) {_DESC} from the ({_alt(SIDES)})$")),
]


def _desc(size: str | None, color: str | None, noun: str) -> Description:
    return Description(size=size, color=color, shape=None if noun == NOUN_ANY else noun)


def parse(text: str) -> Expression:
    """Read an expression of this grammar; ValueError for anything else."""
    text = " ".join(text.lower().split())
    for kind, pattern in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "category":
            return Category(_desc(*g))
        if kind == "attribute":
            return Attribute(_desc(*g))
        if kind == "absolute":
            return Absolute(g[0], _desc(*g[1:4]))
        if kind == "relation":
            return Relation(_desc(*g[0:3]), g[3], _desc(*g[4:7]))
        return Ordinal(g[0], _desc(*g[1:4]), g[4])
    raise ValueError(f"not an expression of the synthetic grammar: {text!r}")


# ----------------------------------------------------------------------------- meaning


def _coord(obj: SceneObject, axis: str) -> float:
    cx, cy = obj.center
    return cx if axis == "x" else cy


def _satisfies(a: SceneObject, relation: str, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {
        "left of": ax1 <= bx0,
        "right of": ax0 >= bx1,
        "above": ay1 <= by0,
        "below": ay0 >= by1,
    }[relation]


def evaluate(expr: Expression, objects: Sequence[SceneObject]) -> list[int]:
    """Indices of all objects the expression may denote (ties within TIE_MARGIN included)."""
    matching = [i for i, o in enumerate(objects) if expr.what.matches(o)]
    if isinstance(expr, (Category, Attribute)):
        return matching
    if isinstance(expr, Absolute):
        if not matching:
            return []
        axis, pick = DIRECTIONS[expr.direction]
        extreme = pick(_coord(objects[i], axis) for i in matching)
        return [i for i in matching if abs(_coord(objects[i], axis) - extreme) < TIE_MARGIN]
    if isinstance(expr, Relation):
        anchors = [i for i, o in enumerate(objects) if expr.anchor.matches(o)]
        if len(anchors) != 1:
            return []  # the anchor must be unique for the relation to mean anything
        anchor = objects[anchors[0]]
        return [i for i in matching if i != anchors[0] and _satisfies(objects[i], expr.relation, anchor)]
    if isinstance(expr, Ordinal):
        axis, descending = SIDES[expr.side]
        n = ORDINALS[expr.ordinal]
        if len(matching) < n:
            return []
        coords = sorted((_coord(objects[i], axis) for i in matching), reverse=descending)
        nth = coords[n - 1]
        return [i for i in matching if abs(_coord(objects[i], axis) - nth) < TIE_MARGIN]
    raise TypeError(f"not an expression: {expr!r}")
