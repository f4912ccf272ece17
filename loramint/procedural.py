"""Procedural task families generated in code: exact answers, real instructions, any number of examples.

Each task is a seeded generator of (input, answer) pairs with the instruction a user would write and two
shorter phrasings. They give the library breadth in skills a small model can learn (string, list, number,
date and format manipulation); held-out evaluation stays on human-written tasks.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from loramint.tasks import ANIMALS, FRUITS, OBJECTS, Example, Task

VERSION = 1
"""Bumped whenever a generator's output changes (the corpus manifest records it)."""
N_EXAMPLES = 400
COLORS = tuple(
    [
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
        "grey",
        "violet",
        "crimson",
        "scarlet",
        "teal",
        "navy",
        "maroon",
        "beige",
        "ivory",
        "turquoise",
        "magenta",
        "cyan",
        "indigo",
        "lavender",
        "gold",
        "silver",
        "amber",
        "khaki",
        "ochre",
        "tan",
        "mauve",
        "lilac",
        "azure",
        "cobalt",
        "emerald",
        "jade",
        "ruby",
        "sapphire",
        "charcoal",
        "bronze",
        "copper",
    ]
)
WORDS = tuple(sorted(set(FRUITS + ANIMALS + OBJECTS)))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = tuple(dt.date(2000, m, 1).strftime("%B") for m in range(1, 13))
FIRST = tuple(
    [
        "Alice",
        "Ben",
        "Chloe",
        "David",
        "Emma",
        "Felix",
        "Grace",
        "Henry",
        "Iris",
        "Jack",
        "Kate",
        "Liam",
        "Maya",
        "Noah",
        "Olivia",
        "Paul",
    ]
)

Gen = Callable[[random.Random], tuple[str, str | tuple[list[str], int]]]


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    description: str
    phrasings: tuple[str, str]
    make: Gen


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(WORDS, k)


def _numbers(rng: random.Random, k: int, hi: int = 99) -> list[int]:
    return [rng.randint(0, hi) for _ in range(k)]


def _sentence(rng: random.Random) -> str:
    return " ".join(_words(rng, rng.randint(4, 8)))


def _choice(choices: list[str], answer: str) -> tuple[list[str], int]:
    return choices, choices.index(answer)


def _date(rng: random.Random) -> dt.date:
    return dt.date(1990, 1, 1) + dt.timedelta(days=rng.randrange(365 * 40))


def _count_mentions(rng: random.Random) -> tuple[str, str]:
    pool = rng.sample(WORDS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(4, 9))]
    return f"Text: {' '.join(words)}\nWord: {words[0]}", str(words.count(words[0]))


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


