"""Crash consistency: `kill -9` of ticks and workers at seeded random points, then normal ticks converge.

Each trial builds a fresh world (fake Linear, fake GitHub, bare origin, the real Codex CLI against the
scripted fake model), delegates work, and SIGKILLs one process at a random point of one phase (a hook, a gate
or a held request widens the phase so the kill lands inside it):

* a **tick** (started with `subprocess.Popen`, same argv and environment as `world.cli`, in its own process
  group, which is killed whole) during
  - *intake*: one of the Linear reads the tick makes (learnt from a `tick --dry-run`) is held open with
    `hang_next`; the kill lands inside it or just after it, where the intake transaction commits. The tick
    takes in one or two new delegations, or a follow-up prompt in the session of an issue whose pull
    request is open;
  - *launch*: right after the `claimed` run row appears in the database (before the spawn, between the spawn and
    recording the worker's pid, or after);
  - *publish*: an activity, a plan or session link, or an issue move (by Linear root field) is held open,
    in the first tick (racing the worker it launched for the session's messages) or in the tick that opens
    the pull request, where GitHub's "create a pull request" may be the request held (the kill then lands
    before the pull request is recorded);
* a **worker** (the pid of its `runs` row; its process group is killed: the worker and its git children;
  the app-server lives in its own group and must be cleaned up by reconcile)
  - *before the turn*: at start-up, while `git worktree add` fills the new worktree, or while the
    repository's `.patchrelay/hooks/prepare-worktree` runs (it waits on a gate, like a long `npm ci`);
  - *mid-turn*: the model request held at a gate; the turn is then left hanging, released after the kill,
    or completed while the worker is frozen (SIGSTOP) before it is killed;
  - *during the commit or the push*: `git add` held in a clean filter (index.lock taken), `git commit` held
    in prepare-commit-msg or in reference-transaction (HEAD and the branch locked), the commit made and
    held in post-commit, or the push held by a `pre-receive` hook on the bare origin;
  - *in the final transaction*: a short random delay after the push gate opens, sometimes with the final
    Linear response held open.

Then normal ticks run (each waits for the workers it launched) until nothing is active or runnable and a
tick changes nothing, and the trial asserts convergence:

* every delegated issue is tracked, in a state of `patchrelay.TRANSITIONS`, resting with one pull request
  for its branch, whose changes on origin are the agent's files and nothing else, and no run active or
  pending;
* one run that is not `interrupted` per trigger (a requeued run after a dead worker is fine), completed;
  no failed run and no error event: nothing in this world fails but the killed process;
* every Linear message delivered exactly once: each activity of the session is a sent outbox row (same id,
  same content) and each sent row is in Linear; no body repeats except the acknowledgement ("Picked up",
  once per trigger) and "Started the ... run" (once per run whose worker started); the acknowledgement
  comes first; one run response per trigger and one for the pull request; the session's plan is the last
  plan queued and the issue is In Review;
* the outbox is empty (nothing queued, nothing failed) and no row is still leased;
* no worker and no app-server (`process_alive(appserver_pid, appserver_started)`) is left, nor a
  prepare-worktree hook the killed worker started; no worker log shows a traceback; every tick after the
  kill exits 0.

Trials: 5 per kind of kill, seeds 1-5 (35 in all); PATCHRELAY_CRASH_TRIALS=N runs N trials spread over the
kinds (seeds 1, 2, ...). pytest-xdist spreads them (`-n 2`). Seeds take a kind's variants in turn (so the
fixed seeds cover every variant) and fix every random choice (which request is held, the delays); the
interleaving with the processes still depends on timing. Every failure message starts with the kind, the seed and the node id that replays it,
then where the kill landed, the trial's log and the state. PATCHRELAY_CRASH_STATS=FILE appends one JSON
line per trial (kind, seed, where the kill landed, how the ticks resolved it, outcome, seconds).
Convergence ticks run the click CLI in this process (`helpers.tick_result`; the killed tick is always a
real process); PATCHRELAY_TEST_SUBPROCESS=1 runs them as subprocesses.
"""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

import patchrelay as pr
from conftest import PATCHRELAY
from helpers import (DB_ERRORS, cli_inproc, db_rows, file_at, git, held, last_events, pg_connect, pg_url,
                     remote_branches, say, tick_result, tool)

KINDS = ["tick_intake", "tick_launch", "tick_publish", "worker_before_turn", "worker_mid_turn",
         "worker_commit_push", "worker_final"]
