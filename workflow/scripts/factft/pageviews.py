"""Wikipedia page views of subjects (Wikimedia REST API), fetched politely and cached on disk.

Each subject's total over [start, end] is cached as one small json file, so a rerun (or the
`popularity` job on a compute node without internet) makes no request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import requests

from factft.errors import FactftError
from factft.sources import get_with_retries
from factft.tables import atomic_path

log = logging.getLogger(__name__)

API = "https://wikimedia.org/api/rest_v1/metrics/pageviews/per-article"
# 404: no such article, or no views in the range; 400: a title Wikipedia cannot have.
MISSING_STATUS = frozenset({400, 404})


def article_title(name: str) -> str:
    """The Wikipedia title for a name: underscores for spaces, first letter upper case."""
    title = name.strip().replace(" ", "_")
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
) -> pd.DataFrame:
    """Columns article, views (int64): each distinct article's summed daily views.

    Missing articles (and empty titles) count 0 views. Articles in the cache cost no request.
    """
    _check_range(start, end)
    folder = Path(cache_dir) / project / f"{start}-{end}"
    articles = sorted(set(articles))
    views, missing, fetched = {}, 0, 0
    interval = 1.0 / requests_per_second
    last_request = float("-inf")
    with requests.Session() as session:
        for article in articles:
            if not article:  # facts without a title (fact_articles warned)
                views[article] = 0
                continue
            cached = _cache_file(folder, article)
            if cached.is_file():
                views[article] = json.loads(cached.read_text())["views"]
                continue
            # Wikimedia asks clients to keep a modest request rate.
            time.sleep(max(0.0, last_request + interval - time.monotonic()))
            last_request = time.monotonic()
            url = f"{base_url}/{project}/all-access/user/{quote(article, safe='')}/daily/{start}/{end}"
            response = get_with_retries(session, url, attempts=attempts, backoff=backoff, timeout=timeout)
            if response.status_code in MISSING_STATUS:
                total, missing = 0, missing + 1
            elif response.status_code == 200:
                total = sum(int(item["views"]) for item in response.json().get("items", []))
            else:
                raise FactftError(f"pageviews of '{article}': HTTP {response.status_code} from {url}")
            fetched += 1
            with atomic_path(cached) as tmp:
                tmp.write_text(json.dumps({"article": article, "views": total}))
            views[article] = total
    log.info(
        "pageviews %s %s-%s: %d articles, %d fetched (%d without an article), %d from the cache",
        project,
        start,
        end,
        len(articles),
        fetched,
        missing,
        len(articles) - fetched,
    )
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
