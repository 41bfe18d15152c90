"""Logging that carries the job id: plain lines for people, `--log-json` lines for machines."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

job_id_var: ContextVar[str | None] = ContextVar("forseti_job_id", default=None)
"""The job the current task or thread works for (asyncio.to_thread copies it)."""


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class TextFormatter(logging.Formatter):
    """`time level [job] logger: message`."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as one readable line."""
        job = getattr(record, "job_id", None)
        record.job_tag = f" [{job}]" if job else ""
        return super().format(record)


class _Stderr:
    """Whatever `sys.stderr` is when a record is written: while a progress bar is live, rich puts a
    proxy there that prints above the bar, so a log line does not land inside it."""

    def write(self, text: str) -> int:
        """Write to the current stderr."""
        return sys.stderr.write(text)

    def flush(self) -> None:
        """Flush the current stderr."""
        sys.stderr.flush()


def setup_logging(*, json_lines: bool = False, level: str = "INFO") -> None:
    """Send logs to stderr in the chosen format, each record tagged with its job id."""
    handler: logging.StreamHandler[_Stderr] = logging.StreamHandler(_Stderr())
    handler.addFilter(_JobIdFilter())
    handler.setFormatter(
        JsonFormatter() if json_lines else TextFormatter("%(asctime)s %(levelname)s%(job_tag)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
