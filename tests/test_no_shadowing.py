"""No folder of the repository shadows an installed distribution.

`python -m …` and `python -c …` put the current folder first on `sys.path`; README, quickstart,
.ci/run and every bench script start their processes from the repository root. A top-level
folder that is a regular package (has `__init__.py`) then wins over an installed package of the
same name: transformers 5.25 imports the PyPI package `kernels`, and our `kernels/` broke every
`transformers.modeling_utils` import that way. The folders are PEP 420 namespace portions
instead, mapped into `mobillm.*` by pyproject's package-dir: a portion never beats a regular package.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def top_level_names() -> set[str]:
    """Every top-level import name the installed distributions provide."""
    names: set[str] = set()
    for dist in md.distributions():
        if (dist.metadata["Name"] or "").lower() == "mobillm":
            continue
        names |= set((dist.read_text("top_level.txt") or "").split())
        for f in (dist.files or [])[:5000]:
            first = str(f).split("/")[0]
            if not first.endswith((".dist-info", ".egg-info", ".data")):
                names.add(first.removesuffix(".py"))
    return names


def test_no_top_level_folder_is_a_regular_package():
    regular = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert regular == [], (f"{regular}: a top-level folder with __init__.py shadows any installed package "
                           "of that name from the repository root; keep them namespace portions")


def test_repository_folders_do_not_hide_installed_packages():
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    clashes = sorted(folders & top_level_names())
    # A shared name is harmless while the folder stays a namespace portion: imported from the
    # repository root, each name must resolve to the installed package, never to our folder.
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    print(name, getattr(importlib.import_module(name), '__file__', None))\n")
    proc = subprocess.run([sys.executable, "-c", script, *clashes], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        name, file = line.split(" ", 1)
        assert file != "None" and not file.startswith(str(REPO)), f"{name} resolved to the repository: {file}"


def test_transformers_and_peft_import_from_the_repository_root():
    # Exactly how README, quickstart and bench children start Python: current folder = repo root.
    proc = subprocess.run([sys.executable, "-c", "import transformers.modeling_utils, peft, kernels; "
                           "print(kernels.__file__)"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stdout.strip().startswith(str(REPO)), proc.stdout
