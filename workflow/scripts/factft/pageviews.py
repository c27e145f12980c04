"""Wikipedia page views of subjects (Wikimedia REST API), fetched politely and cached on disk.

A subject's title may redirect ("JFK" to "John F. Kennedy"), whose own views are a few: it is
first resolved to its article through the MediaWiki API, 50 titles a query, which also says
whether that article is a disambiguation page (an ambiguous name, whose views are no
entity's). Each title's article and each article's total over [start, end] are cached as
small json files, so a rerun (or the `popularity` job on a compute node without internet)
makes no request. Requests run on a few threads under one rate limit: one at a time, a
request's round trip (~0.1-0.2 s) would keep the rate far below the configured one, and
EntityQuestions has about 200,000 subjects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlencode

import pandas as pd
import requests

from factft.errors import FactftError
from factft.net import get_with_retries, user_agent
from factft.tables import atomic_path

log = logging.getLogger(__name__)

API = "https://wikimedia.org/api/rest_v1/metrics/pageviews/per-article"
# 404: no such article, or no views in the range; 400: a title Wikipedia cannot have.
MISSING_STATUS = frozenset({400, 404})
# Threads enough to keep the rate with round trips of up to this many seconds.
ROUND_TRIP_S = 0.5
MAX_THREADS = 32
MIN_RATE = 1.0  # requests/s that a run of 429s (too many requests) slows down to, at most
PROGRESS_EVERY = 5000  # fetched articles between progress lines
QUERY_PROGRESS_EVERY = 200  # title queries (10,000 titles) between progress lines
TITLES_PER_QUERY = 50  # the MediaWiki API's limit per query for clients without bot rights
# Characters of titles in one query's URL: servers refuse URLs beyond ~8,000 (50 Cyrillic
# titles of 45 letters make 11,000).
MAX_QUERY_CHARS = 6000
TITLES_QUERY = "action=query&format=json&formatversion=2&redirects=1&prop=pageprops&ppprop=disambiguation"


class RateLimit:
    """Spaces calls of `wait()` from any thread at least 1/per_second apart; `slow_down()`
    halves the rate."""

    def __init__(self, per_second: float, clock=time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep = 1.0 / per_second, clock, sleep
        self.lock = threading.Lock()
        self.next_slot = self.slowed_at = float("-inf")

    @property
    def per_second(self) -> float:
        return 1.0 / self.interval

    def slow_down(self) -> bool:
        """Halve the rate, down to MIN_RATE, once a second at most: threads that meet the same
        burst of 429s slow it down once. Whether it did."""
        with self.lock:
            now = self.clock()
            if now - self.slowed_at < 1.0 or self.interval >= 1.0 / MIN_RATE:
                return False
            self.interval, self.slowed_at = min(2 * self.interval, 1.0 / MIN_RATE), now
            return True

    def wait(self) -> None:
        with self.lock:
            now = self.clock()
            slot = max(self.next_slot, now)
            self.next_slot = slot + self.interval
        if slot > now:
            self.sleep(slot - now)


def article_title(name: str) -> str:
    """The Wikipedia title for a name: one underscore for each run of spaces, first letter upper case."""
    title = "_".join(name.split())
    return title[:1].upper() + title[1:]


def fact_articles(facts: pd.DataFrame, params: dict, dataset: str) -> pd.Series:
    """Each fact's article: its `title_column` (e.g. PopQA's s_wiki_title) when the config
    names one, else its subject's name, which misses subjects whose article title differs."""
    column = params.get("title_column")
    if column is None:
        return facts["subject"].map(article_title)
    if column not in facts.columns:
        raise FactftError(
            f"dataset '{dataset}': column '{column}' named in popularity.title_column is missing from "
            f"the raw table (columns: {list(facts.columns)}); rerun `download` for this dataset"
        )
    titles = facts[column].map(lambda t: article_title(t) if isinstance(t, str) else "")
    if (titles == "").any():
        log.warning(
            "dataset '%s': %d facts without a title in %s count 0 views", dataset, int((titles == "").sum()), column
        )
    return titles


