"""Several phrasings of one task description, by rule (no model download): the generator trains on all of
them so that a short user-style sentence lands near the long definition it was trained with.

Sources, in order: the description, the task's own other phrasings (`Task.descriptions`; for BIG-bench
natural-instructions tasks the one-line SNI "Prompt" and the full definition), then rule-made variants:
the first sentence, the first two sentences, and the description without its boilerplate opening
("In this task, you're given ...").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_OPENING = re.compile(
    r"^(in this task,?\s*(you('re| are| will be)?|we( will)?( ask you to)?)?\s*(given|provided( with)?)?\s*)",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    """Split on sentence ends followed by a capital (good enough for task definitions)."""
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if s.strip()]


def without_opening(sentence: str) -> str:
    """'In this task, you're given a passage ...' -> 'A passage ...' (unchanged when there is no opening)."""
    rest = _OPENING.sub("", sentence, count=1).strip()
    return rest[:1].upper() + rest[1:] if len(rest) >= 12 else sentence


def phrasings(description: str, others: Sequence[str] = (), max_chars: int = 2000) -> list[str]:
    """Distinct phrasings of a task, the description first; each cut to `max_chars` characters."""
    parts = sentences(description)
    candidates = [description, *others]
    if parts:
        candidates += [parts[0], " ".join(parts[:2]), without_opening(parts[0])]
    out: dict[str, None] = {}
    for text in candidates:
        text = " ".join(text.split())[:max_chars]
        if text:
            out.setdefault(text, None)
    return list(out)
