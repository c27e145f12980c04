"""Popularity scorers: a registry by config name, clean numbers out, page views fetched once."""

import json
import logging

import pandas as pd
import pytest
import requests
import yaml

from factft.errors import FactftError
from factft import pageviews
from factft.pageviews import MIN_RATE, RateLimit, article_title, fact_articles, pageview_table
from factft.popularity import SCORERS, ScoringContext, add_popularity
from factft.net import get_with_retries
from factft.tables import check_facts, read_table, write_table
from test_plots import snakemake_in

DAYS = "daily/20230101/20230103"


def raw(n=10, **extra):
    table = pd.DataFrame(
        {
            "id": [f"d-{i}" for i in range(n)],
            "question": [f"Where was p{i} born?" for i in range(n)],
            "answers": [[f"city{i}"] for i in range(n)],
            "subject": [f"Person {i % 5}" for i in range(n)],
            "relation": ["born"] * n,
        }
    )
    return table.assign(**extra)


def test_column_scorer_gives_float_popularity_and_names_its_source():
    facts = add_popularity(
        raw(s_pop=range(10)), {"scorer": "column", "column": "s_pop"}, ScoringContext("popqa"), 0.1
    )
    check_facts(facts, "popqa")
    assert facts["popularity"].dtype == "float64"
    assert facts["popularity"].tolist() == [float(i) for i in range(10)]
    assert set(facts["popularity_source"]) == {"column:s_pop"}


def test_missing_nonnumeric_and_negative_popularity_rows_are_dropped_and_counted(caplog):
    views = [1, 2, "n/a", 4, None, 6, -7, float("inf"), 9, 10] + list(range(10, 30))
    with caplog.at_level(logging.INFO, logger="factft"):
        facts = add_popularity(
            raw(30, v=views), {"scorer": "column", "column": "v"}, ScoringContext("x"), 0.2
        )
    assert len(facts) == 26
    assert not {"d-2", "d-4", "d-6", "d-7"} & set(facts["id"])
    assert "dropping 3 rows: popularity missing or not a number" in caplog.text
    assert "dropping 1 rows: negative popularity (a count or rate, >= 0: not its logarithm)" in caplog.text


def test_more_invalid_popularity_than_max_drop_fraction_is_an_error():
    with pytest.raises(FactftError, match=r"dataset 'x' \(popularity column:v\): 2 of 10 rows are invalid"):
        add_popularity(
            raw(v=[None, -1] + [1] * 8), {"scorer": "column", "column": "v"}, ScoringContext("x"), 0.1
        )


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(FactftError, match=r"popularity\.scorer 'fame' is unknown; scorers are: \['column', "):
        add_popularity(raw(), {"scorer": "fame"}, ScoringContext("x"), 0.1)
    assert set(SCORERS) == {"column", "pageviews", "model_confidence", "pretraining_count"}


def test_the_schemas_scorers_are_the_registered_ones():
    from factft.config import SCHEMA

    schema = yaml.safe_load(SCHEMA.read_text())
    popularity = schema["properties"]["datasets"]["additionalProperties"]["properties"]["popularity"]
    assert set(popularity["properties"]["scorer"]["enum"]) == set(SCORERS)


def test_each_scorers_settings_are_popularity_keys_of_the_schema_and_cover_them():
    """What a popularity job's params hold (rules/common.smk): each scorer's own keys."""
    from factft.config import SCHEMA

    schema = yaml.safe_load(SCHEMA.read_text())
    keys = set(schema["properties"]["datasets"]["additionalProperties"]["properties"]["popularity"]["properties"])
    used = {key for scorer in SCORERS.values() for key in scorer.settings}
    assert used == keys - {"scorer", "requests_per_second"}  # the request rate is how fast, not what


def test_missing_popularity_column_names_it_and_lists_the_columns():
    with pytest.raises(
        FactftError, match=r"column 's_pop' named in popularity\.column is missing; columns are: \['id'"
    ):
        add_popularity(raw(), {"scorer": "column", "column": "s_pop"}, ScoringContext("popqa"), 0.1)