def pageview_table(
    articles,
    cache_dir: str | Path,
    *,
    project: str = "en.wikipedia",
    start: str = "20230101",
    end: str = "20231231",
    follow_redirects: bool = True,
    requests_per_second: float = 20,
    base_url: str = API,
    titles_url: str | None = None,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float = 30,
    contact: str | None = None,
) -> pd.DataFrame:
    """Columns article, target, views (int64), disambiguation (boolean): each distinct
    article's summed daily views.

    With follow_redirects, a title that redirects (or that Wikipedia spells otherwise) counts
    the views of the article it leads to, its `target`, asked of the MediaWiki API at
    `titles_url` (default: the project's api.php), which also says whether the target is a
    disambiguation page; without, each title counts its own and disambiguation is unknown (NA).
    Missing articles (and empty titles) count 0 views. Articles and titles in the cache cost
    no request; each answer is cached at once, so a run stopped by an error keeps what it
    fetched. `contact` (email or URL) goes into the User-Agent, as Wikimedia asks; an answer
    "too many requests" (429) halves the rate for the rest of the run.
    """
    check_range(start, end)
    articles = set(articles)
    untitled, articles = "" in articles, sorted(articles - {""})
    client = _Client(requests_per_second, contact, attempts=attempts, backoff=backoff, timeout=timeout)
    try:
        folder = Path(cache_dir) / project
        if follow_redirects:
            resolved = _resolve(articles, folder / "titles", client, titles_url or _api_php(project))
        else:  # titles taken as given: none asked of the API, so whether one is ambiguous is not known
            resolved = {article: {"target": article, "disambiguation": pd.NA} for article in articles}
        url = f"{base_url}/{project}/all-access/user/{{}}/daily/{start}/{end}"
        views = _views(sorted({entry["target"] for entry in resolved.values()}), folder / f"{start}-{end}", client, url)
    finally:
        client.close()
    if untitled:  # facts without a title (fact_articles warned)
        resolved[""], views[""] = {"target": "", "disambiguation": False if follow_redirects else pd.NA}, 0
    order = sorted(resolved)
    return pd.DataFrame(
        {
            "article": pd.Series(order, dtype=object),
            "target": pd.Series([resolved[a]["target"] for a in order], dtype=object),
            "views": pd.Series([views[resolved[a]["target"]] for a in order], dtype="int64"),
            "disambiguation": pd.Series([resolved[a]["disambiguation"] for a in order], dtype="boolean"),
        }
    )


class _Client:
    """GETs on a few threads (each with its own Session) under one rate limit."""

    def __init__(self, per_second: float, contact: str | None, **retry):
        self.per_second, self.contact, self.retry = per_second, contact, retry
        self.agent, self.limit = user_agent(contact), RateLimit(per_second)
        self.threads = max(1, min(MAX_THREADS, math.ceil(per_second * ROUND_TRIP_S)))
        self.local, self.sessions, self.warned = threading.local(), [], False

    def get(self, url: str) -> requests.Response:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()  # a Session is not shared between threads
            self.sessions.append(self.local.session)
        # Every attempt waits its turn (Wikimedia asks clients to keep a modest request rate).
        return get_with_retries(
            self.local.session, url, agent=self.agent, pace=self.limit.wait, on_throttled=self._throttled, **self.retry
        )

    def refused(self, what: str, response: requests.Response, url: str) -> FactftError:
        problem = f"{what}: HTTP {response.status_code} from {url}"
        if response.status_code == 403 and not self.contact:
            problem += "; Wikimedia refuses clients it cannot identify: set `contact` in the config"
        return FactftError(problem)

    def map(self, fetch, items: list, what: str, *, threads: int | None = None, every: int = PROGRESS_EVERY):
        """(item, fetch(item)) for each item, fetched on the client's threads (or `threads`), in
        order, with a progress line `every` items."""
        if items and not self.contact and not self.warned:
            self.warned = True
            log.warning(
                "no `contact` in the config: Wikimedia asks clients for an email or URL in the User-Agent "
                "and may rate-limit those without"
            )
        pool = ThreadPoolExecutor(threads or self.threads, thread_name_prefix="pageviews")
        try:
            for done, item in enumerate(zip(items, pool.map(fetch, items)), start=1):
                yield item
                if done % every == 0:
                    log.info("pageviews: %d of %d %s fetched", done, len(items), what)
        finally:
            # On an error, requests not yet started are dropped (those fetched stay cached).
            pool.shutdown(cancel_futures=True)

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def _throttled(self) -> None:
        if self.limit.slow_down():
            log.warning("pageviews: HTTP 429 (too many requests); now at most %.3g requests/s", self.limit.per_second)


