"""Route a rule's output to its log file and show user errors as one clear line."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from factft.errors import FactftError

log = logging.getLogger("factft")
# Seconds between a long job's progress lines: one line each, readable in a batch job's log (no \r bars).
PROGRESS_EVERY_S = 30
# bitsandbytes warns at import, in every job that imports peft, when the optional `kernels`
# package is absent: its CPU 4-bit kernels then fall back to plain torch, which only QLoRA
# on a CPU (the tests) uses. A false alarm in every LoRA log; its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@contextlib.contextmanager
def to_log(path: str | Path):
    """Send logging, stdout and stderr to `path` for the body of the block.

    factft's warnings go to stderr too, where Snakemake shows them: a run that succeeds gives
    no reason to open its log. A FactftError ends the job with its message alone (in the log
    and on stderr); any other exception keeps its traceback in the log.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        real_stderr = sys.stderr
        shown = logging.StreamHandler(real_stderr)
        shown.addFilter(lambda record: record.levelno == logging.WARNING)  # errors: see below
        shown.setFormatter(logging.Formatter(f"factft warning (log {path}): %(message)s"))
        log.addHandler(shown)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        except FactftError as error:
            log.error("%s", error)
            print(f"factft: {error}", file=real_stderr)
            raise SystemExit(1) from None
        except BaseException:
            log.exception("failed")
            raise
        finally:
            root.removeHandler(handler)
            log.removeHandler(shown)
