"""FakeLinear: an in-process Linear GraphQL API for PatchRelay's tests.

Every request is parsed and ``validate()``d against Linear's real SDL (``tests/schemas/linear.graphql``,
a verbatim copy of ``@linear/sdk``'s ``schema.graphql``), its variables are coerced, and the document is
then *executed* by graphql-core against plain in-memory dicts, so any valid query shape works.

    fake = FakeLinear().start()                     # 127.0.0.1:<free port>; fake.url ends in /graphql
    app = fake.add_user("PatchRelay", app=True, token="lin_app")   # or FakeLinear(tokens={"lin_app": id})
    alice = fake.add_user("Alice")
    team = fake.add_team("APP")
    issue = fake.add_issue(team, "Fix it", delegate=app, creator=alice)        # APP-1
    session = fake.add_session(issue, alice, app, body="@PatchRelay please fix")
    ... run the CLI with LINEAR_API_KEY=lin_app, api_url=fake.url ...
    assert fake.validation_errors == []
    assert [a["content"]["type"] for a in fake.activities(session)] == ["thought", ...]
    fake.stop()

Behaviour worth knowing (documented choices, not necessarily Linear's):
* Auth: ``Authorization: <key>`` or ``Bearer <key>``, the key being one of ``tokens`` or an OAuth access
  token (below). Unknown, expired or revoked -> HTTP 400 AUTHENTICATION_ERROR.
* Parse / validation / variable-coercion errors -> HTTP 400 (``GRAPHQL_PARSE_FAILED``,
  ``GRAPHQL_VALIDATION_FAILED``, ``BAD_USER_INPUT``) and appended to ``self.validation_errors``.
  Complexity is estimated like Linear's (3rd-party) description: 0.1/property, 1/object, connection
  children x ``first``/``last`` (default 50). Above 10,000 (Linear's reported per-query cap) the request
  is listed in ``self.complexity_warnings``; with ``max_complexity=N`` it is rejected like a validation
  error (HTTP 400 QUERY_TOO_COMPLEX). Off by default because the formula is not verified.
  Use of deprecated fields is only recorded in ``self.deprecations``.
* Resolver errors (entity not found, duplicate activity id, bad input) -> HTTP 200 with ``errors``.
  A filter key or argument the fake does not implement is an error saying "FakeLinear: unsupported",
  never silently ignored.
* Connections: ``nodes``, ``edges{node cursor}``, ``pageInfo``. ``first``/``after`` and
  ``last``/``before`` paging, default page 50, opaque keyset cursors (stable when rows change).
  **Order: ``orderBy`` createdAt (the default) or updatedAt, always NEWEST FIRST (descending)**,
  ties broken by creation sequence. This includes ``Team.states`` and ``Issue.comments``, so
  clients must sort by ``position``/``createdAt`` themselves if they care.
* Filters (IssueFilter, CommentFilter, AgentActivityFilter, WorkflowStateFilter, TeamFilter,
  UserFilter, IssueLabelFilter): comparators eq neq in nin gt gte lt lte eqIgnoreCase neqIgnoreCase
  contains notContains containsIgnoreCase notContainsIgnoreCase startsWith(IgnoreCase) notStartsWith
  endsWith notEndsWith null; ``and``/``or``; relations (team, state, delegate, assignee, creator, user,
  issue, parent, sourceComment) with ``null``; collections (labels, children, comments, members) with
  ``some``/``every``/``length``/``null`` (plain field keys on a collection mean "some").
  ``isMe`` compares with the request's viewer. Dates compare as datetimes; inputs may be ISO-8601
  datetimes, a bare year/date, or durations relative to now ("-P1D", "-PT5M", "P2W1D").
  A comparator whose value is null (e.g. ``{gte: $since}`` with $since null) is ignored.
  ``IssueFilter.id`` accepts a UUID or an identifier.
* Timestamps are ISO-8601 strings with milliseconds and ``Z``, from a monotonic clock: every write
  is at least 1 ms after the previous one. ``advance(seconds)`` moves the clock forward.
* Sessions: ``agentActivityCreate`` (only by the session's app user, never ``prompt`` content) moves
  ``status`` like Linear does: thought/action -> active, elicitation -> awaitingInput,
  response -> complete, error -> error; sets startedAt/endedAt, bumps session updatedAt.
  Prompts (``add_prompt``) only bump updatedAt; use ``update_session`` for anything else.
  ``Query.agentSessions`` returns every session in the workspace (filter on ``appUser`` yourself).
* Every response has a ``Date`` header (RFC 7231) from the fake's clock, ``now()``: after ``advance()`` it
  differs from the real time the way a server's clock can differ from the client's.
* Every normal response has x-ratelimit-{requests,complexity}-{limit,remaining,reset} (reset in epoch
  ms) and x-complexity. Remaining requests drop by 1 and complexity by the estimate per request; when
  requests remaining is 0 (``set_budget``) the fake answers 400 RATELIMITED until the reset time.

OAuth 2.0, as Linear does it since April 2026 (every app gets refresh tokens). ``add_oauth_app(client_id,
client_secret, app_user, token_lifetime=86400, redirect_uris=(...))``; ``authorize(client_id, redirect_uri,
scope=, actor="app", state=None)`` stands in for the admin's browser and returns the redirect URL with
``?code=`` (``authorize_code`` returns just the code: single use, 600 s). ``POST /oauth/token`` takes a
form body (JSON -> 400 invalid_request), client credentials as form fields or HTTP Basic (bad -> 401
invalid_client), ``grant_type`` authorization_code (code + the same redirect_uri) or refresh_token, and
answers {access_token "lin_oauth_...", token_type, expires_in, scope (space separated), refresh_token
"lin_refresh_..."}. Refresh tokens ROTATE: the one used dies at once, reusing it -> 400 invalid_grant; the
previous access token lives on until its own expiry. Access tokens expire ``token_lifetime`` seconds after
issue in REAL time (time.time(), not ``now()``/``advance()``); ``oauth_lifetime(client_id, s)`` changes it
for later tokens. ``POST /oauth/revoke`` (form ``token=``, auth by ``Bearer <access token>`` or client
credentials, none -> 401) kills every token of that token's grant; unknown tokens get 200 too. These
endpoints are not GraphQL: they land in ``oauth_log`` ({path, grant_type, result "issued" | "revoked" |
"issued-dropped" | error code, at, client_id}), never in ``requests``; helpers ``refreshes()``,
``refused_grants()``, ``live_refresh_tokens(client_id=None)``. Faults: ``oauth_delay`` (seconds between
deciding a /oauth/token request, rotation included, and answering it) and ``oauth_drop_next_refresh(n=1)``
(rotates, then closes the socket unanswered, as if PatchRelay died right after Linear answered).

Model: plain dicts held in ``users/teams/states/labels/issues/comments/sessions/activities``
(id -> dict). Relations are stored as ids (``issue["teamId"]``, ``["stateId"]``, ``["delegateId"]``,
``["assigneeId"]``, ``["creatorId"]``, ``["labelIds"]``; ``comment["userId"]``, ``["issueId"]``,
``["agentSessionId"]``; ``session["issueId"]``, ``["appUserId"]``, ``["creatorId"]``, ``["commentId"]``;
``activity["agentSessionId"]``, ``["userId"]``, ``["content"]``). Helpers return these live dicts.

Records: ``requests`` (one dict per HTTP request: operation, query, variables, headers with the token
redacted, fields, viewer, status, fault, complexity, request_bytes and response_bytes: the sizes of the
request and response bodies; response_bytes stays None for a dropped connection), ``validation_errors``,
``deprecations``, ``complexity_warnings``,
``issue_updates`` ({id, identifier, input, user, at}), ``plans`` (session id -> [plan, ...]).

Fault injection (each entry is consumed by the request(s) it hits; ``operation`` optionally limits it to
requests whose operation name or a root field equals it, ``when`` to requests whose record (see Records;
``variables`` already filled in) it returns true for, e.g. ``when=lambda r: (r["variables"] or {}).get("after")``
for a follow-up page):
``fail_next(n, status)``, ``rate_limit_next(n, style="400"|"429", retry_after)``,
``drop_after_commit_next(n, operation="agentActivityCreate")`` (executes, then closes the socket without a
response), ``hang_next(seconds, n)`` (sleeps, then answers normally).
"""
from __future__ import annotations

import base64
import copy
import hmac
import json
import re
import secrets
import threading
import time
import unicodedata
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, unquote_plus, urlencode

from graphql import (GraphQLEnumType, GraphQLError, GraphQLList, GraphQLNonNull, GraphQLObjectType,
                     GraphQLScalarType, build_schema, execute, get_named_type, get_nullable_type,
                     get_operation_ast)
from graphql.execution.values import get_variable_values
from graphql.language import (FieldNode, FragmentDefinitionNode, FragmentSpreadNode, InlineFragmentNode,
                              IntValueNode, OperationType, VariableNode)

from .gql import CheckedDocuments
from .http import Handler, Server, close_connections

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "linear.graphql"
DEFAULT_STATES = [("Backlog", "backlog"), ("Todo", "unstarted"), ("In Progress", "started"),
                  ("In Review", "started"), ("Done", "completed"), ("Canceled", "canceled")]
ACTIVITY_TYPENAMES = {t: f"AgentActivity{t.capitalize()}Content"
                      for t in ("thought", "action", "response", "error", "elicitation", "prompt")}
