"""Wikipedia page views of subjects (Wikimedia REST API), fetched politely and cached on disk.

Each subject's total over [start, end] is cached as one small json file, so a rerun (or the
`popularity` job on a compute node without internet) makes no request. Requests run on a few
threads under one rate limit: one at a time, a request's round trip (~0.1-0.2 s) would keep
the rate far below the configured one, and EntityQuestions has about 200,000 subjects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import requests

from factft.errors import FactftError
from factft.sources import get_with_retries, user_agent
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
    requests_per_second: float = 20,
    base_url: str = API,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float = 30,
    contact: str | None = None,
) -> pd.DataFrame:
    """Columns article, views (int64): each distinct article's summed daily views.

    Missing articles (and empty titles) count 0 views. Articles in the cache cost no request;
    each fetched one is cached at once, so a run stopped by an error keeps what it fetched.
    `contact` (email or URL) goes into the User-Agent, as Wikimedia asks; an answer "too many
    requests" (429) halves the rate for the rest of the run.
    """
    _check_range(start, end)
    folder = Path(cache_dir) / project / f"{start}-{end}"
    articles = sorted(set(articles))
    views = {"": 0}  # facts without a title (fact_articles warned)
    unreadable = []
    for article in articles:
        if not article:
            continue
        try:  # one file-system call per article, not two: 200,000 of them on a cluster's NFS
            views[article] = int(json.loads(_cache_file(folder, article).read_text())["views"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):  # e.g. emptied by a crash: fetched again
            unreadable.append(article)
    if unreadable:
        log.warning(
            "pageviews: %d cached entries cannot be read (e.g. %s); fetching them again",
            len(unreadable), _cache_file(folder, unreadable[0]),
        )  # fmt: skip
    todo = [article for article in articles if article not in views]
    threads = max(1, min(MAX_THREADS, math.ceil(requests_per_second * ROUND_TRIP_S)))
    log.info(
        "pageviews %s %s-%s: %d articles, %d cached, %d to fetch at up to %g requests/s on %d threads "
        "(at least %.0f min)",
        project, start, end, len(articles), len(articles) - len(todo), len(todo), requests_per_second, threads,
        len(todo) / requests_per_second / 60,
    )  # fmt: skip
    if todo and not contact:
        log.warning(
            "no `contact` in the config: Wikimedia asks clients for an email or URL in the User-Agent "
            "and may rate-limit those without"
        )
    agent, limit, local, sessions = user_agent(contact), RateLimit(requests_per_second), threading.local(), []

    def throttled() -> None:
        if limit.slow_down():
            log.warning("pageviews: HTTP 429 (too many requests); now at most %.3g requests/s", limit.per_second)

    def fetch(article: str) -> tuple[int, bool]:
        """(views, whether the article is missing), cached."""
        if not hasattr(local, "session"):
            local.session = requests.Session()  # a Session is not shared between threads
            sessions.append(local.session)
        url = f"{base_url}/{project}/all-access/user/{quote(article, safe='')}/daily/{start}/{end}"
        # Every attempt waits its turn (Wikimedia asks clients to keep a modest request rate).
        response = get_with_retries(
            local.session, url, attempts=attempts, backoff=backoff, timeout=timeout, agent=agent,
            pace=limit.wait, on_throttled=throttled,
        )  # fmt: skip
        if response.status_code in MISSING_STATUS:
            total = 0
        elif response.status_code == 200:
            total = sum(int(item["views"]) for item in response.json().get("items", []))
        else:
            problem = f"pageviews of '{article}': HTTP {response.status_code} from {url}"
            if response.status_code == 403 and not contact:
                problem += "; Wikimedia refuses clients it cannot identify: set `contact` in the config"
            raise FactftError(problem)
        with atomic_path(_cache_file(folder, article), shared=True) as tmp:
            tmp.write_text(json.dumps({"article": article, "views": total}))
        return total, response.status_code in MISSING_STATUS

    missing = 0
    pool = ThreadPoolExecutor(threads, thread_name_prefix="pageviews")
    try:
        for done, (article, (total, absent)) in enumerate(zip(todo, pool.map(fetch, todo)), start=1):
            views[article], missing = total, missing + absent
            if done % PROGRESS_EVERY == 0:
                log.info("pageviews: %d of %d fetched", done, len(todo))
    finally:
        # On an error, requests not yet started are dropped (those fetched stay cached).
        pool.shutdown(cancel_futures=True)
        for session in sessions:
            session.close()
    log.info(
        "pageviews %s %s-%s: %d articles, %d fetched (%d without an article), %d from the cache",
        project, start, end, len(articles), len(todo), missing, len(articles) - len(todo),
    )  # fmt: skip
    table = pd.DataFrame({"article": articles})
    table["views"] = pd.Series([views[a] for a in articles], dtype="int64")
    return table


def _cache_file(folder: Path, article: str) -> Path:
    # Titles can hold any character (/, :, ...): the file is named by the title's hash.
    digest = hashlib.sha256(article.encode()).hexdigest()[:24]
    return folder / digest[:2] / f"{digest}.json"


def _check_range(start: str, end: str) -> None:
    try:
        first, last = datetime.strptime(start, "%Y%m%d"), datetime.strptime(end, "%Y%m%d")
    except ValueError as error:
        raise FactftError(f"popularity.start/end: {error}; dates are YYYYMMDD") from None
    if first > last:
        raise FactftError(f"popularity.start {start} is after popularity.end {end}")
