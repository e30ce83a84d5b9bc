"""The splits of the synthetic world and the scenes + expressions each one holds.

Every split has its own seed; image `i` of a split is drawn from `default_rng([seed, i])`, so
any image can be regenerated alone and two splits never share a scene.

| split        | expressions                                 | use                                   |
|--------------|---------------------------------------------|---------------------------------------|
| pretrain     | category queries (all targets of each)      | stage 0, foundation                   |
| train        | attribute + absolute + relation + ordinal   | stages 1-3                            |
| val          | attribute + absolute + relation + ordinal   | model selection, ablations            |
| testA        | attribute + absolute                        | test                                  |
| testB        | relation + ordinal                          | test                                  |
| heldout      | single-target category queries              | foundation's own check                |
| train_absent | train's expressions, each object absent     | no-match calibrator (weights)         |
| val_absent   | val's expressions, each object absent       | no-match calibrator (choice, threshold) |
| test_absent  | testA's and testB's expressions, absent     | no-match calibrator (test)            |
| shift_background | attribute + absolute + relation + ordinal | test under shift: gradient / textured background |
| shift_size   | attribute + absolute + relation + ordinal   | test under shift: diameters outside the trained ranges |
| shift_crowded | attribute + absolute + relation + ordinal  | test under shift: 8-10 objects per image |

An `*_absent` split mirrors other splits: its image `i` takes the expressions of image `i` of the
mirrored splits (in order: all of the first, then the second) and draws, from its own seed, a new
scene with as many objects in which none of them refers to anything (`expressions.absent_scene`).
So the same texts occur with their object present and absent, and a detector of "no match" cannot
go by the words. Expressions that no scene can lack ("the leftmost shape") are left out. The
mirrored splits' own content does not change.

A `shift_*` split draws its scenes from a `SceneSpec` other than the trained one (`scene`), one
change each, and keeps everything else: the grammar, the expression kinds, 2 per image, 300 images.
`shift_background`: a gray gradient or a texture (stripes, checkerboard) instead of one gray level
(backgrounds.py). `shift_size`: "small" objects 10-13 px and "large" 40-48 px across (trained:
14-20 and 28-38), so the size words keep their order. `shift_crowded`: 8-10 objects per image
(trained: 3-6). A held-out colour-shape split ("base-to-new") is not among them: the train split
holds every pair, so it would need a new train split and retrained models (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from diffprompt.training.data.synthetic.expressions import absent_scene, category_queries, sample_expressions
from diffprompt.training.data.synthetic.language import Expression
from diffprompt.training.data.synthetic.world import TRAINED, Scene, SceneSpec, sample_scene

REC_KINDS = ("attribute", "absolute", "relation", "ordinal")


@dataclass(frozen=True)
class SplitSpec:
    name: str
    seed: int
    n_images: int  # default size when written to disk
    kinds: tuple[str, ...]  # expression kinds; "category" = detection-style queries
    per_image: int = 2  # REC expressions per image (category splits take every query)
    single_target_only: bool = False  # category split keeping queries with one target only
    mirror: tuple[str, ...] = ()  # absent-object split: the splits whose expressions it places on new scenes
    scene: SceneSpec = TRAINED  # how its scenes are drawn; a shift split's differs from the trained world

    @property
    def absent(self) -> bool:
        """Every expression of this split refers to nothing in its image."""
        return bool(self.mirror)

    @property
    def shifted(self) -> bool:
        """Its scenes are drawn differently from the trained world's (a distribution-shift split)."""
        return self.scene != TRAINED


SPLITS: dict[str, SplitSpec] = {
    "pretrain": SplitSpec("pretrain", 1_000, 12_000, ("category",)),
    "train": SplitSpec("train", 2_000, 4_000, REC_KINDS, per_image=2),
    "val": SplitSpec("val", 3_000, 300, REC_KINDS, per_image=2),
    "testA": SplitSpec("testA", 4_000, 300, ("attribute", "absolute"), per_image=2),
    "testB": SplitSpec("testB", 5_000, 300, ("relation", "ordinal"), per_image=2),
    "heldout": SplitSpec("heldout", 6_000, 400, ("category",), single_target_only=True),
    "train_absent": SplitSpec("train_absent", 7_000, 2_000, REC_KINDS, mirror=("train",)),  # its first 2000
    "val_absent": SplitSpec("val_absent", 8_000, 300, REC_KINDS, mirror=("val",)),
    "test_absent": SplitSpec("test_absent", 9_000, 600, REC_KINDS, mirror=("testA", "testB")),
    # distribution shift: one change each to the trained world (see the table above)
    "shift_background": SplitSpec("shift_background", 10_000, 300, REC_KINDS,
                                  scene=SceneSpec(background="gradient_or_texture")),
    "shift_size": SplitSpec("shift_size", 11_000, 300, REC_KINDS, scene=SceneSpec(small=(10, 13), large=(40, 48))),
    "shift_crowded": SplitSpec("shift_crowded", 12_000, 300, REC_KINDS, scene=SceneSpec(n_objects=(8, 10))),
}
SHIFT_SPLITS = tuple(name for name, spec in SPLITS.items() if spec.shifted)  # test splits under shift


@dataclass(frozen=True)
class SyntheticImage:
    index: int
    scene: Scene
    expressions: tuple[tuple[Expression, tuple[int, ...]], ...]  # (expression, target indices; () if absent)


def mirrored_image(spec: SplitSpec, index: int) -> tuple[SplitSpec, int]:
    """(mirrored split, image index) whose expressions image `index` of an absent-object split takes."""
    for name in spec.mirror:
        source = SPLITS[name]
        if index < source.n_images:
            return source, index
        index -= source.n_images
    raise IndexError(f"{spec.name} has {sum(SPLITS[n].n_images for n in spec.mirror)} images at most")


def generate_image(spec: SplitSpec, index: int) -> SyntheticImage:
    """Image `index` of a split with its expressions; deterministic."""
    rng = np.random.default_rng([spec.seed, index])
    if spec.absent:
        source = generate_image(*mirrored_image(spec, index))
        scene, absent = absent_scene([e for e, _ in source.expressions], len(source.scene.objects), rng)
        return SyntheticImage(index, scene, tuple((e, ()) for e in absent))
    scene = sample_scene(rng, spec=spec.scene)
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
