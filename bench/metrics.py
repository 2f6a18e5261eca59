"""What `patchrelay metrics` and the status page cost on a large database, next to `status`.

    python bench/metrics.py [--issues 10000] [--runs 100000] [--events 1000000] [--repeat 5]

Builds a SQLite database with PatchRelay's schema (Store migrations) holding ISSUES issues in every factory
state, RUNS runs of every type and outcome (a few active), EVENTS events, an outbox with queued and failed
rows and an hour of ticks, then times, in this process, the median of REPEAT calls of:

  metrics        current_metrics(): the store snapshot and its Prometheus text (what `patchrelay metrics`
                 prints and every tick writes to metrics.textfile)
  status --json  the data of `patchrelay status --json` (_status_data)
  status --html  status_page(): the HTML status page (what metrics.html gets every tick)

and the same commands as processes (`patchrelay metrics`, `status --json`), wall time including Python's start.
Prints figures; asserts nothing.
"""
import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import patchrelay as pr  # noqa: E402

STATES = list(pr.TRANSITIONS)
OUTCOMES = ["completed"] * 8 + ["failed", "stopped", "interrupted"]


def iso_ago(seconds):
    return pr.iso(pr.utcnow() - pr.dt.timedelta(seconds=seconds))


def build(path, n_issues, n_runs, n_events):
    pr.Store(path).close()                      # the schema, by the migrations
    db = sqlite3.connect(path)
    rnd = random.Random(7)
    issues = []
    for i in range(1, n_issues + 1):
        state = "done" if rnd.random() < 0.8 else rnd.choice(STATES)
        pending = rnd.choice(pr.RUN_TYPES) if state not in pr.FINAL_STATES and rnd.random() < 0.05 else None
        issues.append((i, "app", f"lin-{i}", f"APP-{i}", f"Issue {i}", state, pending, iso_ago(rnd.random() * 86400 * 30),
                       iso_ago(rnd.random() * 86400 * 30), f"https://linear.app/acme/issue/APP-{i}"))
    db.executemany("INSERT INTO issues (id, project_id, linear_id, key, title, factory_state, pending_run_type, "
                   "created_at, updated_at, url) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", issues)
    runs = []
    for r in range(1, n_runs + 1):
        status = "running" if r > n_runs - 5 else rnd.choice(OUTCOMES)
        ago = rnd.random() * 86400 * 60
        runs.append((r, rnd.randint(1, n_issues), rnd.choice(pr.RUN_TYPES), status, iso_ago(ago), iso_ago(ago - 1),
                     None if status == "running" else iso_ago(max(0, ago - 600)), rnd.randint(0, 50000)))
    db.executemany("INSERT INTO runs (id, issue_id, run_type, status, claimed_at, started_at, ended_at, tokens_spent) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", runs)
    for run_id, issue_id, *_ in runs[-5:]:
        db.execute("UPDATE issues SET active_run_id = ?, factory_state = 'implementing' WHERE id = ?", (run_id, issue_id))
    batch = []
    for e in range(1, n_events + 1):
        batch.append((rnd.randint(1, n_issues), iso_ago(rnd.random() * 86400 * 30), "info", "run", f"event {e}"))
        if len(batch) == 50000:
            db.executemany("INSERT INTO events (issue_id, at, level, kind, message) VALUES (?, ?, ?, ?, ?)", batch)
            batch = []
    if batch:
        db.executemany("INSERT INTO events (issue_id, at, level, kind, message) VALUES (?, ?, ?, ?, ?)", batch)
    for o in range(200):
        db.execute("INSERT INTO outbox (issue_id, kind, session_id, client_id, payload, status, created_at) "
                   "VALUES (?, 'activity', 's', ?, '{}', ?, ?)", (rnd.randint(1, n_issues), f"c{o}",
                                                                   "failed" if o < 3 else "queued", iso_ago(600 - o)))
    for t in range(720):
        start = iso_ago(3600 - t * 5)
        db.execute("INSERT INTO ticks (started_at, ended_at, result, summary) VALUES (?, ?, 'ok', ?)",
                   (start, start, json.dumps({"api_cost": {"linear_requests": 1, "github_requests": 1}})))
    db.commit()
    db.close()


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--issues", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=100000)
    ap.add_argument("--events", type=int, default=1000000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="patchrelay-bench-") as tmp:
        db = Path(tmp) / "patchrelay.sqlite"
        t0 = time.time()
        build(db, a.issues, a.runs, a.events)
        cfg_path = Path(tmp) / "patchrelay.yaml"
        cfg_path.write_text(json.dumps({"database": {"path": str(db)}, "codex": {"max_tokens_per_day": 10 ** 9},
                                        "projects": [{"id": "app", "repo_path": tmp, "github_repo": "acme/app"}]}))
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}; "
              f"database: {a.issues:,} issues, {a.runs:,} runs, {a.events:,} events, "
              f"{db.stat().st_size / 2 ** 20:,.0f} MiB (built in {time.time() - t0:.0f} s)\n")
        cfg = pr.load_config(str(cfg_path))
        store = pr.Store(db, readonly=True)
        rows = []
        t_m, text = timed(lambda: pr.current_metrics(cfg, store), a.repeat)
        rows.append(("metrics", t_m, f"{len(text.splitlines())} lines, {len(text):,} bytes"))
        t_s, data = timed(lambda: pr._status_data(cfg, store, False), a.repeat)
        rows.append(("status --json", t_s, f"{len(data['issues']):,} issues listed"))
        t_h, page = timed(lambda: pr.status_page(cfg, store), a.repeat)
        rows.append(("status --html", t_h, f"{len(page):,} bytes"))
        print(f"{'in process (median of ' + str(a.repeat) + ')':34} {'ms':>8}   output")
        for name, t, what in rows:
            print(f"  {name:32} {t * 1000:8.1f}   {what}")
        print(f"\n{'as a process (median of 3)':34} {'ms':>8}")
        for args in (["metrics"], ["status", "--json"]):
            t, _ = timed(lambda: subprocess.run([sys.executable, str(ROOT / "patchrelay.py"), "--config", str(cfg_path),
                                                 *args], capture_output=True, check=True), 3)
            print(f"  patchrelay {' '.join(args):21} {t * 1000:8.1f}")
        print("\nmetrics:")
        print("".join(f"  {ln}\n" for ln in text.splitlines() if not ln.startswith("#") and (
            "runs_finished" not in ln or "implementation" in ln)))


if __name__ == "__main__":
    main()
