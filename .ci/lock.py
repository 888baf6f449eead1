"""Write the lock of tested versions: `pip freeze` of this environment, kept to what
`pip install -e '.[EXTRAS]'` pulls (mobillm's requirements and theirs, markers evaluated here).

    python3 .ci/lock.py [--extras dev] [--out constraints.txt]

Run by .ci/refresh-lock in the environment the suite passed in. Versions come from the installed
distributions; local labels are dropped (torch 2.13.0+cpu is pinned as torch==2.13.0, which the
CPU wheel satisfies). Standard library + `packaging` (installed with pip's own tools and the dev set).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def project_requirements(extras: list[str]) -> list[tuple[Requirement, set[str]]]:
    """mobillm's own requirements, from pyproject.toml (the checkout, not an installed copy)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(r.name) == "mobillm":
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    return [(r, set()) for r in reqs]


def closure(extras: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the project's requirements reach, by canonical name."""
    env = default_environment()
    found: dict[str, md.Distribution] = {}
    visited: set[tuple[str, frozenset]] = set()
    todo = project_requirements(extras)
    while todo:
        req, wanted_extras = todo.pop()
        marker_ok = req.marker is None or any(
            req.marker.evaluate({**env, "extra": e}) for e in (wanted_extras or {""}))
        if not marker_ok:
            continue
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            sys.exit(f"lock: {req} is required but not installed here; install the project first "
                     f"(pip install -e '.[{','.join(extras)}]')")
        if (name, frozenset(req.extras)) in visited:
            continue
        visited.add((name, frozenset(req.extras)))
        found[name] = dist
        for sub in dist.requires or []:
            todo.append((Requirement(sub), set(req.extras)))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", default="dev", help="the extras whose closure is locked (comma-separated)")
    ap.add_argument("--out", type=Path, default=ROOT / "constraints.txt", help="the constraints file to write")
    args = ap.parse_args(argv)
    dists = closure(args.extras.split(","))
    dists.pop("mobillm", None)
    lines = [f"{canonicalize_name(d.metadata['Name'])}=={Version(d.version).public}" for d in dists.values()]
    header = [
        "# The tested versions: pip constraints for `pip install -c constraints.txt ...` (.ci/run, quickstart.sh).",
        f"# Written by .ci/refresh-lock (python3 .ci/lock.py --extras {args.extras}) on Python "
        f"{platform.python_version()}, {platform.machine()}; {len(lines)} distributions.",
        "# Do not edit by hand: install the versions you want, run the suite, then `bash .ci/refresh-lock`.",
    ]
    args.out.write_text("\n".join(header + sorted(lines)) + "\n")
    print(f"lock: {len(lines)} pins -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
