"""Query tokenizer: text -> fixed-length ids for the CLIP-style text tower (numpy only, no torch).

The embedded default ships a word-level `tokenizers` model over the synthetic vocabulary
(`build_word_tokenizer`, with the words from diffprompt.training.data.synthetic.vocabulary); a
Hugging Face OWL checkpoint brings its own `tokenizer.json` (CLIP BPE). Both follow CLIP's
conventions, which the text tower relies on:

- id 0 is padding (OWL-ViT pads with "!" = 0; a query whose first id is 0 is a padding query);
- every sequence is `BOS tokens... EOS`, and EOS has the largest id of the vocabulary, so the
  tower pools at `argmax(ids)`;
- sequences are padded / truncated to `max_length` (16 for OWL), EOS kept on truncation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

from diffprompt.core.errors import MissingFileError

TOKENIZER_FILE = "tokenizer.json"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


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


class QueryTokenizer:
    """Wraps a `tokenizers.Tokenizer` with the OWL padding / truncation rules."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 16):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.eos_id = self.tokenizer.get_vocab_size() - 1

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 16) -> QueryTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise MissingFileError(f"{path}: tokenizer file missing")
        return cls(Tokenizer.from_file(str(path)), max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        self.tokenizer.save(str(path))
        return path

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (Q, max_length) int64, attention_mask (Q, max_length) int64)."""
        ids = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            seq = enc.ids
            if len(seq) > self.max_length:
                seq = seq[: self.max_length - 1] + [seq[-1]]  # keep EOS last
            ids[i, : len(seq)] = seq
        mask = (ids != 0).astype(np.int64)
        return ids, mask
