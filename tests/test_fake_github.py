"""Tests of the GitHub fake itself (tests/fakes/github.py), not of PatchRelay. Real git, no Codex."""
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from fakes import world as worldlib
from fakes.github import FakeGitHub
from helpers import file_at, git, ops_in, remote_branches

EXAMPLES = Path(__file__).resolve().parent / "schemas" / "github_examples"
TOKEN = "ghp_patchrelay0000000000000000000000000"
REPO = "acme/app"


# ----------------------------------------------------------------------------- helpers
def push(bare, branch, files, message="work", start=None):
    """Commit `files` ({path: text}) on `branch` directly in the bare repository, as a push would, with one
    `git fast-import`. The parent is `start` (a branch), else the branch itself, else main; a `start` that
    is not the branch's ancestor makes it a force push. Returns the new commit sha."""
    parent = git(bare, "rev-parse", "-q", "--verify", f"refs/heads/{start or branch}", check=False) or \
        git(bare, "rev-parse", "refs/heads/main")
    stream = [f"commit refs/heads/{branch}", f"committer Test <test@example.com> {int(time.time())} +0000",
              f"data {len(message.encode())}", message, f"from {parent}"]
    for path, text in files.items():
        stream += [f"M 100644 inline {path}", f"data {len(text.encode())}", text]
    subprocess.run(["git", "fast-import", "--quiet", "--force"], cwd=str(bare), check=True,
                   input=("\n".join(stream) + "\n").encode(), capture_output=True)
    return git(bare, "rev-parse", f"refs/heads/{branch}")


def gql(fake, query, variables=None, token=TOKEN, op=None):
    return requests.post(fake.graphql_url, json={"query": query, "variables": variables or {}, "operationName": op},
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)


def data(fake, query, variables=None, **kw):
    r = gql(fake, query, variables, **kw)
    body = r.json()
    assert r.status_code == 200 and "errors" not in body, body
    return body["data"]


def rest(fake, method, path, token=TOKEN, **kw):
    headers = {"Authorization": f"token {token}", "Accept": "application/vnd.github+json"}
    return requests.request(method, fake.api_url + path, headers=headers, timeout=10, **kw)


@pytest.fixture(scope="module")
def origin_template(tmp_path_factory):
    bare, _ = worldlib.make_origin(tmp_path_factory.mktemp("template"))
    return bare


@pytest.fixture
def w(tmp_path, origin_template):
    """A bare origin with main (copied from a template), served as acme/app (required check "test", merge
    queue) by a started fake; token TOKEN is patchrelay-bot, ghp_alice is alice."""
    bare = tmp_path / "origin.git"
    shutil.copytree(origin_template, bare)
    fake = FakeGitHub(tokens={TOKEN: "patchrelay-bot"})
    fake.add_token("ghp_alice", "alice")
    fake.add_repo(REPO, bare, required_checks=("test",), merge_queue=True)
    fake.start()
    w = type("World", (), {"fake": fake, "bare": bare})()
    yield w
    fake.stop()


def create_pr(w, branch, title="Work", **extra):
    r = rest(w.fake, "POST", f"/repos/{REPO}/pulls", json={"title": title, "head": branch, "base": "main", **extra})
    assert r.status_code == 201, r.text
    return r.json()


BRANCH_QUERY = """
query Branches($owner: String!, $name: String!, $b0: String!, $b1: String!, $b2: String!) {
  repository(owner: $owner, name: $name) {
    b0: pullRequests(headRefName: $b0, states: [OPEN, MERGED], first: 1, orderBy: $order) { ...Heads }
    b1: pullRequests(headRefName: $b1, states: [OPEN, MERGED], first: 1, orderBy: $order) { ...Heads }
    b2: pullRequests(headRefName: $b2, states: [OPEN, MERGED], first: 1, orderBy: $order) { ...Heads }
    n1: pullRequest(number: 1) { headRefOid baseRefOid }
    n3: pullRequest(number: 3) { headRefOid }
  }
}
fragment Heads on PullRequestConnection { nodes { number headRefName headRefOid state } }
""".replace("$order", "{field: UPDATED_AT, direction: DESC}")

