"""The documentation cannot drift: the configuration reference is what the code generates,
every config key has a description, and every relative link points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from gateway import config_docs
from gateway.config import Config
from tests.support import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_configuration_reference_is_generated_from_the_models():
    current = config_docs.DOC_PATH.read_text(encoding="utf-8")
    assert current == config_docs.document(current), (
        "docs/configuration.md differs from the models: run .venv/bin/python -m gateway.config_docs --write")


def test_the_check_command_fails_on_a_stale_reference(tmp_path, monkeypatch):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_docs.DOC_PATH.read_text(encoding="utf-8").replace("`retention_days`", "`retention`"))
    monkeypatch.setattr(config_docs, "DOC_PATH", stale)
    assert config_docs.main(["--check"]) == 1
    assert config_docs.main(["--write"]) == 0
    assert config_docs.main(["--check"]) == 0
    assert "`retention_days`" in stale.read_text()


def test_the_module_runs_as_documented():
    res = subprocess.run([sys.executable, "-m", "gateway.config_docs", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for sub in re.findall(r"\w+", repr(field.annotation)):
            cls = getattr(sys.modules[model.__module__], sub, None)
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                _models(cls, seen)


def test_every_config_key_has_a_description():
    seen: set[type[BaseModel]] = set()
    _models(Config, seen)
    from gateway.alarms.rules import EscalateStep, RuleSection

    seen |= {RuleSection, EscalateStep}
    missing = [f"{m.__name__}.{name}" for m in seen for name, f in m.model_fields.items()
               if not f.exclude and name != "source" and not f.description]
    assert not missing, missing
    rendered = config_docs.render()
    for key in ("`retention_days`", "`max_in_flight`", "`allowed_hosts`", "`[[broker.listeners]]`",
                "`[broker.acl.<role>]`", "`[[rules]]`", "`stale_s`"):
        assert key in rendered, key


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out, fence = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#+ (.*)$", line)):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_relative_link_points_at_an_existing_file():
    broken = []
    for doc in [ROOT / "README.md", *DOCS]:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = doc.parent / path if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
    assert DOCS, "docs/*.md missing"


def test_the_operator_page_screenshot_is_linked():
    assert "docs/operator-page.png" in (ROOT / "README.md").read_text()
    assert "operator-page.png" in (ROOT / "docs" / "operator-page.md").read_text()