PER_KIND = 5
N_TRIALS = int(os.environ.get("PATCHRELAY_CRASH_TRIALS") or PER_KIND * len(KINDS))
TRIALS = [(KINDS[i % len(KINDS)], i // len(KINDS) + 1) for i in range(N_TRIALS)]
STATS = os.environ.get("PATCHRELAY_CRASH_STATS")

HELLO = [tool("echo hello > hello.txt")]
TAIL = [tool("echo more >> more.txt"), say("Added more.txt.")] * 3     # what a requeued run does
RESTING = ("pr_open", "awaiting_queue")                                 # where a finished issue rests


# ----------------------------------------------------------------------------- one trial
class Trial:
    def __init__(self, world, kind, seed):
        self.world, self.kind, self.seed = world, kind, seed
        self.rng = random.Random(f"{kind}:{seed}")
        self.log = []
        self.where = "?"            # where the kill landed
        self.resolved = []          # what the ticks after the kill said about it
        self.issues = []            # (fake Linear issue, agent session)
        self.triggers = {}          # issue key -> triggers of an implementation run (delegation, prompts)
        self.no_survivors = []      # paths no process of a killed worker may still be running after convergence
        self.gates = []             # gate files to open when the trial ends
        self.ticks = 0
        self.t0 = time.time()

    # ---- failure messages carry the seed, the replay command and the state
    def fail(self, what):
        n = (self.seed - 1) * len(KINDS) + KINDS.index(self.kind) + 1
        lines = [f"[{self.kind} seed {self.seed}] {what}",
                 f"replay: {f'PATCHRELAY_CRASH_TRIALS={n} ' if n > PER_KIND * len(KINDS) else ''}pytest "
                 f"'tests/test_crash.py::test_kill_9_then_normal_ticks_converge[{self.kind}-seed{self.seed}]'",
                 f"kill landed: {self.where}", "", "trial log:"] + [f"  {x}" for x in self.log]
        try:
            lines += ["", "issues:"] + [f"  {r}" for r in self.db(
                "SELECT key, factory_state, pending_run_type, active_run_id, not_before, pr_number FROM issues")]
            lines += ["runs:"] + [f"  {r}" for r in self.db(
                "SELECT id, issue_id, status, attempt, worker_pid, appserver_pid, started_at, failure_reason "
                "FROM runs ORDER BY id")]
            lines += ["outbox:"] + [f"  {r}" for r in self.db(
                "SELECT id, kind, status, attempts, lease_pid, lease_until, last_error, substr(payload, 1, 90) AS p "
                "FROM outbox ORDER BY id")]
            lines += last_events(self.world.state)
        except DB_ERRORS as e:
            lines.append(f"(database unreadable: {e})")
        for _, session in self.issues:
            lines.append(f"Linear activities of session {session['id'][:8]}:")
            lines += [f"  {a['id'][:8]} {a['content']['type']}: {(a['content'].get('body') or '')[:100]!r}"
                      for a in self.world.linear.activities(session)]
        logs = self.world.state / "logs"
        if logs.is_dir():
            for p in sorted(logs.glob("run-*.log")):
                if not p.name.endswith(".codex.log"):
                    lines += [f"--- {p.name}", p.read_text(errors="replace")[-2500:]]
        pytest.fail("\n".join(lines), pytrace=False)

    def variant(self, options):
        """The trial's variant of its kind: seeds take the options in turn, so a few seeds cover them all."""
        return options[(self.seed - 1) % len(options)]

    def note(self, text):
        self.log.append(f"{time.time() - self.t0:6.2f}s {text}")

    def expect(self, ok, what):
        if not ok:
            self.fail(what)

    # ---- SQLite, read-only
    def db(self, sql, args=()):
        return db_rows(self.world.state, sql, args)

    def wait(self, what, predicate, timeout=30, interval=0.02):
        deadline = time.time() + timeout
        while True:
            v = predicate()
            if v:
                return v
            if time.time() > deadline:
                self.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    # ---- the world
    def delegate(self, n=1):
        for i in range(n):
            issue, session = self.world.delegate(title=f"Crash work {i + 1}", description=f"Add file {i + 1}")
            self.issues.append((issue, session))
            self.triggers[issue["identifier"]] = 1
            self.note(f"delegated {issue['identifier']}")

    def start_tick(self):
        """`patchrelay tick` as cron starts it (same argv and environment as world.cli), in its own group."""
        out = open(self.world.tmp / f"killed-tick-{self.ticks}.out", "wb")
        self.ticks += 1
        p = subprocess.Popen([sys.executable, str(PATCHRELAY), "--config", str(self.world.config_path), "tick"],
                             env=self.world.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.note(f"started tick pid {p.pid}")
        return p

    def kill_tick(self, p, first_request=0):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = p.wait()
        self.note(f"killed tick {p.pid} (exit {code})")
        if code == 0:
            self.where += " (the tick had already finished)"
        self.forgive_cut_requests(first_request)

    def forgive_cut_requests(self, first_request):
        """A request the kill cut off after its headers reaches the fake Linear with an empty body, which the fake
        reads as an empty GraphQL document and lists as a parse error. PatchRelay never wrote that document:
        drop one such error per cut-off request of the killed tick (the fixture checks the rest)."""
        lin = self.world.linear
        self.linear_idle()
        with lin.lock:
            cut = [r for r in lin.requests[first_request:] if not r["query"] and int(next(
                (v for k, v in (r["headers"] or {}).items() if k.lower() == "content-length"), 0) or 0) > 0]
            for r in cut:
                e = next((e for e in lin.validation_errors if "Unexpected <EOF>" in str(e.get("message"))), None)
                if e is not None:
                    lin.validation_errors.remove(e)
                    self.note("a Linear request was cut off by the kill (empty body); its parse error is not ours")

    def tick(self, why):
        """A normal tick (in this process unless PATCHRELAY_TEST_SUBPROCESS=1); must exit 0."""
        self.ticks += 1
        code, out, err, exc = tick_result(self.world)
        shown = " | ".join(x for x in (out.strip().replace("\n", " | "), err.strip().replace("\n", " | ")) if x)
        self.note(f"tick ({why}) -> exit {code}: {shown[:400]}")
        for line in out.splitlines():
            if "never started" in line or "worker gone" in line:
                self.resolved.append(line.split(": ", 1)[-1])
        if exc is not None or code != 0 or "Traceback" in out + err:
            self.fail(f"a tick after the kill exited {code}: {exc!r}\nstdout:\n{out}\nstderr:\n{err}")
        return out

    def active_run(self):
        rows = self.db("SELECT * FROM runs WHERE status IN ('claimed', 'running') ORDER BY id DESC LIMIT 1")
        return rows[0] if rows else None

    def github_idle(self, timeout=15):
        """Until the fake GitHub has answered every request (a held request of a killed tick still runs)."""
        self.wait("the fake GitHub to answer its requests in flight",
                  lambda: all(r["status"] is not None or r["fault"] for r in list(self.world.github.requests)),
                  timeout=timeout, interval=0.05)

    def linear_idle(self, timeout=15):
        """Until the fake Linear has answered every request (a held request of a killed process still runs)."""
        self.wait("the fake Linear to answer its requests in flight",
                  lambda: all(r["status"] is not None or r["fault"] == "drop"
                              for r in list(self.world.linear.requests)),
                  timeout=timeout, interval=0.05)

    def wait_linear_op(self, op, after):
        """Until a request named `op` (operation name or root field) arrives at the fake Linear (index >= after);
        returns its record."""
        def arrived():
            reqs = self.world.linear.requests
            return next((r for r in reqs[after:] if op == r["operation"] or op in (r["fields"] or ())), None)
        return self.wait(f"a {op} request", arrived, timeout=30, interval=0.002)

    def intake_reads(self):
        """The Linear reads the next tick's intake makes, learnt from a dry run (which changes nothing)."""
        n0 = len(self.world.linear.requests)
        r = cli_inproc(self.world, "tick", "--dry-run")
        self.expect(r.exit_code == 0, f"tick --dry-run exited {r.exit_code}:\n{r.output}")
        ops = sorted({r["operation"] for r in self.world.linear.requests[n0:] if r["operation"]})
        self.note(f"intake reads: {ops}")
        self.expect(ops, "the dry run made no Linear request")
        return ops

    def live_workers(self):
        rows = self.db("SELECT id, worker_pid, worker_started FROM runs WHERE worker_pid IS NOT NULL")
        return [r["id"] for r in rows if pr.process_alive(r["worker_pid"], r["worker_started"])]

    def wait_workers(self, timeout=60):
        self.wait("the workers to exit", lambda: not self.live_workers(), timeout=timeout, interval=0.1)

    def kill_worker(self, run):
        """SIGKILL the worker's process group (it leads its own: start_new_session). False if it had exited."""
        pid, started = run["worker_pid"], run["worker_started"]
        if not pr.process_alive(pid, started):
            self.where += " (the worker had already exited)"
            self.note(f"worker {pid} of run {run['id']} had already exited; nothing to kill")
            return False
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(f"worker {pid} to die", lambda: not pr.process_alive(pid, started), timeout=10)
        self.note(f"killed worker {pid} of run {run['id']} (status {run['status']})")
        return True

    def worker_of(self):
        """The active run once its worker pid is recorded (by the tick or by the worker itself)."""
        return self.wait("a worker pid on the active run",
                         lambda: (lambda r: r if r and r["worker_pid"] and r["worker_started"] else None)(
                             self.active_run()), timeout=30, interval=0.01)

    def spawned_worker_exists(self, run_id):
        """A `patchrelay run --run-id N` process of this world (spawned, not yet recorded in SQLite)."""
        needle = [str(self.world.config_path).encode(), b"--run-id", str(run_id).encode()]
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(n in argv for n in needle) and pr.proc_start_time(int(p.name)):
                return True
        return False

    def orphan_claims_settled(self):
        """A claim left by a tick killed before it spawned (or recorded) the worker: reconcile leaves a claim
        without a worker pid alone for 15 s (a spawn may be in progress). Wait that long without ticking,
        exactly as the next cron ticks would, when no worker for it exists."""
        for r in self.db("SELECT id, claimed_at FROM runs WHERE status = 'claimed' AND worker_pid IS NULL"):
            time.sleep(1.5)        # a spawned worker records its own pid as soon as it has started
            if self.db("SELECT worker_pid FROM runs WHERE id = ? AND worker_pid IS NULL", (r["id"],)) \
                    and not self.spawned_worker_exists(r["id"]):
                age = pr.age_seconds(r["claimed_at"]) or 0
                self.note(f"run {r['id']} claimed without a worker; waiting out the 15 s grace ({age:.1f} s old)")
                time.sleep(max(0.0, 15.5 - age))

    # ---- convergence
    def fingerprint(self):
        lin = self.world.linear
        return (tuple((r["key"], r["factory_state"], r["pending_run_type"], r["active_run_id"], r["pr_number"])
                      for r in self.db("SELECT * FROM issues ORDER BY id")),
                tuple((r["id"], r["status"]) for r in self.db("SELECT id, status FROM runs ORDER BY id")),
                tuple((r["id"], r["status"]) for r in self.db("SELECT id, status FROM outbox ORDER BY id")),
                tuple(len(lin.activities(s)) for _, s in self.issues),
                len(self.world.github.prs("acme/app")))

    def quiet(self):
        now = pr.iso()
        active = self.db("SELECT id FROM runs WHERE status IN ('claimed', 'running')")
        runnable = [i["key"] for i in self.db("SELECT * FROM issues")
                    if i["pending_run_type"] and not i["active_run_id"] and i["factory_state"] not in pr.CLOSED_STATES
                    and (not i["not_before"] or i["not_before"] <= now)]
        queued = self.db("SELECT id FROM outbox WHERE status = 'queued'")
        return not active and not runnable and not queued and not self.live_workers()

    def converge(self, timeout=150):
        """Normal ticks until nothing is active or runnable and a tick changes nothing."""
        deadline = time.time() + timeout
        before = None
        while True:
            self.linear_idle()
            self.github_idle()
            self.orphan_claims_settled()
            self.tick("converging")
            self.wait_workers()
            after = self.fingerprint()
            if after == before and self.quiet():
                return
            if time.time() > deadline:
                self.fail(f"not converged after {timeout} s")
            before = after

    # ---- the invariants after convergence
    def check(self):
        w, lin = self.world, self.world.linear
        issues = {r["key"]: r for r in self.db("SELECT * FROM issues")}
        all_runs = self.db("SELECT * FROM runs ORDER BY id")
        outbox = self.db("SELECT * FROM outbox ORDER BY id")
        bad = [(k, r["factory_state"]) for k, r in issues.items() if r["factory_state"] not in pr.TRANSITIONS]
        self.expect(not bad, f"factory_state not in TRANSITIONS: {bad}")
        failed = [(r["id"], r["failure_reason"]) for r in all_runs if r["status"] == "failed"]
        self.expect(not failed, f"runs failed although only a process was killed: {failed}")
        errors = self.db("SELECT issue_key, run_id, kind, message FROM events WHERE level = 'error'")
        self.expect(not errors, f"error events: {errors}")

        # the outbox: everything sent, nothing leased
        left = [(o["id"], o["kind"], o["status"], o["last_error"]) for o in outbox if o["status"] != "sent" and not
                (o["status"] == "superseded" and any(n["kind"] == o["kind"] and n["id"] > o["id"] and
                                                     n["status"] == "sent" for n in outbox))]
        self.expect(not left, f"outbox rows not sent (queued or failed; or superseded by nothing sent): {left}")
        leased = [(o["id"], o["lease_pid"], o["lease_until"]) for o in outbox
                  if o["lease_until"] is not None or o["lease_pid"] is not None]
        self.expect(not leased, f"outbox rows still leased: {leased}")

        # processes: no worker, no app-server left
        alive = [(r["id"], "worker", r["worker_pid"]) for r in all_runs
                 if pr.process_alive(r["worker_pid"], r["worker_started"])]
        alive += [(r["id"], "app-server", r["appserver_pid"]) for r in all_runs
                  if pr.process_alive(r["appserver_pid"], r["appserver_started"])]
        self.expect(not alive, f"processes left running after convergence: {alive}")
        for path in self.no_survivors:
            left = processes_running(path)
            self.expect(not left, f"{path.name} started by the killed worker is still running (pids {left}) after "
                                  "convergence: reconcile cleans up the app-server a dead worker leaves, not this")

        heads = remote_branches(w.bare)
        prs = w.github.prs("acme/app")
        for issue, session in self.issues:
            key = issue["identifier"]
            row = issues.get(key)
            self.expect(row is not None, f"{key}: delegated but not tracked")
            self.expect(row["factory_state"] in RESTING, f"{key}: ended {row['factory_state']}, not in {RESTING}")
            self.expect(not row["active_run_id"] and not row["pending_run_type"],
                        f"{key}: still has a run: active {row['active_run_id']}, pending {row['pending_run_type']}")
            mine = [r for r in all_runs if r["issue_id"] == row["id"]]
            kept = [(r["id"], r["status"]) for r in mine if r["status"] != "interrupted"]
            n = self.triggers[key]
            self.expect(len(kept) == n and all(st == "completed" for _, st in kept),
                        f"{key}: wanted {n} non-interrupted (completed) run(s), one per trigger, got {kept} "
                        f"of {[(r['id'], r['status']) for r in mine]}")
            prompts = [(m["body"], m["delivered_run_id"], m["delivery"]) for m in self.db(
                "SELECT * FROM inbox WHERE issue_id = ? AND kind = 'prompt'", (row["id"],))]
            self.expect(len(prompts) == n - 1 and all(run_id for _, run_id, _ in prompts),
                        f"{key}: wanted each of the {n - 1} follow-up prompt(s) once in the inbox, delivered: "
                        f"{prompts}")
            branch = row["branch"]
            self.expect(branch in heads and (file_at(w.bare, branch, "hello.txt") == "hello\n"
                                             or file_at(w.bare, branch, "more.txt")),
                        f"{key}: the agent's work is not on origin's {branch}: {sorted(heads)}")
            changes = git(w.bare, "diff", "--name-status", f"main...{branch}").splitlines() if branch in heads else []
            self.expect(changes and all(c.split("\t")[0] in ("A", "M")
                                        and c.split("\t")[-1] in ("hello.txt", "more.txt") for c in changes),
                        f"{key}: the branch changes more than the agent's files: {changes}")
            opened = [p for p in prs if p["headRefName"] == branch]
            self.expect(len(opened) == 1 and row["pr_number"] == opened[0]["number"],
                        f"{key}: wanted one pull request for {branch}, recorded #{row['pr_number']}: "
                        f"{[(p['number'], p['headRefName']) for p in prs]}")
            self.expect(lin.state_of(issue)["name"] == "In Review",
                        f"{key}: Linear state is {lin.state_of(issue)['name']}, not In Review")

            # Linear: every message exactly once, and only what the outbox holds
            acts = lin.activities(session)
            sent = {o["client_id"]: json.loads(o["payload"]) for o in outbox
                    if o["kind"] == "activity" and o["session_id"] == session["id"]}
            stray = [(a["id"], a["content"].get("body")) for a in acts if a["id"] not in sent]
            self.expect(not stray, f"{key}: activities in Linear that no outbox row sent: {stray}")
            by_id = {a["id"]: a for a in acts}
            missing = [(cid, p["content"].get("body")) for cid, p in sent.items() if cid not in by_id]
            self.expect(not missing, f"{key}: outbox rows marked sent that Linear never got: {missing}")
            differ = [cid for cid, p in sent.items() if by_id[cid]["content"] != p["content"]]
            self.expect(not differ, f"{key}: activities whose content differs from their outbox row: {differ}")
            bodies = [(a["content"]["type"], a["content"].get("body") or "") for a in acts]
            started = [b for t, b in bodies if b.startswith("Started the ")]
            runs_started = sum(1 for r in mine if r["started_at"])
            self.expect(len(started) == runs_started,
                        f"{key}: {len(started)} 'Started' activities for {runs_started} started runs: {bodies}")
            acks = [b for t, b in bodies if b.startswith(f"Picked up {key}")]
            self.expect(len(acks) == n, f"{key}: {len(acks)} acknowledgements for {n} trigger(s): {bodies}")
            repeated = sorted({b for t, b in bodies if not b.startswith(("Started the ", f"Picked up {key}"))
                               and bodies.count((t, b)) > 1})
            self.expect(not repeated, f"{key}: messages delivered more than once: {repeated}")
            self.expect(bodies and bodies[0][1].startswith(f"Picked up {key}"),
                        f"{key}: the acknowledgement is not the first activity: {bodies[:3]}")
            responses = [b for t, b in bodies if t == "response"]
            self.expect(len(responses) == n + 1 and sum(b.startswith("Implementation run completed")
                                                        for b in responses) == n
                        and sum(b.startswith("Opened pull request") for b in responses) == 1,
                        f"{key}: wanted {n} run response(s) and one for the pull request: {responses}")
            plans = [json.loads(o["payload"])["plan"] for o in outbox
                     if o["kind"] == "plan" and o["session_id"] == session["id"]]
            self.expect(lin.sessions[session["id"]].get("plan") == plans[-1],
                        f"{key}: the session's plan {lin.sessions[session['id']].get('plan')} is not the last "
                        f"plan queued {plans[-1]}")

        logs = w.state / "logs"
        for p in sorted(logs.glob("run-*.log")) if logs.is_dir() else ():
            if p.name.endswith(".codex.log"):
                continue
            text = p.read_text(errors="replace")
            self.expect("Traceback" not in text and not any(line.startswith("patchrelay: ")
                                                            for line in text.splitlines()),
                        f"worker log {p.name} shows an error:\n{text[-3000:]}")

    def record(self, outcome):
        self.note(f"{outcome}: kill landed {self.where}; resolved: {self.resolved}")
        if STATS:
            with open(STATS, "a") as f:
                f.write(json.dumps({"kind": self.kind, "seed": self.seed, "where": self.where,
                                    "resolved": self.resolved, "outcome": outcome,
                                    "seconds": round(time.time() - self.t0, 1)}) + "\n")


# ----------------------------------------------------------------------------- hooks that hold a phase open
def prepare_worktree_gate(world):
    """A repository hook that runs until a gate file exists (a long `npm ci`, say), unless a pass file exists;
    returns (hook, held marker, pass file, gate)."""
    held_at, passed, gate = world.tmp / "hook-gate.held", world.tmp / "hook-gate.pass", world.tmp / "hook-gate"
    hook = world.repo / ".patchrelay" / "hooks" / "prepare-worktree"
    hook.parent.mkdir(parents=True)
    hook.write_text(f"#!/bin/sh\n[ -e '{passed}' ] && exit 0\ntouch '{held_at}'\n"
                    f"while [ ! -e '{gate}' ]; do sleep 0.05; done\n")
    hook.chmod(0o755)
    git(world.repo, "add", ".patchrelay")
    git(world.repo, "commit", "-q", "-m", "prepare-worktree hook")
    return hook, held_at, passed, gate


def push_gate(world):
    """A pre-receive hook on the bare origin that blocks every push until a gate file exists."""
    held_at, gate = world.tmp / "push-gate.held", world.tmp / "push-gate"
    hook = world.bare / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\ntouch '{held_at}'\nwhile [ ! -e '{gate}' ]; do sleep 0.05; done\nexit 0\n")
    hook.chmod(0o755)
    return held_at, gate


def commit_gate(world, phase):
    """Block the worker's bookkeeping in the repository (worktrees share its hooks, config and info/) until a
    gate file exists: "staging" (a clean filter on hello.txt, run by `git add` while it holds index.lock),
    "committing" (prepare-commit-msg: PatchRelay commits with --no-verify, which skips pre-commit), "moving
    the branch" (reference-transaction, prepared: the commit object exists, HEAD and the branch are locked) or
    "committed" (post-commit: the commit exists, the push has not started)."""
    held_at, gate = world.tmp / "commit-gate.held", world.tmp / "commit-gate"
    wait = f"touch '{held_at}'; while [ ! -e '{gate}' ]; do sleep 0.05; done"
    if phase == "staging":
        git(world.repo, "config", "filter.gate.clean", f"{wait}; cat")
        (world.repo / ".git" / "info").mkdir(exist_ok=True)
        (world.repo / ".git" / "info" / "attributes").write_text("hello.txt filter=gate\n")
    elif phase == "moving the branch":   # only a commit's move of HEAD (old and new differ, old not null)
        hook = world.repo / ".git" / "hooks" / "reference-transaction"
        hook.write_text("#!/bin/sh\n[ \"$1\" = prepared ] || { cat >/dev/null; exit 0; }\n"
                        "while read old new ref; do\n"
                        "  if [ \"$ref\" = HEAD ] && [ \"$old\" != \"$new\" ] && "
                        "[ \"$old\" != " + "0" * 40 + " ]; then\n"
                        f"    {wait}\n  fi\ndone\nexit 0\n")
        hook.chmod(0o755)
    else:
        hook = world.repo / ".git" / "hooks" / {"committing": "prepare-commit-msg", "committed": "post-commit"}[phase]
        hook.write_text(f"#!/bin/sh\n{wait}\nexit 0\n")
        hook.chmod(0o755)
    return held_at, gate


def processes_running(path):
    """Pids of live processes whose command line mentions `path`."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(path).encode() in (p / "cmdline").read_bytes() and pr.proc_start_time(int(p.name)):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


# ----------------------------------------------------------------------------- the kinds of kill
def kill_tick_in_intake(t):
    """The tick takes in a new delegation (one or two issues), or a follow-up prompt in the session of an issue
    whose pull request is open."""
    w = t.world
    w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    what = t.variant(["one delegation", "a follow-up prompt", "two delegations"])
    if what == "two delegations":      # one at a time: both runs read the same model script
        w.write_config(runner={**w.config["runner"], "max_concurrent_runs": 1})
    t.delegate(2 if what == "two delegations" else 1)
    if what == "a follow-up prompt":
        t.tick("first run")
        t.wait_workers()
        t.tick("open the pull request")
        issue, session = t.issues[0]
        w.linear.add_prompt(session, w.alice, "please also add more.txt")
        t.triggers[issue["identifier"]] += 1
    op = t.rng.choice(t.intake_reads())
    hang = 0.4
    delay = t.rng.uniform(0, hang) if t.rng.random() < 0.5 else hang + t.rng.uniform(0, 0.12)
    w.linear.hang_next(hang, operation=op)
    n0 = len(w.linear.requests)
    before = t.db("SELECT COUNT(*) AS n FROM events")
    p = t.start_tick()
    t.wait_linear_op(op, n0)
    time.sleep(delay)
    changed = t.db("SELECT COUNT(*) AS n FROM events") != before
    t.where = f"{what}: {'inside' if delay < hang else 'after'} {op} (+{delay:.2f} s); intake " \
              f"{'committed' if changed else 'not committed'}"
    t.kill_tick(p, n0)


def kill_tick_in_launch(t):
    w = t.world
    w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    t.delegate()
    path, url = w.state / "patchrelay.sqlite", pg_url(w.state)
    # 0 and a few ms mostly land before the spawn (the next ticks then wait out reconcile's 15 s grace for a
    # claim without a worker pid), 3-30 ms around the spawn, more after the pid is recorded
    delay = t.variant([t.rng.uniform(0.003, 0.03), 0, t.rng.uniform(0.03, 0.2), t.rng.uniform(0, 0.003)])
    n0 = len(w.linear.requests)
    p = t.start_tick()
    deadline = time.time() + 30
    con = None
    try:
        while True:
            if con is None and url:
                con = pg_connect(url)
                con.autocommit = True      # each poll sees the latest commit
            elif con is None and path.exists():
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                row = con.execute("SELECT id FROM runs WHERE status = 'claimed'").fetchone() if con else None
            except DB_ERRORS:
                row = None      # the schema is not there yet
            row = list(row.values()) if isinstance(row, dict) else row
            if row:
                break
            if time.time() > deadline or p.poll() is not None:
                t.fail(f"the tick claimed no run (exit {p.poll()})")
            time.sleep(0.001)
        if delay:
            time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        r = con.execute(f"SELECT id, worker_pid FROM runs WHERE id = {int(row[0])}").fetchone()
        r = list(r.values()) if isinstance(r, dict) else r
    finally:
        if con is not None:
            con.close()
    t.note(f"killed tick {p.pid} {delay * 1000:.1f} ms after the claim")
    t.forgive_cut_requests(n0)
    if r[1]:
        t.where = "after the worker pid was recorded"
    elif t.spawned_worker_exists(r[0]):
        t.where = "after the spawn, before the worker pid was recorded"
    else:
        t.where = "after the claim, before the spawn"


def kill_tick_in_publish(t):
    w = t.world
    w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    t.delegate()
    phase = t.variant(["first tick", "pull-request tick"])
    if phase == "pull-request tick":
        t.tick("before the kill")
        t.wait_workers()
    # by root field (Linear's API, not PatchRelay's operation names): an activity, a plan or session link, a move;
    # in the tick that opens the pull request also GitHub's "create a pull request" (before it is recorded)
    ops = ["agentActivityCreate", "agentSessionUpdate", "issueUpdate"]
    op = t.rng.choice(ops + (["POST /repos/acme/app/pulls"] if phase == "pull-request tick" else []))
    hang = 0.5
    delay = t.rng.uniform(0, hang) if t.rng.random() < 0.6 else hang + t.rng.uniform(0, 0.15)
    n0 = len(w.linear.requests)
    if op.startswith("POST "):
        w.github.hang_next(hang, match=op)
        g0 = len(w.github.requests)
        p = t.start_tick()
        t.wait("GitHub's create-pull-request request", lambda: any(
            f"{r['method']} {r['path']}" == op for r in w.github.requests[g0:]), timeout=30, interval=0.002)
    else:
        w.linear.hang_next(hang, operation=op)
        p = t.start_tick()
        t.wait_linear_op(op, n0)
    time.sleep(delay)
    leased = t.db("SELECT id, kind FROM outbox WHERE lease_pid = ?", (p.pid,))
    t.where = f"{phase}: {'inside' if delay < hang else 'after'} {op} (+{delay:.2f} s)" + \
        (f", tick held the lease of outbox {[(o['id'], o['kind']) for o in leased]}" if leased else "")
    t.kill_tick(p, n0)


def kill_worker_before_turn(t):
    w = t.world
    model = w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    hook, held_at, passed, gate = prepare_worktree_gate(w)
    t.gates.append(gate)
    t.delegate()
    t.tick("launch")
    how = t.variant(["start-up", "worktree", "hook"])
    if how == "start-up":
        run = t.worker_of()
        time.sleep(t.rng.uniform(0, 0.8))
        t.where = "worker start-up"
    elif how == "worktree":            # `git worktree add` has made the directory and is filling it
        path = w.tmp / "worktrees" / t.issues[0][0]["identifier"]
        partial = path.with_name(f".{path.name}.partial")       # where it is built before it is moved into place
        t.wait("the worktree directory", lambda: partial.exists() or path.exists(), timeout=30, interval=0.0005)
        run = t.worker_of()
        time.sleep(t.rng.choice([0, t.rng.uniform(0, 0.01)]))
        t.where = "creating the worktree"
    else:
        t.wait("the prepare-worktree hook", held_at.exists, timeout=30)
        run = t.worker_of()
        time.sleep(t.rng.uniform(0, 0.3))
        t.where = "inside the prepare-worktree hook"
    run = t.db("SELECT * FROM runs WHERE id = ?", (run["id"],))[0]
    t.where += f" (run {run['status']}, {'after' if run['started_at'] else 'before'} its first transaction, " \
               f"hook {'running' if held_at.exists() else 'not started'})"
    t.kill_worker(run)
    passed.touch()                     # the next run's hook passes at once; one that was running goes on
    t.no_survivors.append(hook)
    t.expect(not model.requests, f"the model was called before the turn: {len(model.requests)} requests")


def kill_worker_mid_turn(t):
    w = t.world
    model = w.use_codex(HELLO + [held("g", say("Added hello.txt."))] + TAIL)
    t.delegate()
    t.tick("launch")
    try:
        model.wait_held("g", timeout=40)
    except TimeoutError as e:
        t.fail(str(e))
    run = t.wait("the app-server pid", lambda: (lambda r: r if r and r["appserver_pid"] else None)(t.active_run()))
    time.sleep(t.rng.uniform(0, 0.5))
    how = t.variant(["left hanging", "released after the kill", "completed while the worker was frozen"])
    if how == "completed while the worker was frozen":
        os.kill(run["worker_pid"], signal.SIGSTOP)
        model.open("g")
        time.sleep(t.rng.uniform(0.2, 1.5))
    t.kill_worker(run)
    if how == "released after the kill":
        model.open("g")               # the orphaned app-server may still complete the turn
        time.sleep(t.rng.uniform(0, 1.0))
    t.where = f"model request held; the turn {how}"


def kill_worker_in_commit_or_push(t):
    w = t.world
    w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    phase = t.variant(["staging", "committing", "moving the branch", "committed", "push"])
    held_at, gate = push_gate(w) if phase == "push" else commit_gate(w, phase)
    t.delegate()
    t.tick("launch")
    t.wait(f"the worker's git bookkeeping to reach the gate ({phase})", held_at.exists, timeout=60)
    run = t.worker_of()
    time.sleep(t.rng.uniform(0, 0.4))
    t.where = {"staging": "git add held in a clean filter (index.lock taken)",
               "committing": "git commit held in prepare-commit-msg",
               "moving the branch": "git commit held in reference-transaction (HEAD and branch locked)",
               "committed": "commit made, held in post-commit",
               "push": "push held in pre-receive"}[phase]
    t.kill_worker(run)
    gate.touch()


def kill_worker_in_final(t):
    w = t.world
    w.use_codex(HELLO + [say("Added hello.txt.")] + TAIL)
    held_at, gate = push_gate(w)
    t.delegate()
    t.tick("launch")
    t.wait("the push to reach the pre-receive hook", held_at.exists, timeout=60)
    run = t.worker_of()
    hold = t.variant([False, True])
    if hold:                           # the final response goes out slowly
        w.linear.hang_next(0.6, operation="agentActivityCreate")
    gate.touch()
    time.sleep(t.rng.uniform(0, 0.7 if hold else 0.3))
    now = t.db("SELECT status FROM runs WHERE id = ?", (run["id"],))[0]["status"]
    branch = t.db("SELECT branch FROM issues")[0]["branch"]
    on_origin = branch in remote_branches(w.bare)
    leased = t.db("SELECT id, kind FROM outbox WHERE lease_pid = ?", (run["worker_pid"],))
    t.where = f"after the push gate opened: run {now}, branch {'on' if on_origin else 'not on'} origin" + \
        (", final response held" if hold else "") + \
        (f", worker held the lease of outbox {[(o['id'], o['kind']) for o in leased]}" if leased else "")
    t.kill_worker(run)


KILL = {"tick_intake": kill_tick_in_intake, "tick_launch": kill_tick_in_launch, "tick_publish": kill_tick_in_publish,
        "worker_before_turn": kill_worker_before_turn, "worker_mid_turn": kill_worker_mid_turn,
        "worker_commit_push": kill_worker_in_commit_or_push, "worker_final": kill_worker_in_final}


@pytest.mark.parametrize("kind,seed", [pytest.param(k, s, id=f"{k}-seed{s}") for k, s in TRIALS])
def test_kill_9_then_normal_ticks_converge(world, kind, seed):
    t = Trial(world, kind, seed)
    try:
        try:
            KILL[kind](t)
            t.converge()
            t.check()
        except Exception as e:          # anything unexpected still names the seed, the log and the state
            t.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    except BaseException:
        t.record("failed")
        raise
    finally:
        for gate in t.gates:
            gate.touch()
    t.record("converged")
