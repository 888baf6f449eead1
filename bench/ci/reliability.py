"""Reliability at full counts: runs tests/reliability with MOBILLM_RELIABILITY_SCALE=full and
prints what each check measured (docs/reliability.md holds a run of it).

  drops survived        link cuts (mid-frame, both directions, handshakes) the device rode through
  lost / duplicated     samples trained 0 or 2+ times in an epoch, from runs/<run>/trained_ids.jsonl (must be 0)
  restart               `trainer serve --resume` start to listening; recovered: kill -9 to the device resumed
  devices held          concurrent devices that all finished; server RSS peak against its stated bound
  fuzz cases            frames through the server's parsers and checks, and fuzzed live sessions
  hostile               floods, oversized HELLOs, maximal batches, run names under --memory-budget (RSS peak)

    python -m mobillm.bench.ci.reliability                    # full counts (a few minutes on 2 cores)
    python -m mobillm.bench.ci.reliability --scale small      # the CI counts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobillm.bench.paths import ROOT


def run_tests(scale: str, report: Path, extra: list[str]) -> tuple[int, float]:
    env = dict(os.environ, MOBILLM_RELIABILITY_SCALE=scale, MOBILLM_RELIABILITY_REPORT=str(report))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:warnings",
                          "-p", "no:cacheprovider", *extra], cwd=ROOT, env=env)
    return rc, time.perf_counter() - t0


def table(rows: dict[str, dict]) -> list[tuple[str, str]]:
    """(check, measured) lines from the tests' JSON reports."""
    out = []
    get = lambda name: next((v for k, v in rows.items() if k.startswith(name)), None)  # noqa: E731
    if r := get("test_many_random_drops"):
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(r["drops_by_kind"].items()))
        out.append(("link faults: drops survived", f"{r['drops_survived']} ({kinds}); {r['reconnects']} reconnects; "
                                                   f"{r['samples']} samples in {r['wall_s']} s"))
        out.append(("link faults: samples lost / duplicated", f"{r['samples_lost']} / {r['samples_duplicated']}"))
    if r := get("test_kill9"):
        out.append(("kill -9: restarts in one run", f"{r['kills']}; weights bit-identical to an uninterrupted run: "
                                                    f"{r['weights_identical']}"))
        out.append(("kill -9: restart time (max)", f"{r['restart_s']} s to listening; {r['recovered_s']} s kill -> "
                                                   f"device resumed"))
        out.append(("kill -9: samples lost / duplicated", f"{r['samples_lost']} / {r['samples_duplicated']}"))
    if r := get("test_sigterm"):
        out.append(("SIGTERM: stop / restart", f"exit 0 in {r['stop_s']} s at step {r['steps_at_sigterm']}; restart "
                                               f"{r['restart_s']} s; device saw {', '.join(r['reconnect_reasons'])}"))
        out.append(("SIGTERM: samples lost / duplicated", f"{r['samples_lost']} / {r['samples_duplicated']}"))
    if r := get("test_32_devices"):
        out.append(("load: devices held", f"{r['devices_finished']} of {r['devices']} finished, {r['peak_concurrent']} "
                                          f"streaming at once; frames {r['frame_kib']} KiB"))
        out.append(("load: server RSS", f"idle {r['idle_rss_mib']} MiB, peak {r['peak_rss_mib']} MiB, bound "
                                        f"{r['rss_bound_mib']} MiB"))
        out.append(("load: throughput", f"{r['samples_per_s']} samples/s, {r['mb_per_s']} MB/s over {r['wall_s']} s"))
        out.append(("load: samples lost / duplicated", f"{r['samples_lost']} / {r['samples_duplicated']}"))
    cases = sum(v.get("fuzz_cases", 0) for k, v in rows.items() if k.startswith(("test_mutated", "test_random",
                                                                                 "test_hello")))
    if cases:
        out.append(("fuzz: frames through the parsers", f"{cases} (mutated frames, random bytes, HELLO fields); "
                                                        "only WireError / ProtocolError"))
    if r := get("test_fuzzed_sessions"):
        codes = ", ".join(f"{v} {k}" for k, v in r["live_fuzz_codes"].items())
        out.append(("fuzz: live sessions beside a good one", f"{r['live_fuzz_sessions']} ({codes}); good device exact"))
    if get("test_token_is_compared") and get("test_a_device_cannot"):
        out.append(("auth / isolation", "token via hmac.compare_digest; other task/manifest/device/taps -> "
                                        "run_mismatch"))
    if r := get("test_hostile"):
        fmt = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items()))  # noqa: E731
        out.append(("hostile: server RSS", f"budget {r['hostile_budget_mib']} MiB: idle {r['hostile_idle_rss_mib']}, "
                                           f"peak {r['hostile_peak_rss_mib']}, after all left "
                                           f"{r['hostile_end_rss_mib']} MiB"))
        out.append(("hostile: attacks", f"pre-auth {fmt(r['preauth'])}; oversized HELLOs {fmt(r['oversized_hellos'])}; "
                                        f"maximal batches {fmt(r['maximal_batches'])}; run names "
                                        f"{fmt(r['run_names'])}; {r['attack_s']} s"))
        out.append(("hostile: threads / fds idle -> after", f"{r['threads'][0]} -> {r['threads'][1]} / {r['fds'][0]} "
                                                            f"-> {r['fds'][1]}"))
        if "run_folders" in r:
            out.append(("hostile: run folders left", f"{r['run_folders']} (the runs that trained)"))
        out.append(("hostile: legit device lost / duplicated", f"{r['samples_lost']} / {r['samples_duplicated']}"))
    if get("test_wss"):
        out.append(("TLS", "wss:// verified with --ca; no CA, wrong token, plain ws:// refused"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["small", "full"], default="full", help="test counts (default full)")
    parser.add_argument("--json", type=Path, help="also write the raw per-test reports here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        rc, wall = run_tests(args.scale, report, args.pytest_args)
        lines = report.read_text().splitlines() if report.is_file() else []
    rows = {}
    for line in lines:
        record = json.loads(line)
        rows[record.pop("test")] = record
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n| check ({args.scale} counts) | measured |\n|---|---|")
    for check, measured in table(rows):
        print(f"| {check} | {measured} |")
    print(f"| tests | {'all passed' if rc == 0 else f'FAILED (pytest exit {rc})'} in {wall:.0f} s |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