STATUS_AFTER = {"thought": "active", "action": "active", "elicitation": "awaitingInput",
                "response": "complete", "error": "error"}

_schema_lock = threading.Lock()
_schema_cache = {}


_checked_document = CheckedDocuments(lambda: get_schema())


def get_schema():
    """The Linear schema, built once per process (the SDL is 1.2 MB, about 1.5 s)."""
    with _schema_lock:
        if "schema" not in _schema_cache:
            _schema_cache["schema"] = build_schema(SCHEMA_PATH.read_text())
        return _schema_cache["schema"]


# ----------------------------------------------------------------------------- small helpers
def _iso(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:40] or "x"


_DURATION = re.compile(r"^([+-])?P(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?"
                       r"(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
                       r"(?:(\d+(?:\.\d+)?)S)?)?$")


def _err(message, code="INVALID_INPUT", **ext):
    return GraphQLError(message, extensions={"code": code, "type": "invalid input",
                                             "userPresentableMessage": message, **ext})


def _unsupported(what):
    return GraphQLError(f"FakeLinear: unsupported {what}", extensions={"code": "FAKE_UNSUPPORTED"})


def _ref(x):
    """A dict entity or an id -> id (None stays None)."""
    return x["id"] if isinstance(x, dict) else x


# --------------------------------------------------------------------------------- filters
# kind -> {"scalar": {field: (type, getter)}, "rel": {field: (kind, getter)}, "coll": {field: (kind, getter)}}
# getters take (fake, obj, ctx).
def _g(key):
    return lambda f, o, c: o.get(key)


def _user_of(key):
    return lambda f, o, c: f.users.get(o.get(key))