ROLLUP_QUERY = """
query Rollup($owner: String!, $name: String!, $n: Int!) {
  repository(owner: $owner, name: $name) {
    pullRequest(number: $n) {
      headRefOid mergeStateStatus
      commits(last: 1) { nodes { commit { oid statusCheckRollup { state contexts(first: 50) {
        totalCount nodes { __typename
          ... on CheckRun { databaseId name status conclusion completedAt isRequired(pullRequestNumber: $n)
                            checkSuite { app { slug } workflowRun { databaseId workflow { name } } } }
          ... on StatusContext { context state } } } } } } }
    }
  }
}
"""


def rollup(w, n=1):
    pr = data(w.fake, ROLLUP_QUERY, {"owner": "acme", "name": "app", "n": n})["repository"]["pullRequest"]
    r = pr["commits"]["nodes"][0]["commit"]["statusCheckRollup"]
    return pr, r


# ----------------------------------------------------------------------------- GraphQL protocol
def test_examples_validate_and_execute(w):
    f = w.fake
    push(w.bare, "feat-a", {"a.txt": "a\n"})
    push(w.bare, "feat-b", {"b.txt": "b\n"})
    a, b = create_pr(w, "feat-a"), create_pr(w, "feat-b")
    f.add_check_run(REPO, a["head"]["sha"], "test", conclusion="FAILURE", log="boom\n")
    f.add_status(REPO, a["head"]["sha"], "ci/lint", "success")
    f.add_review(REPO, a["number"], "alice", "CHANGES_REQUESTED", body="Please fix")
    f.enqueue(REPO, b["number"])
    f.eject(REPO, b["number"], reason="Build failed")
    f.enqueue(REPO, b["number"])

    assert list(ops_in(EXAMPLES / "prs_for_branches.graphql")) == ["PullRequestsForBranches"]
    text = (EXAMPLES / "prs_for_branches.graphql").read_text()
    d = data(f, text, {"owner": "acme", "name": "app", "b0": "feat-a", "b1": "feat-b"}, op="PullRequestsForBranches")
    pa, pb = d["repository"]["b0"]["nodes"][0], d["repository"]["b1"]["nodes"][0]
    assert pa["headRefOid"] == a["head"]["sha"] and pa["reviewDecision"] == "CHANGES_REQUESTED"
    assert pa["mergeStateStatus"] == "BLOCKED" and pa["mergeable"] == "MERGEABLE"
    assert pa["latestOpinionatedReviews"]["nodes"][0]["body"] == "Please fix"
    ctxs = pa["commits"]["nodes"][0]["commit"]["statusCheckRollup"]
    assert ctxs["state"] == "FAILURE"
    assert [n["__typename"] for n in ctxs["contexts"]["nodes"]] == ["CheckRun", "StatusContext"]
    assert ctxs["contexts"]["nodes"][0]["checkSuite"]["app"]["slug"] == "github-actions"
    assert pb["isInMergeQueue"] and pb["mergeQueueEntry"]["position"] == 1
    assert pb["mergeQueueEntry"]["headCommit"]["oid"] != pb["headRefOid"]          # the merge-group commit
    assert [n["__typename"] for n in pb["timelineItems"]["nodes"]] == [
        "AddedToMergeQueueEvent", "RemovedFromMergeQueueEvent", "AddedToMergeQueueEvent"]
    rl = d["rateLimit"]
    assert rl["limit"] == 5000 and rl["cost"] == 1 and rl["remaining"] == 5000 - rl["used"] and rl["nodeCount"] > 0

    mq = data(f, (EXAMPLES / "merge_queue.graphql").read_text(), {"owner": "acme", "name": "app", "branch": "main"})
    entries = mq["repository"]["mergeQueue"]["entries"]["nodes"]
    assert [(e["pullRequest"]["number"], e["state"]) for e in entries] == [(b["number"], "QUEUED")]
    assert f.validation_errors == []


