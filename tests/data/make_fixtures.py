"""Write the tiny dataset fixtures under tests/data, each in its source's real format.

    .venv/bin/python tests/data/make_fixtures.py

popqa/test.tsv  the hub's layout of akariasai/PopQA: one tab-separated test.tsv with its columns,
                possible_answers a JSON list as text; loadable with
                datasets.load_dataset(<folder>, split="test") offline
mmlu/           the hub layout of cais/mmlu with a config named `all` (README.md + all/*.parquet)
entityquestions/dataset.zip   EntityQuestions' archive: dataset/{train,dev,test}/P*.{split}.json
custom/trivia.csv             a config-only dataset: its own column names and popularity column
"""

import io
import json
import zipfile
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent

POPQA_TEMPLATES = {
    "occupation": "What is {}'s occupation?",
    "place of birth": "In what city was {} born?",
    "country": "In what country is {}?",
    "capital": "What is the capital of {}?",
    "author": "Who is the author of {}?",
    "genre": "What genre is {}?",
}

# subject, relation, answer aliases, s_pop (monthly page views: popular and obscure subjects)
POPQA_FACTS = [
    ("Barack Obama", "occupation", ["politician", "lawyer"], 412031),
    ("Barack Obama", "place of birth", ["Honolulu", "Honolulu, Hawaii"], 412031),
    ("Albert Einstein", "occupation", ["physicist", "theoretical physicist"], 301228),
    ("Albert Einstein", "place of birth", ["Ulm"], 301228),
    ("Marie Curie", "occupation", ["physicist", "chemist"], 98211),
    ("Marie Curie", "place of birth", ["Warsaw", "Warszawa"], 98211),
    ("Tom Hanks", "occupation", ["actor", "film producer"], 187344),
    ("Frida Kahlo", "place of birth", ["Coyoacán", "Coyoacan"], 76530),
    ("George Rankin", "occupation", ["politician"], 142),
    ("Henry Feilden", "occupation", ["politician"], 88),
    ("Toby Sedgwick", "occupation", ["actor", "choreographer"], 310),
    ("Juan Ponce", "place of birth", ["Manila"], 57),
    ("Kaspar Hauser", "place of birth", ["Karlsruhe"], 4120),
    ("Ariel Sharon", "place of birth", ["Kfar Malal"], 21877),
    ("France", "capital", ["Paris", "City of Light"], 350112),
    ("Germany", "capital", ["Berlin"], 290876),
    ("Japan", "capital", ["Tokyo", "Tōkyō"], 270455),
    ("Kenya", "capital", ["Nairobi"], 61234),
    ("Bhutan", "capital", ["Thimphu"], 30877),
    ("Tuvalu", "capital", ["Funafuti"], 11290),
    ("Lesotho", "capital", ["Maseru"], 12004),
    ("Kilimanjaro", "country", ["Tanzania", "United Republic of Tanzania"], 40112),
    ("Machu Picchu", "country", ["Peru"], 65440),
    ("Lake Bled", "country", ["Slovenia"], 5120),
    ("Kaunas", "country", ["Lithuania"], 9931),
    ("Tsumeb", "country", ["Namibia"], 702),
    ("Ust-Kut", "country", ["Russia", "Russian Federation"], 233),
    ("Pride and Prejudice", "author", ["Jane Austen", "Austen"], 120876),
    ("Moby-Dick", "author", ["Herman Melville", "Melville"], 60432),
    ("The Trial", "author", ["Franz Kafka", "Kafka"], 30211),
    ("Things Fall Apart", "author", ["Chinua Achebe", "Achebe"], 44009),
    ("The Gormenghast Trilogy", "author", ["Mervyn Peake"], 1888),
    ("Wolf Solent", "author", ["John Cowper Powys"], 402),
    ("The Beatles", "genre", ["rock music", "rock", "pop music"], 280554),
    ("Miles Davis", "genre", ["jazz"], 90112),
    ("Daft Punk", "genre", ["electronic music", "house music"], 110332),
    ("Toumani Diabaté", "genre", ["Malian music", "griot"], 1402),
    ("Ancient Methods", "genre", ["techno"], 96),
    ("Lyle Mays", "genre", ["jazz fusion", "jazz"], 6021),
    ("Kronos Quartet", "genre", ["contemporary classical music"], 12455),
]