KINDS = {
    "issue": {
        "scalar": {"id": ("issueid", lambda f, o, c: (o["id"], o["identifier"])), "title": ("str", _g("title")),
                   "description": ("str", _g("description")), "number": ("num", _g("number")),
                   "priority": ("num", _g("priority")), "estimate": ("num", _g("estimate")),
                   **{k: ("date", _g(k)) for k in ("createdAt", "updatedAt", "startedAt", "completedAt",
                                                   "canceledAt", "archivedAt", "triagedAt", "snoozedUntilAt")}},
        "rel": {"team": ("team", lambda f, o, c: f.teams.get(o["teamId"])),
                "state": ("state", lambda f, o, c: f.states.get(o["stateId"])),
                "delegate": ("user", _user_of("delegateId")), "assignee": ("user", _user_of("assigneeId")),
                "creator": ("user", _user_of("creatorId")), "snoozedBy": ("user", _user_of("snoozedById")),
                "parent": ("issue", lambda f, o, c: f.issues.get(o.get("parentId")))},
        "coll": {"labels": ("label", lambda f, o, c: [f.labels[i] for i in o["labelIds"] if i in f.labels]),
                 "children": ("issue", lambda f, o, c: [i for i in f.issues.values() if i.get("parentId") == o["id"]]),
                 "comments": ("comment", lambda f, o, c: [x for x in f.comments.values() if x["issueId"] == o["id"]])},
    },
    "user": {
        "scalar": {"id": ("id", _g("id")), "name": ("str", _g("name")), "displayName": ("str", _g("displayName")),
                   "email": ("str", _g("email")), "app": ("bool", _g("app")), "active": ("bool", _g("active")),
                   "admin": ("bool", _g("admin")), "owner": ("bool", _g("owner")),
                   "invited": ("bool", lambda f, o, c: False), "isInvited": ("bool", lambda f, o, c: False),
                   "isMe": ("bool", lambda f, o, c: o["id"] == c["viewer"]["id"]),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt"))},
        "rel": {},
        "coll": {"assignedIssues": ("issue", lambda f, o, c: [i for i in f.issues.values()
                                                               if i.get("assigneeId") == o["id"]])},
    },
    "team": {
        "scalar": {"id": ("id", _g("id")), "key": ("str", _g("key")), "name": ("str", _g("name")),
                   "description": ("str", _g("description")), "private": ("bool", _g("private")),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt")),
                   "retiredAt": ("date", _g("retiredAt"))},
        "rel": {},
        "coll": {"members": ("user", lambda f, o, c: f._members(o)), "users": ("user", lambda f, o, c: f._members(o)),
                 "issues": ("issue", lambda f, o, c: [i for i in f.issues.values() if i["teamId"] == o["id"]])},
    },
    "state": {
        "scalar": {"id": ("id", _g("id")), "name": ("str", _g("name")), "type": ("str", _g("type")),
                   "position": ("num", _g("position")), "description": ("str", _g("description")),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt"))},
        "rel": {"team": ("team", lambda f, o, c: f.teams.get(o["teamId"]))},
        "coll": {"issues": ("issue", lambda f, o, c: [i for i in f.issues.values() if i["stateId"] == o["id"]])},
    },
    "label": {
        "scalar": {"id": ("id", _g("id")), "name": ("str", _g("name")), "isGroup": ("bool", _g("isGroup")),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt"))},
        "rel": {"team": ("team", lambda f, o, c: f.teams.get(o.get("teamId"))),
                "creator": ("user", _user_of("creatorId")),
                "parent": ("label", lambda f, o, c: f.labels.get(o.get("parentId")))},
        "coll": {},
    },
    "comment": {
        "scalar": {"id": ("id", _g("id")), "body": ("str", _g("body")),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt"))},
        "rel": {"user": ("user", _user_of("userId")), "issue": ("issue", lambda f, o, c: f.issues.get(o["issueId"])),
                "parent": ("comment", lambda f, o, c: f.comments.get(o.get("parentId")))},
        "coll": {},
    },
    "activity": {
        "scalar": {"id": ("id", _g("id")), "agentSessionId": ("str", _g("agentSessionId")),
                   "type": ("str", lambda f, o, c: o["content"].get("type")),
                   "createdAt": ("date", _g("createdAt")), "updatedAt": ("date", _g("updatedAt"))},
        "rel": {"sourceComment": ("comment", lambda f, o, c: f.comments.get(o.get("sourceCommentId")))},
        "coll": {},
    },
    "session": {"scalar": {}, "rel": {}, "coll": {}},
}


class FakeLinear:
    """See the module docstring."""

    def __init__(self, tokens=None, host="127.0.0.1", port=0, max_complexity=None, org="fake"):
        self.tokens = dict(tokens or {})
        self.host, self.port, self.org = host, port, org
        self.max_complexity = max_complexity
        self.lock = threading.RLock()
        self.users, self.teams, self.states, self.labels = {}, {}, {}, {}
        self.issues, self.comments, self.sessions, self.activities_by_id = {}, {}, {}, {}
        self.requests, self.validation_errors, self.deprecations = [], [], []
        self.issue_updates, self.plans, self.complexity_warnings = [], {}, []
        self._faults = []
        self.faults_taken = []      # the operation names of the requests a fault was applied to
        self._seq = 0
        self._sync_id = 1000
        self._clock_offset = timedelta(0)
        self._last_ts = self._last_read = datetime.fromtimestamp(0, timezone.utc)
        self._stopping = threading.Event()
        self._budget = {"requests_limit": 5000, "complexity_limit": 2_000_000,
                        "requests_remaining": 5000, "complexity_remaining": 2_000_000, "reset_ms": None}
        self._httpd = None
        self._thread = None
        self._conns = set()
        self.url = None
        # OAuth 2.0: apps (client_id -> app), codes, grants (one per authorization), tokens (token -> record)
        self.oauth_apps, self._oauth_codes, self._oauth_grants = {}, {}, {}
        self.oauth_access, self.oauth_refresh, self.oauth_log = {}, {}, []
        self.oauth_delay = 0.0
        self._oauth_drop_refreshes = 0

    # ------------------------------------------------------------------ server lifecycle
    def start(self):
        get_schema()
        self._stopping.clear()
        self._httpd = Server((self.host, self.port), _Handler)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}/graphql"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="FakeLinear",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        close_connections(self)

    def __enter__(self):
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clock / ids
    def _real_now(self):
        t = datetime.now(timezone.utc) + self._clock_offset
        return t.replace(microsecond=t.microsecond // 1000 * 1000)

    def now(self):
        """Current fake time (real UTC now + advance(), whole ms). Every later write is strictly after it."""
        with self.lock:
            t = max(self._real_now(), self._last_ts)
            self._last_read = t
            return t

    def _stamp(self):
        with self.lock:
            t = self._real_now()
            if t <= self._last_ts or t <= self._last_read:
                t = max(self._last_ts, self._last_read) + timedelta(milliseconds=1)
            self._last_ts = t
            return _iso(t)

    def advance(self, seconds):
        """Move the fake clock forward (affects timestamps and "-P1D"-style durations)."""
        with self.lock:
            self._clock_offset += timedelta(seconds=seconds)

    def _next_seq(self):
        self._seq += 1
        return self._seq

    def _sync(self):
        self._sync_id += 1
        return float(self._sync_id)

    def _base(self, typename, id=None):
        ts = self._stamp()
        return {"__typename": typename, "id": id or str(uuid.uuid4()), "createdAt": ts, "updatedAt": ts,
                "archivedAt": None, "_seq": self._next_seq()}

    def _touch(self, obj):
        obj["updatedAt"] = self._stamp()

    # ------------------------------------------------------------------ model helpers
    def add_user(self, name, email=None, app=False, id=None, token=None, display_name=None, **extra):
        """Create a user (an app/agent user with app=True). token= registers an API key for it."""
        with self.lock:
            u = self._base("User", id)
            u.update(name=name, displayName=display_name or (name if app else name.split()[0].lower()),
                     email=email or (f"{_slug(name)}@oauthapp.linear.app" if app else f"{_slug(name)}@example.com"),
                     app=bool(app), active=True, admin=False, owner=False, guest=False, isAssignable=True,
                     isMentionable=True, supportsAgentSessions=bool(app), avatarBackgroundColor="#5e6ad2",
                     initials="".join(p[0] for p in name.split()[:2]).upper() or "X",
                     url=f"https://linear.app/{self.org}/profiles/{_slug(name)}", inviteHash="fake",
                     canAccessAnyPublicTeam=True, hasGitHubCodeAccess=False, createdIssueCount=0, **extra)
            self.users[u["id"]] = u
            if token:
                self.tokens[token] = u["id"]
            return u

    def add_token(self, token, user):
        with self.lock:
            self.tokens[token] = _ref(user)

    def add_team(self, key, name=None, states=None, members=None, id=None):
        """states: [(name, type) | (name, type, position) | dict]; members: users (None = everyone)."""
        with self.lock:
            t = self._base("Team", id)
            t.update(key=key, name=name or key.title(), displayName=name or key.title(), description=None,
                     private=False, timezone="UTC", color="#5e6ad2", icon=None, cyclesEnabled=False,
                     triageEnabled=False, issueEstimationType="notUsed", visibility="public",
                     memberIds=None if members is None else [_ref(m) for m in members], _next_number=1)
            self.teams[t["id"]] = t
            for pos, spec in enumerate(states or DEFAULT_STATES):
                if isinstance(spec, dict):
                    spec = (spec["name"], spec["type"], spec.get("position", pos))
                s = self._base("WorkflowState")
                s.update(name=spec[0], type=spec[1], position=float(spec[2] if len(spec) > 2 else pos),
                         teamId=t["id"], color="#bec2c8", description=None)
                self.states[s["id"]] = s
            return t

    def add_label(self, name, team=None, color="#eb5757", id=None):
        """An issue label; team=None makes a workspace label (Team.labels lists only team labels)."""
        with self.lock:
            lab = self._base("IssueLabel", id)
            lab.update(name=name, color=color, teamId=_ref(team), isGroup=False, description=None,
                       creatorId=None, parentId=None)
            self.labels[lab["id"]] = lab
            return lab

    def add_issue(self, team, title, description="", delegate=None, assignee=None, labels=(), state="Todo",
                  creator=None, priority=0, parent=None, id=None):
        with self.lock:
            team = self._team(team)
            n = team["_next_number"]
            team["_next_number"] += 1
            i = self._base("Issue", id)
            ident = f"{team['key']}-{n}"
            i.update(identifier=ident, number=float(n), title=title, description=description, teamId=team["id"],
                     stateId=self._state(team, state)["id"], delegateId=_ref(delegate), assigneeId=_ref(assignee),
                     creatorId=_ref(creator), labelIds=[self._label(x)["id"] for x in labels],
                     parentId=_ref(parent), priority=float(priority), estimate=None,
                     url=f"https://linear.app/{self.org}/issue/{ident}/{_slug(title)}",
                     branchName=f"{ident.lower()}-{_slug(title)}", startedAt=None, completedAt=None,
                     canceledAt=None, sortOrder=0.0, boardOrder=0.0, prioritySortOrder=0.0,
                     customerTicketCount=0, previousIdentifiers=[], reactionData={}, reactions=[],
                     inheritsSharedAccess=False)
            i["priorityLabel"] = ["No priority", "Urgent", "High", "Medium", "Low"][int(priority) % 5]
            self.issues[i["id"]] = i
            return i

    def update_issue(self, issue, **fields):
        """Change an issue as a human would: delegate/assignee/creator=user|id|None, state=name|dict|id,
        labels=[label|name|id], team=...; any other key (title, description, priority...) is set as-is."""
        with self.lock:
            i = self._issue(issue)
            for k, v in fields.items():
                if k in ("delegate", "assignee", "creator", "parent"):
                    i[k + "Id"] = _ref(v)
                elif k == "state":
                    self._set_state(i, self._state(self.teams[i["teamId"]], v))
                elif k == "labels":
                    i["labelIds"] = [self._label(x)["id"] for x in v]
                elif k == "team":
                    i["teamId"] = self._team(v)["id"]
                else:
                    i[k] = v
            self._touch(i)
            return i

    def add_comment(self, issue, user, body, session=None, parent=None, id=None):
        with self.lock:
            i = self._issue(issue)
            c = self._base("Comment", id)
            c.update(body=body, bodyData=json.dumps({"type": "doc", "text": body}), userId=_ref(user),
                     issueId=i["id"], parentId=_ref(parent), agentSessionId=_ref(session), editedAt=None,
                     resolvedAt=None, url=f"{i['url']}#comment-{c['id'][:8]}", reactionData={}, reactions=[],
                     hideInLinear=False, isArtificialAgentSessionRoot=False, quotedText=None)
            self.comments[c["id"]] = c
            self._touch(i)
            return c

    def edit_comment(self, comment, body):
        """A person edits a comment: new body, editedAt and updatedAt now (the issue is not touched)."""
        with self.lock:
            c = self.comments[_ref(comment)]
            ts = self._stamp()
            c.update(body=body, bodyData=json.dumps({"type": "doc", "text": body}), editedAt=ts, updatedAt=ts)
            return c

    def add_session(self, issue, creator, app_user, body=None, status="pending", id=None):
        """An AgentSession (as Linear creates on mention/delegation). With body: a source comment by
        creator (comment.agentSession = the session) and an initial prompt activity by creator."""
        with self.lock:
            i = self._issue(issue)
            s = self._base("AgentSession", id)
            s.update(status=status, issueId=i["id"], appUserId=_ref(app_user), creatorId=_ref(creator),
                     commentId=None, sourceCommentId=None, plan=None, externalUrls=[], externalLink=None,
                     startedAt=None, endedAt=None, dismissedAt=None, summary=None, context={},
                     sourceMetadata=None, slugId=s["id"][:8], type="commentThread",
                     url=f"{i['url']}#agent-session-{s['id'][:8]}")
            self.sessions[s["id"]] = s
            self.plans[s["id"]] = []
            if body is not None:
                c = self.add_comment(i, creator, body, session=s)
                s["commentId"] = s["sourceCommentId"] = c["id"]
                self._new_activity(s, creator, {"type": "prompt", "body": body}, source_comment=c, bump=False)
            return s

    def update_session(self, session, **fields):
        with self.lock:
            s = self._session(session)
            s.update(fields)
            self._touch(s)
            return s

    def add_prompt(self, session, user, body, signal=None, comment=False):
        """A user prompt in the session (content type prompt, optional signal e.g. "stop").
        comment=True also posts the thread reply comment Linear shows for it (as sourceComment)."""
        with self.lock:
            s = self._session(session)
            c = None
            if comment:
                c = self.add_comment(s["issueId"], user, body, session=s, parent=s.get("commentId"))
            return self._new_activity(s, user, {"type": "prompt", "body": body}, signal=signal, source_comment=c)

    def _new_activity(self, s, user, content, id=None, signal=None, ephemeral=False, signal_metadata=None,
                      source_comment=None, bump=True):
        a = self._base("AgentActivity", id)
        a.update(agentSessionId=s["id"], content=dict(content), ephemeral=bool(ephemeral), signal=signal,
                 signalMetadata=signal_metadata, userId=_ref(user), sourceCommentId=_ref(source_comment),
                 queued=False, sentAt=None, contextualMetadata=None, sourceMetadata=None)
        self.activities_by_id[a["id"]] = a
        if bump:
            self._touch(s)
        return a

    # ------------------------------------------------------------------ accessors
    def activities(self, session_or_id, include_prompts=False):
        """Agent-authored activities of a session (content type != prompt), in creation order."""
        sid = _ref(session_or_id)
        with self.lock:
            acts = sorted((a for a in self.activities_by_id.values() if a["agentSessionId"] == sid),
                          key=lambda a: a["_seq"])
            return [a for a in acts if include_prompts or a["content"].get("type") != "prompt"]

    def plans_for(self, session_or_id):
        return list(self.plans.get(_ref(session_or_id), []))

    def issue_by_key(self, key):
        with self.lock:
            for i in self.issues.values():
                if i["identifier"].lower() == key.lower():
                    return i
            raise KeyError(key)

    def comments_for(self, issue):
        iid = self._issue(issue)["id"]
        return sorted((c for c in self.comments.values() if c["issueId"] == iid), key=lambda c: c["_seq"])

    def state_of(self, issue):
        return self.states[self._issue(issue)["stateId"]]

    def operations(self):
        """Operation names (or root fields) of all requests so far, in order."""
        return [r["operation"] for r in self.requests]

    # ------------------------------------------------------------------ fault injection / budget
    def _add_fault(self, kind, n, operation=None, when=None, **kw):
        with self.lock:
            self._faults.append({"kind": kind, "left": n, "operation": operation, "when": when, **kw})

    def fail_next(self, n=1, status=500, operation=None, when=None):
        """The next n (matching) requests get a plain HTTP error (no execution)."""
        self._add_fault("fail", n, operation, when, status=status)

    def rate_limit_next(self, n=1, style="400", retry_after=None, operation=None, when=None):
        """style "400": HTTP 400, errors[0].extensions.code RATELIMITED; "429": plain HTTP 429."""
        assert style in ("400", "429"), style
        self._add_fault("ratelimit", n, operation, when, style=style, retry_after=retry_after)

    def drop_after_commit_next(self, n=1, operation="agentActivityCreate", when=None):
        """Execute the next n matching requests, then close the socket without any response."""
        self._add_fault("drop", n, operation, when)

    def reply_next(self, body, n=1, status=200, operation=None, content_type="application/json", when=None):
        """Answer the next n matching requests with `body` (bytes, or any JSON value) without executing them:
        odd shapes such as a JSON string, {"data": null}, {"data": {}}, {"errors": "boom"}, an HTML error
        page or truncated JSON."""
        self._add_fault("reply", n, operation, when, body=body, status=status, content_type=content_type)

    def hang_next(self, seconds, n=1, operation=None, when=None):
        """Sleep `seconds` before handling the next n matching requests (then answer normally)."""
        self._add_fault("hang", n, operation, when, seconds=seconds)

    def set_budget(self, requests_remaining=None, complexity_remaining=None, requests_limit=None,
                   complexity_limit=None, reset_in=None):
        """Control the rate-limit headers; reset_in = seconds from now until the budget refills."""
        with self.lock:
            b = self._budget
            for k, v in (("requests_remaining", requests_remaining), ("complexity_remaining", complexity_remaining),
                         ("requests_limit", requests_limit), ("complexity_limit", complexity_limit)):
                if v is not None:
                    b[k] = v
            if reset_in is not None:
                b["reset_ms"] = int((time.time() + reset_in) * 1000)

    def _take_fault(self, kinds, names, rec=None):
        with self.lock:
            for f in self._faults:
                if f["kind"] in kinds and (f["operation"] is None or f["operation"] in names) \
                        and (f.get("when") is None or (rec is not None and f["when"](rec))):
                    f["left"] -= 1
                    if f["left"] <= 0:
                        self._faults.remove(f)
                    self.faults_taken.append(f["operation"] or "/".join(sorted(names)))
                    return f
        return None

    def _budget_headers(self, cost=0):
        with self.lock:
            b = self._budget
            now_ms = int(time.time() * 1000)
            if b["reset_ms"] is None or now_ms >= b["reset_ms"]:
                if b["reset_ms"] is not None:
                    b["requests_remaining"], b["complexity_remaining"] = b["requests_limit"], b["complexity_limit"]
                b["reset_ms"] = now_ms + 3_600_000
            b["requests_remaining"] = max(0, b["requests_remaining"] - 1)
            b["complexity_remaining"] = max(0, b["complexity_remaining"] - int(cost))
            return {"x-ratelimit-requests-limit": b["requests_limit"],
                    "x-ratelimit-requests-remaining": b["requests_remaining"],
                    "x-ratelimit-requests-reset": b["reset_ms"],
                    "x-ratelimit-complexity-limit": b["complexity_limit"],
                    "x-ratelimit-complexity-remaining": b["complexity_remaining"],
                    "x-ratelimit-complexity-reset": b["reset_ms"], "x-complexity": int(cost)}

    def _exhausted(self):
        with self.lock:
            b = self._budget
            return b["requests_remaining"] <= 0 and b["reset_ms"] and time.time() * 1000 < b["reset_ms"]

    # ------------------------------------------------------------------ OAuth 2.0 (/oauth/token, /oauth/revoke)
    def add_oauth_app(self, client_id, client_secret, user, token_lifetime=86400,
                      redirect_uris=("http://localhost:8765/callback",)):
        """Register an OAuth app whose access tokens act as `user` (the app user, a dict or an id)."""
        with self.lock:
            if _ref(user) not in self.users:
                raise ValueError(f"FakeLinear: unknown user {_ref(user)!r} for OAuth app {client_id!r}")
            self.oauth_apps[client_id] = {"client_id": client_id, "secret": client_secret, "user": _ref(user),
                                          "lifetime": int(token_lifetime), "redirect_uris": tuple(redirect_uris)}

    def oauth_lifetime(self, client_id, seconds):
        """Lifetime (seconds) of the access tokens issued to `client_id` from now on."""
        with self.lock:
            self.oauth_apps[client_id]["lifetime"] = int(seconds)

    def authorize_code(self, client_id, redirect_uri, scope="read,write,app:assignable,app:mentionable",
                       actor="app", state=None):
        """The admin clicks "Authorize": a new single-use code (valid 600 s) for a new grant."""
        scopes = [s for s in re.split(r"[,\s]+", scope or "") if s]
        with self.lock:
            app = self.oauth_apps.get(client_id)
            if app is None:
                raise ValueError(f"FakeLinear: unknown OAuth client_id {client_id!r}")
            if redirect_uri not in app["redirect_uris"]:
                raise ValueError(f"FakeLinear: redirect_uri {redirect_uri!r} is not registered for {client_id!r}")
            if actor not in ("app", "user"):
                raise ValueError(f"FakeLinear: actor must be 'app' or 'user', not {actor!r}")
            if actor != "app" and any(s.startswith("app:") for s in scopes):
                raise ValueError("FakeLinear: app:assignable / app:mentionable need actor=app")
            code = secrets.token_hex(16)
            self._oauth_codes[code] = {"client_id": client_id, "redirect_uri": redirect_uri, "scope": scopes,
                                       "actor": actor, "state": state, "expires": time.time() + 600, "used": False}
            return code

    def authorize(self, client_id, redirect_uri, scope="read,write,app:assignable,app:mentionable", actor="app",
                  state=None):
        """Like authorize_code, but returns the URL the browser is redirected to (?code=...&state=...)."""
        code = self.authorize_code(client_id, redirect_uri, scope, actor, state)
        query = urlencode({"code": code, **({"state": state} if state is not None else {})})
        return f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{query}"

    def oauth_drop_next_refresh(self, n=1):
        """The next n successful refresh_token grants rotate the tokens, then close the socket unanswered."""
        with self.lock:
            self._oauth_drop_refreshes += n

    def refreshes(self, include_dropped=True):
        """How many refresh_token grants succeeded (rotated the tokens), by default counting dropped answers."""
        ok = ("issued", "issued-dropped") if include_dropped else ("issued",)
        with self.lock:
            return sum(1 for r in self.oauth_log if r["grant_type"] == "refresh_token" and r["result"] in ok)

    def refused_grants(self):
        """The oauth_log records of grants refused with invalid_grant."""
        with self.lock:
            return [r for r in self.oauth_log if r["result"] == "invalid_grant"]

    def live_refresh_tokens(self, client_id=None):
        """How many refresh tokens would be accepted now (all clients, or only `client_id`'s)."""
        with self.lock:
            return sum(1 for t in self.oauth_refresh.values() if t["alive"]
                       and not self._oauth_grants[t["grant"]]["revoked"]
                       and (client_id is None or t["client_id"] == client_id))

    def _viewer_for(self, token):
        """The user a GraphQL request with this API key or OAuth access token acts as, or None."""
        if not token:
            return None
        with self.lock:
            if token in self.tokens:
                return self.users.get(_ref(self.tokens[token]))
            t = self._live_access(token)
            return self.users.get(self._oauth_grants[t["grant"]]["user"]) if t else None

    def _live_access(self, token):
        t = self.oauth_access.get(token)
        if t is None or time.time() >= t["expires"] or self._oauth_grants[t["grant"]]["revoked"]:
            return None
        return t

    def _issue_pair(self, grant_id, scope):
        """New access + refresh token for a grant; returns the token endpoint's JSON answer."""
        g = self._oauth_grants[grant_id]
        lifetime = self.oauth_apps[g["client_id"]]["lifetime"]
        access, refresh = f"lin_oauth_{secrets.token_hex(32)}", f"lin_refresh_{secrets.token_hex(32)}"
        now = time.time()
        self.oauth_access[access] = {"grant": grant_id, "client_id": g["client_id"], "scope": scope,
                                     "issued": now, "expires": now + lifetime}
        self.oauth_refresh[refresh] = {"grant": grant_id, "client_id": g["client_id"], "scope": scope,
                                       "issued": now, "alive": True}
        return {"access_token": access, "token_type": "Bearer", "expires_in": lifetime, "scope": " ".join(scope),
                "refresh_token": refresh}

    def _oauth_client(self, handler, form):
        """(client_id, error) from HTTP Basic auth or the client_id/client_secret form fields."""
        auth = handler.headers.get("Authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                cid, _, raw = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
            except Exception:
                return None, "invalid_client"
            # RFC 6749 2.3.1 form-encodes id and secret first; many clients (requests' HTTPBasicAuth) do not
            cid, secret = unquote_plus(cid), unquote_plus(raw)
        else:
            cid, secret = form.get("client_id"), form.get("client_secret")
            raw = secret
        with self.lock:
            app = self.oauth_apps.get(cid)
            if app is None or secret is None or not any(hmac.compare_digest(str(x), str(app["secret"]))
                                                        for x in (secret, raw)):
                return cid, "invalid_client"
        return cid, None

    def _handle_oauth(self, handler, body):
        """/oauth/token and /oauth/revoke. Returns (status, headers, payload); None status: drop the socket."""
        path = handler.path.split("?")[0]
        rec = {"path": path, "grant_type": None, "result": None, "at": time.time(), "client_id": None}
        with self.lock:
            self.oauth_log.append(rec)
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}

        def fail(status, error, description=None):
            rec["result"] = error
            h = dict(headers, **({"WWW-Authenticate": 'Basic realm="linear"'} if status == 401 else {}))
            return status, h, {"error": error, **({"error_description": description} if description else {})}

        if path not in ("/oauth/token", "/oauth/revoke"):
            return fail(404, "not_found", "Not found")
        ctype = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return fail(400, "invalid_request", "Body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl((body or b"").decode(), keep_blank_values=True)
        except (ValueError, UnicodeDecodeError):
            return fail(400, "invalid_request", "Malformed form body")
        form = dict(pairs)
        if len(form) != len(pairs):
            return fail(400, "invalid_request", "Repeated parameter")
        rec["grant_type"] = form.get("grant_type")
        if path == "/oauth/revoke":
            return self._oauth_revoke(handler, form, rec, fail, headers)
        answer = self._oauth_token(handler, form, rec, fail, headers)
        delay = self.oauth_delay
        if delay:  # every /oauth/token answer, after the grant was decided (and tokens rotated), without the lock
            self._stopping.wait(delay)
        return answer

    def _oauth_token(self, handler, form, rec, fail, headers):
        cid, err = self._oauth_client(handler, form)
        rec["client_id"] = cid
        if err:
            return fail(401, err, "Client authentication failed")
        grant_type = form.get("grant_type")
        if not grant_type:
            return fail(400, "invalid_request", "Missing grant_type")
        if grant_type not in ("authorization_code", "refresh_token"):
            return fail(400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}")
        drop = False
        with self.lock:
            if grant_type == "authorization_code":
                code = self._oauth_codes.get(form.get("code") or "")
                if not form.get("code"):
                    return fail(400, "invalid_request", "Missing code")
                if code is None or code["used"] or code["client_id"] != cid or time.time() >= code["expires"]:
                    return fail(400, "invalid_grant", "Invalid or expired authorization code.")
                if form.get("redirect_uri") != code["redirect_uri"]:
                    return fail(400, "invalid_grant", "redirect_uri does not match the one authorized.")
                code["used"] = True
                grant_id = str(uuid.uuid4())
                self._oauth_grants[grant_id] = {"client_id": cid, "user": self.oauth_apps[cid]["user"],
                                                "scope": code["scope"], "actor": code["actor"], "revoked": False}
                answer = self._issue_pair(grant_id, code["scope"])
            else:
                if not form.get("refresh_token"):
                    return fail(400, "invalid_request", "Missing refresh_token")
                old = self.oauth_refresh.get(form["refresh_token"])
                if old is None or old["client_id"] != cid:
                    return fail(400, "invalid_grant", "Invalid refresh token.")
                if not old["alive"] or self._oauth_grants[old["grant"]]["revoked"]:
                    return fail(400, "invalid_grant", "Token has been expired or revoked.")
                scope = old["scope"]
                if form.get("scope"):
                    scope = [s for s in re.split(r"[,\s]+", form["scope"]) if s]
                    if not set(scope) <= set(old["scope"]):
                        return fail(400, "invalid_scope", "Requested scope exceeds the granted scope.")
                old["alive"] = False
                answer = self._issue_pair(old["grant"], scope)
                if self._oauth_drop_refreshes > 0:
                    self._oauth_drop_refreshes -= 1
                    drop = True
            rec["result"] = "issued-dropped" if drop else "issued"
        return (None, {}, None) if drop else (200, headers, answer)

    def _oauth_revoke(self, handler, form, rec, fail, headers):
        """RFC 7009: authenticated by a live Bearer access token or by client credentials; revokes the token's
        whole grant; an unknown token is answered 200 too."""
        auth = handler.headers.get("Authorization") or ""
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        with self.lock:
            if bearer is not None:
                t = self._live_access(bearer)
                if t is None:
                    return fail(401, "invalid_client", "Invalid access token")
                cid = t["client_id"]
            elif auth.lower().startswith("basic ") or form.get("client_id"):
                cid, err = self._oauth_client(handler, form)
                if err:
                    rec["client_id"] = cid
                    return fail(401, err, "Client authentication failed")
            else:
                return fail(401, "invalid_client", "Authentication required")
            rec["client_id"] = cid
            token = form.get("token") or bearer
            if not token:
                return fail(400, "invalid_request", "Missing token")
            t = self.oauth_access.get(token) or self.oauth_refresh.get(token)
            if t is not None and t["client_id"] != cid:
                return fail(400, "unauthorized_client", "The token was not issued to this client")
            if t is not None:
                self._oauth_grants[t["grant"]]["revoked"] = True  # _live_access refuses its access tokens
                for other in self.oauth_refresh.values():
                    if other["grant"] == t["grant"]:
                        other["alive"] = False
            rec["result"] = "revoked"
        return 200, headers, {}

    # ------------------------------------------------------------------ lookups
    def _team(self, t):
        tid = _ref(t)
        if tid in self.teams:
            return self.teams[tid]
        for team in self.teams.values():
            if team["key"] == tid:
                return team
        raise KeyError(f"team {t!r}")

    def _state(self, team, s):
        sid = _ref(s)
        if sid in self.states:
            return self.states[sid]
        for st in self.states.values():
            if st["teamId"] == team["id"] and st["name"].lower() == str(sid).lower():
                return st
        raise KeyError(f"state {s!r} in team {team['key']}")

    def _label(self, x):
        lid = _ref(x)
        if lid in self.labels:
            return self.labels[lid]
        for lab in self.labels.values():
            if lab["name"] == lid:
                return lab
        raise KeyError(f"label {x!r}")

    def _issue(self, x):
        return self.issues[_ref(x)] if _ref(x) in self.issues else self.issue_by_key(_ref(x))

    def _session(self, x):
        return self.sessions[_ref(x)]

    def _members(self, team):
        ids = team.get("memberIds")
        return list(self.users.values()) if ids is None else [self.users[i] for i in ids if i in self.users]

    def _set_state(self, issue, state):
        issue["stateId"] = state["id"]
        ts = _iso(self.now())
        if state["type"] == "started" and not issue.get("startedAt"):
            issue["startedAt"] = ts
        issue["completedAt"] = ts if state["type"] == "completed" else None
        issue["canceledAt"] = ts if state["type"] == "canceled" else None

    # ------------------------------------------------------------------ filtering
    def _parse_dt(self, v):
        if isinstance(v, datetime):
            return v
        s = str(v).strip()
        m = _DURATION.match(s)
        if m and s not in ("P", "-P", "+P"):
            y, mo, w, d, h, mi, se = (float(x or 0) for x in m.groups()[1:])
            delta = timedelta(days=y * 365 + mo * 30 + w * 7 + d, hours=h, minutes=mi, seconds=se)
            return self.now() + (-delta if m.group(1) == "-" else delta)
        if re.fullmatch(r"\d{4}", s):
            s += "-01-01"
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise _err(f"Invalid DateTimeOrDuration: {v!r}") from None
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)

    def _cmp(self, actual, comp, typ, where):
        for op, exp in comp.items():
            if exp is None and op != "null":
                continue
            if not self._cmp_one(actual, op, exp, typ, where):
                return False
        return True

    def _cmp_one(self, actual, op, exp, typ, where):
        if op == "null":
            return (actual is None) == exp
        if typ == "issueid":  # actual = (uuid, identifier)
            hit = (lambda e: e in actual or e.upper() == actual[1])
            if op == "eq":
                return hit(exp)
            if op == "neq":
                return not hit(exp)
            if op == "in":
                return any(hit(e) for e in exp)
            if op == "nin":
                return not any(hit(e) for e in exp)
            raise _unsupported(f"comparator {where}.{op}")
        if typ == "date":
            actual = None if actual is None else self._parse_dt(actual)
            exp = [self._parse_dt(e) for e in exp] if isinstance(exp, list) else self._parse_dt(exp)
        positive = {"eq": lambda a, e: a == e, "in": lambda a, e: a in e,
                    "gt": lambda a, e: a > e, "gte": lambda a, e: a >= e,
                    "lt": lambda a, e: a < e, "lte": lambda a, e: a <= e,
                    "eqIgnoreCase": lambda a, e: a.lower() == e.lower(),
                    "contains": lambda a, e: e in a, "containsIgnoreCase": lambda a, e: e.lower() in a.lower(),
                    "containsIgnoreCaseAndAccent": lambda a, e: _fold(e) in _fold(a),
                    "startsWith": lambda a, e: a.startswith(e),
                    "startsWithIgnoreCase": lambda a, e: a.lower().startswith(e.lower()),
                    "endsWith": lambda a, e: a.endswith(e)}
        negated = {"neq": "eq", "nin": "in", "neqIgnoreCase": "eqIgnoreCase", "notContains": "contains",
                   "notContainsIgnoreCase": "containsIgnoreCase", "notStartsWith": "startsWith",
                   "notEndsWith": "endsWith"}
        if op in positive:
            return actual is not None and bool(positive[op](actual, exp))
        if op in negated:
            return actual is None or not positive[negated[op]](actual, exp)
        raise _unsupported(f"comparator {where}.{op}")

    def _match(self, kind, obj, filt, ctx):
        """Does obj (of kind; may be None for a nullable relation) satisfy filter dict filt?"""
        spec = KINDS[kind]
        for key, val in (filt or {}).items():
            if val is None:
                continue
            if key == "null":
                ok = (obj is None) == val
            elif key == "and":
                ok = all(self._match(kind, obj, f, ctx) for f in val)
            elif key == "or":
                ok = any(self._match(kind, obj, f, ctx) for f in val)
            elif obj is None:
                ok = False
            elif key in spec["scalar"]:
                typ, get = spec["scalar"][key]
                ok = self._cmp(get(self, obj, ctx), val, typ, f"{kind}.{key}")
            elif key in spec["rel"]:
                k2, get = spec["rel"][key]
                ok = self._match(k2, get(self, obj, ctx), val, ctx)
            elif key in spec["coll"]:
                k2, get = spec["coll"][key]
                ok = self._match_coll(k2, get(self, obj, ctx), val, ctx)
            else:
                raise _unsupported(f"filter field {kind}.{key}")
            if not ok:
                return False
        return True

    def _match_coll(self, kind, items, filt, ctx):
        for key, val in filt.items():
            if val is None:
                continue
            if key == "some":
                ok = any(self._match(kind, it, val, ctx) for it in items)
            elif key == "every":
                ok = all(self._match(kind, it, val, ctx) for it in items)
            elif key == "length":
                ok = self._cmp(len(items), val, "num", f"{kind}s.length")
            elif key == "null":
                ok = (len(items) == 0) == val
            elif key == "and":
                ok = all(self._match_coll(kind, items, f, ctx) for f in val)
            elif key == "or":
                ok = any(self._match_coll(kind, items, f, ctx) for f in val)
            else:
                ok = any(self._match(kind, it, {key: val}, ctx) for it in items)
            if not ok:
                return False
        return True

    # ------------------------------------------------------------------ connections
    def _connection(self, items, args, ctx, kind):
        if args.get("sort"):
            raise _unsupported("argument sort (use orderBy)")
        if args.get("filter"):
            items = [x for x in items if self._match(kind, x, args["filter"], ctx)]
        order = args.get("orderBy") or "createdAt"
        keyed = sorted(((x[order], x["_seq"], x) for x in items), key=lambda t: (t[0], t[1]), reverse=True)
        keys = [(k, s) for k, s, _ in keyed]

        def decode(cur):
            try:
                o, v, s = json.loads(base64.urlsafe_b64decode(cur.encode()).decode())
                assert o == order
                return (v, s)
            except Exception:
                raise _err(f"Invalid cursor: {cur}") from None

        lo, hi = 0, len(keyed)
        if args.get("after"):
            c = decode(args["after"])
            lo = next((i for i, k in enumerate(keys) if k < c), len(keys))
        if args.get("before"):
            c = decode(args["before"])
            hi = next((i for i, k in enumerate(keys) if k <= c), len(keys))
        hi = max(lo, hi)
        first, last = args.get("first"), args.get("last")
        if first is None and last is None:
            first = 50
        for name, v in (("first", first), ("last", last)):
            if v is not None and v < 0:
                raise _err(f"Argument {name} must be >= 0")
        start, end = lo, hi
        if first is not None:
            end = min(hi, lo + first)
        if last is not None:
            start = max(start, end - last)
        page = keyed[start:end]
        cur = lambda k: base64.urlsafe_b64encode(json.dumps([order, k[0], k[1]]).encode()).decode()  # noqa: E731
        edges = [{"node": x, "cursor": cur((k, s))} for k, s, x in page]
        return {"nodes": [e["node"] for e in edges], "edges": edges,
                "pageInfo": {"hasNextPage": end < len(keyed), "hasPreviousPage": start > 0,
                             "startCursor": edges[0]["cursor"] if edges else None,
                             "endCursor": edges[-1]["cursor"] if edges else None}}

    # ------------------------------------------------------------------ HTTP request handling
    def _handle(self, handler, body):
        """Returns (status, headers, payload-or-None); None payload means "drop the connection"."""
        schema = get_schema()
        hdrs = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in handler.headers.items()}
        rec = {"operation": None, "query": None, "variables": None, "headers": hdrs, "fields": [],
               "viewer": None, "status": None, "fault": None, "complexity": None, "at": time.time(),
               "request_bytes": len(body or b""), "response_bytes": None}
        handler.fake_record = rec
        with self.lock:
            self.requests.append(rec)
        try:
            req = json.loads(body or b"{}")
            assert isinstance(req, dict)
        except Exception:
            rec["status"] = 400
            return 400, {}, {"errors": [{"message": "Body must be a JSON object",
                                         "extensions": {"code": "BAD_REQUEST"}}]}
        query, variables, op_name = req.get("query") or "", req.get("variables") or {}, req.get("operationName")
        rec.update(query=query, variables=variables, operation=op_name)
        doc, syntax_error, errors, deprecated = _checked_document(query)
        op = get_operation_ast(doc, op_name) if doc is not None else None
        if op is not None:
            rec["operation"] = op_name or (op.name.value if op.name else None)
            rec["fields"] = [s.name.value for s in op.selection_set.selections if isinstance(s, FieldNode)]
            rec["operation"] = rec["operation"] or ",".join(rec["fields"])
        names = {rec["operation"], *rec["fields"]}

        def reply(status, payload, headers=None, fault=None):
            rec["status"], rec["fault"] = status, fault
            return status, headers or {}, payload

        fault = self._take_fault({"fail", "ratelimit", "hang", "reply"}, names, rec)
        if fault and fault["kind"] == "reply":
            body = fault["body"]
            return reply(fault["status"], body if isinstance(body, bytes) else json.dumps(body).encode(),
                         self._budget_headers(), fault="reply")
        if fault and fault["kind"] == "hang":
            self._stopping.wait(fault["seconds"])
            rec["fault"] = "hang"
        elif fault and fault["kind"] == "fail":
            return reply(fault["status"], b"Internal Server Error", fault="fail")
        elif fault and fault["kind"] == "ratelimit":
            h = {"retry-after": str(fault["retry_after"])} if fault["retry_after"] is not None else {}
            if fault["style"] == "429":
                return reply(429, b"Too Many Requests", h, fault="ratelimit429")
            h.update(self._budget_headers())
            h["x-ratelimit-requests-remaining"] = 0
            return reply(400, {"errors": [{"message": "Rate limit exceeded", "extensions": {
                "code": "RATELIMITED", "type": "ratelimited",
                "userPresentableMessage": "Rate limit exceeded. Please try again later."}}]}, h, "ratelimit400")

        # authentication
        auth = handler.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        viewer = self._viewer_for(token)
        if viewer is None:
            return reply(400, {"errors": [{"message": "Authentication required, not authenticated",
                                           "extensions": {"code": "AUTHENTICATION_ERROR", "type": "authentication error",
                                                          "userPresentableMessage": "You need to authenticate."}}]})
        rec["viewer"] = viewer["id"]
        if self._exhausted():
            h = self._budget_headers()
            h["retry-after"] = str(max(1, int((h["x-ratelimit-requests-reset"] - time.time() * 1000) / 1000)))
            return reply(400, {"errors": [{"message": "Rate limit exceeded", "extensions": {
                "code": "RATELIMITED", "type": "ratelimited"}}]}, h, "budget")

        # parse / validate / coerce variables
        def bad(errors, code):
            out = []
            for e in errors:
                f = e.formatted if isinstance(e, GraphQLError) else {"message": str(e)}
                f.setdefault("extensions", {})["code"] = code
                out.append(f)
            with self.lock:
                self.validation_errors.extend({"operation": rec["operation"], **f} for f in out)
            return reply(400, {"errors": out}, self._budget_headers())

        if syntax_error is not None:
            return bad([syntax_error], "GRAPHQL_PARSE_FAILED")
        if errors:
            return bad(errors, "GRAPHQL_VALIDATION_FAILED")
        if op is None:
            return bad([GraphQLError("Must provide a (known) operationName when the document has several "
                                     "operations")], "GRAPHQL_VALIDATION_FAILED")
        with self.lock:
            for message in deprecated:
                self.deprecations.append({"operation": rec["operation"], "message": message})
        coerced = get_variable_values(schema, op.variable_definitions, variables)
        if isinstance(coerced, list):
            return bad(coerced, "BAD_USER_INPUT")
        cost = _complexity(schema, doc, op, coerced)
        rec["complexity"] = cost
        if cost > 10_000:
            with self.lock:
                self.complexity_warnings.append({"operation": rec["operation"], "complexity": cost})
        if self.max_complexity and cost > self.max_complexity:
            return bad([GraphQLError(f"Query too complex: {cost:.0f} > {self.max_complexity} points")],
                       "QUERY_TOO_COMPLEX")

        # execute
        ctx = {"fake": self, "viewer": viewer}
        with self.lock:
            result = execute(schema, doc, context_value=ctx, variable_values=variables, operation_name=op_name,
                             field_resolver=_resolve_field, type_resolver=_resolve_type)
        payload = {"data": result.data}
        if result.errors:
            payload["errors"] = [e.formatted for e in result.errors]
        drop = self._take_fault({"drop"}, names, rec)
        if drop:
            rec["status"], rec["fault"] = None, "drop"
            return None, {}, None
        return reply(200, payload, self._budget_headers(cost))


def _fold(s):
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).lower()


class _Handler(Handler):
    server_version = "FakeLinear/1.0"

    def date_time_string(self, timestamp=None):
        """The Date header: the fake's clock (real time moved by advance()), not this machine's."""
        if timestamp is None:
            timestamp = self.server.fake.now().timestamp()
        return super().date_time_string(timestamp)

    def do_GET(self):
        self._send(405, {}, {"errors": [{"message": "Use POST"}]})

    def do_POST(self):
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        if path != "/graphql" and not path.startswith("/oauth/"):
            return self._send(404, {}, {"errors": [{"message": "Not found"}]})
        try:
            if path == "/graphql":
                status, headers, payload = fake._handle(self, body)
            else:  # OAuth endpoints: form bodies, no schema, recorded in fake.oauth_log (not fake.requests)
                status, headers, payload = fake._handle_oauth(self, body)
        except Exception as e:  # a bug in the fake: make it loud
            status, headers, payload = 500, {}, {"errors": [{"message": f"FakeLinear crashed: {e!r}"}]}
            with fake.lock:
                fake.validation_errors.append({"message": f"FakeLinear crashed: {e!r}"})
        if status is None:
            self.drop()
            return
        self._send(status, headers, payload)

    def _send(self, status, headers, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        rec = getattr(self, "fake_record", None)
        if rec is not None:
            rec["response_bytes"] = len(data)
            self.fake_record = None
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8" if not isinstance(payload, bytes)
                         else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)


# ------------------------------------------------------------------------- complexity estimate
def _complexity(schema, doc, op, variables):
    """0.1 per leaf, 1 per object, children of a connection multiplied by first/last (default 50)."""
    frags = {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}

    def arg_int(node, name):
        for a in node.arguments or ():
            if a.name.value == name:
                if isinstance(a.value, IntValueNode):
                    return int(a.value.value)
                if isinstance(a.value, VariableNode):
                    return variables.get(a.value.name.value)
        return None

    def walk(sel_set, ptype, mult, depth=0):
        total = 0.0
        for sel in sel_set.selections:
            if isinstance(sel, FieldNode):
                name = sel.name.value
                fields = getattr(ptype, "fields", {}) if ptype is not None else {}
                if name.startswith("__") or name not in fields:
                    continue
                ftype = fields[name].type
                named = get_named_type(ftype)
                if sel.selection_set is None:
                    total += 0.1
                elif named.name.endswith("Connection"):
                    n = arg_int(sel, "first") or arg_int(sel, "last") or 50
                    total += 1 + walk(sel.selection_set, named, n, depth + 1)
                elif isinstance(get_nullable_type(ftype), GraphQLList):
                    total += mult * (1 + walk(sel.selection_set, named, 1, depth + 1))
                else:
                    total += 1 + walk(sel.selection_set, named, 1, depth + 1)
            elif isinstance(sel, InlineFragmentNode):
                t = schema.get_type(sel.type_condition.name.value) if sel.type_condition else ptype
                total += walk(sel.selection_set, t, mult, depth)
            elif isinstance(sel, FragmentSpreadNode) and sel.name.value in frags and depth < 50:
                fr = frags[sel.name.value]
                total += walk(fr.selection_set, schema.get_type(fr.type_condition.name.value), mult, depth + 1)
        return total

    root = schema.mutation_type if op.operation == OperationType.MUTATION else schema.query_type
    return round(walk(op.selection_set, root, 1), 1)


# ------------------------------------------------------------------------- resolvers
RESOLVERS = {}


def _r(*keys):
    def deco(fn):
        for k in keys:
            RESOLVERS[tuple(k.split("."))] = fn
        return fn
    return deco


def _resolve_type(value, info, abstract_type):
    if abstract_type.name == "AgentActivityContent":
        t = ACTIVITY_TYPENAMES.get((value or {}).get("type"))
        if not t:
            raise _err(f"Unknown agent activity content type: {(value or {}).get('type')!r}")
        return t
    return value.get("__typename") if isinstance(value, dict) else None


def _resolve_field(source, info, **args):
    fn = RESOLVERS.get((info.parent_type.name, info.field_name))
    ctx = info.context
    if fn is not None:
        return fn(ctx["fake"], source, args, ctx)
    if info.parent_type.name in ("Query", "Mutation"):
        raise _unsupported(f"{info.parent_type.name}.{info.field_name}")
    if isinstance(source, dict) and info.field_name in source:
        return source[info.field_name]
    return _default(info.return_type, source, info)


def _default(rtype, source, info):
    """A plausible value for a field the model doesn't store (None when nullable)."""
    if not isinstance(rtype, GraphQLNonNull):
        return None
    t = rtype.of_type
    if isinstance(t, GraphQLList):
        return []
    if isinstance(t, GraphQLEnumType):
        return next(iter(t.values))
    if isinstance(t, GraphQLScalarType):
        return {"String": "", "Boolean": False, "Int": 0, "Float": 0.0, "JSON": {}, "JSONObject": {},
                "ID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{(source or {}).get('id')}/{info.field_name}")),
                "DateTime": (source or {}).get("createdAt") or _iso(datetime.now(timezone.utc)),
                "TimelessDate": datetime.now(timezone.utc).date().isoformat()}.get(t.name, "")
    if isinstance(t, GraphQLObjectType):
        if t.name.endswith("Connection"):
            return {"nodes": [], "edges": [], "pageInfo": {"hasNextPage": False, "hasPreviousPage": False}}
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{(source or {}).get('id')}/{info.field_name}"))}
    raise _unsupported(f"non-null abstract field {info.parent_type.name}.{info.field_name}")


