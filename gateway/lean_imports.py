"""What every gateway process does before its first import of a library, to start lean.

A daemon, a CLI command and a device agent each pay their imports in CPU before doing
anything; the test suite starts hundreds of them, and a technician pays it on every command.
Two costs are not wanted by anything the gateway does:

**rich, pulled in by structlog.** structlog imports rich whenever it is installed (typer
brings it): ``structlog.dev`` for coloured console tracebacks, ``structlog.tracebacks`` for
``rich.pretty``: ~110 ms of CPU per process. The gateway renders JSON under systemd
(tracebacks by ``format_exc_info``) and its ``console`` format prints tracebacks as Python
does (``structlog.dev.plain_traceback``, named in :mod:`gateway.logs`). structlog falls back
by itself when ``import rich`` fails; :class:`_Finder` makes it fail for the duration of
structlog's own import, and only then. Where rich is already imported (a command that drew
a progress bar first, a test process) nothing is hidden: structlog finds it loaded, at no
cost. Commands that use rich themselves (``devices import``'s progress bar, typer's error
boxes) import it as usual.

**pydantic's plugin scan.** The first model pydantic builds asks ``importlib.metadata`` for
every installed distribution's ``pydantic`` entry points: ~40 ms. The gateway uses no
pydantic plugin, so ``PYDANTIC_DISABLE_PLUGINS`` (pydantic's documented switch) is set to
``__all__`` unless the environment sets it already (set it empty to load plugins).

:func:`install` is called by ``gateway/__init__.py``, before anything can import either.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


class _Loader:
    """Runs structlog's real loader with ``sys.modules["rich"] = None`` (an import of rich
    or of one of its submodules then raises ImportError), and takes the mark away after."""

    def __init__(self, real: Any):
        self.real = real

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self.real, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hidden = "rich" not in sys.modules
        if hidden:
            sys.modules["rich"] = None  # type: ignore[assignment]  # the import system's "not importable" mark
        try:
            self.real.exec_module(module)
        finally:
            if hidden and sys.modules.get("rich", ...) is None:
                del sys.modules["rich"]


class _Finder:
    """A one-shot meta path finder: on the first import of ``structlog`` it removes itself,
    asks the other finders for structlog's spec and wraps its loader in :class:`_Loader`."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if name != "structlog":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
        return spec


def install() -> None:
    """Hide rich from structlog's import, unless structlog is loaded already (then it has
    its rich, or not, and nothing is gained); skip pydantic's plugin scan."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if "structlog" not in sys.modules and _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)  # type: ignore[arg-type]


def uninstall() -> None:
    if _Finder in sys.meta_path:
        sys.meta_path.remove(_Finder)  # type: ignore[arg-type]
