"""The device side imports without torch, transformers or the trainer.

A fresh interpreter installs an import blocker for those names, then imports every module of
`mobillm.edge_runtime` (found by walking the package, so new modules are covered as they are
added) plus the shared modules the device reads. A module that needs a blocked name fails
with a message saying which; one that fails for any other reason is reported as such.
"""

import json
import subprocess
import sys

SHARED = ["mobillm.common.wire", "mobillm.common.messages", "mobillm.common.tasks", "mobillm.kernels.codec", "mobillm.common.manifest"]
BLOCKED = ["torch", "transformers", "mobillm.trainer"]

# Runs in the child interpreter; prints one JSON report on its last stdout line.
CHILD = r'''
import importlib, importlib.abc, json, pkgutil, sys, traceback

BLOCKED = {blocked!r}
SHARED = {shared!r}
attempts = []


class Blocker(importlib.abc.MetaPathFinder):
    """Makes the blocked names unimportable, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ModuleNotFoundError(f"blocked on the device: {{name}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
failures = {{}}


def record(name, exc):
    blocked = isinstance(exc, ImportError) and any(
        (exc.name or "") == b or (exc.name or "").startswith(b + ".") for b in BLOCKED)
    failures[name] = {{"blocked": blocked, "error": "".join(traceback.format_exception(exc))}}


def try_import(name):
    try:
        importlib.import_module(name)
        return True
    except BaseException as exc:  # SystemExit or anything else a module may raise at import
        record(name, exc)
        return False


names = []
if try_import("mobillm.edge_runtime"):
    pkg = sys.modules["mobillm.edge_runtime"]
    names.append(pkg.__name__)

    def walk_error(name):
        record(name, sys.exc_info()[1])

    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=walk_error):
        # Importing a __main__ module would run the program.
        if not info.name.endswith(".__main__"):
            names.append(info.name)
names += SHARED
for name in names:
    if name not in failures:
        try_import(name)
print(json.dumps({{"modules": names, "failures": failures, "attempts": attempts,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")
                                   or m.startswith("mobillm.trainer"))}}))
'''


def test_device_modules_import_without_torch(tmp_path):
    code = CHILD.format(blocked=BLOCKED, shared=SHARED)
    # cwd outside the repo: only the installed mobillm package is importable, as on a device.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"the import check itself crashed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "mobillm.edge_runtime" in report["modules"] and "mobillm.edge_runtime.cli" in report["modules"], (
        f"walking mobillm.edge_runtime found too little: {report['modules']}")
    problems = []
    for name, failure in sorted(report["failures"].items()):
        if failure["blocked"]:
            problems.append(f"{name} imports torch, transformers or mobillm.trainer, which the device must never "
                            f"import (README.md, 'What each process needs installed'):\n{failure['error']}")
        else:
            problems.append(f"{name} failed to import for a reason unrelated to torch (a bug in that module or a "
                            f"missing device dependency):\n{failure['error']}")
    assert not problems, "\n\n".join(problems)
    assert report["loaded"] == [], f"blocked modules ended up in sys.modules: {report['loaded']}"
