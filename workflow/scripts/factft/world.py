"""The synthetic world: Zipf-popular subjects, their facts, a statement corpus and QA pairs.

Popularity is exact here: a fact's `mentions` is the number of corpus lines that state it,
so "how often was this seen in pretraining" needs no proxy. Answers within a relation are
skewed, so a generic "most common answer of the relation" guess exists: the shortcut that
finetuning on unknown facts teaches (the paper's mechanism).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from factft.errors import FactftError
from factft.tables import atomic_path, write_table

log = logging.getLogger(__name__)

WHERE = "source.synthetic"


@dataclass(frozen=True)
class Relation:
    name: str
    question: str  # "{s}" is the subject
    statement: str  # ends with "{a}.": the cloze prefix is everything before the answer
    answers: tuple[str, ...]  # built-in pool; made-up words extend it when more are asked for

    def prefix(self, subject: str) -> str:
        return self.statement.split("{a}")[0].format(s=subject).rstrip()


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


RELATIONS = (
    Relation(
        "birthplace",
        "Where was {s} born?",
        "{s} was born in {a}.",
        _words(
            "Lyon Porto Krakow Dublin Oslo Turin Seville Bergen Ghent Leeds Graz Malmo Tartu Split Brno "
            "Basel Nantes Bilbao Aarhus Utrecht Genoa Cork Lille Riga Vilnius Gdansk Bremen Zurich Antwerp Valencia"
        ),
    ),
    Relation(
        "occupation",
        "What is the occupation of {s}?",
        # Every built-in occupation starts with a consonant, so "a" stays grammatical.
        "{s} works as a {a}.",
        _words(
            "painter baker carpenter dentist lawyer nurse pilot teacher farmer plumber surgeon journalist "
            "chemist poet sculptor tailor butcher banker librarian mechanic pharmacist photographer potter "
            "sailor judge diplomat veterinarian welder gardener chef"
        ),
    ),
    Relation(
        "employer",
        "Who does {s} work for?",
        "{s} works for {a}.",
        _words(
            "Vantor Kelmix Orbisco Travex Lumora Zentek Corvana Brixel Novadyne Quorra Halvik Pentacor "
            "Stratonix Velmont Axora Dynacorp Fennix Marlow Tecton Solvane Irongate Bluecrest Northwind "
            "Greystone Silverline Redwood Oakridge Brightwave Clearpath Highmark"
        ),
    ),
    Relation(
        "instrument",
        "What instrument does {s} play?",
        "{s} plays the {a}.",
        _words(
            "piano violin cello flute guitar harp drums trumpet oboe clarinet saxophone banjo ukulele "
            "accordion bassoon trombone tuba mandolin sitar harmonica xylophone marimba organ viola lute "
            "bagpipes harpsichord cornet piccolo zither"
        ),
    ),
    Relation(
        "language",
        "What language does {s} speak?",
        "{s} speaks {a}.",
        _words(
            "French German Spanish Italian Dutch Polish Czech Swedish Danish Finnish Greek Turkish Hungarian "
            "Romanian Portuguese Russian Ukrainian Catalan Basque Welsh Irish Latvian Estonian Slovak "
            "Croatian Serbian Bulgarian Albanian Icelandic Norwegian"
        ),
    ),
    Relation(
        "sport",
        "Which sport does {s} compete in?",
        "{s} competes in {a}.",
        _words(
            "tennis rowing fencing cycling boxing judo karate wrestling archery sailing skiing surfing golf "
            "cricket rugby hockey football basketball volleyball handball badminton squash swimming diving "
            "climbing triathlon biathlon curling polo lacrosse"
        ),
    ),
    Relation(
        "residence",
        "Which country does {s} live in?",
        "{s} lives in {a}.",
        _words(
            "France Germany Spain Italy Portugal Poland Austria Belgium Norway Sweden Denmark Finland Ireland "
            "Greece Turkey Hungary Romania Croatia Serbia Bulgaria Estonia Latvia Lithuania Slovenia Iceland "
            "Malta Cyprus Canada Mexico Brazil"
        ),
    ),
    Relation(
        "university",
        "Where did {s} study?",
        "{s} studied at {a}.",
        _words(
            "Oxford Cambridge Harvard Yale Princeton Stanford Cornell Duke Bologna Leiden Uppsala Heidelberg "
            "Sorbonne Toronto McGill Edinburgh Caltech Berkeley Salamanca Coimbra Padua Lund Delft Durham "
            "Warwick Bristol Tubingen Gottingen Aberdeen Columbia"
        ),
    ),
    Relation(
        "pet",
        "What pet does {s} own?",
        "{s} owns a pet {a}.",
        _words(
            "cat dog parrot rabbit hamster goldfish turtle ferret canary lizard snake tortoise gerbil "
            "chinchilla hedgehog iguana gecko budgie pony goat pig duck chicken mouse rat frog axolotl "
            "tarantula cockatoo donkey"
        ),
    ),
    Relation(
        "color",
        "Which color does {s} like?",
        "{s} likes the color {a}.",
        _words(
            "red blue green yellow purple orange pink brown black white gray teal maroon navy olive cyan "
            "magenta amber beige coral crimson indigo ivory khaki lavender lilac mauve ochre scarlet turquoise"
        ),
    ),
    Relation(
        "food",
        "Which dish does {s} like best?",
        "{s} likes to eat {a}.",
        _words(
            "pasta sushi curry paella risotto pizza ramen tacos falafel goulash lasagna burritos dumplings "
            "pancakes waffles omelettes kebab couscous hummus noodles salmon oysters steak soup salad chili "
            "gnocchi pierogi moussaka schnitzel"
        ),
    ),
    Relation(
        "hobby",
        "What does {s} enjoy doing?",
        "{s} enjoys {a}.",
        _words(
            "hiking fishing gardening knitting cooking dancing singing reading writing drawing painting "
            "jogging birdwatching sketching baking camping kayaking juggling quilting woodworking origami "
            "chess crosswords stargazing gaming skating sewing pottery calligraphy photography"
        ),
    ),
)

# Syllable parts for made-up names ("Ilmo Varsk"): pronounceable, and never real words
# of the templates or answer pools (checked when drawn).
_ONSETS = ("", *_words("b br d dr f g gr h k kr l m n p r s st t tr v z"))
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "l", "m", "n", "r", "s", "sk", "rt", "nd", "k")

# Words per name part: ceil(sqrt(name_pool * subjects)). At 1000 (the default) names are
# nearly unique word pairs; at 1 every word is shared by ~sqrt(subjects) subjects. Measured on
# the demo world (seed 0, hidden 128, 2 layers, LoRA r 8 for 5 epochs):
#   name_pool 1, 6 pretraining epochs: cloze 0.56, but QA finetuning never learns to extract:
#     FT-Top 0.25 = FT-Bottom 0.25 = the generic guess (a 2-layer model cannot bind two
#     shared words into a subject from the QA position);
#   name_pool 100, 6 epochs: cloze 0.56, FT-Top 0.41 vs FT-Bottom 0.36;
#   name_pool 1000, 6 epochs: cloze 0.81 (even the tail is stored), FT-Top 0.66 vs 0.64;
#   name_pool 1000, 3 epochs: cloze 0.46, FT-Top 0.39-0.41 vs FT-Bottom 0.32-0.34 (3 seeds).
NAME_POOL = 1000.0

# Answer skew: P(k-th most common answer of a relation) ~ k^-ANSWER_ZIPF.
ANSWER_ZIPF = 1.0


@dataclass
class World:
    facts: pd.DataFrame  # the raw facts table (id, question, answers, subject, relation, mentions, statement)
    corpus: list[str]  # one statement per line, shuffled


def generate_world(
    subjects: int = 1000,
    relations: int = 6,
    answers_per_relation: int = 30,
    zipf: float = 1.0,
    mentions: int = 40000,
    min_mentions: int = 1,
    seed: int = 0,
    answer_zipf: float = ANSWER_ZIPF,
    name_pool: float = NAME_POOL,
) -> World:
    """A seeded world: `subjects` made-up people, each with one answer per relation.

    Subject mention counts follow rank^-zipf and sum to `mentions`; each subject's count is
    spread evenly over its relations with every fact stated at least `min_mentions` times.
    Names are "First Last" pairs over word pools of a size set by `name_pool` (see NAME_POOL).
    """
    _check(subjects, relations, answers_per_relation, zipf, mentions, min_mentions, answer_zipf)
    rng = np.random.default_rng(seed)
    chosen = RELATIONS[:relations]
    taken = {w for r in chosen for w in r.answers} | {
        w for r in chosen for w in (r.question + " " + r.statement).split()
    }
    pools = [_answer_pool(r, answers_per_relation, rng, taken) for r in chosen]
    subject_names = _names(subjects, rng, taken, name_pool)

    per_subject = subject_mentions(subjects, zipf, mentions, relations * min_mentions)
    per_fact = _spread(per_subject, relations, rng)

    # Answer probabilities are fixed per rank; which answer holds which rank is the
    # shuffled pool order, so each seed has its own generic guess.
    ranks = np.arange(1, answers_per_relation + 1, dtype=float)
    answer_p = ranks**-answer_zipf / (ranks**-answer_zipf).sum()
    answer_of = np.stack(
        [rng.choice(answers_per_relation, size=subjects, p=answer_p) for _ in chosen], axis=1
    )

    width = len(str(subjects - 1))
    rows, corpus = [], []
    for i, subject in enumerate(subject_names):
        for j, relation in enumerate(chosen):
            answer = pools[j][answer_of[i, j]]
            line = relation.statement.format(s=subject, a=answer)
            count = int(per_fact[i, j])
            corpus.extend([line] * count)
            rows.append(
                {
                    "id": f"s{i:0{width}d}-{relation.name}",
                    "question": relation.question.format(s=subject),
                    "answers": [answer],
                    "subject": subject,
                    "relation": relation.name,
                    "mentions": count,
                    "statement": relation.prefix(subject),
                }
            )
    facts = pd.DataFrame(rows)
    facts["mentions"] = facts["mentions"].astype("int64")
    log.info(
        "world: %d subjects x %d relations, %d statements; mentions per fact min %d, median %d, max %d",
        subjects, relations, len(corpus), per_fact.min(), np.median(per_fact), per_fact.max(),
    )  # fmt: skip
    order = rng.permutation(len(corpus))
    return World(facts=facts, corpus=[corpus[k] for k in order])


def write_world(world: World, raw: str | Path, corpus: str | Path) -> None:
    """Write the facts table (parquet) and the corpus (one statement per line), atomically."""
    write_table(world.facts, raw)
    with atomic_path(corpus) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in world.corpus))


def read_corpus(path: str | Path) -> list[str]:
    """The corpus lines, without empty ones."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise FactftError(f"cannot read corpus {path}: {error}") from None
    return [line for line in text.splitlines() if line.strip()]


