"""A small CLIP-layout BPE vocabulary for tests (nothing downloaded), and transformers' tokens for it.

The 256 byte symbols in CLIP's order (so "!" is id 0, as in CLIP), the same with "</w>", a few
merges, then <|startoftext|> and <|endoftext|> (the largest id): `vocab.json` + `merges.txt` as
`CLIPTokenizer.save_pretrained` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

MERGES = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("s", "t"), ("st", "a"), ("sta", "r</w>"),
          ("l", "e"), ("le", "f"), ("lef", "t</w>")]


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable symbol table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_bpe(directory: Path) -> dict[str, int]:
    """vocab.json + merges.txt as CLIPTokenizer.save_pretrained writes them; returns the vocabulary."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n",
                                          encoding="utf-8")
    return vocab


def reference_tokens(directory: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' CLIP tokenizer, padded as OwlViTProcessor does (max_length 16, pad token "!")."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!")
    enc = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
