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


def article_title(subject: str) -> str:
    """The Wikipedia title for a subject name: underscores for spaces, first letter upper case."""
    title = subject.strip().replace(" ", "_")
    return title[:1].upper() + title[1:]


def pageview_table(
    subjects,
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
    """Columns subject, article, views (int64): each distinct subject's summed daily views.

    Missing articles count 0 views. Subjects already in the cache cost no request.
    """
    _check_range(start, end)
    folder = Path(cache_dir) / project / f"{start}-{end}"
    subjects = sorted(set(subjects))
    views, missing, fetched = {}, 0, 0
    interval = 1.0 / requests_per_second
    last_request = float("-inf")
    with requests.Session() as session:
        for subject in subjects:
            article = article_title(subject)
            cached = _cache_file(folder, article)
            if cached.is_file():
                views[subject] = json.loads(cached.read_text())["views"]
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
            views[subject] = total
    log.info(
        "pageviews %s %s-%s: %d subjects, %d fetched (%d without an article), %d from the cache",
        project,
        start,
        end,
        len(subjects),
        fetched,
        missing,
        len(subjects) - fetched,
    )
    table = pd.DataFrame({"subject": subjects, "article": [article_title(s) for s in subjects]})
    table["views"] = pd.Series([views[s] for s in subjects], dtype="int64")
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