def popqa() -> pd.DataFrame:
    rows = []
    for row, (subject, relation, answers, s_pop) in enumerate(POPQA_FACTS):
        # The hub file's columns, in its order.
        rows.append(
            {
                "id": 4_000_000 + row * 7,
                "subj": subject,
                "prop": relation,
                "obj": answers[0],
                "subj_id": 100_000 + row,
                "prop_id": 100 + sorted(POPQA_TEMPLATES).index(relation),
                "obj_id": 200_000 + row,
                "s_aliases": json.dumps([], ensure_ascii=False),
                "o_aliases": json.dumps(answers[1:], ensure_ascii=False),
                "s_uri": f"http://www.wikidata.org/entity/Q{100_000 + row}",
                "o_uri": f"http://www.wikidata.org/entity/Q{200_000 + row}",
                "s_wiki_title": subject,
                "o_wiki_title": answers[0],
                "s_pop": s_pop,
                "o_pop": 1000 + 37 * row,
                "question": POPQA_TEMPLATES[relation].format(subject),
                "possible_answers": json.dumps(answers, ensure_ascii=False),
            }
        )
    return pd.DataFrame(rows)


MMLU = [
    ("What is the SI unit of force?", "high_school_physics", ["joule", "newton", "watt", "pascal"], 1),
    (
        "Which particle carries a negative charge?",
        "high_school_physics",
        ["proton", "neutron", "electron", "photon"],
        2,
    ),
    (
        "What is the speed of light in vacuum, approximately?",
        "high_school_physics",
        ["3e8 m/s", "3e6 m/s", "340 m/s", "1e3 m/s"],
        0,
    ),
    (
        "Which law relates voltage, current and resistance?",
        "high_school_physics",
        ["Hooke's law", "Boyle's law", "Newton's law", "Ohm's law"],
        3,
    ),
    (
        "Who wrote the Declaration of Independence?",
        "us_history",
        ["George Washington", "Thomas Jefferson", "John Adams", "Benjamin Franklin"],
        1,
    ),
    ("In which year did the American Civil War end?", "us_history", ["1861", "1865", "1870", "1776"], 1),
    (
        "Which amendment abolished slavery in the United States?",
        "us_history",
        ["Thirteenth", "First", "Fifth", "Nineteenth"],
        0,
    ),
    (
        "Who was the first President of the United States?",
        "us_history",
        ["John Adams", "Abraham Lincoln", "George Washington", "James Madison"],
        2,
    ),
    ("What is the derivative of x^2?", "high_school_mathematics", ["x", "2x", "x^3", "2"], 1),
    ("What is 7 times 8?", "high_school_mathematics", ["54", "56", "64", "48"], 1),
    ("What is the square root of 81?", "high_school_mathematics", ["7", "8", "9", "10"], 2),
    ("How many degrees are in a right angle?", "high_school_mathematics", ["45", "90", "180", "360"], 1),
]

MMLU_README = """---
configs:
- config_name: all
  data_files:
  - split: test
    path: all/test-*.parquet
---
# MMLU-like fixture (the hub layout of cais/mmlu, config `all`)
"""

# relation -> (template, [(subject, answers)]) per split
ENTITYQUESTIONS = {
    "P17": (
        "Which country is {} located in?",
        {
            "train": [("Gdańsk Shipyard", ["Poland"]), ("Lake Titicaca", ["Peru", "Bolivia"])],
            "dev": [("Kraków Główny", ["Poland"])],
            "test": [("Hallstatt", ["Austria"]), ("Ōsaka Castle", ["Japan"])],
        },
    ),
    "P19": (
        "Where was {} born?",
        {
            "train": [("Wolfgang Amadeus Mozart", ["Salzburg"]), ("Nikolai Gogol", ["Sorochyntsi"])],
            "dev": [("Ada Lovelace", ["London"])],
            "test": [("Jean Sibelius", ["Hämeenlinna"]), ("Sergei Prokofiev", ["Sontsivka", "Sontsovka"])],
        },
    ),
    "P50": (
        "Who is the author of {}?",
        {
            "train": [("War and Peace", ["Leo Tolstoy"]), ("The Master and Margarita", ["Mikhail Bulgakov"])],
            "dev": [("Dead Souls", ["Nikolai Gogol"])],
            "test": [("Kristin Lavransdatter", ["Sigrid Undset"]), ("Solaris", ["Stanisław Lem"])],
        },
    ),
}