def _views(articles: list[str], folder: Path, client: _Client, url: str) -> dict[str, int]:
    """Each article's views, from `url` with the article in its {}, cached in `folder`
    (<project>/<start>-<end>)."""
    cached, todo = _cached(articles, folder, {"views": int})
    views = {article: entry["views"] for article, entry in cached.items()}
    where = f"{folder.parent.name} {folder.name}"
    log.info(
        "pageviews %s: %d articles, %d cached, %d to fetch at up to %g requests/s on %d threads (at least %.0f min)",
        where, len(articles), len(articles) - len(todo), len(todo), client.per_second, client.threads,
        len(todo) / client.per_second / 60,
    )  # fmt: skip

    def fetch(article: str) -> int | None:
        """The article's views, None where it has none (no such article, or no views)."""
        address = url.format(quote(article, safe=""))
        response = client.get(address)
        if response.status_code in MISSING_STATUS:
            total = None
        elif response.status_code == 200:
            total = sum(int(item["views"]) for item in response.json().get("items", []))
        else:
            raise client.refused(f"pageviews of '{article}'", response, address)
        _store(folder, article, {"article": article, "views": total or 0})
        return total

    missing = 0
    for article, total in client.map(fetch, todo, "articles"):
        views[article], missing = total or 0, missing + (total is None)
    log.info(
        "pageviews %s: %d articles, %d fetched (%d without an article or views), %d from the cache",
        where, len(articles), len(todo), missing, len(articles) - len(todo),
    )  # fmt: skip
    return views


def _resolve(titles: list[str], folder: Path, client: _Client, url: str) -> dict[str, dict]:
    """Each title's {"target": its article, where its redirect leads, as Wikipedia spells it
    (the title itself where it has no article), "disambiguation": whether that article is a
    disambiguation page}. Asked TITLES_PER_QUERY at a time, cached in `folder`."""
    targets, todo = _cached(titles, folder, {"target": str, "disambiguation": bool})
    # No title holds "|" (it separates titles in a query) or "#" (MediaWiki reads what follows
    # as a section: "C#" would count C's views): such a name leads nowhere.
    nowhere = {t for t in todo if "|" in t or "#" in t}
    targets.update({t: {"target": t, "disambiguation": False} for t in nowhere})
    todo = [t for t in todo if t not in nowhere]
    batches = _batches(todo)
    log.info("pageviews: %d titles, %d resolved before, %d queries to resolve the rest", len(titles),
             len(titles) - len(todo) - len(nowhere), len(batches))  # fmt: skip

    def ask(address: str, batch: list[str]) -> dict:
        response = client.get(address)
        if response.status_code != 200:
            raise client.refused(f"titles '{batch[0]}' ...", response, address)
        answer = response.json()
        if "error" in answer:
            raise FactftError(f"titles '{batch[0]}' ...: {answer['error'].get('info', answer['error'])} from {address}")
        return answer

    def fetch(batch: list[str]) -> dict[str, dict]:
        address = f"{url}?{TITLES_QUERY}&titles={quote('|'.join(batch))}"
        answer, query = ask(address, batch), {}
        for _ in range(len(batch) + 1):  # each further answer brings at least one page's properties
            for key, items in answer.get("query", {}).items():
                query.setdefault(key, []).extend(items)
            if "continue" not in answer:
                break
            # The page properties came in parts (MediaWiki's result size limit): ask for the rest.
            answer = ask(f"{address}&{urlencode(answer['continue'])}", batch)
        else:
            raise FactftError(f"titles '{batch[0]}' ...: the MediaWiki API's answer never ends ({address})")
        found = _targets(batch, query)
        for title, entry in found.items():
            _store(folder, title, {"title": title, **entry})
        return found

    # One query at a time, as the MediaWiki API's etiquette asks: for EntityQuestions some
    # 4,000 queries, about 15 min at a quarter second each (estimated, not measured), once.
    for _, found in client.map(fetch, batches, "title queries", threads=1, every=QUERY_PROGRESS_EVERY):
        targets.update(found)
    moved = sorted((title, entry["target"]) for title, entry in targets.items() if entry["target"] != title)
    log.info(
        "pageviews: %d of %d titles lead to another article%s",
        len(moved), len(titles), "" if not moved else f" (e.g. '{moved[0][0]}' -> '{moved[0][1]}')",
    )  # fmt: skip
    ambiguous = sorted(title for title, entry in targets.items() if entry["disambiguation"])
    if ambiguous:
        log.warning(
            "pageviews: %d of %d titles (%.1f%%) lead to a disambiguation page (e.g. '%s'): an ambiguous name, "
            "whose views are the page's, no entity's; the pageviews table's `disambiguation` column lists them",
            len(ambiguous), len(titles), 100 * len(ambiguous) / len(titles), ambiguous[0],
        )  # fmt: skip
    return targets