def test_invalid_documents_are_rejected_and_recorded(w):
    f = w.fake
    r = gql(f, "query Bad { viewer { login nope } }")
    assert r.status_code == 400 and "nope" in r.json()["errors"][0]["message"]
    assert f.validation_errors[-1]["operation"] == "Bad"
    r = gql(f, "query P { repository(owner: \"acme\", name: \"app\") { pullRequests(states: [OPEN]) { totalCount } } }")
    assert r.status_code == 400 and r.json()["errors"][0]["type"] == "MISSING_PAGINATION_BOUNDARIES"
    r = gql(f, 'query P($n: Int) { repository(owner: "acme", name: "app") { pullRequests(first: $n) { totalCount } } }',
            {"n": 101})
    assert r.json()["errors"][0]["type"] == "EXCESSIVE_PAGINATION"
    r = gql(f, "query V($n: Int!) { repository(owner: \"acme\", name: \"app\") { pullRequest(number: $n) { id } } }",
            {"n": "one"})
    assert r.status_code == 400
    assert len(f.validation_errors) == 4
    # unknown repository / PR: GitHub-style NOT_FOUND, not a validation error
    r = gql(f, '{ repository(owner: "acme", name: "nope") { id } }')
    body = r.json()
    assert r.status_code == 200 and body["data"] == {"repository": None} and body["errors"][0]["type"] == "NOT_FOUND"
    # a field the fake does not model is loud
    r = gql(f, '{ repository(owner: "acme", name: "app") { issues(first: 1) { totalCount } } }')
    assert "FakeGitHub: unsupported" in r.json()["errors"][0]["message"]
    assert f.validation_errors[-1]["kind"] == "unsupported"


def test_auth(w):
    assert gql(w.fake, "{ viewer { login } }", token="nope").status_code == 401
    r = requests.get(w.fake.api_url + "/user", timeout=5)
    assert r.status_code == 401 and r.json()["message"] == "Bad credentials"
    assert data(w.fake, "{ viewer { login } }")["viewer"]["login"] == "patchrelay-bot"
    assert rest(w.fake, "GET", "/user", token="ghp_alice").json()["login"] == "alice"


def test_batched_aliased_query_reads_head_shas_from_the_bare_repo(w):
    f = w.fake
    shas = {b: push(w.bare, b, {f"{b}.txt": b}) for b in ("feat-a", "feat-b", "feat-c")}
    for b in shas:
        create_pr(w, b)
    v = {"owner": "acme", "name": "app", "b0": "feat-a", "b1": "feat-b", "b2": "feat-c"}
    repo = data(f, BRANCH_QUERY, v)["repository"]
    assert {repo[k]["nodes"][0]["headRefName"]: repo[k]["nodes"][0]["headRefOid"] for k in ("b0", "b1", "b2")} == shas
    assert repo["n1"]["headRefOid"] == shas["feat-a"] and repo["n3"]["headRefOid"] == shas["feat-c"]
    assert repo["n1"]["baseRefOid"] == remote_branches(w.bare)["main"]
    assert f.requests[-1]["aliases"] == 5 and f.requests[-1]["operation"] == "Branches"
    # a later push is seen on the next query; a force push leaves a timeline event
    new_b = push(w.bare, "feat-b", {"more.txt": "x"})
    forced = push(w.bare, "feat-c", {"other.txt": "y"}, start="main")
    repo = data(f, BRANCH_QUERY, v)["repository"]
    assert repo["b1"]["nodes"][0]["headRefOid"] == new_b and repo["b2"]["nodes"][0]["headRefOid"] == forced
    assert [e["__typename"] for e in f.timeline(REPO, 3)] == ["HeadRefForcePushedEvent"]
    assert f.validation_errors == []


# ----------------------------------------------------------------------------- REST
def test_create_pr_validation_and_duplicates(w):
    f = w.fake
    sha = push(w.bare, "feat", {"f.txt": "f"})
    pr = create_pr(w, "acme:feat", body="Closes APP-1", draft=True)
    assert (pr["number"], pr["head"]["ref"], pr["head"]["sha"], pr["base"]["ref"]) == (1, "feat", sha, "main")
    assert pr["html_url"] == "https://github.com/acme/app/pull/1" and pr["state"] == "open" and pr["draft"] is True
    assert pr["node_id"].startswith("PR_") and isinstance(pr["id"], int)
    assert [(c["number"], c["head"], c["login"]) for c in f.created_prs] == [(1, "feat", "patchrelay-bot")]
    r = rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "again", "head": "feat", "base": "main"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["message"] == "A pull request already exists for acme:feat."
    r = rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "x", "head": "nope", "base": "main"})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"resource": "PullRequest", "field": "head", "code": "invalid"}]
    # lookups by head
    listed = rest(f, "GET", f"/repos/{REPO}/pulls", params={"head": "acme:feat", "state": "all"}).json()
    assert [p["number"] for p in listed] == [1]
    assert rest(f, "GET", f"/repos/{REPO}/pulls/1").json()["mergeable_state"] == "draft"
    assert f.validation_errors == []


