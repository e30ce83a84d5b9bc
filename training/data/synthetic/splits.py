"""The splits of the synthetic world and the scenes + expressions each one holds.

Every split has its own seed; image `i` of a split is drawn from `default_rng([seed, i])`, so
any image can be regenerated alone and two splits never share a scene.

| split    | expressions                                   | use                          |
|----------|-----------------------------------------------|------------------------------|
| pretrain | category queries (all targets of each)        | stage 0, foundation          |
| train    | attribute + absolute + relation + ordinal     | stages 1-3                   |
| val      | attribute + absolute + relation + ordinal     | model selection, ablations   |
| testA    | attribute + absolute                          | test                         |
| testB    | relation + ordinal                            | test                         |
| heldout  | single-target category queries                | foundation's own check       |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from diffprompt.training.data.synthetic.expressions import category_queries, sample_expressions
from diffprompt.training.data.synthetic.language import Expression
from diffprompt.training.data.synthetic.world import Scene, sample_scene

REC_KINDS = ("attribute", "absolute", "relation", "ordinal")


@dataclass(frozen=True)
class SplitSpec:
    name: str
    seed: int
    n_images: int  # default size when written to disk
    kinds: tuple[str, ...]  # expression kinds; "category" = detection-style queries
    per_image: int = 2  # REC expressions per image (category splits take every query)
    single_target_only: bool = False  # category split keeping queries with one target only


SPLITS: dict[str, SplitSpec] = {
    "pretrain": SplitSpec("pretrain", 1_000, 12_000, ("category",)),
    "train": SplitSpec("train", 2_000, 4_000, REC_KINDS, per_image=2),
    "val": SplitSpec("val", 3_000, 300, REC_KINDS, per_image=2),
    "testA": SplitSpec("testA", 4_000, 300, ("attribute", "absolute"), per_image=2),
    "testB": SplitSpec("testB", 5_000, 300, ("relation", "ordinal"), per_image=2),
    "heldout": SplitSpec("heldout", 6_000, 400, ("category",), single_target_only=True),
}


@dataclass(frozen=True)
class SyntheticImage:
    index: int
    scene: Scene
    expressions: tuple[tuple[Expression, tuple[int, ...]], ...]  # (expression, target indices)


def generate_image(spec: SplitSpec, index: int) -> SyntheticImage:
    """Image `index` of a split with its expressions; deterministic."""
    rng = np.random.default_rng([spec.seed, index])
    scene = sample_scene(rng)
    if spec.kinds == ("category",):
        pairs = category_queries(scene.objects)
        if spec.single_target_only:
            pairs = [p for p in pairs if len(p[1]) == 1]
    else:
        pairs = sample_expressions(scene.objects, spec.kinds, spec.per_image, rng)
    return SyntheticImage(index, scene, tuple((e, tuple(t)) for e, t in pairs))


def generate_split(spec: SplitSpec, n_images: int | None = None) -> Iterator[SyntheticImage]:
    for index in range(spec.n_images if n_images is None else n_images):
        yield generate_image(spec, index)