def _batches(titles: list[str]) -> list[list[str]]:
    """Titles TITLES_PER_QUERY at a time, fewer where their URL would pass MAX_QUERY_CHARS."""
    batches, size = [], 0
    for title in titles:
        chars = len(quote(title)) + 3  # and an encoded "|"
        if not batches or len(batches[-1]) == TITLES_PER_QUERY or size + chars > MAX_QUERY_CHARS:
            batches.append([])
            size = 0
        batches[-1].append(title)
        size += chars
    return batches


def _targets(batch: list[str], query: dict) -> dict[str, dict]:
    """Each title's {"target", "disambiguation"}, read from a MediaWiki query's `normalized`
    spellings, `redirects` and `pages` with their `pageprops` (formatversion 2)."""
    spelled = {step["from"]: step["to"] for step in query.get("normalized", [])}
    redirects = {step["from"]: step["to"] for step in query.get("redirects", [])}
    pages = query.get("pages", [])
    exists = {page["title"] for page in pages if not page.get("missing") and not page.get("invalid")}
    ambiguous = {page["title"] for page in pages if "disambiguation" in page.get("pageprops", {})}
    targets = {}
    for title in batch:
        sent = unicodedata.normalize("NFC", title)  # as MediaWiki reads every request
        name, seen = spelled.get(sent, sent), set()
        while name in redirects and name not in seen:
            seen.add(name)
            name = redirects[name]
        # The API's spelling is the article's: only its spaces become underscores (its own
        # case rules differ from Python's upper(): ß, Georgian).
        found = name in exists
        targets[title] = {"target": name.replace(" ", "_") if found else title, "disambiguation": name in ambiguous}
    return targets


def _cached(keys: list[str], folder: Path, kinds: dict[str, type]) -> tuple[dict, list[str]]:
    """({key: its cached entry's fields named in `kinds`}, the keys to fetch). An entry that
    cannot be read, or that lacks a field or holds one of another kind, is fetched again."""
    values, unreadable = {}, []
    for key in keys:
        try:  # one file-system call per key, not two: 200,000 of them on a cluster's NFS
            entry = json.loads(_cache_file(folder, key).read_text())
            fields = {field: entry[field] for field in kinds}
            if any(type(value) is not kinds[field] for field, value in fields.items()):
                raise TypeError(entry)
            values[key] = fields
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):  # e.g. emptied by a crash: fetched again
            unreadable.append(key)
    if unreadable:
        log.warning(
            "pageviews: %d cached entries cannot be read or lack a field (e.g. %s); fetching them again",
            len(unreadable), _cache_file(folder, unreadable[0]),
        )  # fmt: skip
    return values, [key for key in keys if key not in values]


def _store(folder: Path, key: str, entry: dict) -> None:
    with atomic_path(_cache_file(folder, key), shared=True) as tmp:
        tmp.write_text(json.dumps(entry))


def _api_php(project: str) -> str:
    """The MediaWiki API of a Wikimedia project (en.wikipedia -> https://en.wikipedia.org/w/api.php)."""
    return f"https://{project.removesuffix('.org')}.org/w/api.php"


def _cache_file(folder: Path, article: str) -> Path:
    # Titles can hold any character (/, :, ...): the file is named by the title's hash.
    digest = hashlib.sha256(article.encode()).hexdigest()[:24]
    return folder / digest[:2] / f"{digest}.json"


def check_range(start: str, end: str, where: str = "popularity") -> None:
    """Days `start` to `end` (YYYYMMDD), checked when the workflow starts (config.check_config,
    `where` the config's key) and again before any request."""
    for key, day in (("start", start), ("end", end)):
        try:
            datetime.strptime(day, "%Y%m%d")
        except ValueError:
            raise FactftError(f"{where}.{key}: '{day}' is no day (YYYYMMDD, such as 20230101)") from None
    if start > end:  # YYYYMMDD sorts as the days do
        raise FactftError(f"{where}.start {start} is after {where}.end {end}")