def _not_found(what):
    return _err(f"Entity not found: {what}", userPresentableMessage=f"Could not find referenced {what}.")


def _get(store, id, what):
    if id in store:
        return store[id]
    raise _not_found(what)


# --- Query and nested fields. Resolvers take (fake, source, args, ctx).
def _lookup(store, what, finder=None):
    def fn(f, s, a, c):
        try:
            return finder(f, a["id"]) if finder else getattr(f, store)[a["id"]]
        except KeyError:
            raise _not_found(what) from None
    return fn


def _conn(kind, items):
    """A connection resolver over items(fake, source) -> list of dicts."""
    return lambda f, s, a, c: f._connection(items(f, s), a, c, kind)


def _rel(store, key):
    return lambda f, s, a, c: getattr(f, store).get(s.get(key))


def _where(store, key, source_key="id"):
    return lambda f, s: [x for x in getattr(f, store).values() if x.get(key) == s[source_key]]


RESOLVERS.update({
    ("Query", "viewer"): lambda f, s, a, c: c["viewer"],
    ("Query", "issue"): _lookup(None, "Issue", lambda f, i: f._issue(i)),
    ("Query", "team"): _lookup(None, "Team", lambda f, i: f._team(i)),
    ("Query", "workflowState"): _lookup("states", "WorkflowState"),
    ("Query", "issueLabel"): _lookup("labels", "IssueLabel"),
    ("Query", "agentSession"): _lookup("sessions", "AgentSession"),
    ("Query", "agentActivity"): _lookup("activities_by_id", "AgentActivity"),
    ("Query", "comment"): _lookup("comments", "Comment"),
    ("Query", "user"): _lookup("users", "User"),
    ("Query", "issues"): _conn("issue", lambda f, s: list(f.issues.values())),
    ("Query", "teams"): _conn("team", lambda f, s: list(f.teams.values())),
    ("Query", "workflowStates"): _conn("state", lambda f, s: list(f.states.values())),
    ("Query", "issueLabels"): _conn("label", lambda f, s: list(f.labels.values())),
    ("Query", "agentSessions"): _conn("session", lambda f, s: list(f.sessions.values())),
    ("Query", "agentActivities"): _conn("activity", lambda f, s: list(f.activities_by_id.values())),
    ("Query", "comments"): _conn("comment", lambda f, s: list(f.comments.values())),
    ("Query", "users"): _conn("user", lambda f, s: list(f.users.values())),
    # Issue
    ("Issue", "team"): _rel("teams", "teamId"),
    ("Issue", "state"): _rel("states", "stateId"),
    ("Issue", "parent"): _rel("issues", "parentId"),
    ("Issue", "labels"): _conn("label", lambda f, s: [f.labels[i] for i in s["labelIds"] if i in f.labels]),
    ("Issue", "comments"): _conn("comment", _where("comments", "issueId")),
    ("Issue", "children"): _conn("issue", _where("issues", "parentId")),
    ("Issue", "agentSessions"): _conn("session", _where("sessions", "issueId")),
    # Team / WorkflowState / IssueLabel / User
    ("Team", "states"): _conn("state", _where("states", "teamId")),
    ("Team", "labels"): _conn("label", _where("labels", "teamId")),
    ("Team", "members"): _conn("user", lambda f, s: f._members(s)),
    ("Team", "issues"): _conn("issue", _where("issues", "teamId")),
    ("Team", "issueCount"): lambda f, s, a, c: len(_where("issues", "teamId")(f, s)),
    ("WorkflowState", "team"): _rel("teams", "teamId"),
    ("WorkflowState", "issues"): _conn("issue", _where("issues", "stateId")),
    ("IssueLabel", "team"): _rel("teams", "teamId"),
    ("IssueLabel", "parent"): _rel("labels", "parentId"),
    ("IssueLabel", "issues"): _conn("issue", lambda f, s: [i for i in f.issues.values() if s["id"] in i["labelIds"]]),
    ("User", "isMe"): lambda f, s, a, c: s["id"] == c["viewer"]["id"],
    ("User", "assignedIssues"): _conn("issue", _where("issues", "assigneeId")),
    ("User", "delegatedIssues"): _conn("issue", _where("issues", "delegateId")),
    ("User", "createdIssues"): _conn("issue", _where("issues", "creatorId")),
    ("User", "teams"): _conn("team", lambda f, s: [t for t in f.teams.values() if s in f._members(t)]),
    # AgentSession / AgentActivity / Comment
    ("AgentSession", "activities"): _conn("activity", _where("activities_by_id", "agentSessionId")),
    ("AgentSession", "issue"): _rel("issues", "issueId"),
    ("AgentSession", "comment"): _rel("comments", "commentId"),
    ("AgentSession", "sourceComment"): _rel("comments", "sourceCommentId"),
    ("AgentSession", "externalLinks"): lambda f, s, a, c: [{"label": u.get("label") or u["url"], "url": u["url"]}
                                                           for u in s.get("externalUrls") or []],
    ("AgentActivity", "agentSession"): _rel("sessions", "agentSessionId"),
    ("AgentActivity", "sourceComment"): _rel("comments", "sourceCommentId"),
    ("AgentActivity", "content"): lambda f, s, a, c: s["content"],
    ("Comment", "issue"): _rel("issues", "issueId"),
    ("Comment", "agentSession"): _rel("sessions", "agentSessionId"),
    ("Comment", "parent"): _rel("comments", "parentId"),
    ("Comment", "children"): _conn("comment", _where("comments", "parentId")),
    ("Comment", "spawnedAgentSessions"): _conn("session", _where("sessions", "sourceCommentId")),
    ("Comment", "agentSessions"): _conn("session", _where("sessions", "commentId")),
})
for _t, _f, _col in (("Issue", "delegate", "delegateId"), ("Issue", "assignee", "assigneeId"),
                     ("Issue", "creator", "creatorId"), ("Issue", "snoozedBy", "snoozedById"),
                     ("Comment", "user", "userId"), ("AgentSession", "appUser", "appUserId"),
                     ("AgentSession", "creator", "creatorId"), ("AgentActivity", "user", "userId"),
                     ("IssueLabel", "creator", "creatorId")):
    RESOLVERS[(_t, _f)] = _rel("users", _col)