def test_pretraining_count_uses_mentions_and_needs_the_column():
    facts = add_popularity(
        raw(mentions=[5] * 10), {"scorer": "pretraining_count"}, ScoringContext("synth"), 0.1
    )
    assert set(facts["popularity"]) == {5.0} and set(facts["popularity_source"]) == {"pretraining_count"}
    with pytest.raises(
        FactftError, match=r"dataset 'popqa': scorer pretraining_count needs a 'mentions' column"
    ):
        add_popularity(raw(), {"scorer": "pretraining_count"}, ScoringContext("popqa"), 0.1)


def daily(*views):
    return {
        "items": [{"article": "x", "timestamp": f"2023010{i + 1}00", "views": v} for i, v in enumerate(views)]
    }


def route(title):
    return f"/en.wikipedia/all-access/user/{title}/{DAYS}"


def fetch(server, subjects, cache, **extra):
    """The page views of `subjects` from the test server; titles are taken as they are unless
    `follow_redirects=True` is passed."""
    return pageview_table(
        [article_title(s) for s in subjects],
        cache,
        start="20230101",
        end="20230103",
        base_url=server.url,
        titles_url=f"{server.url}/w/api.php",
        backoff=0.01,
        requests_per_second=1000,
        **{"follow_redirects": False, **extra},
    )


def titles_route(titles):
    """The MediaWiki query that resolves `titles` (one batch)."""
    return f"/w/api.php?{pageviews.TITLES_QUERY}&titles={'|'.join(titles)}"


def titles_answer(titles, redirects=(), missing=(), ambiguous=()):
    """What the MediaWiki API answers for `titles` (formatversion 2): underscores spelled as
    spaces, `redirects` as (from, to) pairs, the articles they reach, `missing` titles and
    `ambiguous` ones (disambiguation pages)."""
    spelled = {t: t.replace("_", " ") for t in titles}
    moved = dict(redirects)
    reached = [moved.get(name, name) for name in spelled.values()]

    def page(title):
        if title in missing:
            return {"ns": 0, "title": title, "missing": True}
        properties = {"pageprops": {"disambiguation": ""}} if title in ambiguous else {}
        return {"ns": 0, "title": title, "pageid": 1, **properties}

    pages = [page(t) for t in reached]
    return {
        "batchcomplete": True,
        "query": {
            "normalized": [{"fromencoded": False, "from": t, "to": n} for t, n in spelled.items() if t != n],
            "redirects": [{"from": a, "to": b} for a, b in redirects],
            "pages": pages,
        },
    }


def test_pageviews_sum_daily_views_and_a_rerun_makes_no_request(http_server, tmp_path):
    http_server.reply(route("Ada_Lovelace"), (200, daily(10, 20, 30)))
    http_server.reply(route("Hallstatt"), (200, daily(1, 2, 3)))
    table = fetch(http_server, ["Ada Lovelace", "Hallstatt", "Ada Lovelace"], tmp_path)
    assert table.to_dict("records") == [  # titles taken as given: whether one is ambiguous is not known
        {"article": "Ada_Lovelace", "target": "Ada_Lovelace", "views": 60, "disambiguation": None},
        {"article": "Hallstatt", "target": "Hallstatt", "views": 6, "disambiguation": None},
    ]
    assert len(http_server.requests) == 2
    again = fetch(http_server, ["Hallstatt", "Ada Lovelace"], tmp_path)
    assert again.equals(table) and len(http_server.requests) == 2


