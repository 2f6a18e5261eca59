"""Tests of the Linear fake itself (tests/fakes/linear.py), not of PatchRelay."""
import time
import uuid
from pathlib import Path

import pytest
import requests

from fakes.linear import FakeLinear
from helpers import ops_in

EXAMPLES = Path(__file__).resolve().parent / "schemas" / "linear_examples"


@pytest.fixture
def w():
    """A small workspace: app user (token lin_app), two humans, teams APP and OPS, a few issues."""
    fake = FakeLinear()
    w = type("World", (), {})()
    w.fake = fake
    w.app = fake.add_user("PatchRelay", app=True, token="lin_app")
    w.alice = fake.add_user("Alice Doe", token="lin_alice")
    w.bob = fake.add_user("Bob Roe")
    w.app_team = fake.add_team("APP", "App")
    w.ops = fake.add_team("OPS", "Ops")
    w.agent_label = fake.add_label("agent", team=w.app_team)
    w.bug = fake.add_label("Bug", team=w.app_team)
    w.i1 = fake.add_issue(w.app_team, "Delegated one", delegate=w.app, creator=w.alice, labels=[w.bug])
    w.i2 = fake.add_issue(w.app_team, "Assigned to app", assignee=w.app, creator=w.alice)
    w.i3 = fake.add_issue(w.app_team, "Labelled", labels=[w.agent_label], creator=w.bob)
    w.i4 = fake.add_issue(w.app_team, "Delegated but done", delegate=w.app, state="Done")
    w.i5 = fake.add_issue(w.ops, "Other team", delegate=w.app)
    w.i6 = fake.add_issue(w.app_team, "Unrelated", assignee=w.bob)
    fake.start()
    yield w
    fake.stop()


def gql(fake, query, variables=None, token="lin_app", op=None, **kw):
    r = requests.post(fake.url, json={"query": query, "variables": variables or {}, "operationName": op},
                      headers={"Authorization": token}, timeout=kw.pop("timeout", 10), **kw)
    return r


def data(fake, query, variables=None, **kw):
    r = gql(fake, query, variables, **kw)
    body = r.json()
    assert r.status_code == 200 and "errors" not in body, body
    return body["data"]


def keys(nodes):
    return sorted(n["identifier"] for n in nodes)


