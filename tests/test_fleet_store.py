"""The store on both backends, and what a fleet of hosts relies on: the same store API on SQLite and on a real
PostgreSQL server (tests/pg.py starts one as an unprivileged user), leases read from the database's clock,
claims that never give one run to two hosts, heartbeats, the fence, and `db copy` from SQLite into PostgreSQL."""
import json
import subprocess
import sys
import threading
import time

import pytest

import patchrelay as pr


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A fresh, migrated store of each backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        s = pr.Store(tmp_path / "state" / "unused.sqlite", url=url)
    else:
        s = pr.Store(tmp_path / "state" / "patchrelay.sqlite")
    s.backend = request.param
    yield s
    s.close()


def reopen(s, tmp_path):
    return pr.Store(s.path, url=s.url)


def new_issue(s, key="APP-1", **fields):
    with s.tx():
        return s.insert_issue({"project_id": "app", "linear_id": f"lin-{key}", "key": key, "title": f"Issue {key}",
                               "factory_state": "delegated", **fields})


def test_the_same_store_api_works_on_both_backends(store):
    assert store.schema_version() == len(pr.MIGRATIONS)
    a = new_issue(store, "APP-1", pending_run_type="implementation", delegated=True)
    new_issue(store, "app-2")
    assert store.issue_by_key("app-1")["id"] == a and store.issue_by_key("APP-2")["key"] == "app-2"  # any case
    assert store.issue(a)["delegated"] == 1                      # a bool stored as the integer SQLite keeps
    run_id = store.claim_run(a, host="h1")
    assert run_id and store.claim_run(a, host="h2") is None      # the pending run is gone: no second claim
    run = store.run(run_id)
    assert run["status"] == "claimed" and run["host"] == "h1" and store.issue(a)["host"] == "h1"
    assert store.run_is_current(run_id)
    with store.tx():
        store.update_run(run_id, {"tokens_spent": 3_000_000_000, "status": "running"})   # beyond 32 bits
        store.add_event(a, "run", "100% done, 'quoted' ? and %s", run_id=run_id)
        store.add_event(None, "unrouted", "XYZ-1 delegated; no project routes it", issue_key="XYZ-1")
        store.add_event(None, "unrouted", "XYZ-1 delegated again", issue_key="XYZ-1")
        assert store.add_inbox(a, "prompt", "hi", "alice", "comment", "c1")
        assert not store.add_inbox(a, "prompt", "hi", "alice", "comment", "c1")   # once per source id
        store.mark_seen("k1")
        store.mark_seen("k1")
    assert store.seen("k1") and store.inbox_has_source("c1")
    assert store.tokens_spent() == 3_000_000_000 and isinstance(store.tokens_spent(), int)
    assert [e["message"] for e in store.feed(issue_key="APP-1")] == ["100% done, 'quoted' ? and %s"]
    assert [u["message"] for u in store.unrouted()] == ["XYZ-1 delegated again"]      # the newest per key
    assert [r["id"] for r in store.active_runs(host="h1")] == [run_id] and store.active_runs(host="h2") == []
    assert store.count_active_runs() == 1 and store.count_active_runs(host="h2") == 0
    snap = store.metrics_snapshot(pr.iso(), pr.iso(), pr.utc_day_start())
    assert {(r["run_type"], r["status"], r["n"]) for r in snap["runs"]} == {("implementation", "running", 1)}
    with store.tx():
        store.update_issue(a, {"pending_run_type": "ci_repair"})
    assert store.metrics_snapshot(pr.iso(), pr.iso(), pr.utc_day_start())["pending"] == []   # active: not pending


