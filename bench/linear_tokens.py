"""Linear app mode's self-refreshing OAuth tokens under concurrent processes, against the fake Linear.

    python bench/linear_tokens.py [--lifetime 4] [--seconds 60] [--processes 3] [--interval 0.5]

A fresh world (tests/conftest.py `World`, fake Linear, no GitHub, `runner.paused: true`, nothing delegated)
in app mode: the fake Linear has an OAuth app whose access tokens live --lifetime seconds (real time), and the
environment has no LINEAR_API_KEY, only PATCHRELAY_TOKEN_KEY, LINEAR_CLIENT_ID and LINEAR_CLIENT_SECRET.
`patchrelay linear connect --code CODE` (a subprocess) stores the first pair. Then, for --seconds,
--processes loops run at once:

  loop 0   `patchrelay tick` as a subprocess, then --interval s of sleep, again (as cron or `watch` runs it);
           every tick polls Linear at least once;
  loop k   one Python subprocess (k >= 1) calling Linear's viewer every --interval s, as a worker or a command
           does: odd k build a new client for every call (`patchrelay.linear_client(cfg, store).viewer()`,
           so the token is refreshed before use when it is due), even k keep one client for the whole loop
           (its token goes stale; Linear refuses it and the client asks for a fresh one and retries).

So several processes need a fresh token at the same moments; exactly one of them should refresh it (a
lease in the database) and the others should use the pair it stored. A refresh token rotates at use:
refreshing twice with the same one is refused (invalid_grant), and PatchRelay then needs a new connect.

Figures:
  lifetime / run / covered    token lifetime, seconds run, token lifetimes covered (run / lifetime)
  ticks / failed ticks        ticks run by loop 0, and how many exited non-zero
  loop k calls / failed       viewer calls of loop k, and how many raised
  refreshes                   refresh_token grants the fake issued (fake.refreshes())
  refused grants              grants the fake refused with invalid_grant
  GraphQL refused for token   GraphQL requests answered 400 with no viewer and no injected fault (a token
                              Linear did not accept: expired, or refreshed away); a held client's stale
                              token costs one each lifetime, and the call is retried with the fresh one
  stored refreshes            the `refreshes` column of the database's linear_oauth row

Prints figures; asserts nothing. Needs what the tests need (run .ci/run once). Progress goes to stderr.
"""
import argparse
import collections
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import patchrelay  # noqa: E402
from conftest import PATCHRELAY, World  # noqa: E402
from fakes.linear import FakeLinear  # noqa: E402

CLIENT_ID, CLIENT_SECRET = "patchrelay-bench-client", "bench-client-secret-value"
REDIRECT = "http://localhost:8765/callback"

# one "other" process: a viewer call every `interval` s until `deadline`; prints its figures as JSON
CALLER = r"""
import collections, json, sys, time
sys.path.insert(0, sys.argv[1])
import patchrelay as pr
config, deadline, interval, held = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "held"
cfg = pr.load_config(config)
s = pr.Store(cfg.database_path)
calls, failed, errors, c = 0, 0, collections.Counter(), None
while time.time() < deadline:
    calls += 1
    try:
        if c is None or not held:
            c = pr.linear_client(cfg, s)
        c.viewer()
    except Exception as e:  # noqa: BLE001 - counted and reported
        failed += 1
        errors[f"{type(e).__name__}: {pr.one_line(str(e), 200)}"] += 1
    time.sleep(interval)
print(json.dumps({"calls": calls, "failed": failed, "errors": errors.most_common(3)}))
"""


