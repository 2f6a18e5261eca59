"""What a fleet buys: throughput and API cost of 1, 2 and 3 hosts on one PostgreSQL, claim latency, and an idle
tick on PostgreSQL against SQLite.

    python bench/fleet.py [--hosts 1,2,3] [--issues 24] [--turn-seconds 12] [--max-runs 2] [--interval 1]
                          [--idle-seconds 10] [--skip-throughput] [--skip-claims] [--skip-ticks]

1. Throughput. For each fleet size, a fresh world (tests/conftest.py `World`: fake Linear, fake GitHub, a bare
   origin) on a fresh database of one throwaway PostgreSQL server (tests/pg.py), the real Codex CLI against a
   fake model whose every turn is a tool call sleeping --turn-seconds and writing a file, then a message
   (tests/fakes/model.py responder_for_issue_files), and a fleet (tests/fleet.py) of that many hosts, each
   `patchrelay watch --interval` (--interval) with runner.max_concurrent_runs --max-runs. --issues delegations are made
   before the hosts start. Busy window: from the first claim to the last implementation run's end; runs/min
   over it. Linear and GitHub requests per minute in the busy window (Linear reads: queries; writes: mutations,
   which grow with the runs finished, not the hosts), then, once every issue's PR is open and the outbox is
   empty, an idle window of --idle-seconds (polling only: Linear intake and GitHub observation).
   Goals: 3 hosts >= 2.5x one host's runs/min; the fleet's API requests per minute <= 1.1x one host's (polling:
   the idle window and the busy window's Linear reads).
2. Claim latency: a PostgreSQL store with 10,000 finished runs (1,000 done issues) and 100 pending issues;
   Store.claim_run of each pending issue in turn (p50/p95 of 100; goal p95 < 5 ms). The same on SQLite, for
   reference.
3. Idle tick: run_tick in this process on a world with nothing to do (3 done issues, Linear's clock past the
   poll overlap; intake still polls once per tick), median of 20 after 3 warm-up ticks, on PostgreSQL and on
   SQLite (goal PG <= 1.5x); on PostgreSQL also the statements (round trips) per tick and their time.

The machine's cores and load are printed, and its CPU use over each busy window: every host of the fleet,
the fakes and PostgreSQL share this one machine, so shorter turns or faster ticks (--turn-seconds 6,
--interval 0.5) saturate two cores with three hosts and measure the machine, not the fleet.
Prints figures; asserts nothing. Needs what the tests need (run .ci/run once).
"""
import argparse
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import patchrelay  # noqa: E402
from conftest import GH_LOGIN, GH_TOKEN, World  # noqa: E402
from fakes.github import FakeGitHub  # noqa: E402
from fakes.linear import FakeLinear  # noqa: E402
from fakes.model import responder_for_issue_files  # noqa: E402
from fleet import Fleet, close_world, make_world  # noqa: E402
from pg import PgServer  # noqa: E402

REPO = "acme/app"


def progress(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ts(value):
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def is_mutation(rec):
    return (rec.get("query") or "").lstrip().startswith("mutation")


def counts(world, t0, t1):
    """Requests to the fakes between t0 and t1: Linear (all, reads, writes) and GitHub."""
    with world.linear.lock:
        lin = [r for r in world.linear.requests if t0 <= r["at"] < t1]
    with world.github.lock:
        gh = [r for r in world.github.requests if t0 <= r["at"] < t1]
    writes = sum(1 for r in lin if is_mutation(r))
    return {"linear": len(lin), "linear_reads": len(lin) - writes, "linear_writes": writes, "github": len(gh)}


def operations(world, t0, t1):
    """{Linear operation: requests} between t0 and t1 ("mutation " before the writes' names)."""
    with world.linear.lock:
        lin = [r for r in world.linear.requests if t0 <= r["at"] < t1]
    out = {}
    for r in lin:
        name = ("mutation " if is_mutation(r) else "") + str(r.get("operation") or "?")
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


CPU_SAMPLES = []      # (time.time(), busy jiffies, all jiffies) of the machine, every half second while waiting


def cpu_sample():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)     # idle + iowait
    CPU_SAMPLES.append((time.time(), sum(fields) - idle, sum(fields)))