def test_an_unreadable_cache_entry_is_fetched_again_and_replaced(http_server, tmp_path, caplog):
    http_server.reply(route("Ada_Lovelace"), (200, daily(10, 20, 30)))
    http_server.reply(route("Hallstatt"), (200, daily(1, 2, 3)))
    fetch(http_server, ["Ada Lovelace", "Hallstatt"], tmp_path)
    (entry,) = [p for p in tmp_path.rglob("*.json") if "Hallstatt" in p.read_text()]
    entry.write_text("")  # what a node crash can leave of a file written just before it
    with caplog.at_level(logging.WARNING, logger="factft"):
        table = fetch(http_server, ["Ada Lovelace", "Hallstatt"], tmp_path)
    assert table["views"].tolist() == [60, 6]
    assert f"1 cached entries cannot be read or lack a field (e.g. {entry}); fetching them again" in caplog.text
    assert http_server.requests.count(route("Hallstatt")) == 2
    assert http_server.requests.count(route("Ada_Lovelace")) == 1
    fetch(http_server, ["Hallstatt"], tmp_path)  # the entry was written anew
    assert http_server.requests.count(route("Hallstatt")) == 2


def test_pageviews_are_fetched_on_several_threads_each_result_its_own(http_server, tmp_path):
    names = [f"Person {i}" for i in range(12)]
    for i, name in enumerate(names):
        http_server.reply(route(article_title(name)), (200, daily(i, 1)))
    http_server.delay = 0.2  # a round trip: one request at a time would keep the rate far below the limit
    table = fetch(http_server, names, tmp_path)
    assert dict(zip(table["article"], table["views"])) == {article_title(n): i + 1 for i, n in enumerate(names)}
    assert http_server.most_at_once > 1 and len(http_server.requests) == 12


def test_the_rate_limit_spaces_requests_from_every_thread():
    now, slept = [100.0], []
    limit = RateLimit(4, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):  # three threads at the same moment: the second waits 1/4 s, the third 1/2 s
        limit.wait()
    assert slept == [0.25, 0.5]
    now[0] = 200.0  # long after the last slot: no wait
    limit.wait()
    assert slept == [0.25, 0.5]


def test_pageviews_retry_429_and_5xx_with_backoff(http_server, tmp_path):
    http_server.reply(
        route("Solaris"), (429, "slow down", {"Retry-After": "0"}), (503, "busy"), (200, daily(7))
    )
    assert fetch(http_server, ["Solaris"], tmp_path)["views"].tolist() == [7]
    assert len(http_server.requests) == 3


def test_a_429_halves_the_rate_once_per_burst_down_to_the_floor():
    now = [100.0]
    limit = RateLimit(8, clock=lambda: now[0], sleep=lambda s: None)
    assert limit.slow_down() and limit.per_second == 4
    assert not limit.slow_down() and limit.per_second == 4  # the same burst, within a second
    for _ in range(5):
        now[0] += 1.0
        limit.slow_down()
    assert limit.per_second == MIN_RATE


def test_every_attempt_waits_its_turn_retries_included_and_each_429_is_reported(http_server):
    http_server.reply("/x", (429, "slow down", {"Retry-After": "0"}), (503, "busy"), (200, "ok"))
    paced, throttled = [], []
    with requests.Session() as session:
        response = get_with_retries(
            session, f"{http_server.url}/x", backoff=0.01, pace=lambda: paced.append(len(http_server.requests)),
            on_throttled=lambda: throttled.append(len(http_server.requests)),
        )  # fmt: skip
    assert response.status_code == 200
    assert paced == [0, 1, 2] and throttled == [1]  # before each of the 3 requests; after the 429


def test_pageviews_slow_down_after_429_and_send_the_configured_contact(http_server, tmp_path, caplog):
    http_server.reply(route("Solaris"), (429, "slow down", {"Retry-After": "0"}), (200, daily(7)))
    with caplog.at_level(logging.WARNING, logger="factft.pageviews"):
        table = fetch(http_server, ["Solaris"], tmp_path, contact="ada@example.org")
    assert table["views"].tolist() == [7]
    assert "HTTP 429 (too many requests); now at most 500 requests/s" in caplog.text
    assert "no `contact`" not in caplog.text
    assert all(agent.startswith("factft/0.1 (ada@example.org; ") for agent in http_server.agents)