# --- Mutations
def _payload(f, **entity):
    return {"success": True, "lastSyncId": f._sync(), **entity}


@_r("Mutation.agentActivityCreate")
def _m_activity_create(f, s, a, c):
    inp = a["input"]
    sess = _get(f.sessions, inp["agentSessionId"], "AgentSession")
    if inp.get("id") is not None:
        try:
            uuid.UUID(inp["id"])
        except ValueError:
            raise _err(f"Argument Validation Error: id must be a UUID, got {inp['id']!r}") from None
        if inp["id"] in f.activities_by_id:
            raise _err(f"Agent activity with id {inp['id']} already exists", code="CONFLICT")
    viewer = c["viewer"]
    if sess["appUserId"] != viewer["id"]:
        raise _err("Only the app user that owns the agent session can create activities in it",
                   code="FORBIDDEN")
    content = inp["content"]
    if not isinstance(content, dict) or content.get("type") not in ACTIVITY_TYPENAMES:
        raise _err(f"Invalid agent activity content: {content!r}")
    typ = content["type"]
    if typ == "prompt":
        raise _err("Agents cannot create prompt activities")
    need = ("action", "parameter") if typ == "action" else ("body",)
    if any(not isinstance(content.get(k), str) for k in need):
        raise _err(f"Invalid {typ} content: {', '.join(need)} must be strings")
    act = f._new_activity(sess, viewer, content, id=inp.get("id"), signal=inp.get("signal"),
                          ephemeral=inp.get("ephemeral"), signal_metadata=inp.get("signalMetadata"))
    act["contextualMetadata"] = inp.get("contextualMetadata")
    sess["status"] = STATUS_AFTER[typ]
    sess["startedAt"] = sess.get("startedAt") or act["createdAt"]
    sess["endedAt"] = act["createdAt"] if typ in ("response", "error") else None
    return _payload(f, agentActivity=act)


