"""GitHub property: whatever happens on GitHub, in any order, PatchRelay stays consistent.

One delegated issue gets its pull request; then random sequences of what CI, people and GitHub do run against
the fake GitHub, with ticks in between and REAL workers driving the real Codex CLI against the scripted fake model:
checks that pass, fail, stay pending a while, are flaky (fail, then pass when rerun) or fail on the base branch
too; reviews by a trusted and an untrusted reviewer (approve, request changes); a person's push; the merge queue
taking the PR and ejecting it; the base branch moving (sometimes into a conflict); merge; close; reopen; rate
limits. Every agent step rewrites the file it works on, so a conflicted merge is always resolved. After every tick:

* the tick exits 0 (1 when it reports a rate limit) and prints no traceback, and no worker died of an error;
* an issue has at most one active (claimed or running) run, and its factory_state is in the table;
* no repair budget is exceeded;
* nothing is pushed to the branch while its PR is in the merge queue (only the person's pushes, which this
  test makes only outside the queue, may move it);
* every Linear response that names a head, or a merge, is sent once.
A merged PR ends `done` at the first tick that looks at GitHub (not one waiting out a rate limit), and stays so.

Seeds: fixed ones plus one drawn per test run (shown in the id and every failure). Replay with
PATCHRELAY_PROPERTY_SEED=N (`-k random`); PATCHRELAY_GITHUB_STEPS=N changes the steps per seed (default 50).
"""
import collections
import json
import os
import random
import re
import time
import traceback

import pytest

import patchrelay as pr
from helpers import (BRANCH, bobs_clone, db_rows, drawn_seed, drive, git, issue_row, last_events, say, tick_result,
                     tool)

REPO = "acme/app"
STEPS = int(os.environ.get("PATCHRELAY_GITHUB_STEPS") or 50)
RANDOM_SEED = drawn_seed()
SEEDS = [pytest.param(11, id="seed-11"), pytest.param(12, id="seed-12"), pytest.param(13, id="seed-13"),
         pytest.param(RANDOM_SEED, id=f"random-{RANDOM_SEED}")]
ACTIONS = {"approve": 2, "changes": 1.5, "untrusted": 1, "push": 1, "enqueue": 1.5, "eject": 1.5, "main": 1,
           "conflict": 1, "merge": 0.7, "close": 0.5, "reopen": 0.7, "rate_limit": 0.7, "pause": 2}
BUDGETS = {"ci": "ci_repair_budget", "queue": "queue_repair_budget", "review": "review_fix_budget"}


