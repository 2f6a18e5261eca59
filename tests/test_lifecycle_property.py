"""Lifecycle property: whatever people do in Linear, in any order, PatchRelay stays consistent.

Random sequences of what users and operators do (delegate a new issue, un-delegate, re-delegate with a
new agent session, move the issue to each of the team's states, prompt in a session, stop signal,
trusted comment, mention on an issue that is not delegated, `patchrelay stop`, `patchrelay retry`,
a pause) run against the fake Linear (and the fake GitHub, where pushed branches get pull requests), with
ticks in between and REAL workers driving the real Codex CLI against the scripted fake model (the runner
is not paused; runs take a second or two, so ticks land before, during and after them). After every tick:

* the tick exits 0 and prints no traceback;
* every worker ends on its own: no worker log shows a traceback or the CLI's one-line error, and no tick
  has to resolve the run of a dead worker (nothing kills workers here);
* an issue has at most one active (claimed or running) run;
* every issue's factory_state is a state of `patchrelay.TRANSITIONS`;
* no undelivered stop is addressed to a run that has ended (it could never be delivered);
* no run has failed and no error event was recorded (an illegal transition, a dropped pending run...):
  nothing in this world fails (model, git and APIs all answer), so an error is a decision or a race gone
  wrong, never bad luck.

At the end of a sequence, once no worker is alive and nothing is runnable, a brand-new delegation is
acknowledged by a single tick, as on a fresh install, and no Linear write was given up.

Seeds: a few fixed ones plus one drawn per test run (shared by pytest-xdist workers), shown in the test id
and in every failure message. The seed fixes the sequence of actions; the interleaving with the workers
depends on timing. Replay a seed with PATCHRELAY_PROPERTY_SEED=N (it replaces the drawn one:
`-k random`); PATCHRELAY_PROPERTY_STEPS=N changes the number of steps per seed (default 80).
"""
import os
import random
import time
import traceback

import pytest

import patchrelay as pr
from helpers import DB_ERRORS, cli_inproc, db_rows, db_snapshot, drawn_seed, last_events, say, show, tick_result, tool

STEPS = int(os.environ.get("PATCHRELAY_PROPERTY_STEPS") or 80)


RANDOM_SEED = drawn_seed()
SEEDS = [pytest.param(1, id="seed-1"), pytest.param(2, id="seed-2"), pytest.param(3, id="seed-3"),
         pytest.param(RANDOM_SEED, id=f"random-{RANDOM_SEED}")]

STATES = ["Backlog", "Todo", "In Progress", "In Review", "Done", "Canceled"]
ACTIONS = {   # action -> weight
    "new": 3, "undelegate": 1.5, "redelegate": 2, "state": 3.5, "prompt": 2.5, "stop_signal": 1.5,
    "comment": 1.5, "mention": 1, "cli_stop": 1.5, "cli_retry": 1.5, "pause": 2,
}
SHORT_RUN = [tool("echo x >> f.txt"), say("done")]


