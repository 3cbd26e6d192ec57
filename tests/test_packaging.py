"""The tested versions are what a fresh machine installs: README and CI install with constraints.txt, which
pins every dependency (and everything they pull in) to one version."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_exactly():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    missing = [r for r in wanted if _name(r) not in pins]
    assert not missing, f"constraints.txt lacks {missing}"
    assert pins["torch"] and pins["torchvision"] and pins["ray"] and pins["mlflow"]


def test_readme_and_ci_install_with_the_constraints():
    install = "pip install -c constraints.txt -e '.[dev]'"
    assert install in (ROOT / "README.md").read_text()
    assert "-c constraints.txt -e '.[dev]'" in (ROOT / ".ci" / "run").read_text()