def test_rest_requests_are_checked_against_the_openapi_description(w):
    f = w.fake
    push(w.bare, "feat", {"f.txt": "f"})
    r = rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "t", "head": "feat", "base": "main", "draft": "yes"})
    assert r.status_code == 422 and "draft" in r.json()["message"]
    r = rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "t", "head": "feat"})
    assert r.status_code == 422 and "base" in r.json()["message"]
    assert rest(f, "GET", f"/repos/{REPO}/pull/1").status_code == 404
    assert rest(f, "GET", f"/repos/{REPO}/pulls", params={"state": "merged"}).status_code == 422
    assert rest(f, "PUT", f"/repos/{REPO}/pulls").status_code == 404
    assert [e["kind"] for e in f.validation_errors] == ["rest"] * 5
    assert not f.prs(REPO)


def test_comments_reviews_and_threads(w):
    f = w.fake
    push(w.bare, "feat", {"f.txt": "f"})
    create_pr(w, "feat")
    r = rest(f, "POST", f"/repos/{REPO}/issues/1/comments", json={"body": "Working on it"})
    assert r.status_code == 201 and r.json()["user"]["login"] == "patchrelay-bot"
    f.add_pr_comment(REPO, 1, "alice", "@patchrelay please rename", association="OWNER")
    f.add_review(REPO, 1, "alice", "CHANGES_REQUESTED", body="See inline",
                 comments=[{"path": "f.txt", "line": 1, "body": "rename this"}])
    q = """query($n: Int!) { repository(owner: "acme", name: "app") { pullRequest(number: $n) {
      reviewDecision
      comments(last: 10) { nodes { body author { login } authorAssociation databaseId } }
      reviews(first: 10, states: [CHANGES_REQUESTED]) { nodes { state body commit { oid }
        comments(first: 10) { nodes { path line body diffHunk author { login } } } } }
      reviewThreads(first: 10) { nodes { id isResolved path line comments(first: 5) { nodes { body } } } } } } }"""
    pr = data(f, q, {"n": 1})["repository"]["pullRequest"]
    assert [c["body"] for c in pr["comments"]["nodes"]] == ["Working on it", "@patchrelay please rename"]
    assert pr["comments"]["nodes"][1]["authorAssociation"] == "OWNER"
    assert pr["reviewDecision"] == "CHANGES_REQUESTED"
    assert pr["reviews"]["nodes"][0]["comments"]["nodes"][0]["path"] == "f.txt"
    thread = pr["reviewThreads"]["nodes"][0]
    assert not thread["isResolved"] and thread["comments"]["nodes"][0]["body"] == "rename this"
    data(f, "mutation($t: ID!) { resolveReviewThread(input: {threadId: $t}) { thread { isResolved } } }",
         {"t": thread["id"]})
    assert f.threads_of(REPO, 1)[0]["isResolved"]
    f.add_review(REPO, 1, "alice", "APPROVED")
    assert data(f, q, {"n": 1})["repository"]["pullRequest"]["reviewDecision"] == "APPROVED"
    assert [c["body"] for c in f.comments_posted] == ["Working on it"]
    listed = rest(f, "GET", f"/repos/{REPO}/issues/1/comments").json()
    assert [c["user"]["login"] for c in listed] == ["patchrelay-bot", "alice"]
    assert f.validation_errors == []


