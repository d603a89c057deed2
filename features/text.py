"""Text as imgsent stores and prints it: a file name that is not valid UTF-8 (an old zip archive) is written
with \\x escapes instead of failing the write; counts with their noun ('1 image', '2 images')."""
from __future__ import annotations


def safe_text(s: str) -> str:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) are stored with \\x escapes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