@_r("Mutation.agentSessionUpdate")
def _m_session_update(f, s, a, c):
    sess = _get(f.sessions, a["id"], "AgentSession")
    inp = a["input"]
    if "plan" in inp and inp["plan"] is not None:
        sess["plan"] = copy.deepcopy(inp["plan"])
        f.plans.setdefault(sess["id"], []).append(copy.deepcopy(inp["plan"]))
    if inp.get("externalUrls") is not None:
        sess["externalUrls"] = [dict(u) for u in inp["externalUrls"]]
    for u in inp.get("addedExternalUrls") or []:
        sess["externalUrls"] = [x for x in sess["externalUrls"] if x["url"] != u["url"]] + [dict(u)]
    if inp.get("removedExternalUrls"):
        sess["externalUrls"] = [x for x in sess["externalUrls"] if x["url"] not in inp["removedExternalUrls"]]
    for k in ("externalLink", "dismissedAt"):
        if k in inp:
            sess[k] = inp[k]
    f._touch(sess)
    return _payload(f, agentSession=sess)


@_r("Mutation.agentSessionCreateOnIssue")
def _m_session_create(f, s, a, c):
    inp = a["input"]
    try:
        issue = f._issue(inp["issueId"])
    except KeyError:
        raise _not_found("Issue") from None
    if not c["viewer"]["app"]:
        raise _err("Only app users can create agent sessions", code="FORBIDDEN")
    sess = f.add_session(issue, c["viewer"], c["viewer"])
    sess["externalUrls"] = [dict(u) for u in inp.get("externalUrls") or []]
    sess["externalLink"] = inp.get("externalLink")
    return _payload(f, agentSession=sess)