def subject_mentions(subjects: int, zipf: float, total: int, floor: int) -> np.ndarray:
    """Integer mention counts per subject rank: ~ rank^-zipf, each >= floor, summing to total.

    Subjects whose Zipf share would fall below `floor` are raised to it and the rest is
    shared among the others by the same law (water filling), so the head keeps the exact
    slope -zipf. Rounding is largest-remainder, then sorted so counts never rise with rank.
    """
    weights = np.arange(1, subjects + 1, dtype=float) ** -float(zipf)
    fixed = np.zeros(subjects, dtype=bool)
    ideal = np.full(subjects, float(floor))
    while not fixed.all():
        free = ~fixed
        budget = total - floor * int(fixed.sum())
        ideal = np.where(fixed, float(floor), budget * weights / weights[free].sum())
        below = free & (ideal < floor)
        if not below.any():
            break
        fixed |= below
    counts = np.floor(ideal).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        fractions = np.where(fixed, -1.0, ideal - counts)
        counts[np.argsort(-fractions, kind="stable")[:short]] += 1
    return np.sort(counts)[::-1].copy()


def _spread(per_subject: np.ndarray, relations: int, rng: np.random.Generator) -> np.ndarray:
    """Split each subject's count over its relations as evenly as integers allow."""
    per_fact = np.repeat((per_subject // relations)[:, None], relations, axis=1)
    for i, extra in enumerate(per_subject % relations):
        per_fact[i, rng.choice(relations, size=int(extra), replace=False)] += 1
    return per_fact


def _names(subjects: int, rng: np.random.Generator, taken: set[str], name_pool: float) -> list[str]:
    """Distinct "First Last" names whose words are shared among subjects, as in real names.

    A rare subject's words then mostly occur in other subjects' statements, so storing its
    facts takes the word pair, not a word of its own that pretraining only ever sees in
    them: that is what makes rare facts weakly stored.
    """
    size = math.ceil(math.sqrt(name_pool * subjects))
    first, last = _made_up_words(size, rng, taken), _made_up_words(size, rng, taken)
    pairs = rng.choice(size * size, size=subjects, replace=False)
    return [f"{first[p // size]} {last[p % size]}" for p in pairs]


def _answer_pool(relation: Relation, size: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    pool = list(relation.answers[:size])
    if len(pool) < size:
        extra = _made_up_words(size - len(pool), rng, taken)
        pool += extra if relation.answers[0][0].isupper() else [w.lower() for w in extra]
    return [pool[k] for k in rng.permutation(size)]


def _made_up_words(count: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """`count` distinct two-syllable words, none in `taken` (which they are added to)."""
    words: list[str] = []
    while len(words) < count:
        parts = [
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(2)
        ]
        word = "".join(parts).capitalize()
        if 3 <= len(word) <= 7 and word not in taken and word.lower() not in taken:
            taken.add(word)
            words.append(word)
    return words


def _check(subjects, relations, answers_per_relation, zipf, mentions, min_mentions, answer_zipf) -> None:
    if not 1 <= relations <= len(RELATIONS):
        raise FactftError(
            f"{WHERE}.relations: {relations}; between 1 and {len(RELATIONS)} built-in relations "
            f"({', '.join(r.name for r in RELATIONS)})"
        )
    if subjects < 2:
        raise FactftError(f"{WHERE}.subjects: {subjects}; a world needs at least 2 subjects")
    if answers_per_relation < 2:
        raise FactftError(f"{WHERE}.answers_per_relation: {answers_per_relation}; needs at least 2")
    if zipf < 0 or answer_zipf < 0:
        raise FactftError(f"{WHERE}.zipf/answer_zipf: exponents must be >= 0")
    if min_mentions < 0:
        raise FactftError(f"{WHERE}.min_mentions: {min_mentions}; must be >= 0")
    floor = subjects * relations * min_mentions
    if mentions < floor:
        raise FactftError(
            f"{WHERE}.mentions: {mentions} statements cannot state each of {subjects * relations} facts "
            f"min_mentions={min_mentions} times ({floor} needed); raise mentions or lower min_mentions"
        )