def test_leases_have_one_holder_until_they_run_out_by_the_databases_clock(store):
    assert store.lease_take("step:intake", "h1", 1.5)
    assert store.lease_take("step:intake", "h1", 1.5)           # the holder renews
    assert not store.lease_take("step:intake", "h2", 1.5)
    assert store.lease_holder("step:intake") == "h1"
    assert store.lease_take("step:observe", "h2", 1.5)           # another step, another holder
    time.sleep(1.7)
    assert store.lease_holder("step:intake") is None
    assert store.lease_take("step:intake", "h2", 30)             # a silent holder's lease is taken over
    store.lease_release("step:intake", "h1")                     # not h1's any more: nothing happens
    assert store.lease_holder("step:intake") == "h2"


def test_heartbeats_make_the_fleet(store):
    store.heartbeat("h1", 100, 2)
    store.heartbeat("h2", 200, 3)
    issue = new_issue(store, pending_run_type="implementation")
    store.claim_run(issue, host="h2")
    store.lease_take("step:intake", "h2", 60)
    hosts = {h["name"]: h for h in store.hosts()}
    assert set(hosts) == {"h1", "h2"}
    assert hosts["h2"]["active_runs"] == 1 and hosts["h1"]["active_runs"] == 0 and hosts["h2"]["max_runs"] == 3
    assert hosts["h2"]["leases"] == ["step:intake"] and hosts["h1"]["leases"] == []
    assert 0 <= hosts["h1"]["silent_seconds"] < 5


def test_a_tick_begins_with_its_row_heartbeat_and_leases_in_one_step(store):
    """begin_tick (one statement on PostgreSQL): the tick's row, the host's heartbeat by the database's clock,
    and the leases it could take; a lease another host holds is named with its holder, and the next tick of
    the same host keeps what it holds."""
    store.heartbeat("h2", 200, 2)
    assert store.lease_take("step:publish", "h2", 60)
    before = store.clock()
    tick_id, holders, now = store.begin_tick(100, None, "h1", 3, ["step:intake", "step:observe", "step:publish"], 30)
    assert before - 1 <= now <= store.clock() + 1
    assert holders == {"step:intake": "h1", "step:observe": "h1", "step:publish": "h2"}
    assert store.last_tick()["id"] == tick_id and store.last_tick()["pid"] == 100
    hosts = {h["name"]: h for h in store.hosts()}
    assert hosts["h1"]["max_runs"] == 3 and hosts["h1"]["pid"] == 100 and hosts["h1"]["silent_seconds"] < 5
    assert hosts["h1"]["leases"] == ["step:intake", "step:observe"]
    tick2, holders2, _ = store.begin_tick(100, None, "h1", 3, ["step:intake", "step:observe", "step:publish"], 30)
    assert tick2 > tick_id and holders2 == holders                       # kept, and still not publish
    _, holders3, _ = store.begin_tick(300, None, "h3", 1, ["step:intake"], 30)
    assert holders3["step:intake"] == "h1"                               # h1's lease runs: h3 takes nothing


def test_each_host_records_its_own_worktrees_and_status_sums_them(store):
    with store.tx():
        store.meta_set("worktrees.usage:h1", json.dumps({"at": pr.iso(), "count": 2, "bytes": 300}))
        store.meta_set("worktrees.usage:h2", json.dumps({"at": pr.iso(), "count": 1, "bytes": 50}))
        store.meta_set("worktrees.kept:h2", json.dumps([{"issue": "APP-9", "worktree": "/w/APP-9",
                                                        "holds": "uncommitted changes"}]))
    got = store.worktrees_recorded()
    assert (got["count"], got["bytes"]) == (3, 350)
    assert [k["issue"] for k in got["kept"]] == ["APP-9"]
    assert got["hosts"]["h1"]["count"] == 2 and got["hosts"]["h2"]["kept"][0]["worktree"] == "/w/APP-9"