def cpu_busy(t0, t1):
    """The machine's CPU use between t0 and t1 (the samples nearest inside), 0..1 of every core."""
    inside = [x for x in CPU_SAMPLES if t0 <= x[0] <= t1] or CPU_SAMPLES[-1:]
    (_, b0, a0), (_, b1, a1) = inside[0], inside[-1]
    return (b1 - b0) / max(1, a1 - a0)


def wait(fleet, predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        cpu_sample()
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


# ----------------------------------------------------------------------------- 1. throughput
def bench_fleet(server, hosts, issues, turn, max_runs, idle, tmp, interval=0.5):
    """One fleet size in a fresh world -> figures (dict)."""
    world = make_world(Path(tmp) / f"hosts{hosts}", server)
    fleet = None
    try:
        world.use_codex()
        world.model.responder = responder_for_issue_files(sleep=turn)
        for n in range(issues):
            world.delegate(title=f"Bench task {n + 1}", description=f"Write the bench file for task {n + 1}.")
        fleet = Fleet(world, hosts, max_runs=max_runs, host_timeout=10, interval=interval)
        t_start = time.time()
        fleet.start()

        def finished():
            rs = [r for r in fleet.runs() if r["run_type"] == "implementation" and r["status"] == "completed"]
            return rs if len({r["key"] for r in rs}) >= issues else None
        done = wait(fleet, finished, 300 + issues * (turn + 30) / max(1, hosts * max_runs), "every run")
        runs = fleet.runs()
        t0 = min(ts(r["claimed_at"]) for r in runs)
        t1 = max(ts(r["ended_at"]) for r in done)
        busy = counts(world, t0, t1)
        cpu = cpu_busy(t0, t1)
        busy_ops = operations(world, t0, t1)
        progress(f"{hosts} host(s): {issues} runs in {t1 - t0:.1f}s; waiting for the PRs")
        wait(fleet, lambda: len(world.github.prs(REPO)) >= issues and all(
            i["factory_state"] == "pr_open" for i in fleet.issues()), 120, "every PR")
        wait(fleet, lambda: not fleet.query("SELECT id FROM outbox WHERE status = 'queued'"), 60, "the outbox")
        time.sleep(1.0)
        i0 = time.time()
        time.sleep(idle)
        i1 = time.time()
        quiet = counts(world, i0, i1)
        steps = fleet.tick_steps(i0, i1)
        per_min = lambda n, a, b: n * 60.0 / max(b - a, 1e-9)  # noqa: E731
        return {"hosts": hosts, "runs": len(done), "attempts": len(runs), "busy_s": t1 - t0, "cpu": cpu * 100,
                "startup_s": t0 - t_start, "runs_min": per_min(len(done), t0, t1),
                "run_s": statistics.median(ts(r["ended_at"]) - ts(r["claimed_at"]) for r in done),
                **{f"busy_{k}_min": per_min(v, t0, t1) for k, v in busy.items()},
                **{f"idle_{k}_min": per_min(v, i0, i1) for k, v in quiet.items()},
                "per_run_linear": busy["linear"] / max(1, len(done)), "prs": len(world.github.prs(REPO)),
                "idle_s": i1 - i0, "idle_steps": steps, "busy_ops": busy_ops}
    finally:
        if fleet is not None:
            fleet.shutdown()
        close_world(world, server)


def print_throughput(results):
    base = results[0]
    cols = [("hosts", "hosts", "{:d}"), ("runs", "runs", "{:d}"), ("busy s", "busy_s", "{:.1f}"),
            ("run s p50", "run_s", "{:.1f}"), ("CPU %", "cpu", "{:.0f}"), ("runs/min", "runs_min", "{:.2f}"),
            ("x1", None, None),
            ("Linear/min", "busy_linear_min", "{:.0f}"), ("L reads/min", "busy_linear_reads_min", "{:.0f}"),
            ("L writes/min", "busy_linear_writes_min", "{:.0f}"), ("GitHub/min", "busy_github_min", "{:.0f}"),
            ("idle L/min", "idle_linear_min", "{:.0f}"), ("idle GH/min", "idle_github_min", "{:.0f}"),
            ("L/run", "per_run_linear", "{:.1f}")]
    rows = []
    for r in results:
        row = []
        for _, key, fmt in cols:
            row.append(f"{r['runs_min'] / base['runs_min']:.2f}x" if key is None else fmt.format(r[key]))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(cols)]
    print("\nThroughput and API cost (busy: first claim to last run end; idle: every PR open, nothing to do;\n"
          f"CPU %: the machine's {os.cpu_count()} cores over the busy window, hosts, fakes and PostgreSQL together)")
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print("\nIdle window, per host: ticks per minute (of them: ticks that polled Linear / observed GitHub)")
    for r in results:
        per_min = 60.0 / r["idle_s"]
        print(f"  {r['hosts']} host(s): " + "; ".join(
            f"{h} {c['ticks'] * per_min:.0f}/min (intake {c['intake'] * per_min:.0f}, observe "
            f"{c['observe'] * per_min:.0f})" for h, c in r["idle_steps"].items()))
    print("\nLinear requests of the busy window by operation, per finished run:")
    for r in results:
        print(f"  {r['hosts']} host(s): " + ", ".join(f"{op} {n / r['runs']:.2f}" for op, n in r["busy_ops"].items()))
    print("\nGoals against the 1-host row:")
    for r in results[1:]:
        speed = r["runs_min"] / base["runs_min"]
        idle_api = (r["idle_linear_min"] + r["idle_github_min"]) / max(1e-9, base["idle_linear_min"]
                                                                     + base["idle_github_min"])
        reads = r["busy_linear_reads_min"] / max(1e-9, base["busy_linear_reads_min"])
        goal = "goal >= 2.50x" if r["hosts"] == 3 else f"ideal {r['hosts']:d}x"
        print(f"  {r['hosts']} hosts: throughput {speed:.2f}x ({goal}); idle API requests/min {idle_api:.2f}x "
              f"(goal <= 1.10x: {'met' if idle_api <= 1.1 else 'MISSED'}); busy Linear reads/min {reads:.2f}x "
              f"(goal <= 1.10x: {'met' if reads <= 1.1 else 'MISSED'})")
        if r["hosts"] == 3:
            print(f"           3 hosts >= 2.5x one host: {'met' if speed >= 2.5 else 'MISSED'}")