def test_pageviews_without_contact_warn_and_a_403_says_to_set_it(http_server, tmp_path, caplog):
    http_server.reply(route("Solaris"), (403, "Please set a user-agent"))
    with caplog.at_level(logging.WARNING, logger="factft.pageviews"), pytest.raises(
        FactftError, match=r"HTTP 403 from .*Solaris.*: set `contact` in the config"
    ):
        fetch(http_server, ["Solaris"], tmp_path)
    assert "no `contact` in the config" in caplog.text
    assert http_server.agents[0].startswith("factft/0.1 (research workflow")


def test_pageviews_missing_article_counts_zero_and_is_cached(http_server, tmp_path):
    # The server answers 404 for every unscripted path, as Wikimedia does for unknown titles.
    assert fetch(http_server, ["Nobody Atall"], tmp_path)["views"].tolist() == [0]
    assert fetch(http_server, ["Nobody Atall"], tmp_path)["views"].tolist() == [0]
    assert len(http_server.requests) == 1


def test_pageviews_give_up_after_bounded_attempts_and_keep_what_was_fetched(http_server, tmp_path):
    http_server.reply(route("Ada_Lovelace"), (200, daily(5)))
    http_server.reply(route("Zz"), (503, "down"))
    with pytest.raises(FactftError, match=r"gave up after 3 attempts \(HTTP 503\)"):
        fetch(http_server, ["Ada Lovelace", "zz"], tmp_path, attempts=3)
    assert http_server.requests.count(route("Zz")) == 3
    http_server.reply(route("Zz"), (200, daily(1)))
    assert fetch(http_server, ["Ada Lovelace", "zz"], tmp_path)["views"].tolist() == [5, 1]
    assert http_server.requests.count(route("Ada_Lovelace")) == 1


def test_titles_with_slashes_are_escaped_in_the_url(http_server, tmp_path):
    http_server.reply(route("AC/DC"), (200, daily(4)))
    assert fetch(http_server, ["AC/DC"], tmp_path)["views"].tolist() == [4]
    assert article_title(" the Beatles ") == "The_Beatles"
    assert article_title("Ella  Fitzgerald\t") == "Ella_Fitzgerald"  # Wikipedia has no title with "__"


def test_a_title_that_redirects_counts_the_views_of_the_article_it_leads_to(http_server, tmp_path, caplog):
    titles = ["Ada_Lovelace", "Ada_lovelace", "JFK", "Mercury_(disambiguation)", "Nobody_Atall"]  # as sorted
    redirects = [("Ada lovelace", "Ada Lovelace"), ("JFK", "John F. Kennedy"), ("Mercury (disambiguation)", "Mercury")]
    answer = titles_answer(titles, redirects, missing={"Nobody Atall"}, ambiguous={"Mercury"})
    http_server.reply(titles_route(titles), (200, answer))
    http_server.reply(route("Ada_Lovelace"), (200, daily(10, 20, 30)))
    http_server.reply(route("John_F._Kennedy"), (200, daily(500)))
    http_server.reply(route("Mercury"), (200, daily(70)))
    # No title holds a "|"; a disambiguation page's views count as they are, flagged.
    subjects = ["Ada lovelace", "JFK", "Ada Lovelace", "Nobody Atall", "AC|DC", "Mercury (disambiguation)"]
    with caplog.at_level(logging.WARNING, logger="factft.pageviews"):
        table = fetch(http_server, subjects, tmp_path, follow_redirects=True)
    assert table.to_dict("records") == [
        {"article": "AC|DC", "target": "AC|DC", "views": 0, "disambiguation": False},
        {"article": "Ada_Lovelace", "target": "Ada_Lovelace", "views": 60, "disambiguation": False},
        {"article": "Ada_lovelace", "target": "Ada_Lovelace", "views": 60, "disambiguation": False},
        {"article": "JFK", "target": "John_F._Kennedy", "views": 500, "disambiguation": False},
        {"article": "Mercury_(disambiguation)", "target": "Mercury", "views": 70, "disambiguation": True},
        {"article": "Nobody_Atall", "target": "Nobody_Atall", "views": 0, "disambiguation": False},
    ]
    assert "1 of 6 titles (16.7%) lead to a disambiguation page (e.g. 'Mercury_(disambiguation)')" in caplog.text
    # One query for the titles, one request per article: Ada Lovelace's views are asked once.
    articles = ("AC|DC", "Ada_Lovelace", "John_F._Kennedy", "Mercury", "Nobody_Atall")
    assert sorted(http_server.requests) == sorted([titles_route(titles), *(route(a) for a in articles)])
    again = fetch(http_server, subjects, tmp_path, follow_redirects=True)
    assert again.equals(table) and len(http_server.requests) == 6  # all from the cache


