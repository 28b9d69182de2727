"""Text that can enter a tokenizer, a hash or a file: valid Unicode, no lone surrogates.

JSON can spell a lone surrogate (``"\\ud800"``) and Python keeps it in a ``str``; it only fails
later, when something encodes it (a tokenizer's TypeError, a hash's UnicodeEncodeError). Every
place text enters clp-ray checks it with these and names the item.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional


def is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def first_invalid(texts: Iterable[str]) -> Optional[int]:
    """The index of the first text holding a lone surrogate, or None."""
    return next((i for i, t in enumerate(texts) if not is_valid_text(t)), None)


SURROGATE = "holds a lone surrogate (not valid Unicode text)"
