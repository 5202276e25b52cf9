"""Special piece ids, the same in every model `mt` trains (its SentencePiece models are trained with
them), and the target-language tags of a multilingual model."""

import re

PAD, UNK, BOS, EOS = 0, 1, 2, 3

TAG_PATTERN = re.compile(r"^<2([A-Za-z][A-Za-z0-9_]*)>$")  # <2fr>: "translate into French", first source piece


def language_tag(lang: str) -> str:
    """The reserved piece that asks a multilingual model for output in `lang`."""
    return f"<2{lang}>"