# ----------------------------------------------------------------------------- the sequence runner
class Sequence:
    def __init__(self, world, seed, steps):
        self.world, self.seed, self.n_steps = world, seed, steps
        self.rng = random.Random(seed)
        self.max_issues = self.rng.randint(2, 4)
        self.issues = {}        # key -> fake Linear issue
        self.sessions = {}      # key -> [agent sessions on it, oldest first]
        self.delegated = {}     # key -> delegated to the app (as this test set it; PatchRelay never changes it)
        self.log = []           # every step, for failure messages
        self.ticks = 0
        self.logs_checked = {}  # worker log path -> bytes already checked
        self.model = world.use_codex(SHORT_RUN * 4)

    # ---- reporting
    def fail(self, what):
        raise AssertionError(self.describe(what))

    def describe(self, what):
        lines = [f"[seed {self.seed}] {what}",
                 f"replay: PATCHRELAY_PROPERTY_SEED={self.seed} pytest tests/test_lifecycle_property.py -k random "
                 f"(steps {self.n_steps}, {self.max_issues} issues)",
                 "", "sequence:"] + [f"  {x}" for x in self.log]
        try:
            lines += ["", "issues:"] + [f"  {r}" for r in self.db(
                "SELECT key, factory_state, linear_state, delegated, pending_run_type, active_run_id FROM issues")]
            lines += ["runs:"] + [f"  {r}" for r in self.db(
                "SELECT id, issue_id, run_type, status, attempt, failure_reason FROM runs ORDER BY id")]
            lines += ["inbox:"] + [f"  {r}" for r in self.db(
                "SELECT id, issue_id, kind, run_id, delivered_at IS NOT NULL AS delivered, delivery FROM inbox")]
            lines += last_events(self.world.state)
        except DB_ERRORS as e:
            lines.append(f"(database unreadable: {e})")
        logs = self.world.state / "logs"
        if logs.is_dir():
            for p in sorted(logs.glob("run-*.log"), key=lambda p: p.stat().st_mtime)[-4:]:
                if not p.name.endswith(".codex.log"):
                    lines += [f"--- {p.name}", p.read_text(errors="replace")[-3000:]]
        return "\n".join(lines)

    def note(self, text):
        self.log.append(f"{len(self.log) + 1:3d}. {text}")

    # ---- reading the database (read-only, one snapshot per call)
    def db(self, sql, args=()):
        return db_rows(self.world.state, sql, args)

    def snapshot(self):
        return db_snapshot(self.world.state, {
            "double_runs": "SELECT issue_id, COUNT(*) AS n, MIN(id) AS first_run, MAX(id) AS last_run FROM runs "
                           "WHERE status IN ('claimed', 'running') GROUP BY issue_id HAVING COUNT(*) > 1",
            "issues": "SELECT id, key, factory_state, pending_run_type, active_run_id, not_before FROM issues",
            "stale_stops": "SELECT i.id, i.issue_id, i.run_id, i.body, r.status FROM inbox i "
                           "JOIN runs r ON r.id = i.run_id WHERE i.kind = 'stop' AND i.delivered_at IS NULL "
                           "AND r.status NOT IN ('claimed', 'running')",
            "active": "SELECT id, issue_id, status, worker_pid, worker_started FROM runs "
                      "WHERE status IN ('claimed', 'running')",
            "workers": "SELECT id, worker_pid, worker_started FROM runs WHERE worker_pid IS NOT NULL",
            "failed": "SELECT id, issue_id, run_type, failure_reason FROM runs WHERE status = 'failed'",
            "errors": "SELECT id, issue_key, run_id, kind, message FROM events WHERE level = 'error'",
        })

    # ---- the invariants, after every tick
    def check(self, where):
        s = self.snapshot()
        if s["double_runs"]:
            self.fail(f"{where}: more than one active run for an issue: {s['double_runs']}")
        bad = [(i["key"], i["factory_state"]) for i in s["issues"] if i["factory_state"] not in pr.TRANSITIONS]
        if bad:
            self.fail(f"{where}: factory_state not in TRANSITIONS: {bad}")
        if s["stale_stops"]:
            self.fail(f"{where}: undelivered stop addressed to a run that has ended: {s['stale_stops']}")
        if s["failed"]:
            self.fail(f"{where}: a run failed in a world where nothing fails: {s['failed']}")
        if s["errors"]:
            self.fail(f"{where}: error events in a world where nothing fails: {s['errors']}")
        self.check_worker_logs(where)
        return s

    def check_worker_logs(self, where):
        logs = self.world.state / "logs"
        if not logs.is_dir():
            return
        for p in logs.glob("run-*.log"):
            if p.name.endswith(".codex.log"):
                continue
            data = p.read_bytes()
            start = self.logs_checked.get(p, 0)
            new = data[start:].decode(errors="replace")
            # a worker ends quietly; "patchrelay: ..." is the CLI's one-line error, i.e. the worker died of it
            if "Traceback" in new or any(line.startswith("patchrelay: ") for line in new.splitlines()):
                self.fail(f"{where}: worker of {p.stem} died of an error:\n{data.decode(errors='replace')[-4000:]}")
            self.logs_checked[p] = start + data[start:].rfind(b"\n") + 1     # re-read a partial last line

    # ---- commands
    def top_up(self):
        if len(self.model.remaining) < 8:
            self.model.push(*SHORT_RUN * 4)

    def tick(self, why=""):
        self.top_up()
        self.ticks += 1
        code, out, err, exc = tick_result(self.world)
        shown = " | ".join(x for x in (out.strip().replace("\n", " | "), err.strip().replace("\n", " | ")) if x)
        self.note(f"tick{f' ({why})' if why else ''} -> exit {code}: {shown[:400]}")
        if exc is not None:
            self.fail(f"tick {self.ticks} raised {type(exc).__name__}: {exc}\n"
                      + "".join(traceback.format_exception(exc)))
        if code != 0:
            self.fail(f"tick {self.ticks} exited {code}\nstdout:\n{out}\nstderr:\n{err}")
        if "Traceback" in out or "Traceback" in err:
            self.fail(f"tick {self.ticks} printed a traceback\nstdout:\n{out}\nstderr:\n{err}")
        if "worker gone" in out or "never started; requeued" in out:
            self.fail(f"tick {self.ticks} had to resolve the run of a worker that died (no worker is killed here)"
                      f"\nstdout:\n{out}")
        return self.check(f"after tick {self.ticks}"), out

    def operator(self, command, key):
        """`patchrelay stop|retry KEY`: 0, or 2 with a one-line message; never a traceback."""
        r = cli_inproc(self.world, command, key)
        text = (r.stdout + r.stderr).strip()
        self.note(f"patchrelay {command} {key} -> exit {r.exit_code}: {text[:300]}")
        if r.exception and not isinstance(r.exception, SystemExit):
            self.fail(f"patchrelay {command} {key} raised {type(r.exception).__name__}: {r.exception}\n"
                      + "".join(traceback.format_exception(r.exception)))
        if r.exit_code not in (0, 2) or "Traceback" in r.output:
            self.fail(f"patchrelay {command} {key} exited {r.exit_code}\n{r.output}")
        if r.exit_code == 2 and (len(r.stderr.strip().splitlines()) != 1 or not r.stderr.startswith("patchrelay: ")):
            self.fail(f"patchrelay {command} {key}: exit 2 without a one-line message: {r.stderr!r}")

    # ---- Linear actions
    def new_issue(self, delegated=True, mention=False):
        lin, w = self.world.linear, self.world
        n = len(self.issues) + 1
        issue = lin.add_issue(w.team, f"Property issue {n}", description=f"Change number {n}",
                              delegate=w.app if delegated else None, creator=w.alice)
        key = issue["identifier"]
        self.issues[key], self.delegated[key], self.sessions[key] = issue, delegated, []
        if delegated or mention:
            body = "please do it" if delegated else f"@PatchRelay what do you think of {key}?"
            self.sessions[key].append(lin.add_session(issue, w.alice, w.app, body=body))
        return key

    def step(self, i):
        rng, lin, w = self.rng, self.world.linear, self.world
        keys = sorted(self.issues)
        room = len(self.issues) < self.max_issues
        while True:
            action = "new" if not keys else rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
            if action == "new" and not room:
                continue
            if action == "mention" and not room and all(self.delegated.values()):
                continue
            break
        key = rng.choice(keys) if keys else None
        issue = self.issues.get(key)
        if action == "new":
            key = self.new_issue()
            self.note(f"delegate new issue {key} (delegate + agent session)")
        elif action == "undelegate":
            lin.update_issue(issue, delegate=None)
            self.delegated[key] = False
            self.note(f"{key}: un-delegate")
        elif action == "redelegate":
            lin.update_issue(issue, delegate=w.app)
            self.delegated[key] = True
            self.sessions[key].append(lin.add_session(issue, w.alice, w.app, body="take it again please"))
            self.note(f"{key}: re-delegate (delegate + new agent session)")
        elif action == "state":
            state = rng.choice(STATES)
            lin.update_issue(issue, state=state)
            self.note(f"{key}: move to {state}")
        elif action in ("prompt", "stop_signal"):
            if not self.sessions[key]:
                self.note(f"{key}: no agent session to prompt in; skipped")
            else:
                sessions = self.sessions[key]
                which = len(sessions) - 1 if rng.random() < 0.7 else rng.randrange(len(sessions))
                if action == "prompt":
                    lin.add_prompt(sessions[which], w.alice, f"please also add line {i}")
                    self.note(f"{key}: prompt in session #{which + 1}")
                else:
                    lin.add_prompt(sessions[which], w.alice, "stop", signal="stop")
                    self.note(f"{key}: stop signal in session #{which + 1}")
        elif action == "comment":
            lin.add_comment(issue, w.alice, f"A note from Alice ({i})")
            self.note(f"{key}: comment by Alice (trusted)")
        elif action == "mention":
            idle = [k for k in keys if not self.delegated[k]]
            if idle:
                key = rng.choice(idle)
                self.sessions[key].append(lin.add_session(self.issues[key], w.alice, w.app,
                                                          body=f"@PatchRelay a thought about {key}"))
                self.note(f"{key}: mention (agent session, not delegated)")
            else:
                key = self.new_issue(delegated=False, mention=True)
                self.note(f"mention on new, not delegated issue {key}")
        elif action in ("cli_stop", "cli_retry"):
            self.operator(action[4:], key)
        elif action == "pause":
            secs = rng.choice([0.3, 0.7, 1.5, 2.5])
            time.sleep(secs)
            self.note(f"pause {secs} s")
        if action == "pause" or rng.random() < 0.7:
            self.tick()

    # ---- the end of a sequence
    def settle(self, timeout=120):
        """Tick until no run is active or runnable and no worker is alive."""
        deadline = time.time() + timeout
        while True:
            snap, _ = self.tick("settling")
            now = pr.iso()
            runnable = [i["key"] for i in snap["issues"] if i["pending_run_type"] and not i["active_run_id"]
                        and i["factory_state"] not in pr.CLOSED_STATES
                        and (not i["not_before"] or i["not_before"] <= now)]
            alive = [r["id"] for r in snap["workers"] if pr.process_alive(r["worker_pid"], r["worker_started"])]
            if not snap["active"] and not runnable and not alive:
                return
            if time.time() > deadline:
                self.fail(f"not settled after {timeout} s: active runs {snap['active']}, runnable {runnable}, "
                          f"live workers of runs {alive}")
            time.sleep(0.4)

    def fresh_delegation_is_acknowledged_at_once(self):
        w = self.world
        issue, session = w.delegate(title="Brand new work after the storm")
        key = issue["identifier"]
        self.note(f"delegate brand-new issue {key}")
        _, out = self.tick("fresh delegation")
        if f"{key}: new agent session -> implementation queued" not in out:
            self.fail(f"{key}: a single tick did not queue the fresh delegation; tick said:\n{out}")
        shown = show(w, key)
        i = shown["issue"]
        if not (i["pending_run"] == "implementation" or i["active_run"] or shown["runs"]):
            self.fail(f"{key}: neither a pending implementation run nor a run after the tick: {i}")
        acks = [o for o in shown["outbox"] if o["kind"] == "activity" and o["payload"]["content"]["type"] == "thought"]
        if not acks:
            self.fail(f"{key}: the tick queued no acknowledgement: {shown['outbox']}")
        # the tick sends it (or, if a worker of the issue holds the session's lane at that moment, the worker)
        deadline = time.time() + 15
        while not [a for a in w.linear.activities(session) if a["content"]["type"] == "thought"]:
            if time.time() > deadline:
                self.fail(f"{key}: no thought activity in its agent session: {w.activity_types(session)}")
            time.sleep(0.1)
        first = w.linear.activities(session)[0]["content"]
        if first["type"] != "thought" or not first["body"].startswith(f"Picked up {key}"):
            self.fail(f"{key}: first activity is not the acknowledgement: {first}")

    def no_linear_write_given_up(self):
        failed = self.db("SELECT id, issue_id, kind, attempts, last_error FROM outbox WHERE status = 'failed'")
        if failed:
            self.fail(f"Linear writes given up: {failed}")

    def run(self):
        for i in range(self.n_steps):
            self.step(i)
        self.settle()
        self.no_linear_write_given_up()
        self.fresh_delegation_is_acknowledged_at_once()


@pytest.mark.parametrize("seed", SEEDS)
def test_any_sequence_of_linear_and_operator_actions_keeps_patchrelay_consistent(world, seed):
    seq = Sequence(world, seed, STEPS)
    t0 = time.time()
    try:
        seq.run()
    finally:
        print(f"seed {seed}: {STEPS} steps, {seq.ticks} ticks, {len(seq.issues)} issues, "
              f"{time.time() - t0:.1f} s")
