"""Scores of one answer (exact match, ROUGE-L) and bootstrap confidence intervals over examples and tasks.

Pure functions on strings and numpy arrays; the harness in `evaluate.py` feeds them.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised target, else 0.0."""
    guess = normalize(prediction)
    return float(any(guess == normalize(t) for t in targets))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme, one row kept)."""
    row = [0] * (len(b) + 1)  # row[j]: LCS of the prefix of `a` read so far and b[:j]
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, targets: Sequence[str]) -> float:
    """ROUGE-L F1 on lowercased word tokens (runs of letters/digits), the best over acceptable targets."""
    guess = _WORD.findall(prediction.lower())
    best = 0.0
    for target in targets:
        ref = _WORD.findall(target.lower())
        common = lcs_length(guess, ref)
        if common:
            precision, recall = common / len(guess), common / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---- bootstrap ----------------------------------------------------------------------------------------------


def bootstrap_task_means(
    per_task: Sequence[np.ndarray], n_resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """[R, T]: each task's mean over examples resampled with replacement, R times.

    The indices depend only on `seed` and the tasks' sizes, so two methods scored on the same examples get
    the same resamples: differences and ratios of their replicates are paired.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, len(per_task)))
    for t, values in enumerate(per_task):
        values = np.asarray(values, dtype=np.float64)  # [n_t]
        if values.size == 0:
            raise ValueError(f"task {t} has no values to resample")
        idx = rng.integers(0, values.size, size=(n_resamples, values.size))  # [R, n_t]
        out[:, t] = values[idx].mean(axis=1)
    return out


def interval(point: float, replicates: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high"}: the point estimate and the percentile interval of its replicates."""
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(point), "ci_low": float(low), "ci_high": float(high)}


def format_ci(entry: dict | None, digits: int = 3) -> str:
    """An `interval` entry as text, mean [low, high]; the mean alone when it has no interval, "–" when none."""
    if not entry:
        return "–"
    if entry.get("ci_low") is None:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of `values` with a 95% percentile-bootstrap interval over them."""
    values = np.asarray(values, dtype=np.float64)
    return interval(values.mean(), bootstrap_task_means([values], n_resamples, seed)[:, 0])


def hierarchical_ci(
    per_task: Sequence[np.ndarray], n_resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Mean over tasks of each task's mean, with a 95% interval from resampling examples within each task.

    The task set is held fixed (it is the benchmark); the interval reflects which examples were drawn.
    Paired differences: pass per-example differences between two methods on the same examples.
    """
    point = float(np.mean([np.mean(v) for v in per_task]))
    return interval(point, bootstrap_task_means(per_task, n_resamples, seed).mean(axis=1))