class GitHubSequence:
    def __init__(self, world, seed, steps):
        self.world, self.seed, self.n_steps = world, seed, steps
        self.rng = random.Random(seed)
        self.log, self.ticks, self.edits, self.main_edits = [], 0, 0, 0
        self.ci = {}                      # sha -> what its checks say (drawn the first time GitHub looks)
        self.merged = False
        self.last = None                  # (in queue, head) at the last check
        self.logs_checked = {}
        cfg = world.config
        cfg["github"].update(auto_merge=True, ci_repair_budget=2, queue_repair_budget=2, review_fix_budget=2,
                             review_quiet_seconds=0, poll_interval=0)
        cfg["projects"][0]["trusted_reviewers"] = ["alice"]
        world.write_config()
        world.github.repos[REPO]["_merge_queue"] = True
        world.github.set_check_policy(REPO, self.checks)
        self.model = world.use_codex(self.work(8))

    # ---- the world's behaviour
    def work(self, n):
        out = []
        for _ in range(n):
            self.edits += 1
            out += [tool(f"printf 'edit {self.edits}\\n' > work.txt"), say(f"Edit {self.edits}.")]
        return out

    def checks(self, sha, fake):
        if sha not in self.ci:
            on_main = fake.file_at(REPO, sha, "work.txt") is None
            kind = "pass" if on_main and self.rng.random() < 0.85 else self.rng.choices(
                ["pass", "fail", "flaky", "pending"], weights=[5, 2.5, 1.5, 1])[0]
            self.ci[sha] = kind
        kind = self.ci[sha]
        if kind == "pass":
            return [{"name": "test", "conclusion": "SUCCESS"}]
        if kind == "pending":
            return [{"name": "test", "conclusion": "SUCCESS", "pending_observations": 2}]
        return [{"name": "test", "conclusion": "FAILURE", "log": f"test failed on {sha[:8]}\n",
                 "rerun_result": {"conclusion": "SUCCESS" if kind == "flaky" else "FAILURE"}}]

    # ---- reporting
    def note(self, text):
        self.log.append(f"{len(self.log) + 1:3d}. {text}")

    def fail(self, what):
        lines = [f"[seed {self.seed}] {what}",
                 f"replay: PATCHRELAY_PROPERTY_SEED={self.seed} pytest tests/test_github_property.py -k random", "",
                 "sequence:"] + [f"  {x}" for x in self.log]
        lines += ["issues:"] + [f"  {r}" for r in db_rows(self.world.state, "SELECT key, factory_state, pr_state, "
                                                          "pr_ci, pending_run_type, repair_counts FROM issues")]
        lines += ["runs:"] + [f"  {r}" for r in db_rows(self.world.state, "SELECT id, run_type, status, "
                                                        "failure_reason FROM runs ORDER BY id")]
        lines += last_events(self.world.state)
        raise AssertionError("\n".join(lines))

    # ---- the invariants
    def head(self):
        return git(self.world.bare, "rev-parse", BRANCH).strip()

    def check(self, where, observed=True):
        w = self.world
        active = db_rows(w.state, "SELECT issue_id, COUNT(*) AS n FROM runs WHERE status IN ('claimed', 'running') "
                                  "GROUP BY issue_id HAVING COUNT(*) > 1")
        if active:
            self.fail(f"{where}: more than one active run for an issue: {active}")
        row = issue_row(w)
        if row["factory_state"] not in pr.TRANSITIONS:
            self.fail(f"{where}: factory_state {row['factory_state']} is not in the table")
        for signature, used in json.loads(row["repair_counts"] or "{}").items():
            budget = w.config["github"][BUDGETS[signature.split(":")[0]]]
            if used > budget:
                self.fail(f"{where}: repair budget exceeded: {signature} used {used} of {budget}")
        queued, head = bool(w.github.queue_entry(REPO, 1)), self.head()
        if self.last and self.last[0] and queued and head != self.last[1] and not self.pushed_since:
            self.fail(f"{where}: the branch moved from {self.last[1][:8]} to {head[:8]} while the PR was queued")
        self.last, self.pushed_since = (queued, head), False
        said = [a["content"]["body"] for a in w.linear.activities(self.session) if a["content"]["type"] == "response"]
        once = [b for b, n in collections.Counter(said).items()
                if n > 1 and (re.search(r"\b[0-9a-f]{7,40}\b", b) or "was merged" in b)]
        if once:
            self.fail(f"{where}: Linear responses sent more than once: {once}")
        if self.merged and observed and row["factory_state"] != "done" and not row["active_run_id"] \
                and not row["pending_run_type"]:
            self.fail(f"{where}: the PR merged but the issue is {row['factory_state']}")
        self.check_worker_logs(where)

    def check_worker_logs(self, where):
        logs = self.world.state / "logs"
        for p in logs.glob("run-*.log") if logs.is_dir() else ():
            if p.name.endswith(".codex.log"):
                continue
            data = p.read_bytes()
            start = self.logs_checked.get(p, 0)
            if "Traceback" in data[start:].decode(errors="replace"):
                self.fail(f"{where}: worker of {p.stem} died of an error:\n{data.decode(errors='replace')[-4000:]}")
            self.logs_checked[p] = start + data[start:].rfind(b"\n") + 1

    def tick(self, why=""):
        if len(self.model.remaining) < 6:
            self.model.push(*self.work(6))
        self.ticks += 1
        code, out, err, exc = tick_result(self.world)
        self.note(f"tick{f' ({why})' if why else ''} -> exit {code}: {(out + err).strip()[:300]!r}")
        if exc is not None:
            self.fail(f"tick {self.ticks} raised {type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)))
        limited = code == 1 and err.strip() and all("rate limit" in ln for ln in err.strip().splitlines())
        if (code != 0 and not limited) or "Traceback" in out + err:   # a rate limit is reported, exit 1
            self.fail(f"tick {self.ticks} exited {code}\nstdout:\n{out}\nstderr:\n{err}")
        # a tick that waits out GitHub's rate limit has not looked at the PR: a merge is seen by a later one
        self.check(f"after tick {self.ticks}", observed="rate limit" not in out + err)

    # ---- GitHub actions
    def pr_state(self):
        return self.world.github.pr(REPO, 1)["state"]

    def main_moves(self, conflict):
        w = self.world
        other = bobs_clone(w, "main-clone")
        git(other, "pull", "-q", "origin", "main")
        self.main_edits += 1
        name = "work.txt" if conflict else f"main-{self.main_edits}.txt"
        (other / name).write_text(f"from main {self.main_edits}\n")
        git(other, "add", name)
        git(other, "commit", "-q", "-m", f"main {self.main_edits}")
        git(other, "push", "-q", "origin", "HEAD:main")

    def person_pushes(self):
        w = self.world
        clone = bobs_clone(w, "bob-clone")
        git(clone, "fetch", "-q", "origin")
        git(clone, "checkout", "-q", "-B", BRANCH, f"origin/{BRANCH}")
        self.main_edits += 1
        (clone / "bob.txt").write_text(f"bob {self.main_edits}\n")
        git(clone, "add", "bob.txt")
        git(clone, "commit", "-q", "-m", "bob")
        git(clone, "push", "-q", "origin", f"HEAD:{BRANCH}")
        self.pushed_since = True

    def step(self):
        rng, gh = self.rng, self.world.github
        action = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        state, queued = self.pr_state(), bool(gh.queue_entry(REPO, 1))
        if action in ("approve", "changes", "untrusted") and state == "OPEN":
            who, what = ("mallory", "APPROVED") if action == "untrusted" else \
                ("alice", "APPROVED" if action == "approve" else "CHANGES_REQUESTED")
            gh.add_review(REPO, 1, who, what, body="" if what == "APPROVED" else "Please change work.txt",
                          association="MEMBER")
            self.note(f"{who} {what.lower()}")
        elif action == "push" and state == "OPEN" and not queued and not issue_row(self.world)["active_run_id"]:
            # a person pushes while no run of ours is busy (else their push may be refused as non-fast-forward
            # by the run's own push, as on GitHub; test_github covers a person's push during a repair)
            self.person_pushes()
            self.note("a person pushes to the branch")
        elif action == "enqueue" and state == "OPEN" and not queued and not issue_row(self.world)["active_run_id"]:
            # a person queues an idle PR (a worker asks GitHub right before it pushes; a PR queued in the
            # milliseconds between that answer and the push is not this test's subject)
            try:
                gh.enqueue(REPO, 1)
                self.note("a person puts the PR in the merge queue")
            except ValueError as e:
                self.note(f"enqueue refused: {e}")
        elif action == "eject" and queued:
            gh.eject(REPO, 1, reason="The merge commit could not be created")
            self.note("the merge queue ejects the PR")
        elif action in ("main", "conflict"):
            self.main_moves(conflict=action == "conflict")
            self.note(f"main moves{' (conflicting)' if action == 'conflict' else ''}")
        elif action == "merge" and state == "OPEN":
            try:
                gh.merge(REPO, 1)
                self.merged = True
                self.note("the PR is merged")
            except ValueError as e:
                self.note(f"merge refused: {e}")
        elif action == "close" and state == "OPEN" and not queued:
            gh.close(REPO, 1)
            self.note("the PR is closed")
        elif action == "reopen" and state == "CLOSED":
            gh.reopen(REPO, 1)
            self.note("the PR is reopened")
        elif action == "rate_limit":
            gh.graphql_rate_limited_next(1, reset_in=1)
            self.note("GitHub's GraphQL budget runs out for a second")
        elif action == "pause":
            secs = rng.choice([0.3, 1.0, 2.0])
            time.sleep(secs)
            self.note(f"pause {secs} s")
        else:
            self.note(f"{action}: not possible now; skipped")
        if action == "pause" or rng.random() < 0.8:
            self.tick()

    def settle(self, timeout=180):
        deadline = time.time() + timeout
        while True:
            self.tick("settling")
            row = issue_row(self.world)
            alive = [r for r in db_rows(self.world.state, "SELECT worker_pid, worker_started FROM runs")
                     if pr.process_alive(r["worker_pid"], r["worker_started"])]
            if not row["active_run_id"] and not row["pending_run_type"] and not alive:
                return row
            if time.time() > deadline:
                self.fail(f"not settled after {timeout} s")
            time.sleep(0.5)

    def run(self):
        _, self.session = self.world.delegate()
        self.pushed_since = False
        drive(self.world, lambda s: s["pull_request"] is not None, "the pull request")
        self.note("the issue is implemented and its PR is open")
        for _ in range(self.n_steps):
            if self.merged:
                break
            self.step()
        row = self.settle()
        if self.merged and row["factory_state"] != "done":
            self.fail(f"the PR merged but the issue ended {row['factory_state']}")


@pytest.mark.parametrize("seed", SEEDS)
def test_any_sequence_of_github_events_keeps_patchrelay_consistent(world, seed):
    seq = GitHubSequence(world, seed, STEPS)
    t0 = time.time()
    try:
        seq.run()
    finally:
        print(f"seed {seed}: {len(seq.log)} steps, {seq.ticks} ticks, CI outcomes "
              f"{dict(collections.Counter(seq.ci.values()))}, merged {seq.merged}, {time.time() - t0:.1f} s")
