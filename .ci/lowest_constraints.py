"""Print pip constraints that pin each dependency of pyproject.toml (and the named extras) to its lowest allowed version.

CI installs with them to prove that the floors pyproject.toml declares are the versions that work:
    python .ci/lowest_constraints.py test > lowest.txt && pip install -c lowest.txt -e ".[test]"
"""

import re
import sys
import tomllib
from pathlib import Path

SELF_EXTRA = re.compile(r"^[A-Za-z0-9_.-]+\[([^\]]+)\]\s*$")
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def lowest_pins(requirements: list[str]) -> list[str]:
    pins = []
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} has no '>=' floor: every dependency must declare its lowest version")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements, extras = list(project["dependencies"]), list(extras)
    while extras:
        for requirement in project["optional-dependencies"][extras.pop()]:
            nested = SELF_EXTRA.match(requirement) if requirement.startswith(project["name"]) else None
            if nested:  # "deepseek-vl2[serve]": that extra's requirements too
                extras += nested[1].split(",")
            elif requirement not in requirements:
                requirements.append(requirement)
    print("\n".join(lowest_pins(requirements)))


if __name__ == "__main__":
    main(sys.argv[1:])
