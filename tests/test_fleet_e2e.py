"""A fleet end to end: three hosts (`patchrelay watch` each, own clone, worktrees, Codex home, HOME and state
directory; tests/fleet.py) on one real PostgreSQL, the real Codex CLI against one fake model answering every
conversation on its own (a tool call that sleeps 3 s and writes fleet-<KEY>.txt, then "Done."), real git, the
fake Linear and the fake GitHub.

Twelve delegations; one host is killed with SIGKILL (its watch, workers and app-servers) in the middle of its
runs. After runner.host_timeout (10 s) the others take its runs over and finish them; the killed host comes
back with the same config and rejoins without redoing anything. In the end every issue has exactly one pull
request with the agent's file on its branch, no implementation completed twice, and the fleet polls Linear as
one host does.
"""
import collections
import datetime as dt
import time

import pytest

from fakes.model import responder_for_issue_files
from fleet import Fleet
from helpers import file_at

pytestmark = pytest.mark.postgres          # the world gets a fresh database on the test worker's PostgreSQL

N_ISSUES, HOSTS, MAX_RUNS, HOST_TIMEOUT, TURN_SLEEP = 12, 3, 2, 10, 3
IDLE_WINDOW = 8.0
REPO = "acme/app"


def ts(value):
    """An ISO timestamp of PatchRelay's (…Z) as epoch seconds."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait_for(fleet, predicate, timeout, what):
    """World.wait_for, and on a timeout every run and issue of the fleet and its hosts' output."""
    try:
        return fleet.world.wait_for(predicate, timeout=timeout, what=what)
    except AssertionError as e:
        timed_out = str(e)
    runs = "\n".join(f"  run {r['id']} {r['key']} {r['run_type']} {r['status']} host={r['host']} "
                     f"reason={r['failure_reason']}" for r in fleet.runs())
    issues = "\n".join(f"  {i['key']} {i['factory_state']} pending={i['pending_run_type']} "
                       f"active={i['active_run_id']} host={i['host']} pr={i['pr_number']}" for i in fleet.issues())
    raise AssertionError(f"{timed_out}\nruns:\n{runs}\nissues:\n{issues}\n{fleet.output()}")


def running_host(fleet):
    """The host with the most runs whose turn has started (mid-run), or None."""
    by_host = collections.Counter(r["host"] for r in fleet.active_runs() if r["status"] == "running")
    return by_host.most_common(1)[0][0] if by_host else None


def completed_impl(fleet):
    """{issue key: [completed implementation runs]}."""
    out = collections.defaultdict(list)
    for r in fleet.runs():
        if r["run_type"] == "implementation" and r["status"] == "completed":
            out[r["key"]].append(r)
    return out


def linear_requests_between(linear, t0, t1):
    with linear.lock:
        return [r for r in linear.requests if t0 <= r["at"] < t1]


def idle_window(world, fleet, seconds):
    """(Linear requests per second, GitHub requests per second, Fleet.tick_steps) over a window of `seconds`."""
    t0 = time.time()
    time.sleep(seconds)
    t1 = time.time()
    lin = len(linear_requests_between(world.linear, t0, t1))
    with world.github.lock:
        gh = sum(1 for r in world.github.requests if t0 <= r["at"] < t1)
    return lin / (t1 - t0), gh / (t1 - t0), fleet.tick_steps(t0, t1)