@_r("Mutation.issueUpdate")
def _m_issue_update(f, s, a, c):
    try:
        issue = f._issue(a["id"])
    except KeyError:
        raise _not_found("Issue") from None
    inp = a["input"]
    team = f.teams[inp["teamId"]] if inp.get("teamId") in f.teams else f.teams[issue["teamId"]]
    if inp.get("teamId") is not None and inp["teamId"] not in f.teams:
        raise _not_found("Team")
    if inp.get("stateId") is not None:
        st = f.states.get(inp["stateId"])
        if st is None or st["teamId"] != team["id"]:
            raise _err(f"Workflow state {inp['stateId']} not found in team {team['key']}")
    for k in ("delegateId", "assigneeId"):
        if inp.get(k) is not None and inp[k] not in f.users:
            raise _not_found("User")
    for lid in (inp.get("labelIds") or []) + (inp.get("addedLabelIds") or []):
        if lid not in f.labels:
            raise _not_found("IssueLabel")
    f.issue_updates.append({"id": issue["id"], "identifier": issue["identifier"], "input": copy.deepcopy(inp),
                            "user": c["viewer"]["id"], "at": _iso(f.now())})
    for k, v in inp.items():
        if k == "stateId":
            if v is not None:
                f._set_state(issue, f.states[v])
        elif k == "labelIds":
            issue["labelIds"] = list(v or [])
        elif k == "addedLabelIds":
            issue["labelIds"] += [x for x in v or [] if x not in issue["labelIds"]]
        elif k == "removedLabelIds":
            issue["labelIds"] = [x for x in issue["labelIds"] if x not in (v or [])]
        else:
            issue[k] = v
    f._touch(issue)
    return _payload(f, issue=issue)


