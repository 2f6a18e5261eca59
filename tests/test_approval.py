"""Merging only what a trusted reviewer approved: an approval is pinned to the head it saw.

End to end with the real Codex CLI (fake model), real git and the fake GitHub, which (like a repository without
"dismiss stale approvals") keeps an approval when new commits arrive, so its reviewDecision stays APPROVED.
PatchRelay must hold the line itself: a push after the approval (the agent's repair, a person's commit, a
conflicted merge the agent resolved) needs a new approval; a clean base merge PatchRelay made does not; every
merge request carries expectedHeadOid.
"""
import json

from helpers import BRANCH, bobs_clone, bodies, drive, git, push_to_main, say, tool

REPO = "acme/app"


def merge_requests(world):
    """The merge requests PatchRelay sent: (mutation, expectedHeadOid, error)."""
    return [(m["name"], (m["input"] or {}).get("expectedHeadOid"), m["error"]) for m in world.github.mutations
            if m["name"] in ("enablePullRequestAutoMerge", "enqueuePullRequest")]


def head(world):
    return git(world.bare, "rev-parse", BRANCH).strip()


def person_pushes(world, name="person.txt"):
    """Bob commits to the issue branch on his own clone and pushes."""
    clone = bobs_clone(world, "bob-clone")
    git(clone, "fetch", "-q", "origin")
    git(clone, "checkout", "-q", "-B", BRANCH, f"origin/{BRANCH}")
    (clone / name).write_text("from bob\n")
    git(clone, "add", name)
    git(clone, "commit", "-q", "-m", f"Add {name}")
    git(clone, "push", "-q", "origin", f"HEAD:{BRANCH}")


def auto_merge(world, queue=False, **github):
    world.config["github"].update(auto_merge=True, **github)
    world.write_config()
    world.github.repos[REPO]["_merge_queue"] = queue


def green_pr(world, *script, queue=False):
    """auto_merge on, CI always green, the issue implemented (hello.txt) and its PR open and green; `script`:
    what the agent does in later runs. Returns the Linear session."""
    auto_merge(world, queue=queue)
    world.github.set_check_policy(REPO, lambda sha, f: [{"name": "test", "conclusion": "SUCCESS"}])
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."), *script])
    _, session = world.delegate()
    drive(world, lambda s: s["pull_request"] is not None and s["pull_request"]["ci"] == "success", "green PR")
    return session


def test_an_agent_repair_after_the_approval_needs_a_new_approval_and_the_merge_is_pinned_to_it(world):
    auto_merge(world)
    # CI fails while the branch has hello.txt without fix.txt
    world.github.set_check_policy(REPO, lambda sha, f: [{"name": "test", "conclusion": "FAILURE" if (
        f.file_at(REPO, sha, "hello.txt") is not None and f.file_at(REPO, sha, "fix.txt") is None) else "SUCCESS",
        "log": "FAILED\n"}])
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."),
                     tool("echo fixed > fix.txt"), say("Fixed the test.")])
    _, session = world.delegate()
    drive(world, lambda s: s["pull_request"] is not None, "the PR")
    approved = head(world)
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")         # alice approves head A

    s = drive(world, lambda s: s["pull_request"]["ci"] == "success" and s["pull_request"]["head_sha"] != approved,
              "the CI repair's green head")
    repaired = head(world)
    assert [r["run_type"] for r in reversed(s["runs"])] == ["implementation", "ci_repair"]
    world.tick_subprocess()
    world.tick_subprocess()
    # reviewDecision is still APPROVED on GitHub, but nothing asks GitHub to merge the agent's unreviewed push
    assert world.github.pr(REPO, 1)["state"] == "OPEN" and merge_requests(world) == []
    assert world.issue_state("APP-1") == "pr_open"
    said = [b for b in bodies(world, session, "response") if "new review" in b]
    assert said == [f"I pushed a CI fix after the approval by alice; it needs a new review of `{repaired[:7]}` "
                    "before it can merge."]                                             # said once
    assert world.github.review_requests(REPO, 1) == ["alice"]
    st = json.loads(world.cli("status", "--json", check=0).stdout)
    assert st["issues"][0]["pr"]["waiting_review_of"] == repaired
    why = json.loads(world.cli("why", "APP-1", "--json", check=0).stdout)
    assert f"review {repaired[:8]}" in why["next"]
    assert {"gate": "approval of the head", "ok": False, "value": f"waiting for a review of {repaired}"} \
        in why["gates"]

    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")         # a new approval of B
    s = drive(world, lambda s: s["issue"]["factory_state"] == "awaiting_queue", "the merge request")
    assert merge_requests(world) == [("enablePullRequestAutoMerge", repaired, None)]
    assert s["issue"]["pr"]["waiting_review_of"] is None