def test_migration_12_forgets_the_fleet_wide_worktree_record(tmp_path):
    """An older database's single worktrees.usage (one host's disk, read as the fleet's) goes at the upgrade."""
    import sqlite3
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    for sql in pr.MIGRATIONS[:11]:
        con.executescript(sql)
    con.execute("PRAGMA user_version = 11")
    con.execute("INSERT INTO meta(key, value) VALUES ('worktrees.usage', '{\"count\": 5}'), ('linear.mode', 'app')")
    con.commit()
    con.close()
    s = pr.Store(path)
    try:
        assert s.schema_version() == len(pr.MIGRATIONS)
        assert s.meta_get("worktrees.usage") is None and s.meta_get("linear.mode") == "app"
        assert s.worktrees_recorded()["count"] == 0
    finally:
        s.close()


def test_concurrent_claims_never_give_one_run_to_two_hosts(store, tmp_path):
    """Eight threads, each with its own connection (as hosts have), race to claim 40 pending runs."""
    ids = [new_issue(store, f"APP-{i}", pending_run_type="implementation") for i in range(40)]
    got, errors = [], []

    def host(n):
        s = reopen(store, tmp_path)
        try:
            for i in ids:
                r = s.claim_run(i, host=f"h{n}")
                if r is not None:
                    got.append((i, r, n))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            s.close()
    threads = [threading.Thread(target=host, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(i for i, _, _ in got) == ids                   # every run claimed, each once
    runs = {r["issue_id"]: r for r in store.active_runs()}
    assert len(runs) == 40
    for i, run_id, n in got:
        assert runs[i]["id"] == run_id and runs[i]["host"] == f"h{n}" and store.issue(i)["host"] == f"h{n}"


def test_db_copy_moves_a_sqlite_history_into_an_empty_postgresql_and_refuses_a_full_one(tmp_path, pg_url):
    db = tmp_path / "state" / "patchrelay.sqlite"
    s = pr.Store(db)
    a = new_issue(s, "APP-1", pending_run_type="implementation")
    run_id = s.claim_run(a, host="old")
    with s.tx():
        for n in range(5):
            s.add_event(a, "run", f"event {n}", run_id=run_id)
        s.meta_set("linear.viewer_id", "u1")
    s.close()
    cfg = tmp_path / "patchrelay.yaml"
    cfg.write_text(json.dumps({"database": {"path": str(db)}, "projects": [{"id": "app", "repo_path": str(tmp_path),
                                                                            "github_repo": "acme/app"}]}))

    def cli(*args):
        return subprocess.run([sys.executable, str(pr.Path(pr.__file__)), "--config", str(cfg), *args],
                              capture_output=True, text=True, timeout=120)
    p = cli("db", "copy", "--to", pg_url)
    assert p.returncode == 0, p.stderr
    assert "issues 1" in p.stdout and "runs 1" in p.stdout and "events 5" in p.stdout
    target = pr.Store(db, url=pg_url)
    try:
        assert target.issue_by_key("APP-1")["host"] == "old" and target.meta_get("linear.viewer_id") == "u1"
        assert [e["message"] for e in target.feed()] == [f"event {n}" for n in range(5)]
        b = new_issue(target, "APP-2")                        # ids continue after the copied ones
        assert b > a
        with target.tx():
            target.add_event(b, "run", "after the move")
        assert target.feed()[-1]["id"] > target.feed()[0]["id"]
    finally:
        target.close()
    p = cli("db", "copy", "--to", pg_url)                       # not empty now: refused, nothing written
    assert p.returncode == 2 and "not empty" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1


def test_a_database_url_password_is_never_shown(tmp_path, pg, monkeypatch):
    url = f"postgresql://patchrelay:wrong-secret-pw@127.0.0.1:{pg.port}/postgres"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(pr.StoreError) as e:
        pr.Store(tmp_path / "x.sqlite", url=url)
    assert "wrong-secret-pw" not in str(e.value) and "patchrelay:***@127.0.0.1" in str(e.value)
    cfg = pr.parse_config({"database": {"url": url}, "projects": [{"id": "app", "repo_path": str(tmp_path),
                                                                   "github_repo": "acme/app"}]})
    assert "wrong-secret-pw" not in cfg.database_label and "wrong-secret-pw" not in pr.redact(f"at {url}")
