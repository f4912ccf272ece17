"""Importers that turn a public task collection into loramint Tasks, one function per source.

- `openai_evals_tasks`: the basic (match / includes / fuzzy-match) evals of OpenAI's `evals` registry, from
  the `evals` wheel on PyPI (MIT; data folders the wheel's LICENSE.md lists under other licenses are left out).
- `bbh_tasks`: BIG-Bench Hard (`bbh/*.json` + `cot-prompts/*.txt` of suzgunmirac/BIG-Bench-Hard, MIT).

Importers only convert and filter; the corpus (loramint.corpus) caps, splits and stores what they return.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import yaml

from loramint.errors import TaskError
from loramint.tasks import Example, Task

MIN_EXAMPLES = 20
"""A task with fewer usable examples cannot fill a train, a validation and a test split: left out."""
MAX_INPUT_CHARS = 3000
MAX_TARGET_CHARS = 400
"""Examples longer than these do not fit a 2k-token context with room for the answer: left out."""
MAX_MAJORITY = 0.8
"""A classification task whose most common answer covers more than this share is left out: a constant
answer would look like skill."""
GENERIC_SYSTEM_CHARS = 60
"""A short system prompt about being an assistant ("You are a helpful assistant.") is no task instruction."""
_ASSISTANT = re.compile(r"\bassistant\b", re.IGNORECASE)
MAX_LABELS = 8
"""Free-text tasks whose answers come from at most this many short labels become multiple choice."""

# ------------------------------------------------------------------------------------------ openai evals

EVALS_REQUIREMENT = "evals==3.0.1.post1"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
EVALS_SHA256 = "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"
_REGISTRY = "evals/registry/"
_BASIC = {"Match": "exact_match", "Includes": "exact_match", "FuzzyMatch": "rougeL"}
# Data whose upstream license forbids redistribution or commercial use, though the registry does not list it.
_EXCLUDED_EVALS = re.compile(r"reclor|logiqa")
_ABILITY = re.compile(
    r"^(?:this\s+)?(?:eval(?:uation)?\s+)?(?:tests?|evaluates?|checks?|assess(?:es)?|measures?)\s+"
    r"(?:the\s+)?(?:model'?s?|ai'?s?|llm'?s?|gpt'?s?)\s+(?:ability|capability|capacity|knowledge)\s+(?:to|of|in)\s+",
    re.IGNORECASE,
)

# Family of an eval, by the first rule whose pattern matches "<name> <description>" (lower case).
EVALS_FAMILIES: tuple[tuple[str, str], ...] = (
    ("lexicon", r"lexicon|new-words|loanwords"),
    ("rhyme", r"rhyme"),
    (
        "exam_qa",
        r"exams?-qa|exam\d|upsc|ukraine-eit|swedish_sat|jee-math|cissp|fcc_amateur|atpl|utah_real|"
        r"driving_license|itpassport|medmcqa|medical_exam|computer-science-problems",
    ),
    ("chinese", r"chinese|canto|shi_jing|tang_poet|stratagems|zodiac|lunar|sexagenary"),
    ("japanese", r"japanese|kana|kanji|tokyo"),
    ("korean", r"korean|yaminjeong"),
    ("grammar", r"-gec|gec-|proofread|grammar-|-grammar|rucola"),
    ("numerals", r"numeral|number-reading|numbers\b|decimal-units|num_to|_num\b|case_num"),
    ("colors", r"colou?r|pantone|benjaminmoore|ral_to|hsl"),
    ("encoding", r"base64|caesar|rot13|vigenere|cipher|decode|bitwise|binary|keyboard"),
    (
        "games",
        r"chess|backgammon|connect4|poker|hand_ranks|mahjong|\bgol\b|crossword|rubik|mate-in-one|"
        r"cricket|nfl|sudoku|tic-tac",
    ),
    (
        "spatial",
        r"maze|movement|direction|orientation|globe|3d|finger-tracking|dice|cube|block-puzzle|"
        r"floorplan|viewport|squares|rectangles|triangle|points-on-line|geometry|svg|wkt|lat_long|osm_",
    ),
    ("patterns", r"raven|pattern|sequence|series|abstract-causal|\barc\b|pointer-value|next-val"),
    (
        "logic",
        r"logic|deductive|corr2cause|pararule|causal|unsolvable|escher|knot|automata|context-free|"
        r"tracking-shuffled|regex|grammar-to",
    ),
    (
        "code",
        r"code|css|json|crontab|protocol-buffers|forth|coq|patch|naughty|infiniteloop|resource_id|"
        r"program|\bsql\b",
    ),
    (
        "math",
        r"math|arithmetic|algebra|equation|determinant|matri|derivative|probability|recurrence|"
        r"polynomial|solve-for|operators|calc|combination|sort-numbers|count_|counting",
    ),
    (
        "science",
        r"chem|physics|dna|smiles|resistor|beam|electronic|gears|astro|nutrition|food|medic|heart|"
        r"diabetes|allergen|body|melting|dose|mendeleev|mandaliof",
    ),
    (
        "law_finance",
        r"law|tort|legal|audit|accounting|financ|tax|invoice|stock-option|black-scholes|"
        r"real_estate|monthly_metric|product",
    ),
    ("dates", r"date|day-of-week|calendar|tempo|\btime\b"),
    (
        "languages",
        r"translat|homonym|homograph|orthograph|spelling|syllable|part-of-speech|proverb|"
        r"honorific|phonetic|pronunciation|sindarin|hindi|urdu|hebrew|greek|arabic|polish|russian|russe|"
        r"belarusian|dutch|french|italian|portuguese|romanian|swedish|nepali|turkish|persian|gujarati|"
        r"mongolian|albanian|indonesian|afrikaans|finnish|norwegian|irish|bulgarian|icelandic|ukrain|asl",
    ),
    (
        "text_understanding",
        r"sarcasm|bias|emotion|moral|rhetorical|sentiment|detection|ambiguous|"
        r"irrelevant|crepe|quartz|parable",
    ),
    ("word_games", r"anagram|word|letter|bigram|swap|invert|reverse|riddle|emoji|association"),
    ("knowledge", r".*"),
)


def evals_family(name: str, description: str) -> str:
    text = f"{name} {description}".lower()
    return next(family for family, pattern in EVALS_FAMILIES if re.search(pattern, text))


def _excluded_locations(license_text: str) -> list[str]:
    """The data folders that the wheel's LICENSE.md puts under licenses of their own."""
    return re.findall(r"\*\*Location\*\*:\s*evals/registry/data/([^\s/]+)", license_text)