# ----------------------------------------------------------------------------- checks
def test_policy_driven_failing_check_with_a_long_log_and_rerun(w):
    f = w.fake
    long_log = "".join(f"2024-01-01T00:00:{i % 60:02d}Z line {i} of the test output\n" for i in range(20000))

    def policy(sha, fake):
        ok = fake.file_at(REPO, sha, "fixed.txt") is not None
        return [{"name": "test", "conclusion": "SUCCESS" if ok else "FAILURE", "log": "ok\n" if ok else long_log,
                 "title": "tests"},
                {"name": "lint", "conclusion": "SUCCESS"}]
    f.set_check_policy(REPO, policy)
    push(w.bare, "feat", {"f.txt": "f"})
    create_pr(w, "feat")
    pr, r = rollup(w)
    assert r["state"] == "FAILURE" and pr["mergeStateStatus"] == "BLOCKED"
    test = next(n for n in r["contexts"]["nodes"] if n["name"] == "test")
    assert test["conclusion"] == "FAILURE" and test["isRequired"] is True
    assert test["checkSuite"]["workflowRun"]["workflow"]["name"] == "CI"
    job = test["databaseId"]
    resp = rest(f, "GET", f"/repos/{REPO}/actions/jobs/{job}/logs")
    assert resp.history[0].status_code == 302 and "/_logs/" in resp.history[0].headers["Location"]
    assert resp.status_code == 200 and resp.text == long_log
    assert requests.get(resp.history[0].headers["Location"], timeout=5).text == long_log  # no auth needed
    # rerun: same sha, policy again -> still failing, new job id; the rollup shows only the latest run
    assert rest(f, "POST", f"/repos/{REPO}/actions/jobs/{job}/rerun").status_code == 201
    assert f.reruns[0]["job_id"] == job
    _, r = rollup(w)
    runs = [n for n in r["contexts"]["nodes"] if n["name"] == "test"]
    assert len(runs) == 1 and runs[0]["databaseId"] != job and runs[0]["conclusion"] == "FAILURE"
    # the fix is pushed: a new head commit, the policy runs for it
    push(w.bare, "feat", {"fixed.txt": "ok"})
    pr, r = rollup(w)
    assert r["state"] == "SUCCESS" and pr["mergeStateStatus"] == "CLEAN"
    assert f.validation_errors == []


def test_pending_observations_keep_a_check_in_progress(w):
    f = w.fake
    f.set_check_policy(REPO, lambda sha, fake: [{"name": "test", "conclusion": "SUCCESS", "pending_observations": 2}])
    push(w.bare, "feat", {"f.txt": "f"})
    create_pr(w, "feat")
    seen = []
    for _ in range(3):
        _, r = rollup(w)
        n = r["contexts"]["nodes"][0]
        seen.append((r["state"], n["status"], n["conclusion"], n["completedAt"] is not None))
    assert seen == [("PENDING", "IN_PROGRESS", None, False)] * 2 + [("SUCCESS", "COMPLETED", "SUCCESS", True)]


def test_required_checks_rest_and_no_checks_rollup(w):
    f = w.fake
    body = rest(f, "GET", f"/repos/{REPO}/branches/main/protection/required_status_checks").json()
    assert body["contexts"] == ["test"] and body["strict"] is False
    push(w.bare, "feat", {"f.txt": "f"})
    create_pr(w, "feat")
    pr, r = rollup(w)
    assert r is None and pr["mergeStateStatus"] == "BLOCKED"      # required check missing
    assert rest(f, "GET", f"/repos/{REPO}/branches/feat/protection/required_status_checks").status_code == 404
    repo = rest(f, "GET", f"/repos/{REPO}").json()
    assert repo["permissions"]["push"] is True and repo["default_branch"] == "main" and repo["allow_auto_merge"]
    assert f.validation_errors == []


# ----------------------------------------------------------------------------- rate limits and faults
def test_rate_limit_headers_and_secondary_limit(w):
    f = w.fake
    r = rest(f, "GET", "/user")
    assert r.headers["x-ratelimit-resource"] == "core" and r.headers["x-ratelimit-limit"] == "5000"
    assert int(r.headers["x-ratelimit-remaining"]) == 4999 and int(r.headers["x-ratelimit-used"]) == 1
    assert int(r.headers["x-ratelimit-reset"]) > time.time()
    g = gql(f, "{ viewer { login } }")
    assert g.headers["x-ratelimit-resource"] == "graphql" and g.headers["x-ratelimit-remaining"] == "4999"
    f.secondary_limit_next(retry_after=7, match="/user")
    r = rest(f, "GET", "/user")
    assert r.status_code == 403 and r.headers["retry-after"] == "7"
    assert r.json()["message"].startswith("You have exceeded a secondary rate limit")
    f.secondary_limit_next(style="429", match="Viewer")
    assert gql(f, "query Viewer { viewer { login } }").status_code == 429
    assert rest(f, "GET", "/user").status_code == 200
    assert [q["fault"] for q in f.requests] == [None, None, "secondary", "secondary", None]


