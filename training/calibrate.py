"""Fit the no-match calibrator, and report its precision and recall of "no match" on test.

    diffprompt calibrate --checkpoint checkpoints/diffprompt --ddim-steps 5 --out docs/results/no_match_torch.json
    diffprompt calibrate --artifact artifacts/diffprompt-5steps --out docs/results/no_match_ort.json   # onnxruntime

A grounding pipeline ranks boxes even when the expression's object is not in the image. The
calibrator (diffprompt.core.no_match) is logistic regression from features of what the pipeline
computes for an expression to P(no match). Data: the synthetic splits and their absent-object
mirrors (`train_absent`, `val_absent`, `test_absent`: the same expressions placed on new scenes
without their object).

Fit (with --checkpoint, unless --no-fit):
1. weights on the train expressions of the images `train_absent` mirrors (label 0) and
   `train_absent` (label 1), for each candidate feature set (the best score alone; the pipeline's
   outputs: scores and generated mask; the condition encoder's joint context and pointer; both)
   and ridge strength;
2. on val (`val` + `val_absent`): the candidate and ridge with the highest AUROC, then a
   rescaling of its logit (Platt: two parameters) so that its probabilities match val's
   frequencies, then the threshold with the highest balanced accuracy (mean of the recall of
   "no match" and of "match").
The chosen calibrator is written beside the checkpoint as `no_match-{steps}steps.json`
(--overwrite replaces one); `diffprompt export` copies it into the artifact's manifest.

Report, at the val threshold: precision, recall and F1 of "no match", and AUROC, on val and on
test (`testA` + `testB` present, `test_absent` absent), and the test AUROC on the paired texts only
(leaving out the present expressions no scene can lack, "the leftmost shape": there the words
alone say nothing); every candidate's row (each chosen and
rescaled on val the same way) and a words-only row (bag of words of the expression: how much
the text alone gives away); the share of each test split flagged, and R@1 (IoU >= 0.5) of the
present test expressions that are answered and that are flagged. With --artifact (onnxruntime)
or --no-fit, the stored calibrator is reported; PyTorch and onnxruntime give the same numbers.
Splits missing under --data-dir are written first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffprompt.cli import non_negative_int, positive_int
from diffprompt.core.errors import OutputExistsError, UserError
from diffprompt.core.no_match import (
    FEATURES,
    NoMatchCalibration,
    calibration_file,
    feature_matrix,
    read_calibration,
    sigmoid,
    write_calibration,
)
from diffprompt.core.providers import PROVIDER_NAMES

FIT = ("train", "train_absent")
VAL = ("val", "val_absent")
TEST = ("testA", "testB", "test_absent")
OUTPUT_FEATURES = ("top_logit", "margin", "mean_logit", "mask_peak", "mask_area", "mask_at_top")
CONDITION_FEATURES = ("pointer_peak", "context_summary", "context_pointed", "context_text")
CANDIDATES = {
    "best score": ("top_logit",),
    "outputs": OUTPUT_FEATURES,
    "conditions": CONDITION_FEATURES,
    "outputs + conditions": OUTPUT_FEATURES + CONDITION_FEATURES,
}
WORDS = "words only"  # a bag of words of the expression: what the text alone gives away
RIDGE = (1.0, 10.0, 100.0, 1000.0)  # L2 strengths tried on the standardised weights (not the bias)


# -- running the pipeline ---------------------------------------------------------------------------


@dataclass
class SplitData:
    name: str
    absent: np.ndarray  # (N,) bool: the expression's object is not in the image
    hit: np.ndarray  # (N,) bool: the best box has IoU >= 0.5 with a referred object (False if absent)
    kinds: np.ndarray  # (N,) expression kind
    paired: np.ndarray  # (N,) bool: the text can also be absent (only "the leftmost shape" and the like cannot)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, columns)
    stored: np.ndarray | None = None  # (N,) P(no match) of the stored calibrator


def run_split(model, samples, name: str, names: tuple[str, ...], stored: NoMatchCalibration | None, seed: int,
              batch_size: int, progress: bool) -> SplitData:
    """Run `model` (a DiffPromptPipeline or a GroundingRuntime) on every sample, seeded as evaluation is;
    keep the features `names` (PyTorch) and the stored calibrator's probabilities."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from diffprompt.core.boxes import boxes_to_pixels
    from diffprompt.core.runtime import GroundingRuntime
    from diffprompt.training.data.grounding_dataset import RecDataset, rec_collate
    from diffprompt.training.evaluation.metrics import box_iou
    from diffprompt.training.evaluation.rec import sample_seed

    spec = model.image_spec
    loader = DataLoader(RecDataset(samples, spec), batch_size=batch_size, collate_fn=rec_collate)
    blocks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    stored_p, tops = [], []
    for batch in tqdm(loader, desc=name, unit="batch", disable=not progress, leave=False):
        ids, mask = model.tokenizer(batch["expressions"])
        ids, mask = ids.astype(np.int64), mask.astype(np.int64)
        seeds = [sample_seed(seed, samples[i].sample_id) for i in batch["index"].tolist()]
        if isinstance(model, GroundingRuntime):
            result = model.ground(batch["pixels"].numpy(), ids, mask, seeds)
            outputs = {"scores": result.scores, "boxes": result.boxes}
            stored_p.append(result.no_match)
        else:
            outputs = pipeline_outputs(model, batch["pixels"], ids, mask, seeds)
            for n in names:
                blocks[n].append(feature_matrix((n,), outputs))
            if stored is not None:
                stored_p.append(stored.probability(outputs))
        tops.append(outputs["boxes"][np.arange(len(ids)), np.argmax(outputs["scores"], axis=1)])
    top = np.concatenate(tops)
    hit = np.zeros(len(samples), bool)
    for i, sample in enumerate(samples):
        if len(sample.boxes):
            px = boxes_to_pixels(top[i: i + 1], sample.width, sample.height, spec.resize_mode)
            hit[i] = box_iou(px, sample.boxes).max() >= 0.5
    return SplitData(name, np.array([len(s.boxes) == 0 for s in samples]), hit, np.array([s.kind for s in samples]),
                     np.array([pairable(s.expression) for s in samples]),
                     {n: np.concatenate(b) for n, b in blocks.items()},
                     np.concatenate(stored_p) if stored_p and stored_p[0] is not None else None)