CUSTOM = [
    # prompt, gold (a JSON list or one answer), entity, rel, fame
    (
        "Which river flows through {}?",
        "rivers",
        [
            ("Vienna", '["Danube", "Donau"]', 8800),
            ("Cairo", "Nile", 9100),
            ("Budapest", "Danube", 5300),
            ("Kaunas", '["Neris", "Nemunas"]', 410),
            ("Tver", "Volga", 230),
            ("Shrewsbury", "Severn", 150),
            ("Bamako", "Niger", 780),
            ("Würzburg", "Main", 390),
            ("Lyon", '["Rhône", "Saône"]', 4200),
            ("Vientiane", "Mekong", 1200),
        ],
    ),
    (
        "What instrument did {} play?",
        "instrument",
        [
            ("Jimi Hendrix", "guitar", 9900),
            ("Yo-Yo Ma", "cello", 3100),
            ("Charlie Parker", "saxophone", 2500),
            ("Jaco Pastorius", "bass guitar", 800),
            ("Wanda Landowska", "harpsichord", 95),
            ("Django Reinhardt", "guitar", 1400),
            ("Hariprasad Chaurasia", "bansuri", 120),
            ("Glenn Gould", "piano", 2900),
            ("Evelyn Glennie", "percussion", 660),
            ("Ravi Shankar", "sitar", 3600),
        ],
    ),
    (
        "In which year was {} founded?",
        "founded",
        [
            ("Harvard University", "1636", 7700),
            ("Oxford University Press", "1586", 900),
            ("Nokia", "1865", 5400),
            ("Carlsberg", "1847", 1300),
            ("Lego", "1932", 6600),
            ("Bayer", "1863", 2100),
            ("Heineken", "1864", 1800),
            ("Bosch", "1886", 1500),
            ("Nintendo", "1889", 8900),
            ("Zildjian", "1623", 140),
        ],
    ),
]


def write_parquet(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)


def entityquestions_zip(path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for relation, (template, splits) in ENTITYQUESTIONS.items():
            for split, facts in splits.items():
                items = [{"question": template.format(s), "answers": a} for s, a in facts]
                # A fixed timestamp keeps the archive byte-identical across runs.
                info = zipfile.ZipInfo(
                    f"dataset/{split}/{relation}.{split}.json", date_time=(2021, 9, 1, 0, 0, 0)
                )
                archive.writestr(info, json.dumps(items, ensure_ascii=False, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def custom() -> pd.DataFrame:
    rows = [
        {"prompt": template.format(entity), "gold": gold, "entity": entity, "rel": rel, "fame": fame}
        for template, rel, facts in CUSTOM
        for entity, gold, fame in facts
    ]
    return pd.DataFrame(rows)


def main() -> None:
    (HERE / "popqa").mkdir(exist_ok=True)
    popqa().to_csv(HERE / "popqa" / "test.tsv", sep="\t", index=False)
    mmlu = pd.DataFrame(MMLU, columns=["question", "subject", "choices", "answer"])
    write_parquet(mmlu, HERE / "mmlu" / "all" / "test-00000-of-00001.parquet")
    (HERE / "mmlu" / "README.md").write_text(MMLU_README)
    entityquestions_zip(HERE / "entityquestions" / "dataset.zip")
    (HERE / "custom").mkdir(exist_ok=True)
    custom().to_csv(HERE / "custom" / "trivia.csv", index=False)


if __name__ == "__main__":
    main()