def _render(messages: list[dict]) -> tuple[str | None, str]:
    """(system instruction or None, the input the model reads) of one chat-format sample."""
    system = None
    if messages and messages[0].get("role") == "system" and "name" not in messages[0]:
        system, messages = str(messages[0].get("content", "")).strip(), messages[1:]
    turns = []
    for message in messages:
        role = message.get("name") or message.get("role")
        content = str(message.get("content", "")).strip()
        if role in ("example_user", "example_assistant"):
            role = role.split("_")[1]
        turns.append((role, content))
    if len(turns) == 1 and turns[0][0] == "user":
        return system, turns[0][1]
    lines = [
        f"{'User' if role == 'user' else 'Assistant' if role == 'assistant' else role}: {text}"
        for role, text in turns
    ]
    return system, "\n".join(lines)


def _targets(ideal: object) -> list[str]:
    values = ideal if isinstance(ideal, list) else [ideal]
    out = []
    for value in values:
        text = str(value).strip() if isinstance(value, (str, int, float)) else ""
        if text and text not in out:
            out.append(text)
    return out


def _as_multiple_choice(rows: list[list[str]]) -> tuple[list[str], list[int]] | None:
    """(labels, answers) when every example's answer is one of a few short labels, else None."""
    labels = Counter(targets[0] for targets in rows)
    if not 2 <= len(labels) <= MAX_LABELS or any(len(label.split()) > 4 for label in labels):
        return None
    if min(labels.values()) < 2:
        return None
    choices = sorted(labels)
    return choices, [choices.index(targets[0]) for targets in rows]


def openai_evals_tasks(wheel: str | Path) -> tuple[list[Task], dict]:
    """Tasks of the `evals` wheel's basic evals and a report of what was left out and why."""
    skipped: Counter[str] = Counter()
    tasks: list[Task] = []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        license_name = next(n for n in names if n.endswith(".dist-info/LICENSE.md"))
        excluded = set(_excluded_locations(archive.read(license_name).decode()))
        specs: dict[str, dict] = {}
        for member in sorted(n for n in names if n.startswith(_REGISTRY + "evals/") and n.endswith(".yaml")):
            try:
                data = yaml.safe_load(archive.read(member))
            except yaml.YAMLError:
                skipped["registry yaml that does not parse"] += 1
                continue
            if isinstance(data, dict):
                specs.update({k: v for k, v in data.items() if isinstance(v, dict)})
        used_files: set[str] = set()
        from tqdm.auto import tqdm

        for name, entry in tqdm(sorted(specs.items()), desc="openai-evals", unit="eval"):
            impl = specs.get(str(entry.get("id", "")))
            if impl is None:
                continue
            kind = str(impl.get("class", "")).rsplit(":", 1)[-1]
            samples = (impl.get("args") or {}).get("samples_jsonl")
            if kind not in _BASIC or not isinstance(samples, str):
                skipped["not a basic match/includes/fuzzy-match eval"] += 1
                continue
            member = _REGISTRY + "data/" + samples
            folder = samples.split("/", 1)[0]
            if folder in excluded or _EXCLUDED_EVALS.search(name):
                skipped["data under a license of its own"] += 1
                continue
            if member not in names or member in used_files:
                skipped["samples missing or already imported by another eval"] += 1
                continue
            used_files.add(member)
            try:
                task = _evals_task(name, entry, kind, archive.read(member).decode("utf-8"))
            except (TaskError, ValueError, UnicodeDecodeError) as err:
                skipped[str(err).split(":", 1)[0]] += 1
                continue
            tasks.append(task)
    return tasks, {"skipped": dict(skipped)}