def pipeline_outputs(pipeline, pixels, ids: np.ndarray, mask: np.ndarray, seeds) -> dict[str, np.ndarray | None]:
    """What the no-match features read, from the PyTorch pipeline: scores, boxes, the final generated mask,
    and the condition encoder's outputs (named as the exported graph names them)."""
    import torch

    from diffprompt.training.models.diffprompt import dit_conditions

    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    out, generated = pipeline(pixels, ids_t, mask_t, seeds)
    outputs = {"scores": torch.sigmoid(out.logits[..., 0].float()).numpy(), "boxes": out.pred_boxes.float().numpy(),
               "attention_mask": mask,
               "mask_logits": None if generated is None else generated[:, 0, 0].float().numpy()}  # layer 0 = final x0
    if pipeline.dit is not None:
        with torch.no_grad():
            cond = dit_conditions(pipeline.foundation, pipeline.dit, pixels, ids_t, mask_t)
            prepared = pipeline.dit.prepare_conditions(**cond)
        outputs.update({k: None if v is None else v.float().numpy() for k, v in prepared.items()})
    return outputs


def pairable(text: str) -> bool:
    """True if the expression can refer to nothing in some scene: then the *_absent splits hold it too, and
    its words alone say nothing about presence."""
    from diffprompt.training.data.synthetic.expressions import can_be_absent
    from diffprompt.training.data.synthetic.language import parse

    try:
        return can_be_absent(parse(text))
    except ValueError:  # not of the synthetic grammar
        return True


def words(samples, tokenizer) -> np.ndarray:
    """(N, vocabulary) word counts of each expression."""
    ids, mask = tokenizer([s.expression for s in samples])
    counts = np.zeros((len(samples), tokenizer.vocab_size))
    for i in range(len(samples)):
        np.add.at(counts[i], ids[i][mask[i] > 0], 1.0)
    return counts


def concat(parts: list[SplitData], name: str) -> SplitData:
    join = lambda get: np.concatenate([get(p) for p in parts])
    return SplitData(name, join(lambda p: p.absent), join(lambda p: p.hit), join(lambda p: p.kinds),
                     join(lambda p: p.paired), {k: join(lambda p, k=k: p.features[k]) for k in parts[0].features},
                     None if parts[0].stored is None else join(lambda p: p.stored))


