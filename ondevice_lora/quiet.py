"""Hiding third-party chatter that is no news to our users (errors still raise)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...], warning_categories: tuple[type[Warning], ...] = (Warning,)):
    """Within the block, `loggers` show errors only and warnings of `warning_categories` are hidden
    (unless `verbose()`)."""
    if verbose():
        yield
        return
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


def verbose() -> bool:
    """`odlora -v` (or ODLORA_VERBOSE=1): show the third-party output hidden by default."""
    return os.environ.get("ODLORA_VERBOSE") == "1"


@contextlib.contextmanager
def native_stderr_hidden():
    """Within the block, what C/C++ code writes to file descriptor 2 (ExecuTorch's info logs on
    loading a program) goes to a temporary file instead; it is written back if the block raises,
    so an error's context is never lost. A no-op with `verbose()`."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                caught.seek(0)
                os.write(2, caught.read())


@contextlib.contextmanager
def package_skipped(module: str):
    """Within the block, `top.package.name` imports from its file without running `top.package`'s
    __init__ (see `runtime/executorch.py` for why), unless that package is loaded already. After it,
    `top.package` is still unimported: a later import of it runs normally and finds the module."""
    top, package_name, name = module.split(".")
    package = f"{top}.{package_name}"
    parent = importlib.import_module(top)
    path = Path(parent.__path__[0], package_name, name + ".py")
    if module in sys.modules or package in sys.modules or not path.is_file():
        yield
        return
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    # `import top.package.name as x` walks attributes from `top`: a stand-in for the package during
    # the block only, since the real package's own modules must find the real one.
    stand_in = types.ModuleType(package)
    setattr(stand_in, name, loaded)
    setattr(parent, package_name, stand_in)
    try:
        yield
    finally:
        if getattr(parent, package_name, None) is stand_in:
            delattr(parent, package_name)
