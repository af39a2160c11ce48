"""A fuzz campaign: every harness (or the ones named) under atheris, one after the other, each
for a number of inputs and/or a time, then a table of inputs run and results.

    python -m tests.fuzz.campaign [--runs N] [--seconds S] [--work DIR] [NAME ...]

``--runs`` caps the inputs per harness (libFuzzer ``-runs``; 0: no cap), ``--seconds`` the
time per harness (``-max_total_time``; 0: no cap). ``--work`` keeps the grown corpus
(``DIR/corpus/NAME``, reused by the next campaign) and any crashing input
(``DIR/artifacts/NAME/crash-*``; inputs slower than 10 s are kept as ``slow-unit-*`` and
counted apart, not as failures); the seed corpus ``tests/fuzz/corpus/NAME`` is read, never
written. Exit status 1 when any harness found a crash or invariant break (its input is named;
replay it with ``python -m tests.fuzz.run NAME --replay FILE``, then make it a regression
seed). ``make fuzz`` runs this with FUZZ_SECONDS per harness; the CI campaign
(tests/fuzz/test_fuzz_campaign.py) with a few thousand inputs each.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "tests" / "fuzz" / "corpus"
# inputs longer than libFuzzer's default of 4096 octets where the parser reads whole files
MAX_LEN = {"config": 16384, "smtp_session": 8192, "pop3_session": 8192, "imap_session": 8192}


def harness_names() -> list[str]:
    """Every harness that has a seed corpus folder (one per entry of HARNESSES)."""
    return sorted(p.name for p in SEEDS.iterdir() if p.is_dir())


def run_one(name: str, runs: int, seconds: int, work: Path, seed: int = 0,
            timeout: float | None = None) -> dict:
    """Fuzz one harness; return {"name", "inputs", "seconds", "crash" (path or None),
    "returncode", "log" (the tail of the output)}."""
    corpus = work / "corpus" / name
    artifacts = work / "artifacts" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.fuzz.run", name, f"-artifact_prefix={artifacts}/",
           f"-max_len={MAX_LEN.get(name, 4096)}", "-print_final_stats=1"]
    if runs:
        cmd.append(f"-runs={runs}")
    if seconds:
        cmd.append(f"-max_total_time={seconds}")
    if seed:
        cmd.append(f"-seed={seed}")
    cmd += [str(corpus), str(SEEDS / name)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    before = set(artifacts.iterdir())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    done = re.findall(r"^Done (\d+) runs", out, re.M)
    execs = re.findall(r"stat::number_of_executed_units: (\d+)", out)
    inputs = int(done[-1]) if done else int(execs[-1]) if execs else 0
    new = sorted(set(artifacts.iterdir()) - before)
    # libFuzzer also saves inputs slower than -report_slow_units (10 s) as slow-unit-*: on a
    # loaded machine under nice those are no defect (counted apart, kept for a look)
    slow = [p for p in new if p.name.startswith("slow-unit-")]
    new = [p for p in new if p not in slow]
    return {"name": name, "inputs": inputs, "seconds": round(elapsed, 1),
            "crash": str(new[0]) if new else None, "slow": len(slow),
            "returncode": proc.returncode, "log": "\n".join(out.splitlines()[-60:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--work", type=Path, default=ROOT / ".fuzz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    names = args.names or harness_names()
    failed = False
    print(f"{'harness':<14} {'inputs':>10} {'seconds':>8}  result", flush=True)
    for name in names:
        r = run_one(name, args.runs, args.seconds, args.work, args.seed)
        ok = r["returncode"] == 0 and r["crash"] is None
        failed |= not ok
        result = "ok" if ok else f"FAILED ({r['crash'] or 'exit ' + str(r['returncode'])})"
        if r["slow"]:
            result += f" ({r['slow']} slow input(s) saved, no defect)"
        print(f"{name:<14} {r['inputs']:>10} {r['seconds']:>8}  {result}", flush=True)
        if not ok:
            print(r["log"], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