def test_page_properties_that_come_in_parts_are_asked_for_to_the_end(http_server, tmp_path):
    """MediaWiki may cut a query's page properties short (its result size limit) and say where
    to go on; a title cached without the disambiguation flag (before it was asked) is asked again."""
    titles = ["Apple", "Mercury"]
    first = titles_answer(titles)
    first["continue"] = {"ppcontinue": "2|disambiguation", "continue": "||"}
    http_server.reply(titles_route(titles), (200, first))
    http_server.reply(
        titles_route(titles) + "&ppcontinue=2|disambiguation&continue=||",
        (200, titles_answer(titles, ambiguous={"Mercury"})),
    )
    table = fetch(http_server, titles, tmp_path, follow_redirects=True)
    assert table["disambiguation"].tolist() == [False, True]
    assert sum(r.startswith("/w/api.php") for r in http_server.requests) == 2
    (entry,) = [p for p in (tmp_path / "en.wikipedia" / "titles").rglob("*.json") if "Apple" in p.read_text()]
    entry.write_text(json.dumps({"title": "Apple", "target": "Apple"}))  # the layout of 2026-12-01
    http_server.reply(titles_route(["Apple"]), (200, titles_answer(["Apple"])))
    assert fetch(http_server, titles, tmp_path, follow_redirects=True).equals(table)
    assert http_server.requests[4:] == [titles_route(["Apple"])]  # views from the cache


def test_titles_are_resolved_a_batch_a_query_and_an_api_error_is_named(http_server, tmp_path, monkeypatch):
    monkeypatch.setattr(pageviews, "TITLES_PER_QUERY", 2)
    titles = ["A", "B", "C"]
    http_server.reply(titles_route(["A", "B"]), (200, titles_answer(["A", "B"], [("B", "A")])))
    http_server.reply(titles_route(["C"]), (200, {"error": {"code": "toomanyvalues", "info": "Too many values"}}))
    with pytest.raises(FactftError, match=r"titles 'C' \.\.\.: Too many values from http://127\.0\.0\.1:\d+/w/api"):
        fetch(http_server, titles, tmp_path, follow_redirects=True)
    http_server.reply(titles_route(["C"]), (200, titles_answer(["C"])))
    table = fetch(http_server, titles, tmp_path, follow_redirects=True)
    assert table["target"].tolist() == ["A", "A", "C"]
    assert http_server.requests.count(titles_route(["A", "B"])) == 1  # kept from the failed run