# ----------------------------------------------------------------------------- 2. claim latency
def fill_store(store, done_issues=1000, runs_per_issue=10, pending=100):
    """done_issues closed issues with runs_per_issue finished runs each, and `pending` issues with a pending
    implementation run -> the pending issues' ids."""
    now = patchrelay.iso()
    issue_sql = ("INSERT INTO issues (project_id, linear_id, key, title, factory_state, delegated, pending_run_type, "
                 "pending_since, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    with store.tx():
        store.db.executemany(issue_sql, [("app", f"lin-done-{i}", f"APP-{i + 1}", f"Done {i}", "done", 1, None, None,
                                          now, now) for i in range(done_issues)])
        store.db.executemany(issue_sql, [("app", f"lin-new-{i}", f"APP-{done_issues + i + 1}", f"New {i}",
                                          "delegated", 1, "implementation", now, now, now) for i in range(pending)])
    ids = {r["linear_id"]: r["id"] for r in store.db.execute("SELECT id, linear_id FROM issues").fetchall()}
    run_sql = ("INSERT INTO runs (issue_id, run_type, status, attempt, claimed_at, started_at, ended_at, summary, host) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    rows = [(ids[f"lin-done-{i}"], "implementation" if k == 0 else "ci_repair", "completed", 1, now, now, now,
             "done", f"h{k % 3 + 1}") for i in range(done_issues) for k in range(runs_per_issue)]
    with store.tx():
        for n in range(0, len(rows), 2000):
            store.db.executemany(run_sql, rows[n:n + 2000])
    return [ids[f"lin-new-{i}"] for i in range(pending)]