def test_primary_exhaustion_and_graphql_rate_limited(w):
    f = w.fake
    f.primary_exhausted(reset_in=30)
    r = rest(f, "GET", "/user")
    assert r.status_code == 403 and "API rate limit exceeded" in r.json()["message"]
    assert r.headers["x-ratelimit-remaining"] == "0" and 0 < int(r.headers["x-ratelimit-reset"]) - time.time() <= 31
    g = gql(f, "{ viewer { login } }")
    assert g.status_code == 200 and g.json()["errors"][0]["type"] == "RATE_LIMITED"
    assert rest(f, "GET", "/rate_limit").json()["resources"]["graphql"]["remaining"] == 0
    f.reset_budget()
    assert rest(f, "GET", "/user").status_code == 200
    f.graphql_rate_limited_next()
    g = gql(f, "{ viewer { login } }")
    assert g.status_code == 200 and g.json() == {"errors": [{"type": "RATE_LIMITED", "message": g.json()["errors"][0]
                                                             ["message"]}]}
    assert "viewer" in data(f, "{ viewer { login } }")


def test_fail_malformed_hang_and_drop_after_commit(w):
    f = w.fake
    push(w.bare, "feat", {"f.txt": "f"})
    f.fail_next(status=502)
    assert gql(f, "{ viewer { login } }").status_code == 502
    f.malformed_next(body=b"<html>oops</html>")
    r = gql(f, "{ viewer { login } }")
    assert r.status_code == 200 and r.content == b"<html>oops</html>"
    f.hang_next(0.3, match="/user")
    t = time.time()
    assert rest(f, "GET", "/user").status_code == 200 and time.time() - t >= 0.3
    f.drop_after_commit_next(match="pulls/create")
    with pytest.raises(requests.ConnectionError):
        rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "t", "head": "feat", "base": "main"})
    assert [p["number"] for p in f.prs(REPO)] == [1]               # it was created
    r = rest(f, "POST", f"/repos/{REPO}/pulls", json={"title": "t", "head": "feat", "base": "main"})
    assert r.status_code == 422 and "already exists" in r.json()["errors"][0]["message"]
    assert f.validation_errors == []


# ----------------------------------------------------------------------------- merge queue and merging
def test_enqueue_mutation_eject_and_timeline(w):
    f = w.fake
    push(w.bare, "feat", {"f.txt": "f"})
    pr = create_pr(w, "feat")
    out = data(f, "mutation($id: ID!) { enqueuePullRequest(input: {pullRequestId: $id}) { mergeQueueEntry { "
                  "state position headCommit { oid } } } }", {"id": pr["node_id"]})
    entry = out["enqueuePullRequest"]["mergeQueueEntry"]
    assert entry["state"] == "QUEUED" and entry["position"] == 1
    group = entry["headCommit"]["oid"]
    assert remote_branches(w.bare)[f"gh-readonly-queue/main/pr-1-{pr['base']['sha']}"] == group
    assert f.mutations[0]["name"] == "enqueuePullRequest" and f.mutations[0]["input"]["pullRequestId"] == pr["node_id"]
    f.eject(REPO, 1, reason="The required status check \"test\" failed")
    q = """query { repository(owner: "acme", name: "app") { pullRequest(number: 1) {
      isInMergeQueue mergeQueueEntry { id }
      timelineItems(last: 5, itemTypes: [ADDED_TO_MERGE_QUEUE_EVENT, REMOVED_FROM_MERGE_QUEUE_EVENT, MERGED_EVENT]) {
        nodes { __typename ... on RemovedFromMergeQueueEvent { reason beforeCommit { oid } actor { login } } } }
    } } }"""
    p = data(f, q)["repository"]["pullRequest"]
    assert not p["isInMergeQueue"] and p["mergeQueueEntry"] is None
    assert [n["__typename"] for n in p["timelineItems"]["nodes"]] == ["AddedToMergeQueueEvent",
                                                                      "RemovedFromMergeQueueEvent"]
    removed = p["timelineItems"]["nodes"][1]
    assert removed["reason"] == "The required status check \"test\" failed"
    assert removed["beforeCommit"]["oid"] == pr["head"]["sha"] and removed["actor"]["login"] == "github-merge-queue"
    assert not any(b.startswith("gh-readonly-queue/") for b in remote_branches(w.bare))
    assert f.validation_errors == []