def _label_mutation(add):
    def fn(f, s, a, c):
        try:
            issue = f._issue(a["id"])
        except KeyError:
            raise _not_found("Issue") from None
        _get(f.labels, a["labelId"], "IssueLabel")
        f.issue_updates.append({"id": issue["id"], "identifier": issue["identifier"], "user": c["viewer"]["id"],
                                "input": {("addedLabelIds" if add else "removedLabelIds"): [a["labelId"]]},
                                "at": _iso(f.now())})
        ids = [x for x in issue["labelIds"] if x != a["labelId"]]
        issue["labelIds"] = ids + [a["labelId"]] if add else ids
        f._touch(issue)
        return _payload(f, issue=issue)
    return fn


RESOLVERS[("Mutation", "issueAddLabel")] = _label_mutation(True)
RESOLVERS[("Mutation", "issueRemoveLabel")] = _label_mutation(False)


@_r("Mutation.commentCreate")
def _m_comment_create(f, s, a, c):
    inp = a["input"]
    if not inp.get("issueId"):
        raise _unsupported("commentCreate without issueId")
    try:
        issue = f._issue(inp["issueId"])
    except KeyError:
        raise _not_found("Issue") from None
    if inp.get("id") is not None and inp["id"] in f.comments:
        raise _err(f"Comment with id {inp['id']} already exists", code="CONFLICT")
    parent = None
    if inp.get("parentId"):
        parent = _get(f.comments, inp["parentId"], "Comment")
    if not inp.get("body"):
        raise _err("Comment body must not be empty")
    com = f.add_comment(issue, c["viewer"], inp["body"], session=parent and parent.get("agentSessionId"),
                        parent=parent, id=inp.get("id"))
    if inp.get("createAsUser"):
        com["onBehalfOfName"] = inp["createAsUser"]
    return _payload(f, comment=com)
