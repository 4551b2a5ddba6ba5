"""Hiding third-party chatter that is no news to our users (errors still raise)."""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...], warning_categories: tuple[type[Warning], ...] = (Warning,)):
    """Within the block, `loggers` show errors only and warnings of `warning_categories` are hidden."""
    found = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in found]
    with warnings.catch_warnings():
        for category in warning_categories:
            warnings.simplefilter("ignore", category)
        for logger in found:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(found, levels):
                logger.setLevel(level)
