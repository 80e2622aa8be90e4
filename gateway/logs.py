"""structlog set-up: JSON lines under systemd, a readable console format for humans.

Third-party stdlib loggers (websockets, httpx) are routed through the same renderer so the
journal holds one format; their chatty INFO lines are kept at WARNING unless the
gateway itself runs at debug.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    if level not in _LEVELS:  # the config schema allows only these; fail before configuring anything
        raise ValueError(f"logging.level: unknown level {level!r}")
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        # Tracebacks as Python prints them: rich is kept out of structlog (gateway/plain_structlog.py).
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                 exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        # filter_by_level first: a call below the level stops there (about 1 µs) instead of
        # running the processors and being dropped by the stdlib afterwards (about 25 µs, on
        # hot paths such as every registration at debug). It asks the stdlib logger at each
        # call, so a level changed on SIGHUP applies at once.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


_CHATTY = ("websockets", "httpx", "httpcore", "hpack", "h2")


def set_level(level: str) -> None:
    """Apply ``[logging] level`` (at start and on SIGHUP): the root logger, and the chatty
    third-party loggers at WARNING unless the gateway itself runs at debug. Loggers are
    filtered by the stdlib at every call, so cached structlog loggers follow at once."""
    numeric = _LEVELS[level]
    logging.getLogger().setLevel(numeric)
    quiet = logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, quiet))
