"""The synthetic world's vocabulary and the word-level tokenizer the embedded default is trained with."""

from __future__ import annotations

from diffprompt.core.tokenizer import QueryTokenizer, build_word_tokenizer
from diffprompt.training.data.synthetic.language import DIRECTIONS, NOUN_ANY, ORDINALS, RELATIONS, SIDES
from diffprompt.training.data.synthetic.world import COLORS, SHAPES, SIZES


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic grammar can produce, in a fixed order."""
    words = ["the", "from", NOUN_ANY, *SIZES, *COLORS, *SHAPES, *DIRECTIONS, *ORDINALS, *SIDES]
    for relation in RELATIONS:
        words.extend(relation.split())
    return list(dict.fromkeys(words))  # de-duplicated, order kept


def synthetic_tokenizer(max_length: int = 16) -> QueryTokenizer:
    """The word-level tokenizer over `synthetic_vocabulary()` (pad = 0, eos = the largest id)."""
    return QueryTokenizer(build_word_tokenizer(synthetic_vocabulary()), max_length)