# --------------------------------------------------------------------------- protocol
def test_invalid_field_is_rejected_and_recorded(w):
    r = gql(w.fake, "query Bad { viewer { id nope } }")
    assert r.status_code == 400
    err = r.json()["errors"][0]
    assert err["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED" and "nope" in err["message"]
    assert len(w.fake.validation_errors) == 1 and w.fake.validation_errors[0]["operation"] == "Bad"
    # missing required argument and bad variable types are rejected as well
    assert gql(w.fake, "{ issue { id } }").status_code == 400
    r = gql(w.fake, "query Q($n: Int) { issues(first: $n) { nodes { id } } }", {"n": "many"})
    assert r.status_code == 400 and r.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert len(w.fake.validation_errors) == 3


def test_auth(w):
    r = gql(w.fake, "{ viewer { id } }", token="wrong")
    assert r.status_code == 400
    assert r.json()["errors"][0]["extensions"]["code"] == "AUTHENTICATION_ERROR"
    assert data(w.fake, "{ viewer { id app isMe } }", token="Bearer lin_app")["viewer"] == \
        {"id": w.app["id"], "app": True, "isMe": True}
    assert data(w.fake, "{ viewer { name app } }", token="lin_alice")["viewer"] == {"name": "Alice Doe", "app": False}
    rec = w.fake.requests[-1]
    assert rec["headers"]["Authorization"] == "<redacted>" and rec["viewer"] == w.alice["id"]
    assert w.fake.validation_errors == []


def test_nonnull_fields_get_values_and_not_found_errors(w):
    q = """{ issue(id: "APP-1") { id number priority priorityLabel sortOrder createdAt reactionData
             sharedAccess { isShared } attachments { nodes { id } } team { cyclesEnabled displayName
             membership(userId: "x") { id } issueCount } creator { avatarBackgroundColor initials url } } }"""
    d = data(w.fake, q)["issue"]
    assert d["number"] == 1 and d["team"]["issueCount"] == 5 and d["attachments"]["nodes"] == []
    assert d["createdAt"].endswith("Z") and len(d["createdAt"]) == 24
    r = gql(w.fake, '{ issue(id: "APP-99") { id } }').json()
    assert r["data"] is None and "Entity not found" in r["errors"][0]["message"]


# --------------------------------------------------------------------------- the example operations
def test_examples_validate_and_execute(w):
    f = w.fake
    session = f.add_session(w.i1, w.alice, w.app, body="@PatchRelay please fix")
    before_prompt = f.now().isoformat()
    prompt = f.add_prompt(session, w.alice, "stop please", signal="stop")
    other = f.add_session(w.i3, w.bob, w.bob)  # not ours, older in updatedAt order
    assert other

    sess_ops = ops_in(EXAMPLES / "agent_sessions_poll.graphql")
    d = data(f, sess_ops["RecentAgentSessions"])
    assert d["viewer"]["id"] == w.app["id"]
    nodes = d["agentSessions"]["nodes"]
    assert [n["id"] for n in nodes] == [other["id"], session["id"]]  # newest updatedAt first
    mine = [n for n in nodes if n["appUser"]["id"] == w.app["id"]]
    assert mine[0]["issue"]["identifier"] == "APP-1" and mine[0]["sourceComment"]["body"] == "@PatchRelay please fix"
    assert mine[0]["status"] == "pending" and mine[0]["issue"]["delegate"]["id"] == w.app["id"]

    acts = data(f, sess_ops["SessionActivitiesSince"], {"sessionId": session["id"], "since": before_prompt})
    nodes = acts["agentSession"]["activities"]["nodes"]
    assert nodes == [{"id": prompt["id"], "createdAt": prompt["createdAt"], "signal": "stop",
                      "user": {"id": w.alice["id"], "app": False},
                      "content": {"__typename": "AgentActivityPromptContent", "body": "stop please"}}]

    d = data(f, ops_in(EXAMPLES / "delegated_issues_isme.graphql")["DelegatedToMe"], {"since": "-P1D"})
    assert keys(d["issues"]["nodes"]) == ["APP-1", "APP-4", "OPS-1"]
    assert d["viewer"] == {"id": w.app["id"], "name": "PatchRelay", "app": True}

    d = data(f, ops_in(EXAMPLES / "delegated_issues_since.graphql")["DelegatedIssuesSince"],
             {"since": w.i1["createdAt"], "teamKeys": ["APP"], "appUserId": w.app["id"]})
    assert keys(d["issues"]["nodes"]) == ["APP-1", "APP-2", "APP-3"]
    one = next(n for n in d["issues"]["nodes"] if n["identifier"] == "APP-1")
    assert one["labels"]["nodes"] == [{"id": w.bug["id"], "name": "Bug"}] and one["team"]["key"] == "APP"
    assert one["state"]["name"] == "Todo" and one["branchName"].startswith("app-1-")

    f.add_comment(w.i1, w.bob, "a human comment")
    d = data(f, ops_in(EXAMPLES / "issue_details.graphql")["IssueDetails"], {"id": "APP-1"})["issue"]
    assert d["id"] == w.i1["id"] and len(d["team"]["states"]["nodes"]) == 6
    bodies = [c["body"] for c in d["comments"]["nodes"]]
    assert bodies == ["a human comment", "@PatchRelay please fix"]  # newest first
    assert d["comments"]["nodes"][1]["agentSession"] == {"id": session["id"]}

    d = data(f, ops_in(EXAMPLES / "team_states.graphql")["TeamsAndStates"], {"teamKeys": ["APP"]})
    (team,) = d["teams"]["nodes"]
    started = sorted((s for s in team["states"]["nodes"] if s["type"] == "started"), key=lambda s: s["position"])
    assert started[0]["name"] == "In Progress" and {x["name"] for x in team["labels"]["nodes"]} == {"agent", "Bug"}

    m = ops_in(EXAMPLES / "mutations.graphql")
    d = data(f, m["EmitActivity"], {"sessionId": session["id"], "content": {"type": "thought", "body": "On it"}})
    assert d["agentActivityCreate"]["success"] is True
    assert [a["content"] for a in f.activities(session)] == [{"type": "thought", "body": "On it"}]
    assert f.sessions[session["id"]]["status"] == "active"
    d = data(f, m["UpdatePlan"], {"id": session["id"], "plan": {"steps": [{"content": "x", "status": "pending"}]}})
    assert d["agentSessionUpdate"]["agentSession"]["plan"] == {"steps": [{"content": "x", "status": "pending"}]}
    assert f.plans_for(session) == [{"steps": [{"content": "x", "status": "pending"}]}]
    in_progress = next(s for s in team["states"]["nodes"] if s["name"] == "In Progress")
    old = w.i1["updatedAt"]
    d = data(f, m["MoveIssue"], {"id": w.i1["id"], "stateId": in_progress["id"]})
    assert d["issueUpdate"]["issue"]["state"]["type"] == "started" and w.i1["updatedAt"] > old
    assert f.issue_updates[-1]["input"] == {"stateId": in_progress["id"]}
    d = data(f, m["Comment"], {"issueId": "APP-1", "body": "PR opened"})
    assert d["commentCreate"]["comment"]["body"] == "PR opened"
    assert f.comments_for(w.i1)[-1]["userId"] == w.app["id"]
    d = data(f, m["StartSessionOnIssue"], {"issueId": "APP-2", "externalUrl": "http://x/run"})
    assert d["agentSessionCreateOnIssue"]["agentSession"]["status"] == "pending"
    assert f.validation_errors == [] and f.deprecations == []
    # teams (default first 50) x (states first 100 + labels first 250) is ~22k estimated points, over
    # Linear's reported 10k per-query cap: PatchRelay should pass `first` on teams and smaller label pages.
    assert [x["operation"] for x in f.complexity_warnings] == ["TeamsAndStates"]


# --------------------------------------------------------------------------- filters
ISSUES = "query F($f: IssueFilter) { issues(filter: $f) { nodes { identifier } } }"


@pytest.mark.parametrize("flt,token,expected", [
    (lambda w: {"delegate": {"id": {"eq": w.app["id"]}}}, "lin_app", ["APP-1", "APP-4", "OPS-1"]),
    (lambda w: {"delegate": {"isMe": {"eq": True}}}, "lin_app", ["APP-1", "APP-4", "OPS-1"]),
    (lambda w: {"delegate": {"isMe": {"eq": True}}}, "lin_alice", []),
    (lambda w: {"delegate": {"null": True}, "team": {"key": {"eq": "APP"}}}, "lin_app", ["APP-2", "APP-3", "APP-5"]),
    (lambda w: {"team": {"key": {"in": ["OPS"]}}}, "lin_app", ["OPS-1"]),
    (lambda w: {"labels": {"some": {"name": {"eqIgnoreCase": "AGENT"}}}}, "lin_app", ["APP-3"]),
    (lambda w: {"labels": {"name": {"eq": "Bug"}}}, "lin_app", ["APP-1"]),
    (lambda w: {"id": {"in": [w.i2["id"], "APP-3"]}}, "lin_app", ["APP-2", "APP-3"]),
    (lambda w: {"state": {"type": {"nin": ["completed", "canceled"]}}, "assignee": {"name": {"startsWith": "Bob"}}},
     "lin_app", ["APP-5"]),
    (lambda w: {"or": [{"title": {"containsIgnoreCase": "LABEL"}}, {"creator": {"email": {"eq": "bob-roe@example.com"}}}],
                "and": [{"number": {"lte": 3}}]}, "lin_app", ["APP-3"]),
    (lambda w: {"updatedAt": {"gte": w.i4["updatedAt"]}}, "lin_app", ["APP-4", "APP-5", "OPS-1"]),
    (lambda w: {"updatedAt": {"gt": "-PT1H"}, "createdAt": {"lt": "P1D"}}, "lin_app",
     ["APP-1", "APP-2", "APP-3", "APP-4", "APP-5", "OPS-1"]),
    (lambda w: {"updatedAt": {"lt": "-PT1H"}}, "lin_app", []),
])
def test_issue_filters(w, flt, token, expected):
    d = data(w.fake, ISSUES, {"f": flt(w)}, token=token)
    assert keys(d["issues"]["nodes"]) == expected
    assert w.fake.validation_errors == []


def test_updated_since_follows_update_issue_and_other_filters(w):
    since = w.fake.now().isoformat()
    w.fake.update_issue(w.i2, delegate=w.app)
    w.fake.add_comment(w.i6, w.bob, "hi")
    d = data(w.fake, ISSUES, {"f": {"updatedAt": {"gt": since}}})
    assert keys(d["issues"]["nodes"]) == ["APP-2", "APP-5"]
    d = data(w.fake, """query($s: String!) { agentSession(id: $s) { activities(filter: {type: {eq: "prompt"}}) {
                         nodes { content { ... on AgentActivityPromptContent { body } } } } } }""",
             {"s": w.fake.add_session(w.i1, w.alice, w.app, body="go")["id"]})
    assert d["agentSession"]["activities"]["nodes"] == [{"content": {"body": "go"}}]
    d = data(w.fake, '{ comments(filter: {user: {isMe: {eq: false}}, issue: {id: {eq: "APP-5"}}}) { nodes { body } } }')
    assert d["comments"]["nodes"] == [{"body": "hi"}]
    d = data(w.fake, '{ workflowStates(filter: {team: {key: {eq: "OPS"}}, type: {eq: "started"}}) { nodes { name } } }')
    assert sorted(n["name"] for n in d["workflowStates"]["nodes"]) == ["In Progress", "In Review"]
    r = gql(w.fake, '{ issues(filter: {hasActiveAgentSessions: {eq: true}}) { nodes { id } } }').json()
    assert "FakeLinear: unsupported" in r["errors"][0]["message"]


def test_pagination_pages_to_the_end(w):
    for n in range(7):
        w.fake.add_issue(w.ops, f"extra {n}")
    q = """query P($after: String) { issues(first: 3, after: $after, orderBy: updatedAt) {
             pageInfo { hasNextPage endCursor } edges { cursor node { identifier updatedAt } } } }"""
    seen, after, pages = [], None, 0
    while True:
        conn = data(w.fake, q, {"after": after})["issues"]
        seen += [e["node"] for e in conn["edges"]]
        pages += 1
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
        assert after == conn["edges"][-1]["cursor"]
    assert pages == 5 and len(seen) == 13 == len({s["identifier"] for s in seen})
    assert [s["updatedAt"] for s in seen] == sorted((s["updatedAt"] for s in seen), reverse=True)
    assert seen[0]["identifier"] == "OPS-8"
    # default page size is 50
    for n in range(45):
        w.fake.add_issue(w.ops, f"bulk {n}")
    conn = data(w.fake, "{ issues { nodes { id } pageInfo { hasNextPage } } }")["issues"]
    assert len(conn["nodes"]) == 50 and conn["pageInfo"]["hasNextPage"] is True


# --------------------------------------------------------------------------- mutations
ACT = """mutation A($input: AgentActivityCreateInput!) {
  agentActivityCreate(input: $input) { success lastSyncId agentActivity { id ephemeral signal user { id } } } }"""


def test_duplicate_activity_id_rejected(w):
    s = w.fake.add_session(w.i1, w.alice, w.app)
    aid = str(uuid.uuid4())
    inp = {"id": aid, "agentSessionId": s["id"], "content": {"type": "response", "body": "done"}}
    d = data(w.fake, ACT, {"input": inp})["agentActivityCreate"]
    assert d["agentActivity"] == {"id": aid, "ephemeral": False, "signal": None, "user": {"id": w.app["id"]}}
    r = gql(w.fake, ACT, {"input": inp})
    assert r.status_code == 200 and r.json()["data"] is None
    assert aid in r.json()["errors"][0]["message"] and "already exists" in r.json()["errors"][0]["message"]
    assert len(w.fake.activities(s)) == 1 and w.fake.sessions[s["id"]]["status"] == "complete"
    # the human can't post into the app's session; content is checked
    assert "errors" in gql(w.fake, ACT, {"input": {**inp, "id": None}}, token="lin_alice").json()
    bad = {"agentSessionId": s["id"], "content": {"type": "shout", "body": "x"}}
    assert "errors" in gql(w.fake, ACT, {"input": bad}).json()


def test_activity_accessors_order_and_issue_update_record(w):
    s = w.fake.add_session(w.i1, w.alice, w.app, body="hi")
    for i in range(3):
        data(w.fake, ACT, {"input": {"agentSessionId": s["id"], "content": {"type": "thought", "body": str(i)}}})
    assert [a["content"]["body"] for a in w.fake.activities(s["id"])] == ["0", "1", "2"]
    assert [a["content"]["type"] for a in w.fake.activities(s, include_prompts=True)] == ["prompt"] + ["thought"] * 3
    q = 'mutation($id: String!, $d: String) { issueUpdate(id: $id, input: {delegateId: $d}) { success issue { delegate { id } } } }'
    assert data(w.fake, q, {"id": "APP-2", "d": w.app["id"]})["issueUpdate"]["issue"]["delegate"] == {"id": w.app["id"]}
    assert w.fake.issue_updates[-1]["identifier"] == "APP-2" and w.fake.issue_by_key("app-2")["delegateId"] == w.app["id"]


# --------------------------------------------------------------------------- faults and rate limits
def test_rate_limit_modes_and_headers(w):
    f = w.fake
    r1, r2 = gql(f, "{ viewer { id } }"), gql(f, "{ viewer { id } }")
    rem1 = int(r1.headers["x-ratelimit-requests-remaining"])
    assert int(r2.headers["x-ratelimit-requests-remaining"]) == rem1 - 1
    assert int(r1.headers["x-ratelimit-requests-reset"]) > time.time() * 1000
    assert int(r1.headers["x-ratelimit-complexity-remaining"]) <= int(r1.headers["x-ratelimit-complexity-limit"])

    f.rate_limit_next(style="400", retry_after=7)
    r = gql(f, "{ viewer { id } }")
    assert r.status_code == 400 and r.json()["errors"][0]["extensions"]["code"] == "RATELIMITED"
    assert r.headers["retry-after"] == "7"
    f.rate_limit_next(style="429")
    r = gql(f, "{ viewer { id } }")
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert gql(f, "{ viewer { id } }").status_code == 200  # consumed

    f.set_budget(requests_remaining=1, reset_in=60)
    assert gql(f, "{ viewer { id } }").headers["x-ratelimit-requests-remaining"] == "0"
    r = gql(f, "{ viewer { id } }")
    assert r.status_code == 400 and r.json()["errors"][0]["extensions"]["code"] == "RATELIMITED"
    f.set_budget(requests_remaining=100)
    f.fail_next(2, status=502)
    assert [gql(f, "{ viewer { id } }").status_code for _ in range(3)] == [502, 502, 200]
    assert [r["fault"] for r in f.requests[-3:]] == ["fail", "fail", None]


def test_drop_after_commit_and_hang(w):
    f = w.fake
    s = f.add_session(w.i1, w.alice, w.app)
    f.drop_after_commit_next()
    gql(f, "{ viewer { id } }")  # other operations are not affected
    aid = str(uuid.uuid4())
    with pytest.raises(requests.ConnectionError):
        gql(f, ACT, {"input": {"id": aid, "agentSessionId": s["id"], "content": {"type": "thought", "body": "x"}}})
    assert [a["id"] for a in f.activities(s)] == [aid]  # stored although the client saw no response
    f.hang_next(1.0)
    with pytest.raises(requests.Timeout):
        gql(f, "{ viewer { id } }", timeout=0.2)
    assert gql(f, "{ viewer { id } }").status_code == 200


def test_complexity_estimate_and_cap(w):
    q = "{ issues(first: 250) { nodes { comments(first: 100) { nodes { id body user { id } } } } } }"
    assert gql(w.fake, q).status_code == 200
    assert w.fake.complexity_warnings[-1]["complexity"] > 10_000
    w.fake.max_complexity = 10_000
    r = gql(w.fake, q)
    assert r.status_code == 400 and r.json()["errors"][0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"
    w.fake.validation_errors.clear()
    r = gql(w.fake, ops_in(EXAMPLES / "delegated_issues_since.graphql")["DelegatedIssuesSince"],
            {"since": "-P1D", "teamKeys": ["APP"], "appUserId": w.app["id"]})
    assert 500 < int(r.headers["x-complexity"]) < 1500  # NOTES.md estimates about 800
