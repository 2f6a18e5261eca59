"""What a run and a tick cost in PatchRelay's own time, measured with real parts.

    python bench/run_overhead.py [--runs 5] [--issues 100]

1. Run overhead: for each of --runs delegated issues, `patchrelay run ISSUE` in the foreground
   against the real Codex CLI and a fake model that answers at once. From the run rows:
   claim -> worker start -> turn/start (worktree + hook + app-server spawn + handshake +
   thread/start), and claim -> run end. The model's own time is ~0.
2. Tick cost: with --issues tracked issues, the wall time of an idle `patchrelay tick`
   (nothing changed in Linear) and the number of Linear requests it makes.

Prints figures; asserts nothing. Needs what the tests need (run .ci/run once).
"""
import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import World  # noqa: E402
from fakes.linear import FakeLinear  # noqa: E402


def ms(a, b):
    from datetime import datetime
    f = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (f(b) - f(a)).total_seconds() * 1000


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_runs(n):
    with tempfile.TemporaryDirectory() as tmp, FakeLinear() as linear:
        w = World(Path(tmp), linear)
        w.config["runner"]["paused"] = True
        w.use_codex([s for _ in range(n) for s in (
            {"kind": "tool_call", "cmd": "date > stamp.txt"}, {"kind": "message", "text": "done"})])
        keys = []
        for i in range(n):
            issue, _ = w.delegate(title=f"Bench issue {i}")
            keys.append(issue["identifier"])
        w.tick()
        wall = []
        for key in keys:
            t0 = time.perf_counter()
            w.cli("run", key, check=0)
            wall.append((time.perf_counter() - t0) * 1000)
        db = sqlite3.connect(w.state / "patchrelay.sqlite")
        rows = db.execute("SELECT claimed_at, started_at, turn_started_at, ended_at FROM runs ORDER BY id").fetchall()
        to_worker = [ms(r[0], r[1]) for r in rows]
        to_turn = [ms(r[0], r[2]) for r in rows]
        total = [ms(r[0], r[3]) for r in rows]
        print(f"runs: {len(rows)} (real codex 0.169.0, fake model answering at once)")
        for name, vals in (("claim -> worker start", to_worker), ("claim -> turn/start", to_turn),
                           ("claim -> run end (commit+push+report)", total), ("`patchrelay run` wall", wall)):
            print(f"  {name:40} median {statistics.median(vals):7.0f} ms   p90 {pct(vals, 0.9):7.0f} ms")
        w.model.stop()
        subprocess.run(["pkill", "-f", tmp], capture_output=True)


def bench_tick(n):
    with tempfile.TemporaryDirectory() as tmp, FakeLinear() as linear:
        w = World(Path(tmp), linear)
        w.config["runner"]["paused"] = True
        w.write_config()
        for i in range(n):
            w.delegate(title=f"Tracked issue {i}")
        t0 = time.perf_counter()
        w.tick()
        first = (time.perf_counter() - t0) * 1000
        before = len(linear.requests)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            w.tick()
            times.append((time.perf_counter() - t0) * 1000)
        per_tick = (len(linear.requests) - before) / 5
        status_t0 = time.perf_counter()
        w.cli("status", "--json", check=0)
        status_ms = (time.perf_counter() - status_t0) * 1000
        print(f"ticks with {n} tracked issues (process start included, ~150 ms of it Python imports)")
        print(f"  first tick (intake of {n} sessions + acks): {first:7.0f} ms")
        print(f"  idle tick                             median {statistics.median(times):7.0f} ms, "
              f"{per_tick:.1f} Linear requests")
        print(f"  status --json                         {status_ms:7.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--issues", type=int, default=100)
    a = ap.parse_args()
    bench_runs(a.runs)
    bench_tick(a.issues)
