"""homepot-gateway: the edge daemon of a HOMEPOT site."""

# The one place the version is written: pyproject.toml reads it from here (setuptools'
# dynamic version). Not asked of importlib.metadata at run time: importing that (email,
# zipfile, ...) and scanning the installed distributions cost every process ~35 ms of CPU.
__version__ = "0.1.0"

from gateway import lean_imports  # noqa: E402 - after the version, which setuptools reads alone

lean_imports.install()