def test_titles_resolve_as_mediawiki_answers_one_query_at_a_time(http_server, tmp_path, monkeypatch):
    """A MediaWiki answer with a section redirect to a title Python would upper-case otherwise
    (ß), an invalid title, an interwiki one and a chain; a "#" title is never sent (MediaWiki
    would read C# as C). Queries go one at a time however many threads fetch views."""
    monkeypatch.setattr(pageviews, "TITLES_PER_QUERY", 3)
    pools = []

    class Recorded(pageviews.ThreadPoolExecutor):
        def __init__(self, workers, **options):
            pools.append(workers)
            super().__init__(workers, **options)

    monkeypatch.setattr(pageviews, "ThreadPoolExecutor", Recorded)
    first, second = ["A_one", "Eszett", "Foo[bar]"], ["Fr:Paris", "Zed"]  # the sorted titles, 3 a query
    http_server.reply(titles_route(first), (200, {"batchcomplete": True, "query": {
        "normalized": [{"fromencoded": False, "from": "A_one", "to": "A one"}],
        "redirects": [{"from": "A one", "to": "B two"}, {"from": "B two", "to": "C three"},
                      {"from": "Eszett", "to": "ß", "tofragment": "History"}],
        "pages": [{"ns": 0, "title": "C three", "pageid": 3}, {"ns": 0, "title": "ß", "pageid": 4},
                  {"title": "Foo[bar]", "invalidreason": "bad characters", "invalid": True}],
    }}))  # fmt: skip
    http_server.reply(titles_route(second), (200, {"batchcomplete": True, "query": {
        "interwiki": [{"title": "Fr:Paris", "iw": "fr"}], "pages": [{"ns": 0, "title": "Zed", "pageid": 5}],
    }}))  # fmt: skip
    http_server.delay = 0.1
    subjects = ["A one", "Eszett", "Fr:Paris", "Foo[bar]", "Zed", "C#"]
    table = fetch(http_server, subjects, tmp_path, follow_redirects=True)
    assert dict(zip(table["article"], table["target"])) == {
        "A_one": "C_three", "C#": "C#", "Eszett": "ß", "Foo[bar]": "Foo[bar]", "Fr:Paris": "Fr:Paris", "Zed": "Zed"
    }
    queries = [r for r in http_server.requests if r.startswith("/w/api.php")]
    assert queries == [titles_route(first), titles_route(second)]
    assert pools[0] == 1 and pools[1] > 1  # the title queries on one thread, the views on several
    assert all(table[c].map(type).eq(str).all() for c in ("article", "target")) and table["views"].dtype == "int64"


def test_a_query_is_cut_short_before_its_url_grows_too_long():
    titles = [f"Заголовок_{i}_" + "ж" * 40 for i in range(50)]  # Cyrillic: 11,000 characters encoded
    batches = pageviews._batches(titles)
    assert [t for batch in batches for t in batch] == titles and len(batches) > 1
    assert all(sum(len(pageviews.quote(t)) + 3 for t in batch) <= pageviews.MAX_QUERY_CHARS for batch in batches)
    assert pageviews._batches([f"T{i}" for i in range(120)]) == [
        [f"T{i}" for i in range(start, min(start + 50, 120))] for start in (0, 50, 100)
    ]


def test_reversed_date_range_is_an_error_before_any_request(http_server, tmp_path):
    with pytest.raises(FactftError, match="popularity.start 20231231 is after popularity.end 20230101"):
        pageview_table(["x"], tmp_path, start="20231231", end="20230101", base_url=http_server.url)
    assert http_server.requests == []


PAGEVIEWS = {"scorer": "pageviews", "project": "en.wikipedia", "start": "20230101", "end": "20231231"}


def test_pageviews_scorer_maps_subjects_through_the_fetched_table(tmp_path):
    table = pd.DataFrame({"article": [f"Person_{i}" for i in range(5)], "views": [0, 10, 20, 30, 40]})
    write_table(table, tmp_path / "pageviews.parquet")
    facts = add_popularity(raw(), PAGEVIEWS, ScoringContext("eq", pageviews=tmp_path / "pageviews.parquet"), 0.1)
    assert facts["popularity"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0] * 2
    assert set(facts["popularity_source"]) == {"pageviews:en.wikipedia:20230101-20231231"}
    context = ScoringContext("eq", pageviews=tmp_path / "pageviews.parquet")
    own = add_popularity(raw(), {**PAGEVIEWS, "follow_redirects": False}, context, 0.1)
    assert set(own["popularity_source"]) == {"pageviews:en.wikipedia:20230101-20231231:titles-as-given"}