# -- fitting ------------------------------------------------------------------------------------------


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weights and bias of L2-regularised logistic regression (Newton's method; the bias is not penalised)."""
    n, f = x.shape
    design = np.hstack([np.ones((n, 1)), x])
    ridge = l2 * np.eye(f + 1)
    ridge[0, 0] = 0.0
    w = np.zeros(f + 1)
    for _ in range(iterations):
        p = sigmoid(design @ w)
        grad = design.T @ (p - y) + ridge @ w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + ridge + 1e-9 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[1:], float(w[0])


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weights, bias) of logistic regression on standardised columns."""
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    weights, bias = fit_logistic((x - mean) / scale, y.astype(np.float64), l2)
    return mean, scale, weights, bias


def probe_logit(probe, x: np.ndarray) -> np.ndarray:
    mean, scale, weights, bias = probe
    return bias + ((x - mean) / scale) @ weights


def platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, c): sigmoid(a * z + c) fitted to labels y (the rescaling of a logit on val)."""
    (a,), c = fit_logistic(z[:, None], y.astype(np.float64), l2=0.0)
    return float(a), c


def balanced_threshold(p: np.ndarray, absent: np.ndarray) -> float:
    """The threshold t (flag when p >= t) with the highest balanced accuracy, halfway between two probabilities."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], absent[order]
    tpr = np.cumsum(ys) / max(ys.sum(), 1)
    fpr = np.cumsum(~ys) / max((~ys).sum(), 1)
    cuts = np.flatnonzero(np.r_[ps[1:] < ps[:-1], True])  # flag the first k+1 rows only where the next p is lower
    k = cuts[np.argmax((tpr - fpr)[cuts])]
    return float(ps[k] if k == len(ps) - 1 else (ps[k] + ps[k + 1]) / 2)


# -- scoring --------------------------------------------------------------------------------------------


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auroc(p: np.ndarray, y: np.ndarray) -> float:
    """Probability that an absent expression gets a higher P(no match) than a present one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(p)
    pos = y.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scores(p: np.ndarray, threshold: float, data: SplitData, parts: list[SplitData]) -> dict:
    """Precision / recall / F1 of "no match" at `threshold`, AUROC, log-loss, flag rates, R@1 answered/flagged."""
    flag, y = p >= threshold, data.absent
    tp = int((flag & y).sum())
    precision = tp / max(int(flag.sum()), 1)
    recall = tp / max(int(y.sum()), 1)
    present = ~y
    answered, flagged = present & ~flag, present & flag
    out = {"n_present": int(present.sum()), "n_absent": int(y.sum()), "threshold": threshold,
           "precision": precision, "recall": recall,
           "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
           "auroc": auroc(p, y), "auroc_paired": auroc(p[data.paired], y[data.paired]),
           "n_present_paired": int((present & data.paired).sum()),
           "log_loss": log_loss(p, y.astype(np.float64)), "flagged": {},
           "r1_present": float(data.hit[present].mean()),
           "r1_answered": float(data.hit[answered].mean()) if answered.any() else None,
           "r1_flagged": float(data.hit[flagged].mean()) if flagged.any() else None,
           "n_present_flagged": int(flagged.sum())}
    start = 0
    for part in parts:
        out["flagged"][part.name] = float(flag[start: start + len(part.absent)].mean())
        start += len(part.absent)
    out["by_kind"] = {str(k): {"present": int((present & (data.kinds == k)).sum()),
                               "absent": int((y & (data.kinds == k)).sum()),
                               "flagged_present": _share(flag, present & (data.kinds == k)),
                               "flagged_absent": _share(flag, y & (data.kinds == k))}
                      for k in sorted(set(data.kinds.tolist()))}
    return out


def _share(flag: np.ndarray, rows: np.ndarray) -> float | None:
    return float(flag[rows].mean()) if rows.any() else None


# -- the command ---------------------------------------------------------------------------------------


def load_split(name: str, data_dir: Path, progress: bool, limit: int | None):
    from diffprompt.training.data.mdetr import check_images, load_mdetr
    from diffprompt.training.data.synthetic.splits import SPLITS
    from diffprompt.training.data.synthetic.writer import write_split

    path = data_dir / f"{name}.json"
    if not path.exists():
        write_split(SPLITS[name], data_dir, progress=progress)
    samples = list(load_mdetr(path, keep_unannotated=SPLITS[name].absent))
    if name == "train":  # the images train_absent mirrors
        samples = [s for s in samples if s.image_id < SPLITS["train_absent"].n_images]
    samples = samples[:limit]
    if not samples:
        raise UserError(f"{path}: no expressions")
    if any((len(s.boxes) == 0) != SPLITS[name].absent for s in samples):
        raise UserError(f"{path}: split {name} should {'' if SPLITS[name].absent else 'not '}be absent-object "
                        "expressions only; rewrite it with `diffprompt data write`")
    check_images(samples)
    return samples