def _evals_task(name: str, entry: dict, kind: str, text: str) -> Task:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    systems: Counter[str] = Counter()
    parsed = []
    for row in rows:
        raw = row.get("input")
        if isinstance(raw, list):
            system, prompt = _render(raw)
        elif isinstance(raw, str):
            system, prompt = None, raw.strip()
        else:
            continue
        targets = _targets(row.get("ideal"))
        if not prompt or not targets:
            continue
        systems[system or ""] += 1
        parsed.append((system or "", prompt, targets))
    if not parsed:
        raise TaskError("no usable samples: empty")
    common, count = systems.most_common(1)[0]
    summary = _ABILITY.sub("", " ".join(str(entry.get("description") or "").split())).strip()
    if summary:
        summary = summary[0].upper() + summary[1:]
    shared = bool(common) and count >= 0.9 * len(parsed)
    if shared and summary and len(common) < GENERIC_SYSTEM_CHARS and _ASSISTANT.search(common):
        description = (
            summary  # "You are a helpful assistant." says nothing of the task; the eval's summary does
        )
    else:
        description = common if shared else summary
    if not description:
        raise TaskError("no instruction: neither a shared system prompt nor a description")
    examples_raw = []
    for system, prompt, targets in parsed:
        text_in = prompt if (shared and system == common) or not system else f"{system}\n\n{prompt}"
        if shared and system != common:
            continue
        if len(text_in) <= MAX_INPUT_CHARS and all(len(t) <= MAX_TARGET_CHARS for t in targets):
            examples_raw.append((text_in, targets))
    if len(examples_raw) < MIN_EXAMPLES:
        raise TaskError(f"fewer than {MIN_EXAMPLES} usable examples: too small")
    if Counter(targets[0] for _, targets in examples_raw).most_common(1)[0][1] > MAX_MAJORITY * len(
        examples_raw
    ):
        raise TaskError(f"one label answers over {MAX_MAJORITY:.0%} of examples: constant answer")
    mc = _as_multiple_choice([targets for _, targets in examples_raw])
    if mc is not None:
        choices, answers = mc
        examples = [
            Example(text_in, choices=choices, answer=a)
            for (text_in, _), a in zip(examples_raw, answers, strict=True)
        ]
        metric = "accuracy"
    else:
        examples = [Example(text_in, target=targets[0], targets=targets) for text_in, targets in examples_raw]
        metric = _BASIC[kind]
    paraphrases = [summary] if summary and summary != description else []
    return Task(
        name="evals." + _safe_name(name),
        description=description,
        family=evals_family(name, str(entry.get("description") or "")),
        examples=_dedupe(examples),
        source="openai-evals",
        metric=metric,
        descriptions=paraphrases,
        license="MIT",
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:100]


def _dedupe(examples: Iterable[Example]) -> list[Example]:
    """Examples with the same input once (the first), so no input lands in two splits."""
    out, inputs = [], set()
    for example in examples:
        if example.input not in inputs:
            inputs.add(example.input)
            out.append(example)
    return out


# ------------------------------------------------------------------------------------- BIG-Bench Hard

_BBH_VARIANT = re.compile(r"_(three|five|seven)_objects$|_two$")


def bbh_tasks(root: str | Path) -> list[Task]:
    """Tasks of a BIG-Bench Hard checkout (`root` holds bbh/ and cot-prompts/). Each task's description is
    the first line of its chain-of-thought prompt file; the answer options of multiple-choice tasks are
    inside the input, so all are scored by exact match."""
    root = Path(root)
    files = sorted((root / "bbh").glob("*.json"))
    if not files:
        raise TaskError(f"{root} has no bbh/*.json: point it at a checkout of BIG-Bench-Hard")
    tasks = []
    for path in files:
        prompt = root / "cot-prompts" / f"{path.stem}.txt"
        if not prompt.is_file():
            raise TaskError(
                f"{prompt} is missing: each bbh task's description is the first line of its prompt"
            )
        lines = [line.strip() for line in prompt.read_text().splitlines()]
        description = next(line for line in lines if line and line != "-----" and "canary" not in line)
        rows = json.loads(path.read_text())["examples"]
        examples = [Example(str(r["input"]).strip(), target=str(r["target"]).strip()) for r in rows]
        tasks.append(
            Task(
                name=f"bbh.{path.stem}",
                description=description,
                family="bbh_" + _BBH_VARIANT.sub("", path.stem),
                examples=_dedupe(examples),
                source="bbh",
                metric="exact_match",
                license="MIT",
            )
        )
    return tasks