def test_a_title_column_names_the_article_when_the_subject_is_not_its_title(http_server, tmp_path):
    # PopQA's subject "Mercury" is the planet's fact, whose article is Mercury_(planet).
    facts = raw(4).assign(subject=["Mercury"] * 4, s_wiki_title=["Mercury (planet)"] * 2 + ["Freddie Mercury", None])
    params = {**PAGEVIEWS, "title_column": "s_wiki_title"}
    http_server.reply(route("Mercury_(planet)"), (200, daily(5)))
    http_server.reply(route("Freddie_Mercury"), (200, daily(9)))
    table = pageview_table(
        fact_articles(facts, params, "popqa"), tmp_path, start="20230101", end="20230103",
        base_url=http_server.url, requests_per_second=1000, follow_redirects=False,
    )  # fmt: skip
    assert table[["article", "views"]].to_dict("records") == [
        {"article": "", "views": 0},
        {"article": "Freddie_Mercury", "views": 9},
        {"article": "Mercury_(planet)", "views": 5},
    ]
    assert len(http_server.requests) == 2  # no request for the fact without a title
    write_table(table, tmp_path / "pageviews.parquet")
    scored = add_popularity(facts, params, ScoringContext("popqa", pageviews=tmp_path / "pageviews.parquet"), 0.5)
    assert scored["popularity"].tolist() == [5.0, 5.0, 9.0, 0.0]


def test_a_missing_title_column_is_named_with_the_dataset(tmp_path):
    with pytest.raises(FactftError, match=r"dataset 'popqa': column 's_wiki_title' named in popularity\.title_column"):
        fact_articles(raw(), {**PAGEVIEWS, "title_column": "s_wiki_title"}, "popqa")


@pytest.mark.slow
def test_the_pageviews_rule_counts_the_configured_project_and_days_from_the_cache(http_server, data_dir, tmp_path):
    """The `pageviews` job looks up the config's project and days in the config's cache: filled
    here from the local server, so the job makes no request."""
    subjects = pd.read_csv(data_dir / "custom" / "trivia.csv")["entity"].tolist()
    for i, subject in enumerate(subjects):
        route = f"/de.wikipedia/all-access/user/{article_title(subject)}/daily/20230301/20230302"
        http_server.reply(route, (200, daily(i, 1)))
    titles = sorted(article_title(s) for s in subjects)
    http_server.reply(titles_route(titles), (200, titles_answer(titles)))
    pageview_table(
        titles, tmp_path / "hf" / "pageviews", project="de.wikipedia", start="20230301", end="20230302",
        base_url=http_server.url, titles_url=f"{http_server.url}/w/api.php", requests_per_second=1000,
    )  # fmt: skip
    popularity = {"scorer": "pageviews", "project": "de.wikipedia", "start": "20230301", "end": "20230302"}
    columns = {"question": "prompt", "answers": "gold", "subject": "entity", "relation": "rel"}
    trivia = {"source": {"path": str(data_dir / "custom" / "trivia.csv")}, "columns": columns, "popularity": popularity}
    config = {
        "cache_dir": "hf",
        "contact": "factft-tests@example.org",
        "datasets": {"trivia": trivia},
        "models": {"local": {"source": {"path": "no-such-model"}}},  # never built here
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake_in(tmp_path, tmp_path / "config.yaml", ["results/trivia/facts.parquet"], "--cores", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "30 articles, 0 fetched (0 without an article or views), 30 from the cache" in (
        tmp_path / "logs" / "pageviews" / "trivia.log"
    ).read_text()
    facts = read_table(tmp_path / "results" / "trivia" / "facts.parquet")
    assert dict(zip(facts["subject"], facts["popularity"])) == {s: i + 1 for i, s in enumerate(subjects)}
    assert set(facts["popularity_source"]) == {"pageviews:de.wikipedia:20230301-20230302"}