def bench_claims(server, tmp):
    out = {}
    for backend in ("postgres", "sqlite"):
        url = server.create_database() if backend == "postgres" else None
        store = patchrelay.Store(Path(tmp) / f"claims-{backend}" / "patchrelay.sqlite", url=url)
        try:
            pending = fill_store(store)
            n_runs = store.db.execute("SELECT COUNT(*) AS n FROM runs").fetchone()["n"]
            sql = count_statements(store)
            times = []
            for issue_id in pending:
                t = time.perf_counter()
                run_id = store.claim_run(issue_id, host="h1")
                times.append((time.perf_counter() - t) * 1000)
                assert run_id is not None
            out[backend] = {"runs": n_runs, "p50": pct(times, 0.5), "p95": pct(times, 0.95), "max": max(times),
                            "statements": sql["n"] / len(pending), "sql_ms": sql["ms"] / len(pending)}
        finally:
            store.close()
            if url:
                server.drop_database(url)
    print(f"\nClaim latency: Store.claim_run of 100 pending issues, {out['postgres']['runs']:,} runs in the store")
    for backend, f in out.items():
        goal = f" (goal p95 < 5 ms: {'met' if f['p95'] < 5 else 'MISSED'})" if backend == "postgres" else \
            " (reference)"
        sql = f"; {f['statements']:.0f} statements (round trips) per claim, {f['sql_ms']:.2f} ms waiting on them" \
            if f["statements"] else ""
        print(f"  {backend:9s} p50 {f['p50']:.2f} ms  p95 {f['p95']:.2f} ms  max {f['max']:.2f} ms{goal}{sql}")
    return out


# ----------------------------------------------------------------------------- 3. idle tick
@contextlib.contextmanager
def environment(env):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class IdleTicker:
    """A world with nothing to do and its store, ticked in this process: three issues delegated, tracked
    (paused) and then done in Linear, Linear's clock moved past linear.poll_overlap (nothing read again),
    warm-up ticks. On PostgreSQL the statements sent (each one round trip) are counted."""

    def __init__(self, world, warmup=3):
        self.world = world
        self.cfg = patchrelay.load_config(str(world.config_path))
        self.env = world.env()
        self.times, self.errors, self.requests = [], set(), 0
        with environment(self.env):
            self.store = patchrelay.Store(self.cfg.database_path, url=self.cfg.database_url)
            issues = [world.delegate(title=f"Idle task {k + 1}")[0] for k in range(3)]
            patchrelay.run_tick(self.cfg, self.store)
            for issue in issues:
                world.linear.update_issue(issue, state="Done")
            patchrelay.run_tick(self.cfg, self.store)
            world.linear.advance(self.cfg.linear.poll_overlap + 1)
            for _ in range(warmup):
                patchrelay.run_tick(self.cfg, self.store)
        self.sql = count_statements(self.store)

    def tick(self):
        with environment(self.env):
            before = len(self.world.linear.requests)
            t = time.perf_counter()
            report = patchrelay.run_tick(self.cfg, self.store)
            self.times.append((time.perf_counter() - t) * 1000)
            self.requests += len(self.world.linear.requests) - before
            self.errors.update(report["errors"])

    def figures(self):
        n = len(self.times)
        states = sorted({r["factory_state"] for r in self.store.db.execute("SELECT factory_state FROM issues")
                         .fetchall()})
        sql = {"statements": self.sql["n"] / n, "sql_ms": self.sql["ms"] / n, "tx": self.sql["tx"] / n} \
            if self.store.pg else {}
        return {"median": statistics.median(self.times), "p95": pct(self.times, 0.95),
                "linear_per_tick": self.requests / n, "errors": sorted(self.errors), "states": states, **sql}

    def close(self):
        self.store.close()