def test_a_killed_host_s_runs_are_taken_over_and_finished_elsewhere_and_it_rejoins(world):
    t_begin = time.time()
    world.use_codex()
    world.model.responder = responder_for_issue_files(sleep=TURN_SLEEP)
    for n in range(1, N_ISSUES + 1):
        world.delegate(title=f"Fleet task {n}", description=f"Please write the fleet file for task {n}.")
    fleet = Fleet(world, HOSTS, max_runs=MAX_RUNS, host_timeout=HOST_TIMEOUT)
    try:
        fleet.start()

        # ---- one host is killed mid-run
        victim = wait_for(fleet, lambda: running_host(fleet), 90, "a host with a run in progress")
        t_kill = time.time()
        killed_pids = fleet.kill9(victim)
        taken_ids = {r["id"]: r["key"] for r in fleet.active_runs() if r["host"] == victim}
        last_seen = next(float(m["seen_at"]) for m in fleet.members() if m["name"] == victim)
        assert taken_ids, f"{victim} had no active run when killed"
        print(f"\nkilled {victim} at +{t_kill - t_begin:.1f}s with runs {taken_ids} (pids {killed_pids})")

        # ---- after host_timeout the others take its runs over (interrupted, "went silent") and finish them
        def taken_over():
            rows = {r["id"]: r for r in fleet.runs() if r["id"] in taken_ids}
            return rows if all(r["status"] not in ("claimed", "running") for r in rows.values()) else None
        ended = wait_for(fleet, taken_over, HOST_TIMEOUT + 40, f"{victim}'s runs to be taken over")
        for r in ended.values():
            assert r["status"] == "interrupted" and "went silent" in (r["failure_reason"] or ""), r
        t_taken = max(ts(r["ended_at"]) for r in ended.values())
        assert t_taken - last_seen >= HOST_TIMEOUT - 0.5, \
            f"taken over {t_taken - last_seen:.1f}s after {victim}'s last heartbeat, before host_timeout ran out"

        def finished_elsewhere():
            done = completed_impl(fleet)
            return done if all(done.get(k) for k in taken_ids.values()) else None
        done = wait_for(fleet, finished_elsewhere, 100, f"{victim}'s issues to be finished by the others")
        t_finished = max(ts(done[k][0]["ended_at"]) for k in taken_ids.values())
        for key in taken_ids.values():
            assert done[key][0]["host"] != victim, f"{key} was finished by the killed host"
        print(f"last heartbeat {t_kill - last_seen:.1f}s before the kill; kill -> taken over: {t_taken - t_kill:.1f}s; "
              f"kill -> last of its runs finished elsewhere: {t_finished - t_kill:.1f}s (host_timeout {HOST_TIMEOUT}s)")

        # ---- the killed host comes back with the same config and rejoins
        t_restart = time.time()
        finished_at_restart = {k for k, rs in completed_impl(fleet).items() if rs}
        fleet.host(victim).start()

        # ---- until every issue has its pull request
        def all_open():
            issues = fleet.issues()
            prs = world.github.prs(REPO)
            ok = len(issues) == N_ISSUES and all(i["factory_state"] == "pr_open" for i in issues) \
                and len(prs) >= N_ISSUES
            return (issues, prs) if ok else None
        issues, prs = wait_for(fleet, all_open, max(30, 140 - (time.time() - t_begin)),
                               "every issue to have its pull request")
        wait_for(fleet, lambda: any(m["name"] == victim and m["silent"] < 3 for m in fleet.members()), 20,
                 f"{victim}'s heartbeat")

        # ---- each issue: one PR, its branch pushed with the agent's file
        by_branch = collections.Counter(p["headRefName"] for p in prs)
        assert len(prs) == N_ISSUES and all(n == 1 for n in by_branch.values()), by_branch
        for i in issues:
            assert by_branch[i["branch"]] == 1, i["key"]
            assert world.github.pr(REPO, i["pr_number"])["headRefName"] == i["branch"]
            assert file_at(world.bare, i["branch"], f"fleet-{i['key']}.txt") == f"{i['key']}\n", i["key"]

        # ---- runs: one completed implementation per issue; the only interruptions are the take-overs
        runs = fleet.runs()
        done = completed_impl(fleet)
        assert sorted(done) == sorted(i["key"] for i in issues)
        assert {k: len(v) for k, v in done.items() if len(v) != 1} == {}, "an implementation completed twice"
        interrupted = [r for r in runs if r["status"] != "completed"]
        assert {r["id"] for r in interrupted} == set(taken_ids), [
            (r["id"], r["key"], r["status"], r["host"], r["failure_reason"]) for r in interrupted]
        # the restarted host redid nothing: no run claimed after it rejoined for an issue finished before
        redone = [(r["id"], r["key"], r["host"]) for r in runs
                  if r["key"] in finished_at_restart and ts(r["claimed_at"]) >= t_restart]
        assert redone == [], f"runs claimed again for finished issues after {victim} rejoined: {redone}"
        # every run worked in a worktree of its own host (a run taken over never reuses the dead host's)
        homes = {h.name: str(h.dir / "worktrees") + "/" for h in fleet.hosts}
        where = {e["run_id"]: e["message"] for e in fleet.query(
            "SELECT run_id, message FROM events WHERE kind = 'git' AND message LIKE %s", ("worktree %",))}
        for r in runs:
            if r["status"] == "completed":
                assert homes[r["host"]] in where.get(r["id"], ""), (r["id"], r["key"], r["host"], where.get(r["id"]))
        # a fence event may only come from two live hosts racing to take over the same silent run (the loser
        # is fenced off); every worker of the killed host died with it, none got as far as its fence
        fenced = fleet.query("SELECT run_id, message FROM events WHERE kind = 'fleet' AND message LIKE %s",
                             ("%no longer%",))
        assert {e["run_id"] for e in fenced} <= set(taken_ids), fenced
        per_host = collections.Counter(r["host"] for rs in done.values() for r in rs)
        print(f"completed runs per host: {dict(sorted(per_host.items()))}; all {N_ISSUES} PRs open at "
              f"+{time.time() - t_begin:.1f}s")

        # ---- Linear: the fleet polls as one host does (only the intake lease's holder polls)
        wait_for(fleet, lambda: not fleet.query("SELECT id FROM outbox WHERE status = 'queued'"), 20,
                 "the outbox to drain")
        lin3, gh3, tickers3 = idle_window(world, fleet, IDLE_WINDOW)
        holder = fleet.leases().get("step:intake")
        assert holder, "no host holds the intake lease"
        fleet.stop(*[h.name for h in fleet.hosts if h.name != holder])
        time.sleep(1)
        lin1, gh1, tickers1 = idle_window(world, fleet, IDLE_WINDOW)
        print(f"idle Linear requests/s: {lin3:.2f} with {HOSTS} hosts, {lin1:.2f} with 1 host "
              f"(ratio {lin3 / max(lin1, 1e-9):.2f}); GitHub requests/s {gh3:.2f} vs {gh1:.2f}; "
              f"ticks per host: {tickers3} vs {tickers1}")
        assert tickers3.get(victim, {}).get("ticks"), f"the rejoined {victim} did not tick: {tickers3}"
        polled = [h for h, c in tickers3.items() if c.get("intake")]
        assert len(polled) == 1, f"more than one host polled Linear in one idle window: {tickers3}"
        assert lin1 > 0, "the single host made no Linear request while idle"
        # both windows tick on watch's fixed cadence: the holder polls as often as one host (a tick's slack)
        assert lin3 <= 1.1 * lin1 + 0.15, f"the fleet polls Linear more than one host: {lin3:.2f}/s vs {lin1:.2f}/s"
    finally:
        fleet.shutdown()
    print(f"test took {time.time() - t_begin:.1f}s")