def test_merge_advances_the_base_branch(w):
    f = w.fake
    a = push(w.bare, "feat-a", {"a.txt": "a"})
    push(w.bare, "feat-b", {"b.txt": "b"})
    c = push(w.bare, "feat-c", {"c.txt": "c"})
    push(w.bare, "feat-d", {"README.md": "conflicting\n"})
    for b in ("feat-a", "feat-b", "feat-c", "feat-d"):
        create_pr(w, b)
    f.merge(REPO, 1)                                                  # fast-forward
    assert remote_branches(w.bare)["main"] == a
    f.enqueue(REPO, 2)
    group = f.queue_entry(REPO, 2)["_headOid"]
    f.merge(REPO, 2)                                                  # the merge-group commit lands
    main = remote_branches(w.bare)["main"]
    assert main == group and file_at(w.bare, main, "a.txt") == "a"
    assert file_at(w.bare, main, "b.txt") == "b"
    q = """{ repository(owner: "acme", name: "app") { pullRequests(first: 5, states: [MERGED]) { nodes {
      number state merged mergedAt mergeCommit { oid } timelineItems(first: 5, itemTypes: [MERGED_EVENT]) {
        nodes { ... on MergedEvent { commit { oid } } } } } } } }"""
    nodes = data(f, q)["repository"]["pullRequests"]["nodes"]
    assert [(n["number"], n["state"], n["merged"]) for n in nodes] == [(1, "MERGED", True), (2, "MERGED", True)]
    assert nodes[1]["mergeCommit"]["oid"] == main == nodes[1]["timelineItems"]["nodes"][0]["commit"]["oid"]
    f.merge(REPO, 3)                                                  # not queued, not fast-forward: a merge commit
    merged = remote_branches(w.bare)["main"]
    assert git(w.bare, "rev-list", "--parents", "-n1", merged).split()[1:] == [main, c]
    push(w.bare, "main", {"README.md": "changed on main\n"})
    q4 = '{ repository(owner: "acme", name: "app") { pullRequest(number: 4) { mergeable mergeStateStatus } } }'
    assert data(f, q4)["repository"]["pullRequest"] == {"mergeable": "CONFLICTING", "mergeStateStatus": "DIRTY"}
    with pytest.raises(ValueError, match="conflicts"):
        f.merge(REPO, 4)
    # the head branch is deleted after the merge: the PR keeps its last head oid
    git(w.bare, "update-ref", "-d", "refs/heads/feat-a")
    q = '{ repository(owner: "acme", name: "app") { pullRequest(number: 1) { headRefOid headRef { name } } } }'
    assert data(f, q)["repository"]["pullRequest"] == {"headRefOid": a, "headRef": None}
    assert f.validation_errors == []


def test_rerun_result_sequence_and_fallback(w):
    f = w.fake
    sha = push(w.bare, "feat", {"f.txt": "f"})
    job = f.add_check_run(REPO, sha, "flaky", conclusion="FAILURE",
                          rerun_result=[{"conclusion": "FAILURE", "log": "again\n"}, {"conclusion": "SUCCESS"}])
    jobs = [job]
    for _ in range(3):
        jobs.append(f.rerun(jobs[-1]))
    assert [f.check_runs[j]["_conclusion"] for j in jobs] == ["FAILURE", "FAILURE", "SUCCESS", "SUCCESS"]
    assert f.check_runs[jobs[1]]["log"] == "again\n"
    assert [r["databaseId"] for r in f.check_runs_for(REPO, sha)] == [jobs[-1]]
    assert len(f.check_runs_for(REPO, sha, latest=False)) == 4