def main(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.artifact):
        raise UserError("give --checkpoint (PyTorch) or --artifact (onnxruntime), one of them")
    if args.artifact:
        from diffprompt.core.providers import ProviderConfig
        from diffprompt.core.runtime import GroundingRuntime

        model = GroundingRuntime.load(args.artifact, ProviderConfig(preferred=tuple(args.providers),
                                                                    intra_op_threads=args.threads))
        steps, fitting, stored = model.manifest.ddim_steps, False, model.manifest.no_match
        if stored is None:
            raise UserError(f"{args.artifact}: its manifest has no no-match calibration: fit one with "
                            "`diffprompt calibrate --checkpoint PIPELINE`, then export again")
        available: set[str] = set()
    else:
        import torch

        from diffprompt.training.models.diffprompt import PIPELINE_FILE, DiffPromptPipeline, weights_fingerprint

        torch.set_num_threads(args.threads)
        checkpoint = Path(args.checkpoint)
        if (checkpoint / PIPELINE_FILE).exists():
            model = DiffPromptPipeline.from_pretrained(checkpoint, steps=args.ddim_steps)
        else:
            model = DiffPromptPipeline.foundation_only(checkpoint)
        makes_masks = model.learner is not None and model.learner.needs_masks
        steps = args.ddim_steps if makes_masks else 0
        fitting = not args.no_fit
        target = checkpoint / calibration_file(steps)
        if fitting and target.exists() and not args.overwrite:
            raise OutputExistsError(f"{target} exists: give --overwrite to refit it, or --no-fit to report it")
        stored = None if fitting else read_calibration(checkpoint, steps)
        if not fitting and stored is None:
            raise UserError(f"{target}: missing; fit it first (without --no-fit)")
        if stored is not None and stored.fingerprint != weights_fingerprint(checkpoint):
            raise UserError(f"{target}: fitted on other weights than {checkpoint} holds now; refit it (--overwrite)")
        tokens = model.dit is not None and model.dit.pointer
        available = {"scores", "boxes", "attention_mask", *(["mask_logits"] if makes_masks else []),
                     *(["context", "maps"] if tokens else [])}

    candidates = {k: v for k, v in CANDIDATES.items() if all(set(FEATURES[f].needs) <= available for f in v)}
    names = tuple(dict.fromkeys(f for v in candidates.values() for f in v)) if fitting else ()
    data_dir = Path(args.data_dir)
    groups: dict[str, list[SplitData]] = {}
    word_counts: dict[str, np.ndarray] = {}
    for group, splits in (("fit", FIT if fitting else ()), ("val", VAL), ("test", TEST)):
        groups[group] = []
        counts = []
        for split in splits:
            samples = load_split(split, data_dir, args.progress, args.limit)
            groups[group].append(run_split(model, samples, split, names, stored, args.seed, args.batch_size,
                                           args.progress))
            counts.append(words(samples, model.tokenizer))
        if splits:
            word_counts[group] = np.concatenate(counts)
    fit_d = concat(groups["fit"], "fit") if fitting else None
    val, test = concat(groups["val"], "val"), concat(groups["test"], "test")

    rows: dict[str, dict] = {}
    if fitting:
        columns = {name: (lambda d, g, fs=fs: np.concatenate([d.features[f] for f in fs], axis=1))
                   for name, fs in candidates.items()}
        columns[WORDS] = lambda d, g: word_counts[g]
        fitted = {}
        for name, get in columns.items():
            x_fit, x_val, x_test = get(fit_d, "fit"), get(val, "val"), get(test, "test")
            tried = {l2: fit_probe(x_fit, fit_d.absent, l2) for l2 in RIDGE}
            val_auroc = {l2: auroc(probe_logit(probe, x_val), val.absent) for l2, probe in tried.items()}
            l2 = max(RIDGE, key=lambda k: val_auroc[k])
            a, c = platt(probe_logit(tried[l2], x_val), val.absent)
            p_val = sigmoid(a * probe_logit(tried[l2], x_val) + c)
            threshold = balanced_threshold(p_val, val.absent)
            p_test = sigmoid(a * probe_logit(tried[l2], x_test) + c)
            rows[name] = {"features": list(candidates.get(name, ("expression words",))), "l2": l2,
                          "columns": int(x_fit.shape[1]), "val_auroc_by_l2": val_auroc,
                          "fit_auroc": auroc(probe_logit(tried[l2], x_fit), fit_d.absent),
                          "val": scores(p_val, threshold, val, groups["val"]),
                          "test": scores(p_test, threshold, test, groups["test"])}
            fitted[name] = (tried[l2], a, c, threshold, l2)
        chosen = max(candidates, key=lambda k: rows[k]["val"]["auroc"])
        (mean, scale, weights, bias), a, c, threshold, l2 = fitted[chosen]
        stored = NoMatchCalibration(
            candidates[chosen], tuple(mean.tolist()), tuple(scale.tolist()), tuple((a * weights).tolist()),
            a * bias + c, threshold, steps, {
                "weights": f"{FIT[0]} (the {int((~fit_d.absent).sum())} expressions of the images {FIT[1]} "
                           f"mirrors) + {FIT[1]} ({int(fit_d.absent.sum())}), ridge {l2:g}",
                "chosen": f"{chosen!r}: the highest AUROC on {' + '.join(VAL)} among {list(candidates)}",
                "rescaled": f"Platt scaling on {' + '.join(VAL)} "
                            f"({int((~val.absent).sum())} present, {int(val.absent.sum())} absent)",
                "threshold": f"the highest balanced accuracy on {' + '.join(VAL)}",
                "seed": args.seed, "limit": args.limit}, weights_fingerprint(checkpoint))
        print(f"wrote {write_calibration(checkpoint, stored)} ({chosen}: {', '.join(stored.features)}; "
              f"{len(stored.weights)} columns; threshold {stored.threshold:.4f})")
    else:
        chosen = "stored"
        rows[chosen] = {"features": list(stored.features), "val": scores(val.stored, stored.threshold, val,
                                                                          groups["val"]),
                        "test": scores(test.stored, stored.threshold, test, groups["test"])}
    print_tables(rows, chosen)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "checkpoint": args.checkpoint, "artifact": args.artifact, "ddim_steps": steps, "seed": args.seed,
            "limit": args.limit, "chosen": chosen, "calibration": stored.to_dict(), "rows": rows}, indent=1) + "\n")
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def print_tables(rows: dict[str, dict], chosen: str) -> None:
    print("\n'no match' at the threshold chosen on val: precision, recall, F1 (%), AUROC")
    print("| features | columns | threshold | val P | val R | val F1 | val AUROC | test P | test R | test F1 "
          "| test AUROC | test AUROC, paired |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        v, t = r["val"], r["test"]
        label = f"**{name}** (chosen)" if name == chosen and len(rows) > 1 else name
        print(f"| {label} | {r.get('columns', '-')} | {v['threshold']:.4f} | {_pct(v['precision'])} | "
              f"{_pct(v['recall'])} | {_pct(v['f1'])} | {v['auroc']:.4f} | {_pct(t['precision'])} | "
              f"{_pct(t['recall'])} | {_pct(t['f1'])} | {t['auroc']:.4f} | {t['auroc_paired']:.4f} |")
    t = rows[chosen]["test"]
    print(f"\n{chosen} on test ({t['n_present']} present, {t['n_absent']} absent): share flagged 'no match' per "
          "split, R@1 of the present expressions (all, answered, flagged)")
    print("| " + " | ".join(f"flagged, {k}" for k in t["flagged"]) + " | R@1 all | R@1 answered | R@1 flagged "
          "| present flagged |")
    print("|" + "---:|" * (len(t["flagged"]) + 4))
    print("| " + " | ".join(_pct(v) for v in t["flagged"].values()) + f" | {_pct(t['r1_present'])} | "
          f"{_pct(t['r1_answered'])} | {_pct(t['r1_flagged'])} | {t['n_present_flagged']} of {t['n_present']} |")
    print(f"\n{chosen} on test, by expression kind: share flagged 'no match' (%)")
    print("| kind | present | flagged (false alarms) | absent | flagged (recall) |")
    print("|---|---:|---:|---:|---:|")
    for kind, k in t["by_kind"].items():
        print(f"| {kind} | {k['present']} | {_pct(k['flagged_present'])} | {k['absent']} | "
              f"{_pct(k['flagged_absent'])} |")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a train-prompts pipeline (or foundation) directory: fit")
    p.add_argument("--artifact", default=None, help="an exported artifact: report its calibrator (onnxruntime)")
    p.add_argument("--ddim-steps", type=positive_int, default=5,
                   help="Diff-Prompt sampling steps (--checkpoint; 5 = the served artifact)")
    p.add_argument("--no-fit", action="store_true", help="report the stored calibrator instead of fitting one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")
    p.add_argument("--data-dir", default="data/synthetic", help="synthetic splits (written here if missing)")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N expressions of each split only")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="noise seed (per expression: seed, sample id), as evaluate")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--providers", nargs="+", default=["cpu"], choices=list(PROVIDER_NAMES), metavar="PROVIDER",
                   help="onnxruntime providers in order (--artifact)")
    p.add_argument("--out", default=None, help="also write every number as JSON here")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


if __name__ == "__main__":
    from diffprompt.cli import run

    raise SystemExit(run(main, build_parser().parse_args()))
