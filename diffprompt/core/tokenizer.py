"""Query tokenizer: text -> fixed-length ids for the CLIP-style text tower (numpy only, no torch).

The embedded default ships a word-level `tokenizers` model over the synthetic vocabulary
(`build_word_tokenizer`, with the words from diffprompt.training.data.synthetic.vocabulary); a
Hugging Face OWL checkpoint brings CLIP's BPE, as `tokenizer.json` or as the `vocab.json` +
`merges.txt` pair that `CLIPTokenizer.save_pretrained` writes (`build_clip_bpe` rebuilds the fast
tokenizer from them as transformers does). Both follow CLIP's conventions, which the text tower
relies on:

- every sequence is `BOS tokens... EOS`, and EOS has the largest id of the vocabulary, so the
  tower pools at `argmax(ids)`;
- sequences are padded / truncated to `max_length` (16 for OWL) by the tokenizer itself
  (`tokenizers` padding and truncation; EOS kept on truncation);
- the pad id is the checkpoint's pad token (`tokenizer_config.json`'s "pad_token", OWL-ViT: "!"
  = 0, then a special token as in transformers), else the tokenizer.json's padding, else 0; a
  query whose first id is the pad id is a padding query. The attention mask is the tokenizer's
  own: 1 on BOS..EOS, 0 on padding, so a real "!" (id 0 in CLIP's vocabulary) stays attended.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordLevel
from tokenizers.processors import TemplateProcessing

from diffprompt.core.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")  # CLIPTokenizer.save_pretrained's slow-tokenizer files
TOKENIZER_CONFIG = "tokenizer_config.json"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer split (transformers' CLIPConverter): contractions, letter runs, single digits, symbols
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
NEEDED = f"{TOKENIZER_FILE}, or {BPE_FILES[0]} + {BPE_FILES[1]} (as Hugging Face saves a CLIP tokenizer)"


def build_word_tokenizer(words: list[str]) -> Tokenizer:
    """Word-level tokenizer: pad = 0, words, then unk, bos and eos (eos = the largest id)."""
    vocab = {PAD: 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    for special in (UNK, BOS, EOS):
        vocab[special] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return tok


def build_clip_bpe(vocab_file: str | Path, merges_file: str | Path) -> Tokenizer:
    """CLIP's byte-level BPE from `vocab.json` + `merges.txt`, built as transformers' CLIPConverter does.

    Normalise (NFC, collapse whitespace, lower-case), split into words, byte-level BPE with "</w>"
    word ends, then `<|startoftext|> ... <|endoftext|>` around every sequence.
    """
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in Path(merges_file).read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=CLIP_EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single=f"{CLIP_BOS} $A {CLIP_EOS}",
                                            special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])])
    return tok


def _configured_pad_token(directory: Path) -> str | None:
    """`pad_token` of a Hugging Face tokenizer_config.json (a string or {"content": ...}), if any."""
    try:
        pad = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8")).get("pad_token")
    except (OSError, ValueError):
        return None
    return pad.get("content") if isinstance(pad, dict) else pad


class QueryTokenizer:
    """Wraps a `tokenizers.Tokenizer` with the OWL padding / truncation rules."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 16, pad_id: int | None = None):
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: padding / truncation are set on it
        self.max_length = max_length
        if pad_id is None:
            pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
        self.pad_id = int(pad_id)
        pad_token = tokenizer.id_to_token(self.pad_id) or PAD
        self.tokenizer.enable_truncation(max_length)  # counts the post-processor's BOS / EOS: EOS is kept
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.eos_id = self.tokenizer.get_vocab_size() - 1

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 16) -> QueryTokenizer:
        """From a tokenizer.json, or a checkpoint directory holding one (or vocab.json + merges.txt).

        A directory without any raises `CheckpointError` naming the files it needs.
        """
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        pad_token = _configured_pad_token(directory)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
            elif all((path / f).is_file() for f in BPE_FILES):
                tok = build_clip_bpe(path / BPE_FILES[0], path / BPE_FILES[1])
            else:
                raise CheckpointError(f"{path}: no tokenizer; a checkpoint needs {NEEDED}")
        elif path.is_file():
            tok = Tokenizer.from_file(str(path))
        else:
            raise CheckpointError(f"{path}: missing; a checkpoint needs {NEEDED}")
        pad_id = tok.token_to_id(pad_token) if pad_token is not None else None
        if pad_id is not None:
            tok.add_special_tokens([pad_token])  # as transformers does with a configured pad token
        return cls(tok, max_length, pad_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (Q, max_length) int64, attention_mask (Q, max_length) int64), padded by the tokenizer."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)
        return ids, mask