SPECS: tuple[Spec, ...] = (
    # ---- strings: letters of one word
    Spec("reverse_word", "strings", "Write the given word backwards, letter by letter.",
         ("Reverse the word.", "Spell this word in reverse order."),
         lambda r: ((w := r.choice(WORDS)), w[::-1])),
    Spec("uppercase_word", "strings", "Rewrite the given text in capital letters.",
         ("Make it uppercase.", "Convert the text to all caps."),
         lambda r: ((s := _sentence(r)), s.upper())),
    Spec("count_letters", "strings", "Count how many letters the given word has and answer with the number.",
         ("How long is this word?", "Give the number of letters in the word."),
         lambda r: ((w := r.choice(WORDS)), str(len(w)))),
    Spec("first_letter", "strings", "Give the first letter of the word.",
         ("What letter does the word start with?", "Initial letter of the word."),
         lambda r: ((w := r.choice(WORDS)), w[0])),
    Spec("remove_vowels", "strings", "Remove every vowel (a, e, i, o, u) from the word and write what is left.",
         ("Delete the vowels.", "Strip out the vowels from this word."),
         lambda r: ((w := r.choice(WORDS)), "".join(c for c in w if c not in "aeiou") or "-")),
    Spec("sort_letters", "strings", "Write the letters of the word in alphabetical order.",
         ("Sort the letters alphabetically.", "Alphabetize the word's letters."),
         lambda r: ((w := r.choice(WORDS)), "".join(sorted(w)))),
    # ---- word lists
    Spec("sort_words", "word_lists", "Sort the given words in alphabetical order, separated by spaces.",
         ("Alphabetize these words.", "Put the words in A-Z order."),
         lambda r: (" ".join(ws := _words(r, r.randint(3, 6))), " ".join(sorted(ws)))),
    Spec("last_word", "word_lists", "Give the last word of the sentence.",
         ("Which word comes last?", "Say the final word."),
         lambda r: ((s := _sentence(r)), s.split()[-1])),
    Spec("count_words", "word_lists", "Count the words in the sentence and answer with the number.",
         ("How many words are there?", "Word count of the sentence."),
         lambda r: ((s := _sentence(r)), str(len(s.split())))),
    Spec("acronym", "word_lists", "Make an acronym from the first letters of the words, in capitals.",
         ("Initials of these words.", "Turn the phrase into an acronym."),
         lambda r: (" ".join(ws := _words(r, r.randint(2, 5))), "".join(w[0] for w in ws).upper())),
    Spec("join_commas", "word_lists", "Join the given words into one list separated by commas and spaces.",
         ("Comma-separate the words.", "Write the words as a comma list."),
         lambda r: (" ".join(ws := _words(r, r.randint(2, 5))), ", ".join(ws))),
    # ---- number lists
    Spec("max_number", "number_lists", "Give the largest number in the list.",
         ("Which number is biggest?", "Find the maximum."),
         lambda r: (" ".join(map(str, ns := _numbers(r, r.randint(3, 7)))), str(max(ns)))),
    Spec("min_number", "number_lists", "Give the smallest number in the list.",
         ("Which number is smallest?", "Find the minimum."),
         lambda r: (" ".join(map(str, ns := _numbers(r, r.randint(3, 7)))), str(min(ns)))),
    Spec("sort_numbers", "number_lists", "Sort the numbers from smallest to largest, separated by spaces.",
         ("Order these numbers ascending.", "Sort the list of numbers."),
         lambda r: (" ".join(map(str, ns := _numbers(r, r.randint(3, 6)))), " ".join(map(str, sorted(ns))))),
    Spec("sum_numbers", "number_lists", "Add up all the numbers in the list and give the total.",
         ("Total of the list.", "What do these numbers sum to?"),
         lambda r: (" ".join(map(str, ns := _numbers(r, r.randint(2, 4), 30))), str(sum(ns)))),
    Spec("count_items", "number_lists", "Count how many numbers are in the list.",
         ("How many numbers are there?", "Length of the list."),
         lambda r: (" ".join(map(str, ns := _numbers(r, r.randint(2, 9)))), str(len(ns)))),
    # ---- arithmetic
    Spec("add", "arithmetic", "Add the two numbers and give the result.",
         ("Sum of two numbers.", "What is a plus b?"),
         lambda r: (f"{(a := r.randint(0, 99))} + {(b := r.randint(0, 99))}", str(a + b))),
    Spec("subtract", "arithmetic", "Subtract the second number from the first and give the result.",
         ("Difference of two numbers.", "What is a minus b?"),
         lambda r: (f"{(a := r.randint(0, 99))} - {(b := r.randint(0, 99))}", str(a - b))),
    Spec("multiply", "arithmetic", "Multiply the two numbers and give the product.",
         ("Times table question.", "What is a times b?"),
         lambda r: (f"{(a := r.randint(2, 12))} x {(b := r.randint(2, 12))}", str(a * b))),
    Spec("remainder", "arithmetic", "Divide the first number by the second and give the remainder.",
         ("What is left over after dividing?", "Compute a modulo b."),
         lambda r: (f"{(a := r.randint(10, 99))} divided by {(b := r.randint(2, 9))}", str(a % b))),
    Spec("square", "arithmetic", "Give the square of the number.",
         ("Square this number.", "What is n squared?"),
         lambda r: (str(a := r.randint(1, 99)), str(a * a))),
    # ---- number properties (multiple choice)
    Spec("even_odd", "number_properties", "Say whether the number is even or odd.",
         ("Even or odd?", "Parity of the number."),
         lambda r: (str(a := r.randint(0, 999)), _choice(["even", "odd"], ["even", "odd"][a % 2]))),
    Spec("is_prime", "number_properties", "Answer yes if the number is prime and no if it is not.",
         ("Is it a prime number?", "Prime check."),
         lambda r: (str(a := r.choice([p for p in range(2, 200) if _is_prime(p)] if r.random() < 0.5 else range(2, 200))),
                    _choice(["no", "yes"], "yes" if _is_prime(a) else "no"))),
    Spec("compare_numbers", "number_properties", "Say which of the two numbers is larger: the first or the second.",
         ("Which number is bigger?", "Compare the two numbers."),
         lambda r: (f"{(a := r.randint(0, 999))} and {(b := r.choice([x for x in range(1000) if x != a]))}",
                    _choice(["first", "second"], "first" if a > b else "second"))),
    Spec("divisible_by_three", "number_properties", "Answer yes if the number is divisible by 3, otherwise no.",
         ("Is it a multiple of three?", "Divisible by 3?"),
         lambda r: (str(a := r.randint(1, 999)), _choice(["no", "yes"], "yes" if a % 3 == 0 else "no"))),
    # ---- sequences
    Spec("next_in_sequence", "sequences", "Continue the arithmetic sequence: give the next number.",
         ("What comes next?", "Next term of the sequence."),
         lambda r: (", ".join(map(str, [(s := r.randint(0, 20)) + i * (d := r.randint(1, 9)) for i in range(4)])),
                    str(s + 4 * d))),
    Spec("letters_later", "sequences", "Give the letter that comes the given number of places later in the alphabet.",
         ("Count forward in the alphabet.", "Which letter is n places on?"),
         lambda r: (f"{(n := r.randint(1, 5))} after {(c := r.choice(string.ascii_lowercase[:-5]))}", chr(ord(c) + n))),
    Spec("previous_number", "sequences", "Give the number that comes just before the given number.",
         ("One less than this.", "Predecessor of the number."),
         lambda r: (str(a := r.randint(1, 9999)), str(a - 1))),
    # ---- dates and calendars
    Spec("days_later", "calendar", "Name the day of the week that is the given number of days after the given day.",
         ("Which weekday will it be?", "Day of the week n days later."),
         lambda r: (f"{(n := r.randint(1, 30))} days after {DAYS[d := r.randrange(7)]}", DAYS[(d + n) % 7])),
    Spec("months_later", "calendar", "Name the month that is the given number of months after the given month.",
         ("Which month will it be?", "Month n months later."),
         lambda r: (f"{(n := r.randint(1, 24))} months after {MONTHS[m := r.randrange(12)]}", MONTHS[(m + n) % 12])),
    Spec("weekday_of_date", "calendar", "Give the day of the week of the given date.",
         ("What weekday was this date?", "Day of the week for a date."),
         lambda r: ((d := _date(r)).isoformat(), DAYS[d.weekday()])),
    Spec("date_us_to_iso", "calendar", "Rewrite the date given as month/day/year in the YYYY-MM-DD format.",
         ("Convert the date to ISO format.", "US date to year-month-day."),
         lambda r: ((d := _date(r)).strftime("%m/%d/%Y"), d.isoformat())),
    Spec("days_in_month", "calendar", "Say how many days the given month has in the given year.",
         ("Length of this month in days.", "How many days in that month?"),
         lambda r: (f"{MONTHS[(m := r.randrange(12))]} {(y := r.randint(1990, 2030))}",
                    str(calendar.monthrange(y, m + 1)[1]))),
    # ---- units
    Spec("minutes_to_hours", "units", "Convert the number of minutes to hours and minutes, as 'H h M min'.",
         ("Minutes into hours.", "Express the minutes in hours."),
         lambda r: (f"{(m := r.randint(0, 600))} minutes", f"{m // 60} h {m % 60} min")),
    Spec("meters_to_cm", "units", "Convert the length in meters to centimeters and give the number.",
         ("Meters to centimeters.", "How many cm is that?"),
         lambda r: (f"{(m := r.randint(1, 99))} m", str(m * 100))),
    Spec("kg_to_grams", "units", "Convert the mass in kilograms to grams and give the number.",
         ("Kilograms into grams.", "How many grams is that?"),
         lambda r: (f"{(k := r.randint(1, 50))} kg", str(k * 1000))),
    # ---- categories (multiple choice)
    Spec("fruit_or_animal", "categories", "Say whether the word names a fruit or an animal.",
         ("Fruit or animal?", "Is this a fruit or a creature?"),
         lambda r: ((w := r.choice(FRUITS + ANIMALS)), _choice(["fruit", "animal"], "fruit" if w in FRUITS else "animal"))),
    Spec("living_or_object", "categories", "Say whether the word names a living thing or an object.",
         ("Alive or not?", "Living thing or object?"),
         lambda r: ((w := r.choice(ANIMALS + OBJECTS)), _choice(["living", "object"], "living" if w in ANIMALS else "object"))),
    Spec("is_color", "categories", "Answer yes if the word is a color, otherwise no.",
         ("Is this word a colour?", "Color check."),
         lambda r: ((w := r.choice(COLORS) if r.random() < 0.5 else r.choice(WORDS)), _choice(["no", "yes"], "yes" if w in COLORS else "no"))),
    # ---- text formatting
    Spec("snake_to_camel", "formatting", "Convert the snake_case identifier to camelCase.",
         ("snake_case to camelCase.", "Rewrite the name in camel case."),
         lambda r: ("_".join(ws := _words(r, r.randint(2, 3))), ws[0] + "".join(w.title() for w in ws[1:]))),
    Spec("title_case", "formatting", "Rewrite the phrase in title case: every word capitalised.",
         ("Capitalise each word.", "Make it a title."),
         lambda r: ((s := _sentence(r)), s.title())),
    Spec("wrap_quotes", "formatting", "Put each word of the phrase in double quotes, separated by spaces.",
         ("Quote every word.", "Wrap the words in quotation marks."),
         lambda r: (" ".join(ws := _words(r, r.randint(2, 4))), " ".join(f'"{w}"' for w in ws))),
    # ---- people and relations (reading a short context)
    Spec("who_is_older", "reading", "Read the ages and name the older person.",
         ("Who is older?", "Pick the elder of the two."),
         lambda r: (f"{(a := (p := r.sample(FIRST, 2))[0])} is {(x := r.randint(5, 80))} years old. "
                    f"{p[1]} is {(y := r.choice([v for v in range(5, 81) if v != x]))} years old.",
                    _choice(sorted(p), a if x > y else p[1]))),
    Spec("what_color", "reading", "Read the sentence and give the color of the thing it asks about.",
         ("Which color was it?", "Find the color in the text."),
         lambda r: (f"The {(o := (os := r.sample(OBJECTS, 2))[0])} is {(c := (cs := r.sample(COLORS, 2))[0])} and the "
                    f"{os[1]} is {cs[1]}. What color is the {o}?", c)),
    Spec("count_mentions", "reading", "Count how many times the named word appears in the text.",
         ("How often does the word occur?", "Count the mentions."),
         lambda r: _count_mentions(r)),
)  # fmt: skip


def procedural_tasks(n_examples: int = N_EXAMPLES, seed: int = 0) -> list[Task]:
    """Every procedural task, `n_examples` distinct inputs each (fewer where the input space is small)."""
    tasks = []
    for spec in SPECS:
        rng = random.Random(f"{seed}:{spec.name}")
        examples, inputs = [], set()
        for _ in range(20 * n_examples):
            if len(examples) == n_examples:
                break
            text, answer = spec.make(rng)
            if text in inputs:
                continue
            inputs.add(text)
            if isinstance(answer, tuple):
                examples.append(Example(text, choices=answer[0], answer=answer[1]))
            else:
                examples.append(Example(text, target=answer))
        tasks.append(
            Task(
                name=f"proc.{spec.name}",
                description=spec.description,
                family=f"proc_{spec.family}",
                examples=examples,
                source="procedural",
                metric="accuracy" if examples[0].is_multiple_choice else "exact_match",
                descriptions=list(spec.phrasings),
                license="Apache-2.0",
            )
        )
    return tasks
