"""Reaching the internet: factft's User-Agent, GETs with retries, and a failed hub call in a
few words (sources, pageviews and models fetch through these)."""

from __future__ import annotations

import time
from collections.abc import Callable

import requests

from factft.errors import FactftError


def user_agent(contact: str | None = None) -> str:
    """factft's User-Agent, with the operator's contact (email or URL) when the config gives
    one: Wikimedia's policy asks clients for it and may rate-limit those without."""
    who = f"{contact}; " if contact else ""
    return f"factft/0.1 ({who}research workflow reproducing Ghosal et al., ICML 2024) python-requests"


USER_AGENT = user_agent()
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def hub_connection_errors() -> tuple[type[Exception], ...]:
    """What the hub clients raise when the hub cannot be reached: datasets' ConnectionError,
    and the HTTP client's own errors, a proxy's refusal among them (neither of the two kinds
    derives from the other)."""
    from huggingface_hub.utils import httpx

    return ConnectionError, httpx.HTTPError


def hub_failure(error: Exception) -> str:
    """A failed hub call in a few words: the error's type, its first line where that is short
    and specific (not huggingface_hub's paragraph of advice), a hint for a refusing proxy."""
    lines = str(error).strip().splitlines()
    reason = type(error).__name__
    if lines and len(lines[0]) <= 160:
        reason += f": {lines[0]}"
    return reason + proxy_hint(error)


def proxy_hint(error: Exception) -> str:
    """Where a proxy refused (the hub client's or requests' ProxyError), what to check: clusters
    often reach the internet through one, which refuses without credentials."""
    return "; check HTTPS_PROXY and HTTP_PROXY" if "proxy" in type(error).__name__.lower() else ""


def get_with_retries(
    session: requests.Session,
    url: str,
    *,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float = 60,
    stream: bool = False,
    agent: str = USER_AGENT,
    pace: Callable[[], None] | None = None,
    on_throttled: Callable[[], None] | None = None,
) -> requests.Response:
    """GET `url`; retry connection errors, 429 and 5xx with exponential backoff.

    Returns the last response (any other status is the caller's to judge); raises FactftError
    when every attempt failed. Retry-After is honoured but capped, so the loop stays bounded.
    For a caller that sets the pace: `pace` is called before every attempt, retries included,
    and `on_throttled` on each 429 (too many requests).
    """
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(_retry_delay(problem, backoff, attempt))
        if pace is not None:
            pace()
        try:
            response = session.get(url, timeout=timeout, stream=stream, headers={"User-Agent": agent})
        except (requests.ConnectionError, requests.Timeout) as error:
            problem = f"{type(error).__name__}: {error}{proxy_hint(error)}"
            continue
        if response.status_code not in RETRY_STATUS:
            return response
        if response.status_code == 429 and on_throttled is not None:
            on_throttled()
        problem = response
        response.close()
    reason = f"HTTP {problem.status_code}" if isinstance(problem, requests.Response) else problem
    raise FactftError(f"cannot fetch {url}: gave up after {attempts} attempts ({reason})")


def _retry_delay(problem, backoff: float, attempt: int) -> float:
    delay = backoff * 2 ** (attempt - 1)
    if isinstance(problem, requests.Response):
        retry_after = problem.headers.get("Retry-After", "")
        if retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 60.0))
    return delay
