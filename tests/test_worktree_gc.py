"""Worktrees are reclaimed: a closed issue's worktree (and local branch) goes runner.worktree_retention_hours
after it closed, unless it holds work (kept, and `status` says so); a canceled issue's pushed branch stays on
origin; an issue that comes back gets its worktree rebuilt from the pushed branch. Real git, real Codex."""
import json
from pathlib import Path

from helpers import BRANCH, db_exec, file_at, git, remote_branches, say, tool, wait_done


def implemented(world, retention=0):
    world.config["runner"]["worktree_retention_hours"] = retention
    world.write_config()
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt.")])
    issue, session = world.delegate()
    world.tick_subprocess()
    s = wait_done(world)
    assert Path(s["issue"]["worktree"]).is_dir() and BRANCH in remote_branches(world.bare)
    return issue, s["issue"]["worktree"]


def test_a_canceled_issues_worktree_goes_after_the_retention_and_its_pushed_branch_stays(world):
    issue, path = implemented(world)
    world.linear.update_issue(issue, state="Canceled")
    dry = world.cli("gc", "--dry-run", check=0).stdout                      # before the tick sees the cancel
    assert dry.strip() == "nothing to remove"
    world.tick_subprocess()                                                  # intake: canceled; gc: removed
    assert not Path(path).exists()
    assert git(world.repo, "branch", "--list", BRANCH) == ""                  # the local branch went with it
    assert BRANCH in remote_branches(world.bare)                              # the pushed work stays
    s = world.show("APP-1")
    assert s["issue"]["worktree"] is None
    assert any("removed" in e["message"] and "worktree_retention_hours" in e["message"] for e in s["events"])
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["worktrees"]["count"] == 0 and st["worktrees"]["kept"] == []


def test_gc_dry_run_says_what_it_would_remove_and_removes_nothing(world):
    issue, path = implemented(world, retention=24)
    world.linear.update_issue(issue, state="Canceled")
    world.tick_subprocess()
    assert Path(path).is_dir()                                               # within the retention
    world.config["runner"]["worktree_retention_hours"] = 0
    world.write_config()
    out = world.cli("gc", "--dry-run", check=0).stdout
    assert f"APP-1: would remove worktree {path}" in out and Path(path).is_dir()
    out = world.cli("gc", check=0).stdout
    assert f"APP-1: removed worktree {path}" in out and not Path(path).exists()


def test_a_worktree_that_holds_work_is_kept_and_listed(world):
    issue, path = implemented(world)
    (Path(path) / "notes.txt").write_text("not committed\n")
    world.linear.update_issue(issue, state="Canceled")
    world.tick_subprocess()
    world.tick_subprocess()
    assert (Path(path) / "notes.txt").exists()
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["worktrees"]["kept"] == [{"issue": "APP-1", "worktree": path, "holds": "uncommitted changes"}]
    assert st["worktrees"]["count"] == 1 and st["worktrees"]["bytes"] > 0
    assert f"kept: APP-1 {path} holds uncommitted changes" in world.cli("status", check=0).stdout


def test_an_issue_that_comes_back_gets_its_worktree_rebuilt_from_the_pushed_branch(world):
    issue, path = implemented(world)
    world.linear.update_issue(issue, state="Canceled")
    world.tick_subprocess()
    assert not Path(path).exists()
    world.model.push(tool("echo again >> hello.txt"), say("Continued."))
    world.linear.update_issue(issue, state="Todo")                            # reopened, still delegated
    world.tick_subprocess()
    s = wait_done(world)
    assert s["runs"][0]["status"] == "completed", s["runs"]
    assert file_at(world.bare, BRANCH, "hello.txt") == "hello\nagain\n"      # built on the pushed work


def test_a_merged_prs_remote_branch_is_deleted_unless_github_did(world):
    issue, path = implemented(world)
    db_exec(world.state, "UPDATE issues SET factory_state = 'done' WHERE key = 'APP-1'")
    world.tick_subprocess()
    assert BRANCH not in remote_branches(world.bare)
    events = [e["message"] for e in world.show("APP-1")["events"]]
    assert any(f"remote branch {BRANCH}: deleted" in m for m in events), events
