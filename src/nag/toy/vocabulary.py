"""What the built-in model can draw, and the words of a prompt it was never trained on.

The built-in model knows the words of its training captions and nothing else: any other word is
read as a few single-character tokens it has never seen, which pushes the image somewhere
arbitrary. :func:`unknown_words` finds them so that the command line, the web UI and the demo can
say so before drawing.

    >>> from nag.toy.vocabulary import unknown_words
    >>> unknown_words("a large red star on a black background")
    []
    >>> unknown_words("a fox on a checkered background")
    ['fox', 'checkered']
"""

from __future__ import annotations

import re

from .dataset import _COUNT_WORDS, _POSITION_PHRASES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, VOCABULARY

__all__ = [
    "MODEL_BACKGROUNDS", "MODEL_VOCABULARY", "VOCABULARY_TABLE", "prompt_warning", "unknown_words", "vocabulary_text",
]

#: The backgrounds the built-in model is trained on. The dataset and the probe also have textured
#: ones (checkered, striped); the model was not trained on them and does not draw them.
MODEL_BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray")

#: The attribute values of the built-in model, as prompt words, in the order the docs list them.
VOCABULARY_TABLE: dict[str, tuple[str, ...]] = {
    "shapes": SHAPES,
    "colours": COLOURS,
    "counts": tuple(_COUNT_WORDS.values()),
    "sizes": SIZES,
    "positions": tuple(_POSITION_PHRASES[p] for p in POSITIONS),
    "backgrounds": tuple(f"on a {b} background" for b in MODEL_BACKGROUNDS),
}

#: Every word the built-in model was trained on (the caption words minus the untrained backgrounds).
MODEL_VOCABULARY: frozenset[str] = frozenset(VOCABULARY) - (frozenset(BACKGROUNDS) - frozenset(MODEL_BACKGROUNDS))


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` the built-in model was not trained on, in order, each once.

    Case and punctuation are ignored, as the tokenizer does; digits count as words ("2" is not
    "two").
    """
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in MODEL_VOCABULARY))


def vocabulary_text(separator: str = "\n") -> str:
    """The vocabulary, one attribute per part ("shapes: circle, square, ..."), for help texts and warnings."""
    return separator.join(f"{name}: {', '.join(values)}" for name, values in VOCABULARY_TABLE.items())


def prompt_warning(prompt: str, negative: str | None = None) -> str | None:
    """One paragraph naming the words of the prompt or negative prompt outside the vocabulary (or None)."""
    unknown = {"prompt": unknown_words(prompt), "negative prompt": unknown_words(negative or "")}
    parts = [f"{where} {', '.join(repr(w) for w in words)}" for where, words in unknown.items() if words]
    if not parts:
        return None
    return (
        f"the built-in model was not trained on these words ({'; '.join(parts)}) and draws them arbitrarily. "
        f"It knows {vocabulary_text('; ')} (two or three objects are always small and scattered)."
    )