def test_a_persons_push_after_the_approval_needs_a_new_approval(world):
    session = green_pr(world)
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    person_pushes(world)                                 # before PatchRelay sees the approval
    pushed = head(world)
    drive(world, lambda s: s["pull_request"]["head_sha"] == pushed, "the person's head")
    world.tick_subprocess()
    assert merge_requests(world) == [] and world.issue_state("APP-1") == "pr_open"
    said = [b for b in bodies(world, session, "response") if "new review" in b]
    assert said == [f"New commits arrived after the approval by alice; `{pushed[:7]}` needs a new review before "
                    "it can merge."]
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    drive(world, lambda s: s["issue"]["factory_state"] == "awaiting_queue", "the merge request")
    assert merge_requests(world) == [("enablePullRequestAutoMerge", pushed, None)]


def test_a_clean_base_merge_by_a_queue_repair_keeps_the_approval(world):
    session = green_pr(world, say("Merged main; nothing conflicted."), queue=True)   # the repair changes nothing
    approved = head(world)
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    drive(world, lambda s: world.github.queue_entry(REPO, 1) is not None, "the PR to be queued")
    push_to_main(world, "other.txt", "from bob\n")
    world.github.eject(REPO, 1, reason="The merge commit could not be created: base moved")
    drive(world, lambda s: any(r["run_type"] == "queue_repair" and r["status"] == "completed" for r in s["runs"]),
          "the queue repair")
    merged = head(world)
    assert git(world.bare, "log", "-1", "--format=%P", BRANCH).split()[0] == approved      # a merge onto A
    drive(world, lambda s: world.github.queue_entry(REPO, 1) is not None, "the PR to be queued again")
    assert merge_requests(world) == [("enqueuePullRequest", approved, None), ("enqueuePullRequest", merged, None)]
    assert world.github.review_requests(REPO, 1) == []
    assert not [b for b in bodies(world, session, "response") if "new review" in b]


def test_a_conflicted_merge_the_agent_resolved_needs_a_new_approval(world):
    session = green_pr(world, tool("echo 'hello from both' > hello.txt"), say("Resolved the conflict in hello.txt."),
                       queue=True)
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    drive(world, lambda s: world.github.queue_entry(REPO, 1) is not None, "the PR to be queued")
    push_to_main(world, "hello.txt", "hello from main\n")                   # conflicts with the branch
    world.github.eject(REPO, 1, reason="The merge commit could not be created: conflicts")
    drive(world, lambda s: any(r["run_type"] == "queue_repair" and r["status"] == "completed"
                               for r in s["runs"]), "the queue repair")
    resolved = head(world)
    drive(world, lambda s: s["pull_request"]["head_sha"] == resolved, "the resolved head")
    world.tick_subprocess()
    assert world.github.queue_entry(REPO, 1) is None
    assert [m[0] for m in merge_requests(world)] == ["enqueuePullRequest"]          # only the first one
    said = [b for b in bodies(world, session, "response") if "new review" in b]
    assert said == [f"I pushed a merge of the base branch that needed the agent after the approval by alice; it "
                    f"needs a new review of `{resolved[:7]}` before it can merge."]
    assert world.github.review_requests(REPO, 1) == ["alice"]


def test_an_approval_from_outside_trusted_reviewers_does_not_count(world):
    world.config["projects"][0]["trusted_reviewers"] = ["alice"]
    green_pr(world)
    world.github.add_review(REPO, 1, "mallory", "APPROVED", association="MEMBER")   # GitHub says APPROVED
    world.tick_subprocess()
    world.tick_subprocess()
    s = world.show("APP-1")
    assert s["pull_request"]["review"] == "APPROVED"
    assert s["issue"]["factory_state"] == "pr_open" and merge_requests(world) == []
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    drive(world, lambda s: s["issue"]["factory_state"] == "awaiting_queue", "the merge request")
    assert merge_requests(world) == [("enablePullRequestAutoMerge", head(world), None)]


def test_a_merge_request_refused_because_the_head_moved_is_decided_again(world):
    session = green_pr(world)
    approved = head(world)
    world.github.add_review(REPO, 1, "alice", "APPROVED", association="MEMBER")
    # between PatchRelay's observation and its merge request, Bob pushes to the branch
    world.github.before_mutation["enablePullRequestAutoMerge"] = lambda: person_pushes(world)
    world.tick_subprocess()
    moved = head(world)
    assert moved != approved
    assert merge_requests(world) == [("enablePullRequestAutoMerge", approved,
                                      "Head branch was modified. Review and try the merge again.")]
    assert world.github.pr(REPO, 1).get("autoMergeRequest") is None
    s = world.show("APP-1")
    assert any("GitHub refused to merge" in e["message"] and "head moved" in e["message"] for e in s["events"])
    drive(world, lambda s: s["pull_request"]["head_sha"] == moved and s["issue"]["factory_state"] == "pr_open",
              "the next observation")
    world.tick_subprocess()
    assert len(merge_requests(world)) == 1                           # nothing asked for the unreviewed head
    assert any(f"`{moved[:7]}` needs a new review" in b for b in bodies(world, session, "response"))