def count_statements(store):
    """On PostgreSQL, count the statements sent on the store's connection (each one round trip), the
    transactions and the time spent waiting for them: a dict updated as they run."""
    seen = {"n": 0, "ms": 0.0, "tx": 0}
    if not store.pg:
        return seen
    conn = store.db.conn
    execute = conn.execute

    def counted(query, *args, **kwargs):
        t = time.perf_counter()
        try:
            return execute(query, *args, **kwargs)
        finally:
            seen["n"] += 1
            seen["ms"] += (time.perf_counter() - t) * 1000
            seen["tx"] += str(query).startswith("BEGIN")
    conn.execute = counted
    return seen


def bench_ticks(server, tmp, n=20):
    """Idle ticks on SQLite and on PostgreSQL, alternating (the machine's load drifts alike for both)."""
    worlds, tickers = {}, {}
    try:
        for backend in ("sqlite", "postgres"):
            d = Path(tmp) / f"tick-{backend}"
            d.mkdir()
            if backend == "postgres":
                world = make_world(d, server)
            else:
                world = World(d, FakeLinear().start(), FakeGitHub(tokens={GH_TOKEN: GH_LOGIN}).start())
            worlds[backend] = world
            world.config["runner"]["paused"] = True
            world.write_config()
            tickers[backend] = IdleTicker(world)
        for _ in range(n):
            for t in tickers.values():
                t.tick()
        out = {backend: t.figures() for backend, t in tickers.items()}
    finally:
        for t in tickers.values():
            t.close()
        for backend, world in worlds.items():
            close_world(world, server if backend == "postgres" else None)
    ratio = out["postgres"]["median"] / out["sqlite"]["median"]
    print(f"\nIdle tick in this process (run_tick; nothing to do but Linear intake's poll), median of {n}, "
          "the backends alternating:")
    for backend, f in out.items():
        print(f"  {backend:9s} median {f['median']:.1f} ms  p95 {f['p95']:.1f} ms  "
              f"Linear requests/tick {f['linear_per_tick']:.1f}  issues {f['states']}"
              + (f"  SQL statements/tick {f['statements']:.0f} in {f['tx']:.0f} transactions, "
                 f"{f['sql_ms']:.1f} ms waiting" if f.get("statements") else "")
              + (f"  errors: {f['errors']}" if f["errors"] else ""))
    print(f"  PostgreSQL / SQLite: {ratio:.2f}x (goal <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default="1,2,3", help="fleet sizes, comma-separated (the first is the baseline)")
    ap.add_argument("--issues", type=int, default=24)
    ap.add_argument("--turn-seconds", type=float, default=12.0)
    ap.add_argument("--max-runs", type=int, default=2)
    ap.add_argument("--interval", type=float, default=1.0, help="each host's `watch --interval`")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-claims", action="store_true")
    ap.add_argument("--skip-ticks", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in args.hosts.split(",") if x.strip()]
    os.environ.setdefault("GIT_CONFIG_GLOBAL", str(ROOT / ".cache" / "gitconfig"))
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{args.issues} issues, turns of {args.turn_seconds:g} s, max_concurrent_runs {args.max_runs} per host, "
          f"watch --interval {args.interval:g}",
          flush=True)
    server = PgServer().start()
    os.environ["PGPASSWORD"] = server.password       # this process's stores and reads (the URLs carry none)
    progress(f"PostgreSQL {server.version_string.split(',')[0]} on port {server.port}")
    try:
        with tempfile.TemporaryDirectory(prefix="patchrelay-bench-fleet-") as tmp:
            if not args.skip_throughput:
                results = []
                for n in sizes:
                    progress(f"{n} host(s): {args.issues} issues")
                    results.append(bench_fleet(server, n, args.issues, args.turn_seconds, args.max_runs,
                                               args.idle_seconds, tmp, args.interval))
                    progress(f"{n} host(s): {results[-1]['runs_min']:.2f} runs/min")
                print_throughput(results)
            if not args.skip_claims:
                bench_claims(server, tmp)
            if not args.skip_ticks:
                bench_ticks(server, tmp)
    finally:
        server.stop()
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