def progress(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def app_world(tmp, fake, lifetime):
    """A World in app mode: the OAuth app (tokens living `lifetime` s), runner paused, its environment."""
    w = World(Path(tmp), fake)
    fake.add_oauth_app(CLIENT_ID, CLIENT_SECRET, w.app, token_lifetime=lifetime, redirect_uris=(REDIRECT,))
    w.config["runner"]["paused"] = True
    w.config["linear"]["oauth"] = {"redirect_uri": REDIRECT}
    w.write_config()
    key = patchrelay.new_token_key()
    base_env = w.env
    w.env = lambda **extra: base_env(**{"LINEAR_API_KEY": None, "PATCHRELAY_TOKEN_KEY": key,
                                        "LINEAR_CLIENT_ID": CLIENT_ID, "LINEAR_CLIENT_SECRET": CLIENT_SECRET,
                                        **extra})
    return w


def connect(w):
    """`patchrelay linear connect --code` with a code the admin's browser got; exits if it fails."""
    code = w.linear.authorize_code(CLIENT_ID, REDIRECT)
    p = w.cli("linear", "connect", "--code", code, timeout=60)
    if p.returncode != 0 or "Connected" not in p.stdout:
        sys.exit(f"linear connect exited {p.returncode}:\n{p.stdout}{p.stderr}")
    progress(f"connected: {patchrelay.one_line(p.stdout, 200)}")


def tick_loop(w, deadline, interval, out):
    """Loop 0: `patchrelay tick` subprocesses until `deadline`; fills `out` (ticks, failed, errors, seconds)."""
    argv = [sys.executable, str(PATCHRELAY), "--config", str(w.config_path), "tick"]
    env = w.env()
    out.update(ticks=0, failed=0, errors=collections.Counter(), seconds=[])
    while time.time() < deadline:
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        out["seconds"].append(time.perf_counter() - t0)
        out["ticks"] += 1
        if p.returncode != 0:
            out["failed"] += 1
            last = (p.stderr.strip().splitlines() or [p.stdout.strip()[-200:]])[-1]
            out["errors"][f"exit {p.returncode}: {patchrelay.one_line(last, 200)}"] += 1
        time.sleep(interval)


def start_callers(w, n, deadline, interval):
    """Loops 1..n-1: one subprocess each (odd: a new client per call, even: one held client)."""
    procs = []
    for k in range(1, n):
        mode = "held" if k % 2 == 0 else "fresh"
        argv = [sys.executable, "-c", CALLER, str(ROOT), str(w.config_path), repr(deadline), repr(interval), mode]
        procs.append((k, mode, subprocess.Popen(argv, env=w.env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True)))
    return procs


def collect_callers(procs, timeout):
    """[(k, mode, figures)] of the caller subprocesses; a caller that died is reported with its stderr."""
    got = []
    for k, mode, p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        try:
            f = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            f = {"calls": 0, "failed": 0, "errors": [], "died": f"exit {p.returncode}: "
                 f"{patchrelay.one_line(err.strip()[-400:], 400)}"}
        got.append((k, mode, f))
    return got


def run_loops(w, seconds, processes, interval):
    """All loops at once for `seconds` -> (tick figures, caller figures, wall seconds)."""
    t0 = time.time()
    deadline = t0 + seconds
    procs = start_callers(w, processes, deadline, interval)
    ticks = {}
    th = threading.Thread(target=tick_loop, args=(w, deadline, interval, ticks), daemon=True)
    th.start()
    th.join(seconds + 180)
    callers = collect_callers(procs, timeout=max(10, deadline - time.time() + 60))
    return ticks, callers, time.time() - t0


def stored_row(w):
    db_path = w.config["database"]["path"]
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        r = db.execute("SELECT refreshes, refresh_error, generation FROM linear_oauth").fetchone()
    return dict(r) if r else None


def fake_figures(fake, start):
    """What the fake Linear saw after the connect (requests from index `start`)."""
    with fake.lock:
        recs = fake.requests[start:]
        log = list(fake.oauth_log)
    return {"refreshes": fake.refreshes(), "refused": len(fake.refused_grants()),
            "auth_refused": sum(1 for r in recs if r["status"] == 400 and r["viewer"] is None and not r["fault"]),
            "graphql": len(recs), "faults": sum(1 for r in recs if r["fault"]),
            "oauth_results": dict(collections.Counter(f"{r['grant_type']} {r['result']}" for r in log)),
            "live_refresh_tokens": fake.live_refresh_tokens(CLIENT_ID)}


def report(a, ticks, callers, wall, ff, row):
    rows = [("token lifetime", f"{a.lifetime:g} s"), ("seconds run", f"{wall:.1f}"),
            ("token lifetimes covered", f"{wall / a.lifetime:.1f}"),
            ("ticks run (loop 0)", ticks.get("ticks", 0)), ("ticks exited non-zero", ticks.get("failed", 0))]
    for k, mode, f in callers:
        rows.append((f"loop {k} ({mode} client) viewer calls / failed", f"{f['calls']} / {f['failed']}"))
    rows += [("refreshes (fake)", ff["refreshes"]), ("refused grants (invalid_grant)", ff["refused"]),
             ("GraphQL requests refused for their token", f"{ff['auth_refused']} of {ff['graphql']}"),
             ("stored refreshes (linear_oauth.refreshes)", row["refreshes"] if row else "no row")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")
    print()
    notes(ticks, callers, ff, row)
    failed_calls = sum(f["failed"] for _, _, f in callers) + sum(1 for _, _, f in callers if "died" in f)
    ok = ff["refused"] == 0 and ticks.get("failed", 0) == 0 and failed_calls == 0
    print(f"goal: 0 refused grants, 0 failed ticks, 0 failed calls: {'met' if ok else 'NOT met'}")


def notes(ticks, callers, ff, row):
    secs = sorted(ticks.get("seconds") or [0])
    print(f"tick wall time: median {secs[len(secs) // 2] * 1000:.0f} ms, max {secs[-1] * 1000:.0f} ms")
    print(f"oauth endpoint: {ff['oauth_results']}; live refresh tokens at the end: {ff['live_refresh_tokens']}")
    if row is not None:
        print(f"stored row: generation {row['generation']}, refresh_error {row['refresh_error']!r}")
        if row["refreshes"] != ff["refreshes"]:
            print(f"NOTE: the fake issued {ff['refreshes']} refreshes but the database counts {row['refreshes']}")
    if ff["faults"]:
        print(f"NOTE: {ff['faults']} GraphQL request(s) hit an injected fault (none injected by this benchmark)")
    for e, n in (ticks.get("errors") or {}).items():
        print(f"failed tick x {n}: {e}")
    for k, mode, f in callers:
        if "died" in f:
            print(f"loop {k} ({mode}) died: {f['died']}")
        for e, n in f["errors"]:
            print(f"loop {k} ({mode}) failed call x {n}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lifetime", type=float, default=4, help="access token lifetime, seconds (default 4)")
    ap.add_argument("--seconds", type=float, default=60, help="how long the loops run (default 60)")
    ap.add_argument("--processes", type=int, default=3,
                    help="concurrent loops: one ticking, the others calling Linear (default 3)")
    ap.add_argument("--interval", type=float, default=0.5, help="sleep between a loop's ticks or calls (0.5)")
    a = ap.parse_args()
    if a.lifetime < 1 or a.processes < 1 or a.seconds <= 0 or a.interval < 0:
        ap.error("--lifetime >= 1, --processes >= 1, --seconds > 0, --interval >= 0")
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"Linear app mode against tests/fakes/linear.py: tokens living {a.lifetime:g} s (real time), "
          f"{a.processes} concurrent loop(s) for {a.seconds:g} s, {a.interval:g} s apart; runner paused, "
          "nothing delegated")
    with FakeLinear() as fake, tempfile.TemporaryDirectory() as tmp:
        w = app_world(tmp, fake, a.lifetime)
        connect(w)
        start = len(fake.requests)
        progress(f"running {a.processes} loop(s) for {a.seconds:g} s")
        ticks, callers, wall = run_loops(w, a.seconds, a.processes, a.interval)
        ff = fake_figures(fake, start)
        row = stored_row(w)
        validation = list(fake.validation_errors)
    print()
    report(a, ticks, callers, wall, ff, row)
    if validation:
        print(f"fake Linear rejected {len(validation)} request(s); first: "
              f"{patchrelay.one_line(json.dumps(validation[0]), 300)}")


if __name__ == "__main__":
    main()
