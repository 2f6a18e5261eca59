"""FakeGitHub: an in-process GitHub API (GraphQL and REST) for PatchRelay's tests.

GraphQL: every document is parsed and ``validate()``d against GitHub's public SDL (``tests/schemas/github.graphql``,
a verbatim copy of ``@octokit/graphql-schema``'s ``schema.graphql``, built with ``assume_valid_sdl=True`` because
the published SDL defines two fields twice), its variables are coerced, and the document is then *executed* by
graphql-core against plain in-memory dicts, so any valid query shape works.
REST: every request must match an operation of the OpenAPI subset ``tests/schemas/github-rest-openapi.json``
(verbatim copy of the trimmed ``@octokit/openapi`` description): method + path template, query parameters
(name, type, enum) and JSON body (``$ref``, type, required, enum, nullable, items, oneOf/anyOf/allOf).

    fake = FakeGitHub(tokens={"ghp_app": "patchrelay-bot"}).start()     # fake.api_url, fake.graphql_url
    fake.add_repo("acme/app", bare_path, required_checks=("test",), merge_queue=True)
    fake.set_check_policy("acme/app", lambda sha, f: [
        {"name": "test", "conclusion": "SUCCESS" if f.file_at("acme/app", sha, "hello.txt") else "FAILURE",
         "log": "AssertionError: hello.txt missing\\n"}])
    ... run the CLI with GITHUB_TOKEN=ghp_app and the API URLs pointed at the fake ...
    pr = fake.pr("acme/app", 1)                                    # created by the CLI via POST /pulls
    fake.add_review("acme/app", 1, "alice", "CHANGES_REQUESTED", body="Please rename",
                    comments=[{"path": "hello.txt", "line": 1, "body": "typo"}])
    fake.enqueue("acme/app", 1); fake.eject("acme/app", 1, reason="Required status check failed")
    assert fake.validation_errors == []
    fake.stop()

Behaviour worth knowing (documented choices, not necessarily GitHub's):
* Auth: ``Authorization: Bearer <token>`` or ``token <token>``; tokens come from ``tokens=`` / ``add_token``.
  Missing or unknown -> 401 ``{"message": "Bad credentials"}`` (GraphQL too). Logins ending in ``[bot]`` are
  bots: GraphQL shows them as ``Bot`` with the suffix dropped, REST as ``type: "Bot"`` with it; ``GET /user``
  answers 403 for them (installation tokens cannot use it).
* GraphQL rejections -> HTTP 400 with GitHub-style ``{"errors": [...]}`` (real GitHub answers 200 with only
  ``errors``; 400 keeps a client that ignores ``errors`` from passing), appended to ``validation_errors``:
  parse errors, ``validate()`` errors, variable coercion errors, a connection without ``first``/``last``
  (``MISSING_PAGINATION_BOUNDARIES``), ``first``/``last`` above 100 (``EXCESSIVE_PAGINATION``) and more than
  500,000 estimated nodes (``MAX_NODE_LIMIT_EXCEEDED``). Deprecated fields used are listed in ``deprecations``.
* Resolver errors (unknown repository or pull request number, bad mutation input) -> HTTP 200, ``data`` with
  nulls and ``errors`` carrying a top-level ``type`` (``NOT_FOUND``, ``FORBIDDEN``, ``UNPROCESSABLE``) like
  GitHub. Root fields, object fields and REST operations the fake does not model answer with a
  "FakeGitHub: unsupported ..." error and are ALSO appended to ``validation_errors`` (loud, never silent).
* REST rejections (appended to ``validation_errors``): no matching path template or method -> 404
  ``Not Found``; unknown query parameter, bad type or enum -> 422; body not JSON -> 400 ``Problems parsing
  JSON``; body against the schema -> 422 ``Invalid request.``. Stricter than GitHub: unknown body properties,
  a body sent to an operation without one, and ``GET /pulls?head=`` without the ``owner:`` prefix are
  rejected too. Successful JSON responses are filled out to the operation's response schema (every
  required property present) and checked against it; a mismatch is a bug in the fake and is recorded too.
  GET answers carry an ``etag``; ``If-None-Match`` with it -> 304 without spending the budget.
* Rate limits: every API response has ``x-ratelimit-{limit,remaining,used,reset,resource}`` (reset in epoch
  seconds, resource ``core`` for REST and ``graphql`` for GraphQL; separate 5,000 budgets, refilled an hour
  after first use or at the reset time). REST costs 1 per request (``GET /rate_limit`` is free), GraphQL
  ``max(1, round(connection requests / 100))`` like GitHub's formula; ``rateLimit { cost nodeCount ... }``
  reports the estimate (``dryRun`` is accepted and still charged). Exhausted budget: REST 403
  ``API rate limit exceeded ...`` with remaining 0; GraphQL HTTP 200 ``{"errors": [{"type": "RATE_LIMITED"}]}``.
* Timestamps: ISO-8601 with seconds and ``Z`` from ``now()`` (real UTC + ``advance(seconds)``). Orders use a
  creation sequence as tie-break. Cursors are opaque keyset cursors; connections default to oldest first.
* Git is the source of truth for commits: ``headRefOid``/``baseRefOid`` are read from the bare repository
  (``refs/heads/<name>``) at query time, once per request. An open PR whose head moved gets ``updatedAt``
  bumped and, when the old head is not an ancestor of the new one, a ``HeadRefForcePushedEvent``. A deleted
  head branch keeps the last known oid (``headRef`` becomes null). ``mergeable`` is computed with
  ``git merge-tree`` unless set with ``set_pr(mergeable=...)``; non-open PRs report ``UNKNOWN``.
* ``mergeStateStatus`` (unless overridden with ``set_pr(mergeStateStatus=...)``): non-open -> UNKNOWN;
  CONFLICTING -> DIRTY; mergeable UNKNOWN -> UNKNOWN; draft -> DRAFT; a required check/status missing or not
  successful, or reviewDecision CHANGES_REQUESTED/REVIEW_REQUIRED -> BLOCKED; any other context not
  successful (pending included) -> UNSTABLE; else CLEAN. BEHIND is never computed.
* ``reviewDecision``: CHANGES_REQUESTED if any author's latest opinionated review requests changes; APPROVED
  if at least ``max(1, required_approvals)`` approve; else REVIEW_REQUIRED when the repository requires
  approvals, else null. A DISMISSED review cancels its author's opinion.
* Checks: the rollup shows the latest check run per (app, name) and the latest status per context of a
  commit; ``statusCheckRollup`` is null when a commit has none. Rollup state: FAILURE if a run concluded
  FAILURE/TIMED_OUT/CANCELLED/ACTION_REQUIRED/STARTUP_FAILURE/STALE or a status is FAILURE; else ERROR if a
  status is ERROR; else PENDING if a run is not COMPLETED or a status is PENDING/EXPECTED; else SUCCESS.
  Required = in the repository's ``required_checks`` (or ``required=True`` on the run). Required checks apply
  to the default branch only (REST ``.../protection/required_status_checks`` is 404 elsewhere).
  Check policy: ``set_check_policy(repo, fn)``; ``fn(sha, fake)`` returns a list of ``add_check_run`` kwargs
  (items with a ``context`` key are ``add_status`` kwargs instead) and runs the first time the commit's
  checks are looked at. ``pending_observations=N`` keeps a run IN_PROGRESS (no conclusion, no completedAt)
  during the first N GraphQL requests that read that commit's checks. For Actions runs (app
  ``github-actions``) ``databaseId`` is the job id; ``GET .../actions/jobs/{id}/logs`` answers 302 to
  ``/_logs/<id>?token=...`` on the fake, which serves the log as text/plain without auth for ``log_url_ttl``
  seconds, then 403. ``POST .../jobs/{id}/rerun`` (only for completed jobs, else 403) adds a new run with
  the same name on the same commit and workflow run: the run's ``rerun_result`` kwargs (a dict, or a list
  consumed one per re-run), else the policy's item of that name, else a copy of the original.
* Merge queue (``merge_queue=True``): ``enqueue`` (also ``enqueuePullRequest``, and
  ``enablePullRequestAutoMerge`` on such a repository, which enqueues at once) adds an entry and an
  ``AddedToMergeQueueEvent``. Each entry gets a real merge-group commit in the bare repository (a merge of
  the previous entry's group, or the base tip, with the PR head; fixed dates, so rebuilding gives the same
  oid) on ``refs/heads/gh-readonly-queue/<base>/pr-<N>-<parent sha>``; it is the entry's ``headCommit``, and
  policies and checks work on it. Groups are rebuilt when the queue changes; a conflict makes the entry
  UNMERGEABLE (no headCommit). Entry state is QUEUED unless set with ``set_queue_entry``. Nothing advances
  by itself: tests call ``merge`` or ``eject`` (which adds a ``RemovedFromMergeQueueEvent`` with the reason;
  ``dequeuePullRequest`` does the same with reason "DEQUEUED"). Pushing to a queued PR does not dequeue it.
* ``merge(repo, n)``: a queued PR whose group was built on the current base tip fast-forwards the base to
  the group commit; otherwise a fast-forward when the base is an ancestor of the head, else a merge commit
  (``git merge-tree --write-tree`` + ``git commit-tree``, parents base and head); ``method="SQUASH"`` or
  ``"REBASE"`` makes one single-parent commit with the merged tree. Conflicts raise ``ValueError``.
  The PR becomes MERGED with ``mergeCommit``, a ``MergedEvent``; its commits list is frozen.
* Mutations (recorded in ``mutations``): enqueuePullRequest (idempotent for a queued PR), dequeuePullRequest
  (input ``id``), enablePullRequestAutoMerge, disablePullRequestAutoMerge, mergePullRequest,
  closePullRequest, reopenPullRequest, addComment, resolveReviewThread, unresolveReviewThread. They need
  the repository's ``viewer_permission`` to be WRITE, MAINTAIN or ADMIN (else FORBIDDEN); REST writes too.
* ``requestReviews`` keeps the requested logins on the PR (``review_requests(repo, n)``); the
  ``reviewRequests`` connection stays empty.
* Not modelled (loud "unsupported" errors or empty lists): labels, assignees, review requests as a
  connection (empty), files, check steps and annotations (empty), forks (``head`` must be a branch of the same
  repository), organisations beyond the owner login, issues that are not pull requests.

Model: plain dicts, GraphQL-shaped (``__typename`` plus GraphQL field names; private keys start with ``_``).
``users`` (login -> {login, databaseId, id, association}), ``repos`` (full name -> Repository dict: ``_bare``,
``_default``, ``_required_checks``, ``_merge_queue``, ``_required_approvals``, ``_policy``, ``viewerPermission``,
...), ``pulls`` (node id -> PullRequest: ``number``, ``_repo``, ``headRefName``, ``baseRefName``, ``_author``,
``state``, ``isDraft``, ``_headOid``/``_baseOid`` last seen, ``_mergeable``/``_mergeStateStatus`` overrides,
``_mergeCommit``, ``autoMergeRequest``), ``reviews``, ``review_comments``, ``threads``, ``issue_comments``
(node id -> dict with ``_pr`` = the PR's node id, ``_author`` = login), ``check_runs`` (databaseId -> CheckRun
with ``_repo``, ``_sha``, ``_status``, ``_conclusion``, ``log``, ...), ``statuses`` (node id -> StatusContext),
``queue`` (node id -> MergeQueueEntry with ``_pr``, ``_base``, ``_headOid`` = group commit), ``events`` (node id
-> timeline event with ``_pr``). Helpers return these live dicts.

Records: ``requests`` (one dict per HTTP request, the log blob URL included: method, path, query (the query
string), operation (GraphQL operation name, REST operationId or "job-log-blob"), fields (GraphQL root fields),
aliases (aliased fields in the GraphQL document), variables, body, login, resource ("core" | "graphql"),
status, fault, at), ``validation_errors`` ({kind: "graphql" | "rest" | "response" | "unsupported" | "crash",
message, operation / method / path}), ``deprecations``, ``mutations`` ({name, input, login, at, error}),
``reruns`` ({repo, job_id, name, sha, login, new_job_id, at}), ``created_prs`` ({repo, number, head, base,
title, draft, login, at}), ``comments_posted`` ({repo, number, login, body, id, at}).

Fault injection: each entry is consumed by the request(s) it hits. ``match`` limits it to requests whose
GraphQL operation name, a GraphQL root field, or REST operationId equals it, or whose ``"METHOD /path"``
contains it. ``fail_next(n, status, match, body)``, ``secondary_limit_next(n, retry_after, style, match)``,
``malformed_next(n, body, status, match)``, ``hang_next(seconds, n, match)`` (sleeps, then answers normally),
``graphql_rate_limited_next(n, match, reset_in)``, ``before_mutation[name] = fn`` (fn runs once, just before
that mutation executes: a race between an observation and a write), ``drop_after_commit_next(n, match)`` (executes, then closes
the socket without a response) and the budget: ``primary_exhausted(reset_in, resource)``,
``reset_budget(resource)``, ``set_budget(resource, ...)``.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import os
import re
import secrets
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from graphql import (GraphQLError, GraphQLNonNull, GraphQLScalarType, build_schema, execute,
                     get_named_type, get_operation_ast, validate_schema)
from graphql.execution.values import get_argument_values, get_variable_values
from graphql.language import FieldNode, FragmentDefinitionNode, FragmentSpreadNode, InlineFragmentNode, OperationType

from .gql import CheckedDocuments
from .http import Handler, Server, close_connections

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_PATH = SCHEMAS / "github.graphql"
OPENAPI_PATH = SCHEMAS / "github-rest-openapi.json"
WEB = "https://github.com"
DOCS = "https://docs.github.com/rest"
WRITE_PERMISSIONS = ("WRITE", "MAINTAIN", "ADMIN")
WRITERS = ("OWNER", "MEMBER", "COLLABORATOR")
FAILING = {"FAILURE", "TIMED_OUT", "CANCELLED", "ACTION_REQUIRED", "STARTUP_FAILURE", "STALE"}
PASSING = {"SUCCESS", "NEUTRAL", "SKIPPED"}
REST_CONCLUSION = {"STARTUP_FAILURE": "failure", "STALE": "skipped"}  # not in the REST enum
MERGE_QUEUE_BOT = "github-merge-queue[bot]"
SECONDARY_MESSAGE = ("You have exceeded a secondary rate limit. Please wait a few minutes before you try again. "
                     "If you reach out to GitHub Support for help, please include the request ID {rid}.")
PRIMARY_MESSAGE = "API rate limit exceeded for user ID {uid}."
MAX_PAGE = 100
MAX_NODES = 500_000

_cache_lock = threading.Lock()
_cache = {}


def get_schema():
    """GitHub's GraphQL schema, built once per process (the SDL is 1.2 MB, about 2 s)."""
    with _cache_lock:
        if "schema" not in _cache:
            schema = build_schema(SCHEMA_PATH.read_text(), assume_valid_sdl=True)
            if validate_schema(schema):   # graphql-core >= 3.3 flags known upstream defects; queries still validate
                schema._validation_errors = []
            _cache["schema"] = schema
        return _cache["schema"]


def get_openapi():
    """The REST description (parsed and indexed once per process)."""
    with _cache_lock:
        if "openapi" not in _cache:
            _cache["openapi"] = _OpenAPI(json.loads(OPENAPI_PATH.read_text()))
        return _cache["openapi"]


_checked_document = CheckedDocuments(lambda: get_schema())


# ----------------------------------------------------------------------------- small helpers
def _iso(dt):
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(s):
    dt = datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _node_id(prefix, n):
    return f"{prefix}_kwDO" + base64.urlsafe_b64encode(f"fake{n:08d}".encode()).decode().rstrip("=")


def _stable_int(*parts):
    """A small positive int derived from parts (stable across processes, unlike hash())."""
    return int(hashlib.sha1(repr(parts).encode()).hexdigest()[:7], 16)


def _gql_error(message, type_):
    return GraphQLError(message, extensions={"type": type_})


def _unsupported(what):
    return GraphQLError(f"FakeGitHub: unsupported {what}", extensions={"type": "FAKE_UNSUPPORTED"})


def _cursor(key):
    return base64.b64encode(("cursor:v2:" + json.dumps(list(key))).encode()).decode()


def _decode_cursor(cur):
    try:
        raw = base64.b64decode(cur.encode()).decode()
        assert raw.startswith("cursor:v2:")
        return json.loads(raw[len("cursor:v2:"):])
    except Exception:
        raise _gql_error(f"`{cur}` does not appear to be a valid cursor.", "INVALID_CURSOR_ARGUMENTS") from None


def _camel_type(enum_name):
    """ADDED_TO_MERGE_QUEUE_EVENT -> AddedToMergeQueueEvent."""
    return "".join(w.capitalize() for w in enum_name.split("_"))


class ApiError(Exception):
    """A REST error answer raised by an endpoint: HTTP status, message and optional ``errors`` list."""

    def __init__(self, status, message, errors=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.errors, self.headers = status, message, errors, headers or {}

    def payload(self):
        p = {"message": self.message, "documentation_url": DOCS, "status": str(self.status)}
        if self.errors is not None:
            p["errors"] = self.errors
        return p


# ----------------------------------------------------------------------------- git
GIT_ENV = {"GIT_AUTHOR_NAME": "GitHub", "GIT_AUTHOR_EMAIL": "noreply@github.com",
           "GIT_COMMITTER_NAME": "GitHub", "GIT_COMMITTER_EMAIL": "noreply@github.com"}


def _git(bare, *args, check=True, env=None):
    proc = subprocess.run(["git", f"--git-dir={bare}", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(map(str, args))} failed in {bare}: {proc.stderr.strip()}")
    return proc


# ----------------------------------------------------------------------------- OpenAPI
class _OpenAPI:
    """Route matching, parameter/body validation, response skeletons for the REST description."""

    def __init__(self, doc):
        self.doc = doc
        self.routes = []
        for template, item in doc["paths"].items():
            ops = {m.upper(): op for m, op in item.items() if m != "parameters"}
            multi = {}
            for op in ops.values():
                for p in self.params(item, op):
                    if p["in"] == "path":
                        multi[p["name"]] = bool(p.get("x-multi-segment"))
            regex, literal = "", 0
            for part in re.split(r"(\{[^}]+\})", template):
                if part.startswith("{"):
                    name = part[1:-1]
                    regex += f"(?P<{name}>.+?)" if multi.get(name) else f"(?P<{name}>[^/]+)"
                else:
                    regex += re.escape(part)
                    literal += len(part)
            self.routes.append((re.compile(f"^{regex}$"), template, item, ops, literal))
        self.routes.sort(key=lambda r: -r[4])
        self._skeletons = {}

    def resolve(self, node):
        while isinstance(node, dict) and "$ref" in node:
            cur = self.doc
            for part in node["$ref"].lstrip("#/").split("/"):
                cur = cur[part]
            node = cur
        return node

    def params(self, item, op):
        out = {}
        for p in (item.get("parameters") or []) + (op.get("parameters") or []):
            p = self.resolve(p)
            out[(p["name"], p["in"])] = p
        return list(out.values())

    def match(self, method, path):
        """-> (operation, template, path params) or None when no template matches; raises
        LookupError when a template matches but not the method."""
        method_miss = None
        for regex, template, item, ops, _ in self.routes:
            m = regex.match(path)
            if not m:
                continue
            values = {k: unquote(v) for k, v in m.groupdict().items()}
            op = ops.get(method)
            if op is None:
                method_miss = template
                continue
            bad = False
            for p in self.params(item, op):
                if p["in"] == "path" and self.check_value(p.get("schema") or {}, values.get(p["name"])):
                    bad = True
            if bad:
                continue
            return op, template, item, values
        if method_miss:
            raise LookupError(f"{method} is not an operation of {method_miss}")
        return None

    def check_value(self, schema, raw):
        """Problems with a path/query string value against a simple parameter schema."""
        schema = self.resolve(schema)
        t = schema.get("type")
        if raw is None:
            return ["missing"]
        if t == "integer" and not re.fullmatch(r"-?\d+", raw):
            return [f"{raw!r} is not an integer"]
        if t == "boolean" and raw not in ("true", "false"):
            return [f"{raw!r} is not a boolean"]
        if schema.get("enum") and raw not in schema["enum"]:
            return [f"{raw!r} is not one of {schema['enum']}"]
        return []

    def check_query(self, item, op, query):
        problems = []
        declared = {p["name"]: p for p in self.params(item, op) if p["in"] == "query"}
        for name, values in query.items():
            if name not in declared:
                problems.append(f"unknown query parameter {name!r}")
                continue
            for v in values:
                schema = declared[name].get("schema") or {}
                problems += [f"query parameter {name}: {x}" for x in self.check_value(schema, v)]
        for name, p in declared.items():
            if p.get("required") and name not in query:
                problems.append(f"missing required query parameter {name!r}")
        return problems

    def body_schema(self, op):
        rb = self.resolve(op.get("requestBody"))
        if not rb:
            return None, False
        return (rb.get("content", {}).get("application/json") or {}).get("schema"), bool(rb.get("required"))

    def response_schema(self, op, status):
        resp = self.resolve((op.get("responses") or {}).get(str(status)))
        if not resp:
            return None
        return (resp.get("content", {}).get("application/json") or {}).get("schema")

    # JSON-schema subset
    def validate(self, schema, value, where="body", strict=False):
        out = []
        self._v(schema, value, where, out, strict)
        return out

    def _v(self, s, v, where, out, strict):
        s = self.resolve(s)
        if not isinstance(s, dict):
            return
        if "allOf" in s:
            for sub in s["allOf"]:
                self._v(sub, v, where, out, False)
        for key in ("oneOf", "anyOf"):
            if key in s:
                alts = [self.validate(sub, v, where, strict) for sub in s[key]]
                if all(alts):
                    out.append(f"{where}: matches none of the {key} alternatives ({alts[0][0]})")
        if v is None:
            if not s.get("nullable") and s.get("type") not in (None, "null"):
                out.append(f"{where}: null is not allowed")
            return
        t = s.get("type")
        ok = {"string": lambda x: isinstance(x, str), "boolean": lambda x: isinstance(x, bool),
              "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
              "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              "object": lambda x: isinstance(x, dict), "array": lambda x: isinstance(x, list)}.get(t)
        if ok and not ok(v):
            out.append(f"{where}: {v!r} is not of type {t}")
            return
        if "enum" in s and v not in s["enum"]:
            out.append(f"{where}: {v!r} is not one of {s['enum']}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "minimum" in s and v < s["minimum"]:
                out.append(f"{where}: {v} is below the minimum {s['minimum']}")
            if "maximum" in s and v > s["maximum"]:
                out.append(f"{where}: {v} is above the maximum {s['maximum']}")
        if isinstance(v, str) and s.get("format") == "date-time":
            try:
                _parse_iso(v)
            except ValueError:
                out.append(f"{where}: {v!r} is not a date-time")
        if isinstance(v, dict):
            props = s.get("properties") or {}
            for name in s.get("required") or []:
                if name not in v:
                    out.append(f"{where}: missing required property {name!r}")
            extra = s.get("additionalProperties")
            for k, x in v.items():
                if k in props:
                    self._v(props[k], x, f"{where}.{k}", out, False)
                elif isinstance(extra, dict):
                    self._v(extra, x, f"{where}.{k}", out, False)
                elif strict and props and extra is None:
                    out.append(f"{where}: unknown property {k!r}")
        if isinstance(v, list) and "items" in s:
            for i, x in enumerate(v):
                self._v(s["items"], x, f"{where}[{i}]", out, False)

    def fill(self, s, v, depth=0):
        """`v` with every required property its schema (recursively, through arrays) asks for, missing ones
        set to a neutral value; for oneOf/anyOf the alternative that then validates best is used."""
        s = self.resolve(s)
        if depth > 20 or v is None or not isinstance(s, dict):
            return v
        for sub in s.get("allOf") or ():
            v = self.fill(sub, v, depth + 1)
        alts = s.get("oneOf") or s.get("anyOf")
        if alts:
            filled = [self.fill(sub, copy.deepcopy(v), depth + 1) for sub in alts]
            scores = [len(self.validate(sub, x)) for sub, x in zip(alts, filled)]
            return filled[scores.index(min(scores))]
        if isinstance(v, dict) and (s.get("type") == "object" or "properties" in s):
            props = s.get("properties") or {}
            out = dict(v)
            for k in s.get("required") or ():
                if k not in out:
                    out[k] = self.skeleton(props[k]) if k in props else None
            for k, x in out.items():
                if k in props:
                    out[k] = self.fill(props[k], x, depth + 1)
            return out
        if isinstance(v, list) and "items" in s:
            return [self.fill(s["items"], x, depth + 1) for x in v]
        return v

    def skeleton(self, schema):
        """A value with every required property of `schema` (recursively) set to a neutral value."""
        key = id(schema)
        if key not in self._skeletons:
            self._skeletons[key] = self._skel(schema, 0)
        return copy.deepcopy(self._skeletons[key])

    def _skel(self, s, depth):
        s = self.resolve(s)
        if depth > 12 or not isinstance(s, dict):
            return None
        if "allOf" in s:
            out = {}
            for sub in s["allOf"]:
                part = self._skel(sub, depth + 1)
                if isinstance(part, dict):
                    out.update(part)
            return out
        for key in ("oneOf", "anyOf"):
            if key in s:
                return self._skel(s[key][0], depth + 1)
        if s.get("nullable"):
            return None
        t = s.get("type")
        if t == "object" or "properties" in s:
            props = s.get("properties") or {}
            return {k: self._skel(props[k], depth + 1) if k in props else None for k in s.get("required") or []}
        if t == "array":
            return []
        if t == "string":
            if s.get("enum"):
                return s["enum"][0]
            return "1970-01-01T00:00:00Z" if s.get("format") == "date-time" else ""
        if t in ("integer", "number"):
            return 0
        if t == "boolean":
            return False
        return None


# ----------------------------------------------------------------------------- the fake
class FakeGitHub:
    """See the module docstring."""

    def __init__(self, tokens=None, host="127.0.0.1", port=0, log_url_ttl=60):
        self.host, self.port, self.log_url_ttl = host, port, log_url_ttl
        self.lock = threading.RLock()
        self.tokens = {}
        self.users, self.repos, self.pulls = {}, {}, {}
        self.reviews, self.review_comments, self.threads, self.issue_comments = {}, {}, {}, {}
        self.check_runs, self.statuses, self.queue, self.events = {}, {}, {}, {}
        self.requests, self.validation_errors, self.deprecations = [], [], []
        self.mutations, self.reruns, self.created_prs, self.comments_posted = [], [], [], []
        self.before_mutation = {}       # mutation name -> callable run once, just before it executes
        self._nodes = {}
        self._faults = []
        self._seq = itertools.count(1)
        self._db = itertools.count(1001)
        self._clock_offset = timedelta(0)
        self._last_ts = datetime.fromtimestamp(0, timezone.utc)
        self._observations = {}
        self._policy_applied = set()
        self._workflow_runs = {}   # (repo, sha, workflow) -> {"databaseId", "attempt", "id"}
        self._suites = {}          # (repo, sha, app) -> databaseId
        self._log_tokens = {}
        self._merge_cache = {}
        self._commit_cache = {}
        self._git_gen = 0
        self._budgets = {r: {"limit": 5000, "remaining": 5000, "used": 0, "reset": None} for r in ("core", "graphql")}
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None
        self._conns = set()
        self.api_url = self.graphql_url = None
        for token, login in (tokens or {}).items():
            self.add_token(token, login)

    # ------------------------------------------------------------------ server lifecycle
    def start(self):
        get_schema()
        get_openapi()
        self._stopping.clear()
        self._httpd = Server((self.host, self.port), _Handler)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        self.api_url = f"http://{self.host}:{self.port}"
        self.graphql_url = self.api_url + "/graphql"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="FakeGitHub",
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
    def now(self):
        """Current fake time (real UTC now + advance(), whole seconds, never before an earlier stamp)."""
        with self.lock:
            t = (datetime.now(timezone.utc) + self._clock_offset).replace(microsecond=0)
            return max(t, self._last_ts)

    def _stamp(self):
        with self.lock:
            self._last_ts = self.now()
            return _iso(self._last_ts)

    def advance(self, seconds):
        """Move the fake clock forward (timestamps only; rate-limit resets use the real clock)."""
        with self.lock:
            self._clock_offset += timedelta(seconds=seconds)

    def _new(self, typename, prefix, **fields):
        """A fresh entity dict with id/databaseId/_seq, registered for Query.node."""
        db = next(self._db)
        obj = {"__typename": typename, "id": _node_id(prefix, db), "databaseId": db, "fullDatabaseId": db,
               "_seq": next(self._seq), **fields}
        self._nodes[obj["id"]] = obj
        return obj

    # ------------------------------------------------------------------ users / tokens
    def add_user(self, login, association="MEMBER", name=None):
        """A user (or bot, when login ends with "[bot]"); association is its default authorAssociation."""
        with self.lock:
            if login not in self.users:
                db = next(self._db)
                self.users[login] = {"login": login, "databaseId": db, "association": association,
                                     "name": name or login, "bot": login.endswith("[bot]"),
                                     "id": _node_id("BOT" if login.endswith("[bot]") else "U", db)}
            else:
                self.users[login]["association"] = association
            return self.users[login]

    def add_token(self, token, login):
        with self.lock:
            if login not in self.users:
                self.add_user(login)
            self.tokens[token] = login

    def _user(self, login):
        return self.users.get(login) or self.add_user(login)

    def _actor(self, login):
        """GraphQL Actor dict (User or Bot) for a login."""
        if login is None:
            return None
        u = self._user(login)
        shown = login[:-5] if u["bot"] else login
        path = f"/apps/{shown}" if u["bot"] else f"/{shown}"
        return {"__typename": "Bot" if u["bot"] else "User", "login": shown, "id": u["id"],
                "databaseId": u["databaseId"], "name": u["name"], "url": WEB + path, "resourcePath": path,
                "avatarUrl": f"https://avatars.githubusercontent.com/u/{u['databaseId']}?v=4",
                "createdAt": "2020-01-01T00:00:00Z", "updatedAt": "2020-01-01T00:00:00Z"}

    def _rest_user(self, login):
        if login is None:
            return None
        u = self._user(login)
        return {"login": login, "id": u["databaseId"], "node_id": u["id"], "type": "Bot" if u["bot"] else "User",
                "html_url": f"{WEB}/{login}", "url": f"{self.api_url}/users/{quote(login)}",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{u['databaseId']}?v=4",
                "site_admin": False, "name": u["name"]}

    # ------------------------------------------------------------------ repositories
    def add_repo(self, full_name, bare_path, default_branch="main", required_checks=(), merge_queue=False,
                 viewer_permission="WRITE", required_approvals=0, auto_merge_allowed=True,
                 merge_commit_allowed=True, squash_merge_allowed=True, rebase_merge_allowed=True,
                 delete_branch_on_merge=False, private=True):
        """Serve the bare git repository at bare_path as `full_name` ("owner/name")."""
        owner, name = full_name.split("/")
        assert viewer_permission in ("ADMIN", "MAINTAIN", "WRITE", "TRIAGE", "READ"), viewer_permission
        with self.lock:
            r = self._new("Repository", "R", name=name, nameWithOwner=full_name, _owner=owner,
                          url=f"{WEB}/{full_name}", resourcePath=f"/{full_name}", isPrivate=bool(private),
                          viewerPermission=viewer_permission, mergeCommitAllowed=merge_commit_allowed,
                          autoMergeAllowed=auto_merge_allowed, squashMergeAllowed=squash_merge_allowed,
                          rebaseMergeAllowed=rebase_merge_allowed, deleteBranchOnMerge=delete_branch_on_merge,
                          isArchived=False, isFork=False, createdAt=self._stamp(), description=None,
                          _bare=str(bare_path), _default=default_branch, _required_checks=list(required_checks),
                          _merge_queue=bool(merge_queue), _required_approvals=int(required_approvals),
                          _policy=None, _next_number=1)
            r["updatedAt"] = r["createdAt"]
            self.repos[full_name] = r
            return r

    def _repo(self, x):
        if isinstance(x, dict):
            return x
        with self.lock:
            if x in self.repos:
                return self.repos[x]
            for k, r in self.repos.items():
                if k.lower() == str(x).lower():
                    return r
        raise KeyError(f"repository {x!r}")

    def set_required_checks(self, repo, names):
        with self.lock:
            self._repo(repo)["_required_checks"] = list(names)

    def set_check_policy(self, repo, fn):
        """fn(sha, fake) -> [add_check_run kwargs | add_status kwargs (with "context")], run lazily per commit."""
        with self.lock:
            self._repo(repo)["_policy"] = fn

    # ------------------------------------------------------------------ git access
    def _bump_git(self):
        self._git_gen += 1

    def _refs(self, repo, ctx=None):
        """{branch: oid} of the bare repository (cached per request when ctx is given)."""
        repo = self._repo(repo)
        key = (repo["nameWithOwner"], self._git_gen)
        cache = ctx.setdefault("refs", {}) if ctx is not None else {}
        if key not in cache:
            out = _git(repo["_bare"], "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads").stdout
            cache[key] = {line.split(" ")[0][len("refs/heads/"):]: line.split(" ")[1]
                          for line in out.splitlines() if line}
        return cache[key]

    def branch_oid(self, repo, branch, ctx=None):
        """Commit oid of refs/heads/<branch> in the bare repository, or None."""
        return self._refs(repo, ctx).get(branch)

    def rev_parse(self, repo, rev):
        """A commit oid for a sha, branch name or expression, or None."""
        repo = self._repo(repo)
        p = _git(repo["_bare"], "rev-parse", "--verify", "-q", f"{rev}^{{commit}}", check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    def file_at(self, repo, sha, path):
        """Content of `path` at commit `sha` (or any revision) in the bare repository, or None."""
        p = _git(self._repo(repo)["_bare"], "show", f"{sha}:{path}", check=False)
        return p.stdout if p.returncode == 0 else None

    def _is_ancestor(self, repo, a, b):
        return _git(self._repo(repo)["_bare"], "merge-base", "--is-ancestor", a, b, check=False).returncode == 0

    def _merge_tree(self, repo, base, head):
        """Tree oid of merging head into base, or None on conflicts (cached: oids are immutable)."""
        repo = self._repo(repo)
        key = (repo["_bare"], base, head)
        if key not in self._merge_cache:
            p = _git(repo["_bare"], "merge-tree", "--write-tree", "--no-messages", base, head, check=False)
            if p.returncode not in (0, 1):
                raise RuntimeError(f"git merge-tree failed: {p.stderr.strip()}")
            self._merge_cache[key] = p.stdout.split()[0] if p.returncode == 0 else None
        return self._merge_cache[key]

    def _commit_tree(self, repo, tree, parents, message, when):
        """A commit with fixed identity and date `when` (same inputs -> same oid)."""
        stamp = f"{int(when.timestamp())} +0000"
        key = ("commit-tree", self._repo(repo)["_bare"], tree, tuple(parents), message, stamp)
        if key not in self._merge_cache:
            args = ["commit-tree", tree, *itertools.chain.from_iterable(("-p", p) for p in parents), "-m", message]
            self._merge_cache[key] = _git(self._repo(repo)["_bare"], *args, env={
                **GIT_ENV, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}).stdout.strip()
        return self._merge_cache[key]

    def _update_ref(self, repo, branch, new, old=None):
        args = ["update-ref", f"refs/heads/{branch}", new] + ([old] if old else [])
        _git(self._repo(repo)["_bare"], *args)
        self._bump_git()

    def _delete_ref(self, repo, branch):
        _git(self._repo(repo)["_bare"], "update-ref", "-d", f"refs/heads/{branch}", check=False)
        self._bump_git()

    def _commit_info(self, repo, oid):
        key = (self._repo(repo)["_bare"], oid)
        if key not in self._commit_cache:
            p = _git(key[0], "log", "-1", "--format=%s%x00%B%x00%cI%x00%aI%x00%an%x00%ae", oid, check=False)
            parts = p.stdout.split("\x00") if p.returncode == 0 else []
            if len(parts) < 6:
                self._commit_cache[key] = {"messageHeadline": "", "message": "", "committedDate": _iso(self.now()),
                                           "authoredDate": _iso(self.now()), "_an": "", "_ae": ""}
            else:
                self._commit_cache[key] = {
                    "messageHeadline": parts[0], "message": parts[1].rstrip("\n"),
                    "committedDate": _iso(_parse_iso(parts[2])), "authoredDate": _iso(_parse_iso(parts[3])),
                    "_an": parts[4], "_ae": parts[5].strip()}
        return self._commit_cache[key]

    def _commit(self, repo, oid):
        """GraphQL Commit dict."""
        if not oid:
            return None
        name = self._repo(repo)["nameWithOwner"]
        return {"__typename": "Commit", "oid": oid, "abbreviatedOid": oid[:7], "_repo": name,
                "id": "C_kwDO" + base64.urlsafe_b64encode(f"{name}:{oid}".encode()).decode().rstrip("="),
                "url": f"{WEB}/{name}/commit/{oid}", "commitUrl": f"{WEB}/{name}/commit/{oid}",
                "resourcePath": f"/{name}/commit/{oid}", "commitResourcePath": f"/{name}/commit/{oid}"}

    def _ref(self, repo, branch, ctx=None):
        """GraphQL Ref dict for an existing branch, else None."""
        repo = self._repo(repo)
        oid = self.branch_oid(repo, branch, ctx)
        if oid is None:
            return None
        return {"__typename": "Ref", "id": "REF_kwDO" + base64.urlsafe_b64encode(
            f"{repo['nameWithOwner']}:{branch}".encode()).decode().rstrip("="), "name": branch,
            "prefix": "refs/heads/", "_repo": repo["nameWithOwner"], "target": self._commit(repo, oid)}

    # ------------------------------------------------------------------ pull requests
    def add_pr(self, repo, head, base=None, title="", body="", author="octocat", draft=False, association=None):
        """Open a pull request from branch `head` (must exist in the bare repo) into `base` (default branch)."""
        with self.lock:
            repo = self._repo(repo)
            base = base or repo["_default"]
            head_oid, base_oid = self.branch_oid(repo, head), self.branch_oid(repo, base)
            if head_oid is None or base_oid is None:
                raise ValueError(f"branch {head if head_oid is None else base!r} does not exist in {repo['_bare']}")
            n = repo["_next_number"]
            repo["_next_number"] += 1
            ts = self._stamp()
            url = f"{WEB}/{repo['nameWithOwner']}/pull/{n}"
            pr = self._new("PullRequest", "PR", number=n, _repo=repo["nameWithOwner"], title=title, body=body or "",
                           headRefName=head, baseRefName=base, _author=author,
                           authorAssociation=association or self._user(author)["association"], state="OPEN",
                           isDraft=bool(draft), createdAt=ts, updatedAt=ts, publishedAt=ts, mergedAt=None,
                           closedAt=None, lastEditedAt=None, _headOid=head_oid, _baseOid=base_oid,
                           _mergeable=None, _mergeStateStatus=None, _mergeCommit=None, _mergedBy=None, _commits=None,
                           autoMergeRequest=None, maintainerCanModify=False, locked=False, activeLockReason=None,
                           url=url, permalink=url, resourcePath=f"/{repo['nameWithOwner']}/pull/{n}",
                           checksUrl=url + "/checks", checksResourcePath=f"/{repo['nameWithOwner']}/pull/{n}/checks",
                           isCrossRepository=False, milestone=None, editor=None)
            self.pulls[pr["id"]] = pr
            return pr

    def pr(self, repo, number):
        """The live PullRequest dict of repo #number (KeyError when unknown)."""
        with self.lock:
            name = self._repo(repo)["nameWithOwner"]
            for p in self.pulls.values():
                if p["_repo"] == name and p["number"] == int(number):
                    return p
        raise KeyError(f"pull request {repo}#{number}")

    def prs(self, repo=None):
        """Pull requests (of one repository), oldest first."""
        with self.lock:
            name = repo and self._repo(repo)["nameWithOwner"]
            return sorted((p for p in self.pulls.values() if name is None or p["_repo"] == name),
                          key=lambda p: p["_seq"])

    def _pr(self, pr_or_repo, number=None):
        if isinstance(pr_or_repo, dict) and pr_or_repo.get("__typename") == "PullRequest":
            return pr_or_repo
        return self.pr(pr_or_repo, number)

    def set_pr(self, repo, number, **fields):
        """Change a PR as a human would. mergeable= / mergeStateStatus= override the computed values (None
        computes again); any other key (title, body, isDraft, authorAssociation, ...) is set as-is."""
        with self.lock:
            pr = self.pr(repo, number)
            for k, v in fields.items():
                if k in ("mergeable", "mergeStateStatus"):
                    pr["_" + k] = v
                else:
                    pr[k] = v
            pr["updatedAt"] = self._stamp()
            return pr

    def _sync_pr(self, pr, ctx=None):
        """Pick up pushes to an open PR's branches from the bare repository."""
        if pr["state"] != "OPEN":
            return
        if ctx is not None:
            done = ctx.setdefault("synced", set())
            if (pr["id"], self._git_gen) in done:
                return
            done.add((pr["id"], self._git_gen))
        repo = self._repo(pr["_repo"])
        refs = self._refs(repo, ctx)
        new = refs.get(pr["headRefName"])
        if new and new != pr["_headOid"]:
            old = pr["_headOid"]
            if old and not self._is_ancestor(repo, old, new):
                self._event(pr, "HeadRefForcePushedEvent", "HRFPE", actor=self._actor(pr["_author"]),
                            beforeCommit=self._commit(repo, old), afterCommit=self._commit(repo, new),
                            ref=self._ref(repo, pr["headRefName"], ctx))
            pr["_headOid"] = new
            pr["updatedAt"] = self._stamp()
        if refs.get(pr["baseRefName"]):
            pr["_baseOid"] = refs[pr["baseRefName"]]

    def _event(self, pr, typename, prefix, **fields):
        ev = self._new(typename, prefix, _pr=pr["id"], createdAt=self._stamp(), **fields)
        ev.setdefault("url", f"{pr['url']}#event-{ev['databaseId']}")
        ev.setdefault("resourcePath", f"{pr['resourcePath']}#event-{ev['databaseId']}")
        self.events[ev["id"]] = ev
        return ev

    def timeline(self, repo, number, types=None):
        """Timeline events of a PR (typenames, e.g. {"MergedEvent"}), in order."""
        pr = self.pr(repo, number)
        return [e for e in sorted(self.events.values(), key=lambda e: e["_seq"])
                if e["_pr"] == pr["id"] and (types is None or e["__typename"] in types)]

    def _head(self, pr, ctx=None):
        self._sync_pr(pr, ctx)
        return pr["_headOid"]

    def _pr_commits(self, pr, ctx=None):
        """Commit oids of a PR, oldest first (frozen when it merges)."""
        if pr["_commits"] is not None:
            return pr["_commits"]
        repo = self._repo(pr["_repo"])
        head = self._head(pr, ctx)
        key = ("rev-list", repo["_bare"], head, pr["_baseOid"])
        if key not in self._merge_cache:
            out = _git(repo["_bare"], "rev-list", "--reverse", head, f"^{pr['_baseOid']}", check=False).stdout
            self._merge_cache[key] = out.split() or [head]
        return self._merge_cache[key]

    def _diff_stats(self, pr):
        repo = self._repo(pr["_repo"])
        base, head = pr["_baseOid"], pr["_headOid"]
        key = ("numstat", repo["_bare"], base, head)
        if key not in self._merge_cache:
            out = _git(repo["_bare"], "diff", "--numstat", f"{base}...{head}", check=False).stdout
            rows = [line.split("\t") for line in out.splitlines() if line.count("\t") >= 2]
            num = lambda x: int(x) if x.isdigit() else 0  # noqa: E731
            self._merge_cache[key] = {"additions": sum(num(r[0]) for r in rows),
                                      "deletions": sum(num(r[1]) for r in rows), "changedFiles": len(rows)}
        return self._merge_cache[key]

    def _mergeable(self, pr, ctx=None):
        if pr["_mergeable"] is not None:
            return pr["_mergeable"]
        if pr["state"] != "OPEN":
            return "UNKNOWN"
        head = self._head(pr, ctx)
        return "MERGEABLE" if self._merge_tree(pr["_repo"], pr["_baseOid"], head) else "CONFLICTING"

    def _opinions(self, pr):
        """{login: latest opinionated review} (DISMISSED removes the opinion)."""
        latest = {}
        for r in sorted(self._reviews_of(pr), key=lambda r: r["_seq"]):
            if r["state"] in ("APPROVED", "CHANGES_REQUESTED", "DISMISSED"):
                latest[r["_author"]] = r
        return {k: r for k, r in latest.items() if r["state"] != "DISMISSED"}

    def review_decision(self, pr_or_repo, number=None):
        pr = self._pr(pr_or_repo, number)
        ops = self._opinions(pr)
        required = self._repo(pr["_repo"])["_required_approvals"]
        if any(r["state"] == "CHANGES_REQUESTED" for r in ops.values()):
            return "CHANGES_REQUESTED"
        if sum(r["state"] == "APPROVED" for r in ops.values()) >= max(1, required):
            return "APPROVED"
        return "REVIEW_REQUIRED" if required else None

    def merge_state_status(self, pr_or_repo, number=None, ctx=None):
        pr = self._pr(pr_or_repo, number)
        if pr["_mergeStateStatus"] is not None:
            return pr["_mergeStateStatus"]
        if pr["state"] != "OPEN":
            return "UNKNOWN"
        mergeable = self._mergeable(pr, ctx)
        if mergeable == "CONFLICTING":
            return "DIRTY"
        if mergeable == "UNKNOWN":
            return "UNKNOWN"
        if pr["isDraft"]:
            return "DRAFT"
        repo = self._repo(pr["_repo"])
        contexts = self._contexts(repo, self._head(pr, ctx), ctx)
        names = {self._context_name(c) for c in contexts}
        blocked = any(name not in names for name in self._required_names(repo, pr))
        unstable = False
        for c in contexts:
            ok = self._context_ok(c)
            if not ok and self._is_required(repo, c, pr):
                blocked = True
            unstable = unstable or not ok
        if self.review_decision(pr) in ("CHANGES_REQUESTED", "REVIEW_REQUIRED"):
            blocked = True
        return "BLOCKED" if blocked else "UNSTABLE" if unstable else "CLEAN"

    def close(self, repo, number, actor=None):
        """Close an open PR (ClosedEvent); it leaves the merge queue."""
        with self.lock:
            pr = self.pr(repo, number)
            if pr["state"] != "OPEN":
                raise ValueError(f"{repo}#{number} is not open")
            self._sync_pr(pr)
            self._leave_queue(pr)
            ts = self._stamp()
            pr.update(state="CLOSED", closedAt=ts, updatedAt=ts, autoMergeRequest=None)
            self._event(pr, "ClosedEvent", "CE", actor=self._actor(actor or pr["_author"]), stateReason=None,
                        closer=None, _closable=pr["id"])
            return pr

    def reopen(self, repo, number, actor=None):
        with self.lock:
            pr = self.pr(repo, number)
            if pr["state"] != "CLOSED":
                raise ValueError(f"{repo}#{number} is not closed")
            ts = self._stamp()
            pr.update(state="OPEN", closedAt=None, updatedAt=ts)
            self._event(pr, "ReopenedEvent", "REE", actor=self._actor(actor or pr["_author"]), stateReason=None,
                        _closable=pr["id"])
            self._sync_pr(pr)
            return pr

    def merge(self, repo, number, actor=None, method="MERGE", delete_branch=None):
        """Merge an open PR: really advances the base branch in the bare repository (see module docstring)."""
        with self.lock:
            pr = self.pr(repo, number)
            if pr["state"] != "OPEN":
                raise ValueError(f"{repo}#{number} is not open")
            repo = self._repo(pr["_repo"])
            self._sync_pr(pr)
            head = pr["_headOid"]
            base = self.branch_oid(repo, pr["baseRefName"])
            if base is None:
                raise ValueError(f"base branch {pr['baseRefName']!r} is gone")
            entry = self._entry_of(pr)
            message = f"Merge pull request #{pr['number']} from {repo['_owner']}/{pr['headRefName']}"
            if entry and entry["_headOid"] and entry["_baseOid"] == base:
                new = entry["_headOid"]
            elif method == "MERGE" and self._is_ancestor(repo, base, head):
                new = head
            else:
                tree = self._merge_tree(repo, base, head)
                if tree is None:
                    raise ValueError(f"{repo['nameWithOwner']}#{pr['number']} conflicts with {pr['baseRefName']}")
                parents = [base, head] if method == "MERGE" else [base]
                title = message if method == "MERGE" else f"{pr['title']} (#{pr['number']})"
                new = self._commit_tree(repo, tree, parents, title, self.now())
            pr["_commits"] = list(self._pr_commits(pr))
            self._update_ref(repo, pr["baseRefName"], new, base)
            if entry:
                del self.queue[entry["id"]]
            ts = self._stamp()
            login = actor or (MERGE_QUEUE_BOT if entry else pr["_author"])
            pr.update(state="MERGED", mergedAt=ts, closedAt=ts, updatedAt=ts, _mergeCommit=new, _mergedBy=login,
                      _baseOid=base, autoMergeRequest=None)
            self._event(pr, "MergedEvent", "ME", actor=self._actor(login), commit=self._commit(repo, new),
                        mergeRefName=pr["baseRefName"], mergeRef=self._ref(repo, pr["baseRefName"]))
            if delete_branch if delete_branch is not None else repo["deleteBranchOnMerge"]:
                self._delete_ref(repo, pr["headRefName"])
                self._event(pr, "HeadRefDeletedEvent", "HRDE", actor=self._actor(login),
                            headRefName=pr["headRefName"], headRef=None)
            self._rebuild_groups(repo, pr["baseRefName"])
            return pr

    # ------------------------------------------------------------------ reviews / comments
    def _reviews_of(self, pr):
        return [r for r in self.reviews.values() if r["_pr"] == pr["id"]]

    def review_requests(self, repo, number):
        """Logins asked for a review through ``requestReviews``."""
        with self.lock:
            return list(self.pr(repo, number).get("_review_requests") or [])

    def add_review(self, repo, number, login, state, body="", comments=(), association=None, commit=None):
        """A submitted review (state APPROVED | CHANGES_REQUESTED | COMMENTED | DISMISSED | PENDING). comments:
        [{"path", "line", "body", optional "diffHunk"}] each start an unresolved review thread.
        commit defaults to the current head."""
        assert state in ("APPROVED", "CHANGES_REQUESTED", "COMMENTED", "DISMISSED", "PENDING"), state
        with self.lock:
            pr = self.pr(repo, number)
            self._sync_pr(pr)
            assoc = association or self._user(login)["association"]
            ts = self._stamp()
            review = self._new("PullRequestReview", "PRR", _pr=pr["id"], _author=login, authorAssociation=assoc,
                               state=state, body=body, bodyText=body, createdAt=ts, updatedAt=ts,
                               submittedAt=None if state == "PENDING" else ts,
                               publishedAt=None if state == "PENDING" else ts, lastEditedAt=None,
                               _commit=commit or pr["_headOid"], isMinimized=False, minimizedReason=None,
                               authorCanPushToRepository=assoc in WRITERS, editor=None)
            review["url"] = f"{pr['url']}#pullrequestreview-{review['databaseId']}"
            review["resourcePath"] = review["url"][len(WEB):]
            self.reviews[review["id"]] = review
            for c in comments:
                thread = self._new("PullRequestReviewThread", "PRRT", _pr=pr["id"], path=c["path"],
                                   line=c.get("line"), originalLine=c.get("line"), startLine=None,
                                   originalStartLine=None, isResolved=False, isOutdated=False, isCollapsed=False,
                                   diffSide="RIGHT", startDiffSide=None, subjectType="LINE", _resolvedBy=None,
                                   _comments=[])
                self.threads[thread["id"]] = thread
                self._review_comment(pr, review, thread, login, assoc, c)
            pr["updatedAt"] = ts
            return review

    def _review_comment(self, pr, review, thread, login, assoc, c, reply_to=None):
        ts = self._stamp()
        rc = self._new("PullRequestReviewComment", "PRRC", _pr=pr["id"], _review=review and review["id"],
                       _thread=thread["id"], _author=login, authorAssociation=assoc, path=thread["path"],
                       line=thread["line"], originalLine=thread["originalLine"], startLine=None,
                       originalStartLine=None, body=c["body"], bodyText=c["body"], createdAt=ts, updatedAt=ts,
                       publishedAt=ts, lastEditedAt=None,
                       diffHunk=c.get("diffHunk") or f"@@ -{thread['line'] or 1} +{thread['line'] or 1} @@",
                       _commit=(review or {}).get("_commit") or pr["_headOid"], outdated=False, state="SUBMITTED",
                       subjectType="LINE", replyTo=reply_to, isMinimized=False, minimizedReason=None, editor=None)
        rc["url"] = f"{pr['url']}#discussion_r{rc['databaseId']}"
        rc["resourcePath"] = rc["url"][len(WEB):]
        self.review_comments[rc["id"]] = rc
        thread["_comments"].append(rc["id"])
        return rc

    def reply_to_thread(self, thread, login, body, association=None):
        """A reply comment in an existing review thread (no review)."""
        with self.lock:
            t = self.threads[thread["id"] if isinstance(thread, dict) else thread]
            pr = self.pulls[t["_pr"]]
            first = self.review_comments[t["_comments"][0]]
            return self._review_comment(pr, None, t, login, association or self._user(login)["association"],
                                        {"body": body}, reply_to=first)

    def resolve_thread(self, thread, by=None, resolved=True):
        """Mark a review thread resolved (or unresolved with resolved=False)."""
        with self.lock:
            t = self.threads[thread["id"] if isinstance(thread, dict) else thread]
            t["isResolved"] = bool(resolved)
            t["_resolvedBy"] = by if resolved else None
            return t

    def threads_of(self, repo, number):
        pr = self.pr(repo, number)
        return sorted((t for t in self.threads.values() if t["_pr"] == pr["id"]), key=lambda t: t["_seq"])

    def dismiss_review(self, review, message=""):
        with self.lock:
            r = self.reviews[review["id"] if isinstance(review, dict) else review]
            r["state"] = "DISMISSED"
            r["_dismissMessage"] = message
            r["updatedAt"] = self._stamp()
            return r

    def add_pr_comment(self, repo, number, login, body, association=None):
        """A conversation comment on the PR (IssueComment)."""
        with self.lock:
            return self._issue_comment(self.pr(repo, number), login, body, association)

    def _issue_comment(self, pr, login, body, association=None):
        ts = self._stamp()
        c = self._new("IssueComment", "IC", _pr=pr["id"], _author=login,
                      authorAssociation=association or self._user(login)["association"], body=body, bodyText=body,
                      createdAt=ts, updatedAt=ts, publishedAt=ts, lastEditedAt=None, isMinimized=False,
                      minimizedReason=None, editor=None)
        c["url"] = f"{pr['url']}#issuecomment-{c['databaseId']}"
        c["resourcePath"] = c["url"][len(WEB):]
        self.issue_comments[c["id"]] = c
        pr["updatedAt"] = ts
        return c

    def comments_of(self, repo, number):
        pr = self.pr(repo, number)
        return sorted((c for c in self.issue_comments.values() if c["_pr"] == pr["id"]), key=lambda c: c["_seq"])

    # ------------------------------------------------------------------ checks and statuses
    def add_check_run(self, repo, sha, name, status="COMPLETED", conclusion="SUCCESS", required=None, log=None,
                      title=None, summary=None, text=None, app="github-actions", details_url=None, workflow="CI",
                      pending_observations=0, rerun_result=None, started_at=None, completed_at=None):
        """A check run on commit `sha` (an oid or any revision). Returns its databaseId (= the Actions job id)."""
        with self.lock:
            return self._new_run(self._repo(repo), sha, name, status=status, conclusion=conclusion,
                                 required=required, log=log, title=title, summary=summary, text=text, app=app,
                                 details_url=details_url, workflow=workflow,
                                 pending_observations=pending_observations, rerun_result=rerun_result,
                                 started_at=started_at, completed_at=completed_at)["databaseId"]

    def _resolve_sha(self, repo, sha):
        if re.fullmatch(r"[0-9a-f]{40}", str(sha)):
            return sha
        oid = self.rev_parse(repo, sha)
        if oid is None:
            raise ValueError(f"unknown revision {sha!r} in {repo['nameWithOwner']}")
        return oid

    def _new_run(self, repo, sha, name, status="COMPLETED", conclusion="SUCCESS", required=None, log=None,
                 title=None, summary=None, text=None, app="github-actions", details_url=None, workflow="CI",
                 pending_observations=0, rerun_result=None, started_at=None, completed_at=None):
        status = status.upper()
        conclusion = conclusion.upper() if conclusion and status == "COMPLETED" else None
        sha = self._resolve_sha(repo, sha)
        full = repo["nameWithOwner"]
        suite_key = (full, sha, app)
        if suite_key not in self._suites:
            self._suites[suite_key] = next(self._db)
        wf = None
        if app == "github-actions":
            wkey = (full, sha, workflow)
            if wkey not in self._workflow_runs:
                db = next(self._db)
                self._workflow_runs[wkey] = {"databaseId": db, "attempt": 0, "id": _node_id("WFR", db),
                                             "name": workflow}
            wf = self._workflow_runs[wkey]
            wf["attempt"] += 1
        ts = self._stamp()
        run = self._new("CheckRun", "CR", name=name, _repo=full, _sha=sha, _status=status, _conclusion=conclusion,
                        _required=required, log=log, title=title, summary=summary, text=text, _app=app,
                        _workflow=wf, _suite=self._suites[suite_key], _rerun_result=rerun_result,
                        startedAt=started_at or ts,
                        _completedAt=completed_at or (ts if status == "COMPLETED" else None),
                        _pendingUntil=(self._observations.get((full, sha), 0) + int(pending_observations)
                                       if pending_observations else None),
                        externalId="", _attempt=wf["attempt"] if wf else 1)
        db = run["databaseId"]
        run["url"] = f"{WEB}/{full}/runs/{db}"
        run["permalink"] = run["url"]
        run["resourcePath"] = f"/{full}/runs/{db}"
        run["detailsUrl"] = details_url or (f"{WEB}/{full}/actions/runs/{wf['databaseId']}/job/{db}" if wf
                                            else run["url"])
        self.check_runs[db] = run
        return run

    def add_status(self, repo, sha, context, state, target_url=None, description=None, creator=None):
        """A commit status (state ERROR | EXPECTED | FAILURE | PENDING | SUCCESS, any case)."""
        with self.lock:
            repo = self._repo(repo)
            sha = self._resolve_sha(repo, sha)
            ts = self._stamp()
            st = self._new("StatusContext", "SC", _repo=repo["nameWithOwner"], _sha=sha, context=context,
                           state=state.upper(), targetUrl=target_url, description=description, createdAt=ts,
                           updatedAt=ts, _creator=creator or "ci-bot", avatarUrl=None)
            self.statuses[st["id"]] = st
            return st

    def check_runs_for(self, repo, sha, latest=True):
        """Check runs of a commit (latest per (app, name) unless latest=False), oldest first."""
        with self.lock:
            repo = self._repo(repo)
            sha = self._resolve_sha(repo, sha)
            runs = sorted((r for r in self.check_runs.values() if r["_repo"] == repo["nameWithOwner"]
                           and r["_sha"] == sha), key=lambda r: r["_seq"])
            if latest:
                last = {}
                for r in runs:
                    last[(r["_app"], r["name"])] = r
                runs = sorted(last.values(), key=lambda r: r["_seq"])
            return runs

    def _ensure_policy(self, repo, sha):
        key = (repo["nameWithOwner"], sha)
        if repo["_policy"] is None or key in self._policy_applied:
            return
        self._policy_applied.add(key)
        for item in repo["_policy"](sha, self) or []:
            item = dict(item)
            if "context" in item:
                self.add_status(repo, sha, **item)
            else:
                self._new_run(repo, sha, **item)

    def _observe(self, repo, sha, ctx):
        """A read of a commit's checks: applies the policy; counts one observation per GraphQL request."""
        self._ensure_policy(repo, sha)
        if ctx is not None and ctx.get("graphql"):
            seen = ctx.setdefault("observed", set())
            key = (repo["nameWithOwner"], sha)
            if key not in seen:
                seen.add(key)
                self._observations[key] = self._observations.get(key, 0) + 1

    def _run_view(self, run):
        """The check run as clients see it now (pending_observations applied)."""
        v = dict(run)
        until = run["_pendingUntil"]
        pending = until is not None and self._observations.get((run["_repo"], run["_sha"]), 0) <= until
        if pending and run["_status"] == "COMPLETED":
            v.update(status="IN_PROGRESS", conclusion=None, completedAt=None)
        else:
            v.update(status=run["_status"], conclusion=run["_conclusion"], completedAt=run["_completedAt"])
        return v

    def _contexts(self, repo, sha, ctx=None):
        """Current rollup contexts of a commit: latest check run per (app, name), latest status per context."""
        self._observe(repo, sha, ctx)
        runs = [self._run_view(r) for r in self.check_runs_for(repo, sha)]
        last = {}
        for s in sorted(self.statuses.values(), key=lambda s: s["_seq"]):
            if s["_repo"] == repo["nameWithOwner"] and s["_sha"] == sha:
                last[s["context"]] = s
        return sorted(runs + list(last.values()), key=lambda c: c["_seq"])

    @staticmethod
    def _context_name(c):
        return c["name"] if c["__typename"] == "CheckRun" else c["context"]

    @staticmethod
    def _context_ok(c):
        if c["__typename"] == "CheckRun":
            return c["status"] == "COMPLETED" and c["conclusion"] in PASSING
        return c["state"] == "SUCCESS"

    def _required_names(self, repo, pr=None):
        if pr is not None and pr["baseRefName"] != repo["_default"]:
            return []
        return list(repo["_required_checks"])

    def _is_required(self, repo, c, pr=None):
        if c["__typename"] == "CheckRun" and c.get("_required") is not None:
            return bool(c["_required"])
        return self._context_name(c) in self._required_names(repo, pr)

    @staticmethod
    def _rollup_state(contexts):
        states = set()
        for c in contexts:
            if c["__typename"] == "CheckRun":
                states.add("PENDING" if c["status"] != "COMPLETED" else
                           "FAILURE" if c["conclusion"] in FAILING else "SUCCESS")
            else:
                states.add("PENDING" if c["state"] == "EXPECTED" else c["state"])
        for s in ("FAILURE", "ERROR", "PENDING"):
            if s in states:
                return s
        return "SUCCESS"

    def _rollup(self, repo, sha, ctx=None):
        if not sha:
            return None
        contexts = self._contexts(repo, sha, ctx)
        if not contexts:
            return None
        return {"__typename": "StatusCheckRollup", "id": f"SCR_{sha}", "state": self._rollup_state(contexts),
                "_contexts": contexts, "commit": self._commit(repo, sha), "_repo": repo["nameWithOwner"]}

    def rerun(self, job_id, login=None):
        """Re-run a completed job (as POST .../actions/jobs/{id}/rerun does); returns the new run's databaseId."""
        with self.lock:
            run = self.check_runs[int(job_id)]
            repo = self._repo(run["_repo"])
            if self._run_view(run)["status"] != "COMPLETED":
                raise ValueError(f"job {job_id} is still running")
            rr = run["_rerun_result"]
            result, rest = None, None
            if isinstance(rr, list) and rr:
                result, rest = dict(rr[0]), rr[1:]
            elif isinstance(rr, dict):
                result = dict(rr)
            if result is None and repo["_policy"] is not None:
                result = next((dict(i) for i in repo["_policy"](run["_sha"], self) or []
                               if i.get("name") == run["name"] and "context" not in i), None)
            if result is None:
                result = {"conclusion": run["_conclusion"], "log": run["log"], "title": run["title"],
                          "summary": run["summary"], "text": run["text"], "required": run["_required"]}
            result.pop("name", None)
            result.setdefault("app", run["_app"])
            if run["_workflow"]:
                result.setdefault("workflow", run["_workflow"]["name"])
            if "rerun_result" not in result and rr is not None:
                result["rerun_result"] = rest if isinstance(rr, list) else rr
            new = self._new_run(repo, run["_sha"], run["name"], **result)
            self.reruns.append({"repo": repo["nameWithOwner"], "job_id": int(job_id), "name": run["name"],
                                "sha": run["_sha"], "login": login, "new_job_id": new["databaseId"],
                                "at": _iso(self.now())})
            return new["databaseId"]

    # ------------------------------------------------------------------ merge queue
    def _entries(self, repo, base):
        name = self._repo(repo)["nameWithOwner"]
        return sorted((e for e in self.queue.values() if e["_repo"] == name and e["_base"] == base),
                      key=lambda e: (not e["jump"], e["_seq"]))

    def _entry_of(self, pr):
        return next((e for e in self.queue.values() if e["_pr"] == pr["id"]), None)

    def queue_entry(self, repo, number):
        """The live MergeQueueEntry dict of a PR, or None (``_headOid`` is its merge-group commit)."""
        with self.lock:
            return self._entry_of(self.pr(repo, number))

    def set_queue_entry(self, repo, number, state=None, estimated_time_to_merge=None):
        """Override an entry's state (AWAITING_CHECKS | LOCKED | MERGEABLE | QUEUED | UNMERGEABLE) / ETA."""
        with self.lock:
            e = self.queue_entry(repo, number)
            if state is not None:
                e["_state"] = state
            if estimated_time_to_merge is not None:
                e["estimatedTimeToMerge"] = estimated_time_to_merge
            return e

    def enqueue(self, repo, number, actor=None, jump=False):
        """Add an open PR to its base branch's merge queue (AddedToMergeQueueEvent); returns the entry."""
        with self.lock:
            pr = self.pr(repo, number)
            repo = self._repo(pr["_repo"])
            if not repo["_merge_queue"]:
                raise ValueError(f"{repo['nameWithOwner']} has no merge queue")
            if pr["state"] != "OPEN":
                raise ValueError(f"{repo['nameWithOwner']}#{pr['number']} is not open")
            existing = self._entry_of(pr)
            if existing:
                return existing
            self._sync_pr(pr)
            login = actor or pr["_author"]
            entry = self._new("MergeQueueEntry", "MQE", _pr=pr["id"], _repo=repo["nameWithOwner"],
                              _base=pr["baseRefName"], enqueuedAt=self._stamp(), _enqueuer=login, _state=None,
                              estimatedTimeToMerge=None, jump=bool(jump), solo=False, _headOid=None,
                              _baseOid=None, _conflict=False)
            self.queue[entry["id"]] = entry
            self._event(pr, "AddedToMergeQueueEvent", "AMQE", actor=self._actor(login),
                        enqueuer=self._actor(login) if not self._user(login)["bot"] else None,
                        _queue=(repo["nameWithOwner"], pr["baseRefName"]))
            pr["updatedAt"] = self._stamp()
            self._rebuild_groups(repo, pr["baseRefName"])
            return entry

    def eject(self, repo, number, reason="Required status checks failed", actor=MERGE_QUEUE_BOT):
        """Remove a PR from the merge queue with a RemovedFromMergeQueueEvent carrying `reason`."""
        with self.lock:
            pr = self.pr(repo, number)
            entry = self._entry_of(pr)
            if entry is None:
                raise ValueError(f"{repo}#{number} is not in the merge queue")
            del self.queue[entry["id"]]
            repo = self._repo(pr["_repo"])
            self._event(pr, "RemovedFromMergeQueueEvent", "RMQE", actor=self._actor(actor), reason=reason,
                        beforeCommit=self._commit(repo, pr["_headOid"]),
                        enqueuer=self._actor(entry["_enqueuer"]) if not self._user(entry["_enqueuer"])["bot"] else None,
                        _queue=(repo["nameWithOwner"], entry["_base"]))
            pr["updatedAt"] = self._stamp()
            self._rebuild_groups(repo, entry["_base"])
            return pr

    def _leave_queue(self, pr):
        entry = self._entry_of(pr)
        if entry:
            del self.queue[entry["id"]]
            self._rebuild_groups(self._repo(pr["_repo"]), entry["_base"])

    def _rebuild_groups(self, repo, base):
        """(Re)create the merge-group commits and gh-readonly-queue refs of a queue (deterministic oids)."""
        repo = self._repo(repo)
        parent = self.branch_oid(repo, base)
        wanted = {}
        for e in self._entries(repo, base):
            pr = self.pulls[e["_pr"]]
            head = pr["_headOid"]
            tree = self._merge_tree(repo, parent, head) if parent else None
            if tree is None:
                e.update(_headOid=None, _baseOid=parent, _conflict=True)
                continue
            oid = self._commit_tree(repo, tree, [parent, head],
                                    f"Merge pull request #{pr['number']} from {repo['_owner']}/{pr['headRefName']}",
                                    _parse_iso(e["enqueuedAt"]))
            e.update(_headOid=oid, _baseOid=parent, _conflict=False)
            wanted[f"gh-readonly-queue/{base}/pr-{pr['number']}-{parent}"] = oid
            parent = oid
        prefix = f"gh-readonly-queue/{base}/"
        for branch, oid in self._refs(repo).items():
            if branch.startswith(prefix) and wanted.get(branch) != oid:
                self._delete_ref(repo, branch)
        refs = self._refs(repo)
        for branch, oid in wanted.items():
            if refs.get(branch) != oid:
                self._update_ref(repo, branch, oid)

    def _entry_state(self, e):
        if e["_state"]:
            return e["_state"]
        return "UNMERGEABLE" if e["_conflict"] else "QUEUED"

    # ------------------------------------------------------------------ auto-merge
    def enable_auto_merge(self, repo, number, actor=None, merge_method="MERGE", headline=None, body=None):
        """Auto-merge request (AutoMergeEnabledEvent); on a merge-queue repository this enqueues at once."""
        with self.lock:
            pr = self.pr(repo, number)
            repo = self._repo(pr["_repo"])
            if not repo["autoMergeAllowed"]:
                raise ValueError("Pull request Auto merge is not allowed for this repository")
            if pr["state"] != "OPEN":
                raise ValueError("Pull request is not open")
            login = actor or pr["_author"]
            pr["autoMergeRequest"] = {"__typename": "AutoMergeRequest", "enabledAt": self._stamp(),
                                      "enabledBy": self._actor(login), "mergeMethod": merge_method or "MERGE",
                                      "commitHeadline": headline, "commitBody": body, "authorEmail": None,
                                      "_pr": pr["id"]}
            self._event(pr, "AutoMergeEnabledEvent", "AMEE", actor=self._actor(login), enabler=self._actor(login))
            if repo["_merge_queue"]:
                self.enqueue(repo, pr["number"], actor=login)
            return pr

    def disable_auto_merge(self, repo, number, actor=None):
        with self.lock:
            pr = self.pr(repo, number)
            pr["autoMergeRequest"] = None
            login = actor or pr["_author"]
            self._event(pr, "AutoMergeDisabledEvent", "AMDE", actor=self._actor(login), disabler=self._actor(login),
                        reason=None, reasonCode=None)
            return pr

    # ------------------------------------------------------------------ faults / budgets
    def _add_fault(self, kind, n, match, **kw):
        with self.lock:
            self._faults.append({"kind": kind, "left": n, "match": match, **kw})

    def fail_next(self, n=1, status=502, match=None, body=None):
        """The next n matching requests get a plain HTTP error (nothing executes)."""
        self._add_fault("fail", n, match, status=status, body=body)

    def secondary_limit_next(self, n=1, retry_after=60, style="403", match=None):
        """403 (or 429) "You have exceeded a secondary rate limit..." with retry-after (None: no header)."""
        assert style in ("403", "429"), style
        self._add_fault("secondary", n, match, retry_after=retry_after, style=style)

    def malformed_next(self, n=1, body=b"<html><body>Unicorn!</body></html>", status=200, match=None):
        """Answer with these raw bytes (text/html) instead of executing."""
        self._add_fault("malformed", n, match, body=body, status=status)

    def hang_next(self, seconds, n=1, match=None):
        """Sleep `seconds` before handling the next n matching requests (then answer normally)."""
        self._add_fault("hang", n, match, seconds=seconds)

    def graphql_rate_limited_next(self, n=1, match=None, reset_in=None):
        """GraphQL answers HTTP 200 {"errors": [{"type": "RATE_LIMITED", ...}]}; with reset_in the headers also
        say remaining 0 and reset in that many seconds (the budget itself is untouched)."""
        self._add_fault("gql_ratelimited", n, match, reset_in=reset_in)

    def drop_after_commit_next(self, n=1, match=None):
        """Execute the next n matching requests, then close the socket without any response."""
        self._add_fault("drop", n, match)

    def primary_exhausted(self, reset_in=60, resource=None):
        """Spend the whole budget (both resources, or "core"/"graphql") until reset_in seconds from now."""
        with self.lock:
            for name, b in self._budgets.items():
                if resource in (None, name):
                    b.update(remaining=0, used=b["limit"], reset=int(time.time() + reset_in))

    def reset_budget(self, resource=None):
        with self.lock:
            for name, b in self._budgets.items():
                if resource in (None, name):
                    b.update(remaining=b["limit"], used=0, reset=int(time.time()) + 3600)

    def set_budget(self, resource="core", remaining=None, limit=None, reset_in=None):
        with self.lock:
            b = self._budgets[resource]
            if limit is not None:
                b["limit"] = limit
            if remaining is not None:
                b.update(remaining=remaining, used=b["limit"] - remaining)
            if reset_in is not None:
                b["reset"] = int(time.time() + reset_in)

    def _take_fault(self, kinds, names, target):
        with self.lock:
            for f in self._faults:
                m = f["match"]
                if f["kind"] in kinds and (m is None or m in names or m in target):
                    f["left"] -= 1
                    if f["left"] <= 0:
                        self._faults.remove(f)
                    return f
        return None

    def _budget(self, resource):
        b = self._budgets[resource]
        now = time.time()
        if b["reset"] is None or now >= b["reset"]:
            b.update(remaining=b["limit"], used=0, reset=int(now) + 3600)
        return b

    def _spend(self, resource, cost):
        with self.lock:
            b = self._budget(resource)
            b["used"] += cost
            b["remaining"] = max(0, b["limit"] - b["used"])

    def _exhausted(self, resource):
        with self.lock:
            return self._budget(resource)["remaining"] <= 0

    def _rate_headers(self, resource):
        with self.lock:
            b = self._budget(resource)
            return {"x-ratelimit-limit": b["limit"], "x-ratelimit-remaining": b["remaining"],
                    "x-ratelimit-used": b["used"], "x-ratelimit-reset": b["reset"],
                    "x-ratelimit-resource": resource}

    def _rate_json(self, resource):
        b = self._budget(resource)
        return {"limit": b["limit"], "remaining": b["remaining"], "used": b["used"], "reset": b["reset"]}

    # ------------------------------------------------------------------ records
    def operations(self):
        """Operation names (GraphQL operation / REST operationId) of all requests so far, in order."""
        return [r["operation"] for r in self.requests]

    def _record_error(self, kind, message, **extra):
        with self.lock:
            self.validation_errors.append({"kind": kind, "message": message, **extra})

    # ------------------------------------------------------------------ HTTP entry point
    def _dispatch(self, handler, method, body):
        """-> (status, headers, payload); payload None with status None = drop the connection."""
        split = urlsplit(handler.path)
        path, qs = split.path, split.query
        is_gql = path == "/graphql" and method == "POST"
        resource = "graphql" if is_gql else "core"
        hdrs = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in handler.headers.items()}
        rec = {"method": method, "path": path, "query": qs, "operation": None, "fields": [], "aliases": 0,
               "variables": None, "body": None, "login": None, "resource": resource, "status": None,
               "fault": None, "headers": hdrs, "at": time.time()}
        with self.lock:
            self.requests.append(rec)
            rid = f"FAKE:{len(self.requests):06d}"
        ctx = {"rec": rec, "rid": rid, "resource": resource, "method": method, "path": path, "qs": qs}
        if path.startswith("/_logs/") and method == "GET":     # the log blob: not the API, no auth or budget
            rec.update(resource=None, operation="job-log-blob")
            rec["status"], headers, payload = self._serve_log(path, qs)
            return rec["status"], headers, payload
        if is_gql:
            status, headers, payload = self._handle_graphql(handler, body, ctx)
        else:
            status, headers, payload = self._handle_rest(handler, method, body, ctx)
        rec["status"] = status
        if status is not None:
            headers = {**self._rate_headers(resource), **headers, "x-github-request-id": rid}
        return status, headers, payload

    def _pre(self, ctx, names):
        """Faults that act before anything executes -> a response tuple, or None to go on."""
        target = f"{ctx['method']} {ctx['path']}"
        rec = ctx["rec"]
        f = self._take_fault({"fail", "secondary", "malformed", "hang"}, names, target)
        if f is None:
            return None
        rec["fault"] = f["kind"]
        if f["kind"] == "hang":
            self._stopping.wait(f["seconds"])
            return None
        if f["kind"] == "fail":
            body = f["body"] if f["body"] is not None else {"message": "Server Error"}
            return f["status"], {}, body
        if f["kind"] == "malformed":
            return f["status"], {"content-type": "text/html; charset=utf-8"}, f["body"]
        h = {"retry-after": str(f["retry_after"])} if f["retry_after"] is not None else {}
        return int(f["style"]), h, {"message": SECONDARY_MESSAGE.format(rid=ctx["rid"]),
                                    "documentation_url": "https://docs.github.com/free-pro-team@latest/rest/overview/"
                                                         "rate-limits-for-the-rest-api#about-secondary-rate-limits"}

    def _auth(self, handler):
        auth = (handler.headers.get("Authorization") or "").strip()
        low = auth.lower()
        token = None
        if low.startswith("bearer "):
            token = auth[7:].strip()
        elif low.startswith("token "):
            token = auth[6:].strip()
        with self.lock:
            return self.tokens.get(token) if token else None

    def _bad_credentials(self):
        return 401, {}, {"message": "Bad credentials", "documentation_url": DOCS, "status": "401"}

    # ------------------------------------------------------------------ GraphQL
    def _handle_graphql(self, handler, body, ctx):
        schema = get_schema()
        rec = ctx["rec"]
        try:
            req = json.loads(body or b"{}")
            assert isinstance(req, dict)
        except Exception:
            req = None
        query = (req or {}).get("query") or ""
        variables = (req or {}).get("variables") or {}
        op_name = (req or {}).get("operationName")
        rec.update(variables=variables, operation=op_name)
        doc, syntax_error, errors, deprecated = _checked_document(query)
        op = get_operation_ast(doc, op_name) if doc is not None else None
        if op is not None:
            rec["fields"] = [s.name.value for s in op.selection_set.selections if isinstance(s, FieldNode)]
            rec["operation"] = op_name or (op.name.value if op.name else None) or ",".join(rec["fields"])
        if doc is not None:
            rec["aliases"] = _count_aliases(doc)
        names = {rec["operation"], *rec["fields"]}
        early = self._pre(ctx, names)
        if early:
            return early
        login = self._auth(handler)
        if login is None:
            return self._bad_credentials()
        rec["login"] = login
        if self._exhausted("graphql"):
            rec["fault"] = rec["fault"] or "primary"
            return 200, {}, {"errors": [{"type": "RATE_LIMITED",
                                         "message": PRIMARY_MESSAGE.format(uid=self._user(login)["databaseId"])}]}
        f = self._take_fault({"gql_ratelimited"}, names, f"POST {ctx['path']}")
        if f:
            rec["fault"] = "graphql_rate_limited"
            h = {}
            if f["reset_in"] is not None:
                h = {"x-ratelimit-remaining": 0, "x-ratelimit-reset": int(time.time() + f["reset_in"])}
            return 200, h, {"errors": [{"type": "RATE_LIMITED", "message": PRIMARY_MESSAGE.format(
                uid=self._user(login)["databaseId"])}]}

        def bad(errors, code):
            out = []
            for e in errors:
                fe = e.formatted if isinstance(e, GraphQLError) else {"message": str(e)}
                fe = dict(fe)
                ext = fe.pop("extensions", None) or {}
                fe["type"] = ext.pop("type", None) or code
                if ext:
                    fe["extensions"] = ext
                out.append(fe)
            for fe in out:
                self._record_error("graphql", fe["message"], operation=rec["operation"], type=fe["type"])
            return 400, {}, {"errors": out}

        if req is None:
            return 400, {}, {"message": "Problems parsing JSON", "documentation_url": DOCS}
        if syntax_error is not None:
            return bad([syntax_error], "PARSE_ERROR")
        if errors:
            return bad(errors, "VALIDATION_FAILED")
        if op is None:
            return bad([GraphQLError("An operation name is required when the document has several operations")],
                       "VALIDATION_FAILED")
        with self.lock:
            self.deprecations += [{"operation": rec["operation"], "message": m} for m in deprecated]
        coerced = get_variable_values(schema, op.variable_definitions or [], variables)
        if isinstance(coerced, list):
            return bad(coerced, "VARIABLE_COERCION")
        cost_info, problems = _cost(schema, doc, op, coerced)
        if problems:
            return bad([GraphQLError(m, extensions={"type": t}) for t, m in problems], "VALIDATION_FAILED")

        cost = cost_info["cost"]
        with self.lock:
            self._spend("graphql", cost)
            b = self._budget("graphql")
            gctx = {"fake": self, "login": login, "graphql": True, "rec": rec,
                    "rate": {"limit": b["limit"], "cost": cost, "remaining": b["remaining"], "used": b["used"],
                             "resetAt": _iso(datetime.fromtimestamp(b["reset"], timezone.utc)),
                             "nodeCount": cost_info["nodes"]}}
            result = execute(schema, doc, context_value=gctx, variable_values=variables, operation_name=op_name,
                             field_resolver=_resolve_field, type_resolver=_resolve_type)
        payload = {"data": result.data}
        if result.errors:
            payload["errors"] = [_format_error(e) for e in result.errors]
            for fe in payload["errors"]:
                if fe.get("type") == "FAKE_UNSUPPORTED":
                    self._record_error("unsupported", fe["message"], operation=rec["operation"])
        if self._take_fault({"drop"}, names, f"POST {ctx['path']}"):
            rec["fault"] = "drop"
            return None, {}, None
        return 200, {}, payload

    # ------------------------------------------------------------------ REST
    def _handle_rest(self, handler, method, body, ctx):
        api = get_openapi()
        rec = ctx["rec"]
        path = ctx["path"]
        try:
            found = api.match(method, path)
            mismatch = None if found else f"no operation matches {method} {path}"
        except LookupError as e:
            found, mismatch = None, str(e)
        op = found[0] if found else None
        rec["operation"] = op and op["operationId"]
        names = {rec["operation"]}
        early = self._pre(ctx, names)
        if early:
            return early
        login = self._auth(handler)
        if login is None:
            return self._bad_credentials()
        rec["login"] = login
        if mismatch:
            self._record_error("rest", mismatch, method=method, path=path)
            return 404, {}, {"message": "Not Found", "documentation_url": DOCS, "status": "404"}
        op, template, item, params = found
        free = op["operationId"] == "rate-limit/get"
        if not free and self._exhausted("core"):
            rec["fault"] = rec["fault"] or "primary"
            return 403, {}, {"message": PRIMARY_MESSAGE.format(uid=self._user(login)["databaseId"]) +
                             " (But here's the good news: Authenticated requests get a higher rate limit.)",
                             "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"}
        query = parse_qs(ctx["qs"], keep_blank_values=True)
        problems = api.check_query(item, op, query)
        if problems:
            for p in problems:
                self._record_error("rest", p, method=method, path=path, operation=op["operationId"])
            self._spend("core", 1)
            return 422, {}, {"message": "Validation Failed", "errors": [{"message": p, "code": "invalid"}
                                                                        for p in problems],
                             "documentation_url": DOCS, "status": "422"}
        schema, required = api.body_schema(op)
        data, problems = None, []
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                self._record_error("rest", "body is not JSON", method=method, path=path, operation=op["operationId"])
                self._spend("core", 1)
                return 400, {}, {"message": "Problems parsing JSON", "documentation_url": DOCS, "status": "400"}
        rec["body"] = data
        if schema is None and body:
            problems = [f"{op['operationId']} takes no request body"]
        elif schema is not None and data is None and required:
            problems = ["a JSON request body is required"]
        elif schema is not None and data is not None:
            problems = api.validate(schema, data, "body", strict=True)
        if problems:
            for p in problems:
                self._record_error("rest", p, method=method, path=path, operation=op["operationId"])
            self._spend("core", 1)
            return 422, {}, {"message": "Invalid request.\n\n" + "\n".join(problems), "documentation_url": DOCS,
                             "status": "422"}
        rctx = {"login": login, "params": params, "query": {k: v[-1] for k, v in query.items()}, "body": data,
                "op": op, "rec": rec}
        fn = REST.get(op["operationId"])
        with self.lock:
            try:
                if fn is None:
                    raise ApiError(501, f"FakeGitHub: unsupported REST operation {op['operationId']}")
                if "owner" in params and "repo" in params:
                    try:
                        rctx["repo"] = self._repo(f"{params['owner']}/{params['repo']}")
                    except KeyError:
                        raise ApiError(404, "Not Found") from None
                    if method in ("POST", "PATCH", "PUT", "DELETE") and \
                            rctx["repo"]["viewerPermission"] not in WRITE_PERMISSIONS:
                        raise ApiError(403, "Resource not accessible by personal access token")
                status, payload, headers = fn(self, rctx)
            except ApiError as e:
                if e.status == 501:
                    self._record_error("unsupported", e.message, method=method, path=path)
                status, payload, headers = e.status, e.payload(), e.headers
        if 200 <= status < 300 and payload is not None and not isinstance(payload, bytes):
            payload = self._shape_response(op, status, payload, method, path)
            if method == "GET":
                etag = 'W/"' + hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest() + '"'
                headers = {**headers, "etag": etag}
                if handler.headers.get("If-None-Match") == etag:
                    status, payload = 304, None
        if status != 304 and not free:
            self._spend("core", 1)
        if self._take_fault({"drop"}, names, f"{method} {path}"):
            rec["fault"] = "drop"
            return None, {}, None
        return status, headers, payload

    def _shape_response(self, op, status, payload, method, path):
        """Fill required properties from the response schema, then check the result against it."""
        api = get_openapi()
        schema = api.response_schema(op, status)
        if schema is None:
            return payload
        payload = api.fill(schema, payload)
        for p in api.validate(schema, payload, "response")[:5]:
            self._record_error("response", f"FakeGitHub answered off-spec: {p}", method=method, path=path)
        return payload

    def _serve_log(self, path, qs):
        job = path[len("/_logs/"):]
        token = (parse_qs(qs).get("token") or [""])[0]
        with self.lock:
            entry = self._log_tokens.get(token)
            if not entry or entry[0] != job or time.time() > entry[1]:
                return 403, {"content-type": "application/xml"}, (
                    b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code>"
                    b"<Message>Signature expired or invalid.</Message></Error>")
            run = self.check_runs.get(int(job))
            return 200, {"content-type": "text/plain; charset=utf-8"}, self._log_text(run).encode()

    def _log_text(self, run):
        if run["log"] is not None:
            return run["log"]
        v = self._run_view(run)
        end = "##[error]Process completed with exit code 1." if v["conclusion"] in FAILING else \
            "Cleaning up orphan processes"
        return f"{run['startedAt']} ##[group]Run {run['name']}\n{run['startedAt']} ##[endgroup]\n" \
               f"{run['startedAt']} {end}\n"

    # ------------------------------------------------------------------ REST representations
    def _rest_owner(self, owner):
        db = _stable_int(owner)
        return {"login": owner, "id": db, "node_id": _node_id("O", db), "type": "Organization",
                "html_url": f"{WEB}/{owner}", "url": f"{self.api_url}/users/{owner}",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{db}?v=4", "site_admin": False}

    def _rest_repo(self, repo):
        full = repo["nameWithOwner"]
        perm = repo["viewerPermission"]
        rank = ["READ", "TRIAGE", "WRITE", "MAINTAIN", "ADMIN"].index(perm)
        return {"id": repo["databaseId"], "node_id": repo["id"], "name": repo["name"], "full_name": full,
                "owner": self._rest_owner(repo["_owner"]), "private": repo["isPrivate"], "html_url": repo["url"],
                "url": f"{self.api_url}/repos/{full}", "default_branch": repo["_default"],
                "clone_url": f"{WEB}/{full}.git", "visibility": "private" if repo["isPrivate"] else "public",
                "permissions": {"admin": rank >= 4, "maintain": rank >= 3, "push": rank >= 2, "triage": rank >= 1,
                                "pull": True},
                "allow_auto_merge": repo["autoMergeAllowed"], "allow_merge_commit": repo["mergeCommitAllowed"],
                "allow_squash_merge": repo["squashMergeAllowed"], "allow_rebase_merge": repo["rebaseMergeAllowed"],
                "delete_branch_on_merge": repo["deleteBranchOnMerge"], "created_at": repo["createdAt"],
                "updated_at": repo["updatedAt"], "pushed_at": repo["updatedAt"]}

    def _rest_pr(self, pr, ctx=None):
        ctx = {} if ctx is None else ctx       # one git read per call
        self._sync_pr(pr, ctx)
        repo = self._repo(pr["_repo"])
        full, n = repo["nameWithOwner"], pr["number"]
        api = f"{self.api_url}/repos/{full}"
        mss = self.merge_state_status(pr, ctx=ctx)
        mergeable = self._mergeable(pr, ctx)
        n_commits = len(self._pr_commits(pr, ctx))
        amr = pr["autoMergeRequest"]
        stats = self._diff_stats(pr)
        side = lambda ref, sha: {"label": f"{repo['_owner']}:{ref}", "ref": ref, "sha": sha,  # noqa: E731
                                 "user": self._rest_owner(repo["_owner"]), "repo": self._rest_repo(repo)}
        return {
            "url": f"{api}/pulls/{n}", "id": pr["databaseId"], "node_id": pr["id"], "html_url": pr["url"],
            "diff_url": pr["url"] + ".diff", "patch_url": pr["url"] + ".patch", "issue_url": f"{api}/issues/{n}",
            "commits_url": f"{api}/pulls/{n}/commits", "review_comments_url": f"{api}/pulls/{n}/comments",
            "review_comment_url": f"{api}/pulls/comments{{/number}}", "comments_url": f"{api}/issues/{n}/comments",
            "statuses_url": f"{api}/statuses/{pr['_headOid']}", "number": n,
            "state": "open" if pr["state"] == "OPEN" else "closed", "locked": pr["locked"], "title": pr["title"],
            "user": self._rest_user(pr["_author"]), "body": pr["body"] or None, "labels": [], "milestone": None,
            "created_at": pr["createdAt"], "updated_at": pr["updatedAt"], "closed_at": pr["closedAt"],
            "merged_at": pr["mergedAt"], "merge_commit_sha": pr["_mergeCommit"], "assignee": None, "assignees": [],
            "requested_reviewers": [], "requested_teams": [], "draft": pr["isDraft"],
            "head": side(pr["headRefName"], pr["_headOid"]), "base": side(pr["baseRefName"], pr["_baseOid"]),
            "_links": {k: {"href": v} for k, v in (("self", f"{api}/pulls/{n}"), ("html", pr["url"]),
                                                   ("issue", f"{api}/issues/{n}"),
                                                   ("comments", f"{api}/issues/{n}/comments"),
                                                   ("review_comments", f"{api}/pulls/{n}/comments"),
                                                   ("review_comment", f"{api}/pulls/comments{{/number}}"),
                                                   ("commits", f"{api}/pulls/{n}/commits"),
                                                   ("statuses", f"{api}/statuses/{pr['_headOid']}"))},
            "author_association": pr["authorAssociation"],
            "auto_merge": None if amr is None else {
                "enabled_by": self._rest_user(self._login_of(amr["enabledBy"])),
                "merge_method": amr["mergeMethod"].lower(), "commit_title": amr["commitHeadline"] or "",
                "commit_message": amr["commitBody"] or ""},
            "merged": pr["state"] == "MERGED",
            "mergeable": {"MERGEABLE": True, "CONFLICTING": False}.get(mergeable),
            "mergeable_state": mss.lower(), "merged_by": self._rest_user(pr["_mergedBy"]),
            "comments": len([c for c in self.issue_comments.values() if c["_pr"] == pr["id"]]),
            "review_comments": len([c for c in self.review_comments.values() if c["_pr"] == pr["id"]]),
            "commits": n_commits, "maintainer_can_modify": pr["maintainerCanModify"],
            **{"additions": stats["additions"], "deletions": stats["deletions"],
               "changed_files": stats["changedFiles"]}}

    def _login_of(self, actor):
        if actor is None:
            return None
        return actor["login"] + "[bot]" if actor["__typename"] == "Bot" else actor["login"]

    def _rest_check_run(self, run):
        v = self._run_view(run)
        full = run["_repo"]
        app = run["_app"]
        return {"id": run["databaseId"], "node_id": run["id"], "head_sha": run["_sha"], "external_id": "",
                "url": f"{self.api_url}/repos/{full}/check-runs/{run['databaseId']}", "html_url": run["url"],
                "details_url": run["detailsUrl"], "status": v["status"].lower(),
                "conclusion": v["conclusion"] and REST_CONCLUSION.get(v["conclusion"], v["conclusion"].lower()),
                "started_at": run["startedAt"], "completed_at": v["completedAt"], "name": run["name"],
                "output": {"title": run["title"], "summary": run["summary"], "text": run["text"],
                           "annotations_count": 0,
                           "annotations_url": f"{self.api_url}/repos/{full}/check-runs/{run['databaseId']}"
                                              "/annotations"},
                "check_suite": {"id": run["_suite"]},
                "app": {"id": 15368 if app == "github-actions" else 1, "slug": app, "node_id": _node_id("A", 1),
                        "name": "GitHub Actions" if app == "github-actions" else app,
                        "owner": self._rest_owner("github"), "description": None, "external_url": f"{WEB}/{app}",
                        "html_url": f"{WEB}/apps/{app}", "created_at": "2018-07-30T09:30:17Z",
                        "updated_at": "2024-04-10T20:33:16Z", "permissions": {}, "events": []},
                "pull_requests": []}

    def _rest_job(self, run):
        v = self._run_view(run)
        full = run["_repo"]
        wf = run["_workflow"]
        branch = next((p["headRefName"] for p in self.pulls.values() if p["_repo"] == full
                       and p["_headOid"] == run["_sha"]), None)
        return {"id": run["databaseId"], "run_id": wf["databaseId"],
                "run_url": f"{self.api_url}/repos/{full}/actions/runs/{wf['databaseId']}",
                "run_attempt": run["_attempt"],
                "node_id": run["id"], "head_sha": run["_sha"],
                "url": f"{self.api_url}/repos/{full}/actions/jobs/{run['databaseId']}", "html_url": run["detailsUrl"],
                "status": v["status"].lower(),
                "conclusion": v["conclusion"] and REST_CONCLUSION.get(v["conclusion"], v["conclusion"].lower()),
                "created_at": run["startedAt"], "started_at": run["startedAt"], "completed_at": v["completedAt"],
                "name": run["name"], "steps": [],
                "check_run_url": f"{self.api_url}/repos/{full}/check-runs/{run['databaseId']}",
                "labels": ["ubuntu-latest"], "runner_id": 1, "runner_name": "GitHub Actions 1", "runner_group_id": 1,
                "runner_group_name": "GitHub Actions", "workflow_name": wf["name"], "head_branch": branch}

    def _rest_issue_comment(self, c):
        pr = self.pulls[c["_pr"]]
        api = f"{self.api_url}/repos/{pr['_repo']}"
        return {"id": c["databaseId"], "node_id": c["id"], "url": f"{api}/issues/comments/{c['databaseId']}",
                "html_url": c["url"], "body": c["body"], "user": self._rest_user(c["_author"]),
                "created_at": c["createdAt"], "updated_at": c["updatedAt"], "issue_url": f"{api}/issues/{pr['number']}",
                "author_association": c["authorAssociation"]}

    def _rest_review(self, r):
        pr = self.pulls[r["_pr"]]
        api = f"{self.api_url}/repos/{pr['_repo']}/pulls/{pr['number']}"
        return {"id": r["databaseId"], "node_id": r["id"], "user": self._rest_user(r["_author"]), "body": r["body"],
                "state": r["state"], "html_url": r["url"], "pull_request_url": api,
                "_links": {"html": {"href": r["url"]}, "pull_request": {"href": api}},
                "submitted_at": r["submittedAt"], "commit_id": r["_commit"],
                "author_association": r["authorAssociation"]}

    def _rest_review_comment(self, c):
        pr = self.pulls[c["_pr"]]
        api = f"{self.api_url}/repos/{pr['_repo']}/pulls"
        review = self.reviews.get(c["_review"]) if c["_review"] else None
        reply = c["replyTo"]
        return {"id": c["databaseId"], "node_id": c["id"], "url": f"{api}/comments/{c['databaseId']}",
                "pull_request_review_id": review and review["databaseId"], "diff_hunk": c["diffHunk"],
                "path": c["path"], "commit_id": c["_commit"], "original_commit_id": c["_commit"],
                **({"in_reply_to_id": reply["databaseId"]} if reply else {}), "user": self._rest_user(c["_author"]),
                "body": c["body"], "created_at": c["createdAt"], "updated_at": c["updatedAt"],
                "html_url": c["url"], "pull_request_url": f"{api}/{pr['number']}",
                "author_association": c["authorAssociation"], "line": c["line"], "original_line": c["originalLine"],
                "side": "RIGHT", "subject_type": "line",
                "_links": {"self": {"href": f"{api}/comments/{c['databaseId']}"}, "html": {"href": c["url"]},
                           "pull_request": {"href": f"{api}/{pr['number']}"}}}

    def _paginate(self, items, rctx):
        q = rctx["query"]
        per_page = min(MAX_PAGE, max(1, int(q.get("per_page") or 30)))
        page = max(1, int(q.get("page") or 1))
        last = max(1, -(-len(items) // per_page))
        headers = {}
        if len(items) > per_page:
            rec = rctx["rec"]
            base = f"{self.api_url}{rec['path']}"
            other = "&".join(f"{k}={quote(str(v))}" for k, v in q.items() if k != "page")
            link = lambda p, rel: f'<{base}?{other + "&" if other else ""}page={p}>; rel="{rel}"'  # noqa: E731
            parts = []
            if page < last:
                parts += [link(page + 1, "next"), link(last, "last")]
            if page > 1:
                parts += [link(1, "first"), link(page - 1, "prev")]
            if parts:
                headers["link"] = ", ".join(parts)
        return items[(page - 1) * per_page: page * per_page], headers

    def _rest_pr_by_number(self, rctx, key="pull_number"):
        try:
            return self.pr(rctx["repo"], int(rctx["params"][key]))
        except KeyError:
            raise ApiError(404, "Not Found") from None

    def _rest_run(self, rctx, key="job_id", actions=True):
        run = self.check_runs.get(int(rctx["params"][key]))
        if run is None or run["_repo"] != rctx["repo"]["nameWithOwner"] or \
                (actions and run["_workflow"] is None):
            raise ApiError(404, "Not Found")
        return run

    def _create_pr_rest(self, rctx):
        repo, b, login = rctx["repo"], rctx["body"], rctx["login"]
        if b.get("issue") is not None:
            raise ApiError(501, "FakeGitHub: unsupported pulls/create from an issue")
        head = b["head"]
        if ":" in head:
            owner, head = head.split(":", 1)
            if owner.lower() != repo["_owner"].lower():
                raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head",
                                                           "code": "invalid"}])
        if b.get("head_repo") and b["head_repo"].lower() != repo["nameWithOwner"].lower():
            raise ApiError(501, "FakeGitHub: unsupported cross-repository pull requests")
        base = b["base"]
        refs = self._refs(repo)
        if head not in refs:
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head", "code": "invalid"}])
        if base not in refs:
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "base", "code": "invalid"}])
        if not b.get("title"):
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "title",
                                                       "code": "missing_field"}])
        for p in self.prs(repo):
            if p["state"] == "OPEN" and p["headRefName"] == head and p["baseRefName"] == base:
                raise ApiError(422, "Validation Failed", [{
                    "resource": "PullRequest", "code": "custom",
                    "message": f"A pull request already exists for {repo['_owner']}:{head}."}])
        if self._is_ancestor(repo, refs[head], refs[base]):
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                                       "message": f"No commits between {base} and {head}"}])
        pr = self.add_pr(repo, head, base, title=b["title"], body=b.get("body") or "", author=login,
                         draft=bool(b.get("draft")))
        pr["maintainerCanModify"] = bool(b.get("maintainer_can_modify", False))
        self.created_prs.append({"repo": repo["nameWithOwner"], "number": pr["number"], "head": head, "base": base,
                                 "title": pr["title"], "draft": pr["isDraft"], "login": login,
                                 "at": pr["createdAt"]})
        location = f"{self.api_url}/repos/{repo['nameWithOwner']}/pulls/{pr['number']}"
        return 201, self._rest_pr(pr), {"location": location}


# ------------------------------------------------------------------------- REST endpoints
REST = {}


def _op(op_id):
    def deco(fn):
        REST[op_id] = fn
        return fn
    return deco


@_op("rate-limit/get")
def _rest_rate_limit(f, c):
    core, gql = f._rate_json("core"), f._rate_json("graphql")
    return 200, {"resources": {"core": core, "graphql": gql}, "rate": core}, {}


@_op("users/get-authenticated")
def _rest_get_user(f, c):
    if f._user(c["login"])["bot"]:
        raise ApiError(403, "Resource not accessible by integration")
    u = f._rest_user(c["login"])
    return 200, {**u, "created_at": "2020-01-01T00:00:00Z", "updated_at": "2020-01-01T00:00:00Z",
                 "two_factor_authentication": True}, {}


@_op("repos/get")
def _rest_get_repo(f, c):
    return 200, f._rest_repo(c["repo"]), {}


@_op("pulls/list")
def _rest_list_pulls(f, c):
    q, repo = c["query"], c["repo"]
    state = q.get("state", "open")
    head = q.get("head")
    if head is not None and ":" not in head:
        f._record_error("rest", f"pulls/list head={head!r} must be 'owner:branch' (GitHub ignores it otherwise)",
                        operation="pulls/list")
        raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head", "code": "invalid"}])
    rows = []
    ctx = {}
    for p in f.prs(repo):
        f._sync_pr(p, ctx)
        if state == "open" and p["state"] != "OPEN" or state == "closed" and p["state"] == "OPEN":
            continue
        if head is not None:
            owner, branch = head.split(":", 1)
            if owner.lower() != repo["_owner"].lower() or p["headRefName"] != branch:
                continue
        if q.get("base") is not None and p["baseRefName"] != q["base"]:
            continue
        rows.append(p)
    sort = q.get("sort", "created")
    key = {"created": lambda p: (p["createdAt"], p["_seq"]), "updated": lambda p: (p["updatedAt"], p["_seq"]),
           "popularity": lambda p: (len(f.comments_of(repo, p["number"])), p["_seq"]),
           "long-running": lambda p: (p["createdAt"], p["_seq"])}[sort]
    direction = q.get("direction") or ("desc" if sort == "created" else "asc")
    rows.sort(key=key, reverse=direction == "desc")
    page, headers = f._paginate(rows, c)
    return 200, [f._rest_pr(p, ctx) for p in page], headers


@_op("pulls/create")
def _rest_create_pull(f, c):
    return f._create_pr_rest(c)


@_op("pulls/get")
def _rest_get_pull(f, c):
    return 200, f._rest_pr(f._rest_pr_by_number(c)), {}


@_op("pulls/update")
def _rest_update_pull(f, c):
    pr = f._rest_pr_by_number(c)
    b = c["body"] or {}
    if "base" in b and f.branch_oid(c["repo"], b["base"]) is None:
        raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "base", "code": "invalid"}])
    for k in ("title", "body"):
        if k in b:
            pr[k] = b[k]
    if "base" in b:
        pr["baseRefName"] = b["base"]
    if "maintainer_can_modify" in b:
        pr["maintainerCanModify"] = b["maintainer_can_modify"]
    if b.get("state") == "closed" and pr["state"] == "OPEN":
        f.close(c["repo"], pr["number"], actor=c["login"])
    elif b.get("state") == "open" and pr["state"] == "CLOSED":
        f.reopen(c["repo"], pr["number"], actor=c["login"])
    pr["updatedAt"] = f._stamp()
    return 200, f._rest_pr(pr), {}


@_op("pulls/check-if-merged")
def _rest_check_merged(f, c):
    pr = f._rest_pr_by_number(c)
    if pr["state"] != "MERGED":
        raise ApiError(404, "Not Found")
    return 204, None, {}


@_op("pulls/list-reviews")
def _rest_list_reviews(f, c):
    pr = f._rest_pr_by_number(c)
    rows = sorted((r for r in f._reviews_of(pr) if r["state"] != "PENDING"), key=lambda r: r["_seq"])
    page, headers = f._paginate(rows, c)
    return 200, [f._rest_review(r) for r in page], headers


@_op("pulls/get-review")
def _rest_get_review(f, c):
    pr = f._rest_pr_by_number(c)
    r = next((r for r in f._reviews_of(pr) if r["databaseId"] == int(c["params"]["review_id"])), None)
    if r is None:
        raise ApiError(404, "Not Found")
    return 200, f._rest_review(r), {}


@_op("pulls/list-review-comments")
def _rest_list_review_comments(f, c):
    pr = f._rest_pr_by_number(c)
    rows = sorted((x for x in f.review_comments.values() if x["_pr"] == pr["id"]), key=lambda x: x["_seq"])
    if c["query"].get("since"):
        rows = [x for x in rows if _parse_iso(x["updatedAt"]) >= _parse_iso(c["query"]["since"])]
    if c["query"].get("direction") == "desc":
        rows.reverse()
    page, headers = f._paginate(rows, c)
    return 200, [f._rest_review_comment(x) for x in page], headers


@_op("pulls/list-commits")
def _rest_list_pr_commits(f, c):
    pr = f._rest_pr_by_number(c)
    full = c["repo"]["nameWithOwner"]
    rows = []
    for oid in f._pr_commits(pr):
        info = f._commit_info(full, oid)
        rows.append({"sha": oid, "node_id": f._commit(full, oid)["id"],
                     "url": f"{f.api_url}/repos/{full}/commits/{oid}", "html_url": f"{WEB}/{full}/commit/{oid}",
                     "commit": {"message": info["message"], "url": f"{f.api_url}/repos/{full}/git/commits/{oid}",
                                "author": {"name": info["_an"], "email": info["_ae"], "date": info["authoredDate"]},
                                "committer": {"name": info["_an"], "email": info["_ae"],
                                              "date": info["committedDate"]}}})
    page, headers = f._paginate(rows, c)
    return 200, page, headers


@_op("repos/list-pull-requests-associated-with-commit")
def _rest_prs_for_commit(f, c):
    sha = f.rev_parse(c["repo"], c["params"]["commit_sha"])
    ctx = {}
    rows = []
    for p in f.prs(c["repo"]):
        if sha and sha in f._pr_commits(p, ctx) or p["_mergeCommit"] == sha:
            rows.append(p)
    page, headers = f._paginate(rows, c)
    return 200, [f._rest_pr(p, ctx) for p in page], headers


def _ref_sha(f, c, key="ref"):
    sha = f.rev_parse(c["repo"], c["params"][key])
    if sha is None:
        raise ApiError(422, f"No commit found for SHA: {c['params'][key]}")
    return sha


@_op("checks/list-for-ref")
def _rest_checks_for_ref(f, c):
    sha = _ref_sha(f, c)
    f._ensure_policy(c["repo"], sha)
    q = c["query"]
    runs = f.check_runs_for(c["repo"], sha, latest=q.get("filter", "latest") == "latest")
    rows = [f._rest_check_run(r) for r in reversed(runs)]
    if q.get("check_name"):
        rows = [r for r in rows if r["name"] == q["check_name"]]
    if q.get("status"):
        rows = [r for r in rows if r["status"] == q["status"]]
    if q.get("app_id"):
        rows = [r for r in rows if r["app"]["id"] == int(q["app_id"])]
    page, headers = f._paginate(rows, c)
    return 200, {"total_count": len(rows), "check_runs": page}, headers


@_op("checks/get")
def _rest_get_check_run(f, c):
    return 200, f._rest_check_run(f._rest_run(c, "check_run_id", actions=False)), {}


def _statuses_for(f, c):
    sha = _ref_sha(f, c)
    f._ensure_policy(c["repo"], sha)
    rows = sorted((s for s in f.statuses.values() if s["_repo"] == c["repo"]["nameWithOwner"] and s["_sha"] == sha),
                  key=lambda s: s["_seq"], reverse=True)
    return sha, rows


def _rest_status(f, s):
    full = s["_repo"]
    return {"id": s["databaseId"], "node_id": s["id"], "url": f"{f.api_url}/repos/{full}/statuses/{s['_sha']}",
            "state": s["state"].lower() if s["state"] != "EXPECTED" else "pending", "context": s["context"],
            "description": s["description"], "target_url": s["targetUrl"], "created_at": s["createdAt"],
            "updated_at": s["updatedAt"], "avatar_url": None, "creator": f._rest_user(s["_creator"])}


@_op("repos/get-combined-status-for-ref")
def _rest_combined_status(f, c):
    sha, rows = _statuses_for(f, c)
    latest = {}
    for s in rows:
        latest.setdefault(s["context"], s)
    states = {s["state"] for s in latest.values()}
    state = "failure" if states & {"ERROR", "FAILURE"} else \
        "pending" if not states or states & {"PENDING", "EXPECTED"} else "success"
    full = c["repo"]["nameWithOwner"]
    return 200, {"state": state, "sha": sha, "total_count": len(latest),
                 "statuses": [_rest_status(f, s) for s in latest.values()], "repository": f._rest_repo(c["repo"]),
                 "commit_url": f"{f.api_url}/repos/{full}/commits/{sha}",
                 "url": f"{f.api_url}/repos/{full}/commits/{sha}/status"}, {}


@_op("repos/list-commit-statuses-for-ref")
def _rest_list_statuses(f, c):
    _, rows = _statuses_for(f, c)
    page, headers = f._paginate([_rest_status(f, s) for s in rows], c)
    return 200, page, headers


@_op("actions/get-job-for-workflow-run")
def _rest_get_job(f, c):
    return 200, f._rest_job(f._rest_run(c)), {}


@_op("actions/list-jobs-for-workflow-run")
def _rest_list_jobs(f, c):
    run_id = int(c["params"]["run_id"])
    runs = sorted((r for r in f.check_runs.values() if r["_workflow"] and r["_workflow"]["databaseId"] == run_id
                   and r["_repo"] == c["repo"]["nameWithOwner"]), key=lambda r: r["_seq"])
    if c["query"].get("filter", "latest") == "latest":
        last = {}
        for r in runs:
            last[r["name"]] = r
        runs = sorted(last.values(), key=lambda r: r["_seq"])
    page, headers = f._paginate(runs, c)
    return 200, {"total_count": len(runs), "jobs": [f._rest_job(r) for r in page]}, headers


@_op("actions/download-job-logs-for-workflow-run")
def _rest_job_logs(f, c):
    run = f._rest_run(c)
    token = secrets.token_urlsafe(16)
    f._log_tokens[token] = (str(run["databaseId"]), time.time() + f.log_url_ttl)
    return 302, None, {"location": f"{f.api_url}/_logs/{run['databaseId']}?token={token}"}


@_op("actions/re-run-job-for-workflow-run")
def _rest_rerun_job(f, c):
    run = f._rest_run(c)
    try:
        f.rerun(run["databaseId"], login=c["login"])
    except ValueError as e:
        raise ApiError(403, f"Unable to re-run this job: {e}") from None
    return 201, {}, {}


@_op("actions/re-run-workflow-failed-jobs")
def _rest_rerun_failed(f, c):
    run_id = int(c["params"]["run_id"])
    last = {}
    for r in sorted(f.check_runs.values(), key=lambda r: r["_seq"]):
        if r["_workflow"] and r["_workflow"]["databaseId"] == run_id and r["_repo"] == c["repo"]["nameWithOwner"]:
            last[r["name"]] = r
    if not last:
        raise ApiError(404, "Not Found")
    failed = [r for r in last.values() if f._run_view(r)["conclusion"] in FAILING]
    if not failed:
        raise ApiError(403, "This workflow run has no failed jobs to re-run")
    for r in failed:
        f.rerun(r["databaseId"], login=c["login"])
    return 201, {}, {}


def _issue_pr(f, c):
    return f._rest_pr_by_number(c, "issue_number")


@_op("issues/list-comments")
def _rest_list_comments(f, c):
    pr = _issue_pr(f, c)
    rows = f.comments_of(c["repo"], pr["number"])
    if c["query"].get("since"):
        rows = [x for x in rows if _parse_iso(x["updatedAt"]) >= _parse_iso(c["query"]["since"])]
    page, headers = f._paginate(rows, c)
    return 200, [f._rest_issue_comment(x) for x in page], headers


@_op("issues/create-comment")
def _rest_create_comment(f, c):
    pr = _issue_pr(f, c)
    com = f._issue_comment(pr, c["login"], c["body"]["body"])
    f.comments_posted.append({"repo": pr["_repo"], "number": pr["number"], "login": c["login"],
                              "body": com["body"], "id": com["databaseId"], "at": com["createdAt"]})
    return 201, f._rest_issue_comment(com), {"location": f"{f.api_url}/repos/{pr['_repo']}/issues/comments/"
                                                         f"{com['databaseId']}"}


def _comment_by_id(f, c):
    cid = int(c["params"]["comment_id"])
    com = next((x for x in f.issue_comments.values() if x["databaseId"] == cid
                and f.pulls[x["_pr"]]["_repo"] == c["repo"]["nameWithOwner"]), None)
    if com is None:
        raise ApiError(404, "Not Found")
    return com


@_op("issues/get-comment")
def _rest_get_comment(f, c):
    return 200, f._rest_issue_comment(_comment_by_id(f, c)), {}


@_op("issues/update-comment")
def _rest_update_comment(f, c):
    com = _comment_by_id(f, c)
    if com["_author"] != c["login"]:
        raise ApiError(403, "Resource not accessible by personal access token")
    com.update(body=c["body"]["body"], bodyText=c["body"]["body"], updatedAt=f._stamp())
    com["lastEditedAt"] = com["updatedAt"]
    return 200, f._rest_issue_comment(com), {}


def _rest_branch_short(f, repo, name, oid):
    return {"name": name, "commit": {"sha": oid, "url": f"{f.api_url}/repos/{repo['nameWithOwner']}/commits/{oid}"},
            "protected": name == repo["_default"] and bool(repo["_required_checks"])}


@_op("repos/list-branches")
def _rest_list_branches(f, c):
    rows = [_rest_branch_short(f, c["repo"], n, o) for n, o in sorted(f._refs(c["repo"]).items())]
    if c["query"].get("protected") is not None:
        want = c["query"]["protected"] == "true"
        rows = [r for r in rows if r["protected"] == want]
    page, headers = f._paginate(rows, c)
    return 200, page, headers


@_op("repos/get-branch")
def _rest_get_branch(f, c):
    repo, name = c["repo"], c["params"]["branch"]
    oid = f.branch_oid(repo, name)
    if oid is None:
        raise ApiError(404, "Branch not found")
    short = _rest_branch_short(f, repo, name, oid)
    api = f"{f.api_url}/repos/{repo['nameWithOwner']}/branches/{quote(name, safe='')}"
    return 200, {**short, "commit": {**short["commit"], "sha": oid, "node_id": f._commit(repo, oid)["id"],
                                     "html_url": f"{WEB}/{repo['nameWithOwner']}/commit/{oid}"},
                 "_links": {"self": api, "html": f"{WEB}/{repo['nameWithOwner']}/tree/{name}"},
                 "protection": {"enabled": short["protected"]}, "protection_url": api + "/protection"}, {}


@_op("git/get-ref")
def _rest_get_ref(f, c):
    ref = c["params"]["ref"]
    if not ref.startswith("heads/"):
        raise ApiError(404, "Not Found")
    oid = f.branch_oid(c["repo"], ref[len("heads/"):])
    if oid is None:
        raise ApiError(404, "Not Found")
    full = c["repo"]["nameWithOwner"]
    return 200, {"ref": "refs/" + ref, "node_id": _node_id("REF", _stable_int(full, ref)),
                 "url": f"{f.api_url}/repos/{full}/git/refs/{ref}",
                 "object": {"type": "commit", "sha": oid, "url": f"{f.api_url}/repos/{full}/git/commits/{oid}"}}, {}


@_op("git/delete-ref")
def _rest_delete_ref(f, c):
    ref = c["params"]["ref"]
    branch = ref[len("heads/"):] if ref.startswith("heads/") else None
    if branch is None or f.branch_oid(c["repo"], branch) is None:
        raise ApiError(422, "Reference does not exist")
    f._delete_ref(c["repo"], branch)
    for p in f.prs(c["repo"]):
        if p["headRefName"] == branch and p["state"] != "MERGED":
            f._event(p, "HeadRefDeletedEvent", "HRDE", actor=f._actor(c["login"]), headRefName=branch, headRef=None)
    return 204, None, {}


@_op("repos/get-status-checks-protection")
def _rest_required_checks(f, c):
    repo, branch = c["repo"], c["params"]["branch"]
    if f.branch_oid(repo, branch) is None:
        raise ApiError(404, "Branch not found")
    if branch != repo["_default"] or not repo["_required_checks"]:
        raise ApiError(404, "Required status checks not enabled")
    url = f"{f.api_url}/repos/{repo['nameWithOwner']}/branches/{quote(branch, safe='')}/protection/" \
          "required_status_checks"
    return 200, {"url": url, "contexts_url": url + "/contexts", "strict": False,
                 "contexts": list(repo["_required_checks"]),
                 "checks": [{"context": n, "app_id": None} for n in repo["_required_checks"]]}, {}


# ------------------------------------------------------------------------- GraphQL cost / limits
def _count_aliases(doc):
    n = 0

    def walk(sel_set):
        nonlocal n
        for sel in sel_set.selections if sel_set else ():
            if isinstance(sel, FieldNode) and sel.alias:
                n += 1
            if getattr(sel, "selection_set", None):
                walk(sel.selection_set)
    for d in doc.definitions:
        if getattr(d, "selection_set", None):
            walk(d.selection_set)
    return n


def _cost(schema, doc, op, variables):
    """GitHub's formula: each connection field costs one request per parent item (product of the enclosing
    first/last values); cost = max(1, round(requests / 100)); nodes = sum of requests * first/last.
    Returns ({"cost", "nodes"}, [(error type, message)]) - problems for missing/excessive first/last."""
    frags = {d.name.value: d for d in doc.definitions if isinstance(d, FragmentDefinitionNode)}
    problems, totals = [], {"requests": 0, "nodes": 0}

    def walk(sel_set, ptype, mult, depth):
        for sel in sel_set.selections:
            if isinstance(sel, FieldNode):
                name = sel.name.value
                fields = getattr(ptype, "fields", None) or {}
                if name.startswith("__") or name not in fields:
                    continue
                fdef = fields[name]
                named = get_named_type(fdef.type)
                if sel.selection_set is None:
                    continue
                size = 1
                if named.name.endswith("Connection") and "first" in fdef.args:
                    args = get_argument_values(fdef, sel, variables)
                    first, last = args.get("first"), args.get("last")
                    if first is None and last is None:
                        problems.append(("MISSING_PAGINATION_BOUNDARIES",
                                         f"You must provide a `first` or `last` value to properly paginate the "
                                         f"`{name}` connection."))
                    for arg, v in (("first", first), ("last", last)):
                        if v is not None and not 0 <= v <= MAX_PAGE:
                            problems.append(("EXCESSIVE_PAGINATION" if v > MAX_PAGE else "INVALID_ARGUMENTS",
                                             f"Requesting {v} records on the `{name}` connection exceeds the "
                                             f"`{arg}` limit of {MAX_PAGE} records." if v > MAX_PAGE else
                                             f"`{arg}` on the `{name}` connection cannot be negative."))
                    size = max(first or 0, last or 0)
                    totals["requests"] += mult
                    totals["nodes"] += mult * size
                walk(sel.selection_set, named, mult * size, depth + 1)
            elif isinstance(sel, InlineFragmentNode):
                t = schema.get_type(sel.type_condition.name.value) if sel.type_condition else ptype
                walk(sel.selection_set, t, mult, depth)
            elif isinstance(sel, FragmentSpreadNode) and sel.name.value in frags and depth < 50:
                fr = frags[sel.name.value]
                walk(fr.selection_set, schema.get_type(fr.type_condition.name.value), mult, depth + 1)

    root = schema.mutation_type if op.operation == OperationType.MUTATION else schema.query_type
    walk(op.selection_set, root, 1, 0)
    if totals["nodes"] > MAX_NODES:
        problems.append(("MAX_NODE_LIMIT_EXCEEDED", f"This query requests up to {totals['nodes']:,} possible nodes "
                                                    f"which exceeds the maximum limit of {MAX_NODES:,}."))
    seen, unique = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return {"cost": max(1, round(totals["requests"] / 100)), "nodes": totals["nodes"]}, unique


def _format_error(e):
    fe = dict(e.formatted)
    ext = dict(fe.pop("extensions", None) or {})
    if "type" in ext:
        fe["type"] = ext.pop("type")
    if ext:
        fe["extensions"] = ext
    return fe


# ------------------------------------------------------------------------- GraphQL resolvers
RESOLVERS = {}


def _r(*keys):
    def deco(fn):
        for k in keys:
            RESOLVERS[tuple(k.split("."))] = fn
        return fn
    return deco


def _resolve_type(value, info, abstract_type):
    return value.get("__typename") if isinstance(value, dict) else None


def _resolve_field(source, info, **args):
    ctx = info.context
    f = ctx["fake"]
    parent = info.parent_type.name
    fn = RESOLVERS.get((parent, info.field_name))
    if parent == "PullRequest" and isinstance(source, dict):
        f._sync_pr(source, ctx)
    if parent == "Mutation":
        rec = {"name": info.field_name, "input": copy.deepcopy(args.get("input")), "login": ctx["login"],
               "at": _iso(f.now()), "error": None}
        f.mutations.append(rec)
        hook = f.before_mutation.pop(info.field_name, None)
        if hook is not None:
            hook()                  # a test's race: something happens between an observation and this write
        if fn is None:
            rec["error"] = "unsupported"
            raise _unsupported(f"Mutation.{info.field_name}")
        try:
            return fn(f, source, args, ctx)
        except GraphQLError as e:
            rec["error"] = e.message
            raise
    if fn is not None:
        return fn(f, source, args, ctx)
    if parent == "Query":
        raise _unsupported(f"Query.{info.field_name}")
    if isinstance(source, dict) and info.field_name in source:
        return source[info.field_name]
    return _default(info.return_type, source, info)


def _default(rtype, source, info):
    """A plausible value for an unmodelled scalar field; anything structured is an unsupported error."""
    t = rtype.of_type if isinstance(rtype, GraphQLNonNull) else rtype
    if isinstance(t, GraphQLScalarType):
        if not isinstance(rtype, GraphQLNonNull):
            return None
        return {"String": "", "Boolean": False, "Int": 0, "Float": 0.0, "BigInt": "0", "HTML": "",
                "URI": (source or {}).get("url") or WEB, "ID": f"{(source or {}).get('id')}/{info.field_name}",
                "DateTime": (source or {}).get("createdAt") or "1970-01-01T00:00:00Z",
                "GitObjectID": "0" * 40}.get(t.name, "")
    raise _unsupported(f"field {info.parent_type.name}.{info.field_name}")


def _conn(items, args, key=lambda x: (x["_seq"],), reverse=False, **extra):
    """A connection over dicts: keyset cursors, first/last/after/before/skip, totalCount."""
    rows = sorted(items, key=key, reverse=reverse)
    keys = [list(key(x)) for x in rows]
    lo, hi = 0, len(rows)
    if args.get("after"):
        c = _decode_cursor(args["after"])
        lo = next((i for i, k in enumerate(keys) if (k < c if reverse else k > c)), len(rows))
    if args.get("before"):
        c = _decode_cursor(args["before"])
        hi = next((i for i, k in enumerate(keys) if (k <= c if reverse else k >= c)), len(rows))
    hi = max(lo, hi)
    lo = min(hi, lo + (args.get("skip") or 0))
    first, last = args.get("first"), args.get("last")
    start, end = lo, hi
    if first is not None:
        end = min(hi, lo + first)
    if last is not None:
        start = max(start, end - last)
    edges = [{"node": rows[i], "cursor": _cursor(keys[i])} for i in range(start, end)]
    return {"nodes": [e["node"] for e in edges], "edges": edges, "totalCount": len(rows),
            "pageInfo": {"hasNextPage": end < hi, "hasPreviousPage": start > lo,
                         "startCursor": edges[0]["cursor"] if edges else None,
                         "endCursor": edges[-1]["cursor"] if edges else None}, **extra}


def _not_found(message):
    return _gql_error(message, "NOT_FOUND")


def _node(f, node_id, typename=None):
    obj = f._nodes.get(node_id)
    if obj is None or (typename and obj["__typename"] != typename):
        raise _not_found(f"Could not resolve to a node with the global id of '{node_id}'")
    return obj


def _writer(f, pr, mutation, ctx):
    repo = f._repo(pr["_repo"])
    if repo["viewerPermission"] not in WRITE_PERMISSIONS:
        raise _gql_error(f"{ctx['login']} does not have the correct permissions to execute `{mutation}`", "FORBIDDEN")
    return repo


def _as_gql_error(fn):
    """Run a helper; its ValueError becomes an UNPROCESSABLE GraphQL error."""
    try:
        return fn()
    except ValueError as e:
        raise _gql_error(str(e), "UNPROCESSABLE") from None


# --- Query
@_r("Query.viewer")
def _q_viewer(f, s, a, c):
    return {**f._actor(c["login"]), "__typename": "User", "login": c["login"], "email": "",
            "isSiteAdmin": False, "isViewer": True, "_login": c["login"], "company": None, "bio": None}


@_r("Query.rateLimit")
def _q_rate_limit(f, s, a, c):
    return c["rate"]


@_r("Query.repository")
def _q_repository(f, s, a, c):
    try:
        return f._repo(f"{a['owner']}/{a['name']}")
    except KeyError:
        raise _not_found(f"Could not resolve to a Repository with the name '{a['owner']}/{a['name']}'.") from None


@_r("Query.node")
def _q_node(f, s, a, c):
    return _node(f, a["id"])


@_r("Query.nodes")
def _q_nodes(f, s, a, c):
    return [f._nodes.get(i) for i in a["ids"]]


# --- Repository / Ref / owner
@_r("Repository.owner")
def _repo_owner(f, s, a, c):
    owner = s["_owner"]
    return {"__typename": "Organization", "login": owner, "id": f._rest_owner(owner)["node_id"],
            "url": f"{WEB}/{owner}", "resourcePath": f"/{owner}", "name": owner,
            "avatarUrl": f"https://avatars.githubusercontent.com/u/{f._rest_owner(owner)['id']}?v=4"}


@_r("Repository.defaultBranchRef")
def _repo_default_ref(f, s, a, c):
    return f._ref(s, s["_default"], c)


@_r("Repository.ref")
def _repo_ref(f, s, a, c):
    q = a["qualifiedName"]
    if q.startswith("refs/tags/"):
        raise _unsupported("tags in Repository.ref")
    return f._ref(s, q[len("refs/heads/"):] if q.startswith("refs/heads/") else q, c)


@_r("Repository.object")
def _repo_object(f, s, a, c):
    oid = f.rev_parse(s, a.get("oid") or a.get("expression") or "")
    return f._commit(s, oid) if oid else None


@_r("Repository.pullRequest")
def _repo_pull(f, s, a, c):
    try:
        return f.pr(s, a["number"])
    except KeyError:
        raise _not_found(f"Could not resolve to a PullRequest with the number of {a['number']}.") from None


def _pull_requests(f, repo, a, c, head=None):
    if a.get("labels"):
        raise _unsupported("labels filter on pullRequests")
    head = head if head is not None else a.get("headRefName")
    rows = []
    for p in f.prs(repo):
        f._sync_pr(p, c)
        if head is not None and p["headRefName"] != head:
            continue
        if a.get("baseRefName") is not None and p["baseRefName"] != a["baseRefName"]:
            continue
        if a.get("states") and p["state"] not in a["states"]:
            continue
        rows.append(p)
    order = a.get("orderBy") or {"field": "CREATED_AT", "direction": "ASC"}
    field = order["field"]
    if field == "COMMENTS":
        key = lambda p: (len([x for x in f.issue_comments.values() if x["_pr"] == p["id"]]), p["_seq"])  # noqa: E731
    else:
        col = {"CREATED_AT": "createdAt", "UPDATED_AT": "updatedAt"}[field]
        key = lambda p: (p[col], p["_seq"])  # noqa: E731
    return _conn(rows, a, key=key, reverse=order["direction"] == "DESC")


RESOLVERS[("Repository", "pullRequests")] = lambda f, s, a, c: _pull_requests(f, s, a, c)


@_r("Repository.mergeQueue", "PullRequest.mergeQueue")
def _repo_merge_queue(f, s, a, c):
    if s["__typename"] == "PullRequest":
        repo, branch = f._repo(s["_repo"]), s["baseRefName"]
    else:
        repo, branch = s, a.get("branch") or s["_default"]
    if not repo["_merge_queue"]:
        return None
    return _queue_dict(f, repo, branch)


def _queue_dict(f, repo, branch):
    full = repo["nameWithOwner"]
    return {"__typename": "MergeQueue", "_repo": full, "_base": branch,
            "id": "MQ_kwDO" + base64.urlsafe_b64encode(f"{full}:{branch}".encode()).decode().rstrip("="),
            "url": f"{WEB}/{full}/queue/{branch}", "resourcePath": f"/{full}/queue/{branch}",
            "nextEntryEstimatedTimeToMerge": None, "configuration": None}


@_r("MergeQueue.entries")
def _queue_entries(f, s, a, c):
    return _conn(f._entries(s["_repo"], s["_base"]), a, key=lambda e: (not e["jump"], e["_seq"]))


@_r("MergeQueue.repository")
def _queue_repo(f, s, a, c):
    return f._repo(s["_repo"])


@_r("Ref.target")
def _ref_target(f, s, a, c):
    return s["target"]


@_r("Ref.repository", "Commit.repository", "PullRequest.repository", "PullRequest.baseRepository",
    "PullRequest.headRepository", "CheckRun.repository")
def _owning_repo(f, s, a, c):
    return f._repo(s["_repo"])


@_r("Ref.associatedPullRequests")
def _ref_prs(f, s, a, c):
    return _pull_requests(f, f._repo(s["_repo"]), a, c, head=s["name"])


# --- PullRequest
@_r("PullRequest.author", "PullRequestReview.author", "PullRequestReviewComment.author", "IssueComment.author")
def _author(f, s, a, c):
    return f._actor(s["_author"])


RESOLVERS.update({
    ("PullRequest", "merged"): lambda f, s, a, c: s["state"] == "MERGED",
    ("PullRequest", "closed"): lambda f, s, a, c: s["state"] != "OPEN",
    ("PullRequest", "headRefOid"): lambda f, s, a, c: f._head(s, c),
    ("PullRequest", "baseRefOid"): lambda f, s, a, c: s["_baseOid"],
    ("PullRequest", "headRepositoryOwner"): lambda f, s, a, c: _repo_owner(f, f._repo(s["_repo"]), a, c),
    ("PullRequest", "headRef"): lambda f, s, a, c: f._ref(s["_repo"], s["headRefName"], c),
    ("PullRequest", "baseRef"): lambda f, s, a, c: f._ref(s["_repo"], s["baseRefName"], c),
    ("PullRequest", "mergeable"): lambda f, s, a, c: f._mergeable(s, c),
    ("PullRequest", "mergeStateStatus"): lambda f, s, a, c: f.merge_state_status(s, ctx=c),
    ("PullRequest", "reviewDecision"): lambda f, s, a, c: f.review_decision(s),
    ("PullRequest", "isInMergeQueue"): lambda f, s, a, c: f._entry_of(s) is not None,
    ("PullRequest", "isMergeQueueEnabled"): lambda f, s, a, c: f._repo(s["_repo"])["_merge_queue"],
    ("PullRequest", "mergeQueueEntry"): lambda f, s, a, c: f._entry_of(s),
    ("PullRequest", "mergeCommit"): lambda f, s, a, c: f._commit(s["_repo"], s["_mergeCommit"]),
    ("PullRequest", "mergedBy"): lambda f, s, a, c: f._actor(s["_mergedBy"]),
    ("PullRequest", "statusCheckRollup"): lambda f, s, a, c: f._rollup(f._repo(s["_repo"]), f._head(s, c), c),
    ("PullRequest", "totalCommentsCount"): lambda f, s, a, c: len(
        [x for x in f.issue_comments.values() if x["_pr"] == s["id"]]),
    ("PullRequest", "additions"): lambda f, s, a, c: f._diff_stats(s)["additions"],
    ("PullRequest", "deletions"): lambda f, s, a, c: f._diff_stats(s)["deletions"],
    ("PullRequest", "changedFiles"): lambda f, s, a, c: f._diff_stats(s)["changedFiles"],
    ("PullRequest", "labels"): lambda f, s, a, c: _conn([], a),
    ("PullRequest", "assignees"): lambda f, s, a, c: _conn([], a),
    ("PullRequest", "reviewRequests"): lambda f, s, a, c: _conn([], a),
    ("PullRequest", "bodyText"): lambda f, s, a, c: s["body"],
    ("PullRequest", "viewerCanUpdate"): lambda f, s, a, c: f._repo(s["_repo"])["viewerPermission"]
    in WRITE_PERMISSIONS,
})


@_r("PullRequest.commits")
def _pr_commits(f, s, a, c):
    oids = f._pr_commits(s, c)
    nodes = [{"__typename": "PullRequestCommit", "_seq": i, "commit": f._commit(s["_repo"], oid),
              "id": f"PRC_{s['id']}_{oid[:12]}", "url": f"{s['url']}/commits/{oid}",
              "resourcePath": f"{s['resourcePath']}/commits/{oid}", "pullRequest": s}
             for i, oid in enumerate(oids)]
    return _conn(nodes, a)


@_r("PullRequest.reviews")
def _pr_reviews(f, s, a, c):
    rows = [r for r in f._reviews_of(s) if (not a.get("states") or r["state"] in a["states"])
            and (a.get("author") is None or r["_author"] == a["author"])]
    return _conn(rows, a)


@_r("PullRequest.latestReviews")
def _pr_latest_reviews(f, s, a, c):
    latest = {}
    for r in sorted(f._reviews_of(s), key=lambda r: r["_seq"]):
        if r["state"] != "PENDING":
            latest[r["_author"]] = r
    return _conn(list(latest.values()), a)


@_r("PullRequest.latestOpinionatedReviews")
def _pr_latest_opinionated(f, s, a, c):
    rows = list(f._opinions(s).values())
    if a.get("writersOnly"):
        rows = [r for r in rows if r["authorAssociation"] in WRITERS]
    return _conn(rows, a)


@_r("PullRequest.reviewThreads")
def _pr_threads(f, s, a, c):
    return _conn([t for t in f.threads.values() if t["_pr"] == s["id"]], a)


@_r("PullRequest.comments")
def _pr_comments(f, s, a, c):
    rows = [x for x in f.issue_comments.values() if x["_pr"] == s["id"]]
    order = a.get("orderBy")
    if order:
        return _conn(rows, a, key=lambda x: (x["updatedAt"], x["_seq"]), reverse=order["direction"] == "DESC")
    return _conn(rows, a)


@_r("PullRequest.timelineItems")
def _pr_timeline(f, s, a, c):
    types = {_camel_type(t) for t in a["itemTypes"]} if a.get("itemTypes") else None
    rows = [e for e in f.events.values() if e["_pr"] == s["id"]]
    rows += [x for x in f.issue_comments.values() if x["_pr"] == s["id"]]
    rows += [r for r in f._reviews_of(s) if r["state"] != "PENDING"]
    if types is not None:
        rows = [x for x in rows if x["__typename"] in types]
    if a.get("since"):
        since = _parse_iso(a["since"])
        rows = [x for x in rows if _parse_iso(x["createdAt"]) >= since]
    conn = _conn(rows, a)
    conn.update(filteredCount=len(rows), pageCount=len(conn["nodes"]),
                updatedAt=s["updatedAt"])
    return conn


@_r("PullRequest.autoMergeRequest")
def _pr_auto_merge(f, s, a, c):
    return s["autoMergeRequest"]


@_r("AutoMergeRequest.pullRequest")
def _amr_pr(f, s, a, c):
    return f.pulls[s["_pr"]]


# --- events
@_r("AddedToMergeQueueEvent.pullRequest", "RemovedFromMergeQueueEvent.pullRequest", "MergedEvent.pullRequest",
    "HeadRefForcePushedEvent.pullRequest", "HeadRefDeletedEvent.pullRequest", "AutoMergeEnabledEvent.pullRequest",
    "AutoMergeDisabledEvent.pullRequest", "PullRequestReview.pullRequest", "PullRequestReviewComment.pullRequest",
    "PullRequestReviewThread.pullRequest", "IssueComment.pullRequest", "MergeQueueEntry.pullRequest")
def _owner_pr(f, s, a, c):
    return f.pulls[s["_pr"]]


@_r("ClosedEvent.closable", "ReopenedEvent.closable")
def _closable(f, s, a, c):
    return f.pulls[s["_closable"]]


@_r("AddedToMergeQueueEvent.mergeQueue", "RemovedFromMergeQueueEvent.mergeQueue")
def _event_queue(f, s, a, c):
    repo, base = s["_queue"]
    return _queue_dict(f, f._repo(repo), base)


@_r("PullRequestReview.repository", "PullRequestReviewComment.repository", "IssueComment.repository",
    "PullRequestReviewThread.repository")
def _item_repo(f, s, a, c):
    return f._repo(f.pulls[s["_pr"]]["_repo"])


# --- reviews / comments / threads
@_r("PullRequestReview.commit", "PullRequestReviewComment.commit", "PullRequestReviewComment.originalCommit")
def _item_commit(f, s, a, c):
    return f._commit(f.pulls[s["_pr"]]["_repo"], s["_commit"])


@_r("PullRequestReview.comments")
def _review_comments(f, s, a, c):
    return _conn([x for x in f.review_comments.values() if x["_review"] == s["id"]], a)


@_r("PullRequestReviewComment.pullRequestReview")
def _comment_review(f, s, a, c):
    return f.reviews.get(s["_review"]) if s["_review"] else None


@_r("PullRequestReviewThread.comments")
def _thread_comments(f, s, a, c):
    return _conn([f.review_comments[i] for i in s["_comments"]], a)


@_r("PullRequestReviewThread.resolvedBy")
def _thread_resolved_by(f, s, a, c):
    actor = f._actor(s["_resolvedBy"])
    return actor and {**actor, "__typename": "User"}


@_r("IssueComment.issue")
def _comment_issue(f, s, a, c):
    raise _unsupported("IssueComment.issue (pull request comments have no Issue in the fake; use pullRequest)")


# --- commits and checks
@_r("Commit.statusCheckRollup")
def _commit_rollup(f, s, a, c):
    return f._rollup(f._repo(s["_repo"]), s["oid"], c)


def _commit_field(name):
    return lambda f, s, a, c: f._commit_info(s["_repo"], s["oid"])[name]


for _name in ("message", "messageHeadline", "committedDate", "authoredDate"):
    RESOLVERS[("Commit", _name)] = _commit_field(_name)
RESOLVERS[("Commit", "messageBody")] = lambda f, s, a, c: \
    f._commit_info(s["_repo"], s["oid"])["message"].partition("\n")[2].strip("\n")
RESOLVERS[("Commit", "author")] = RESOLVERS[("Commit", "committer")] = lambda f, s, a, c: {
    "__typename": "GitActor", "name": f._commit_info(s["_repo"], s["oid"])["_an"],
    "email": f._commit_info(s["_repo"], s["oid"])["_ae"], "date": f._commit_info(s["_repo"], s["oid"])["authoredDate"],
    "user": None}


@_r("StatusCheckRollup.contexts")
def _rollup_contexts(f, s, a, c):
    ctxs = s["_contexts"]
    runs = [x for x in ctxs if x["__typename"] == "CheckRun"]
    sts = [x for x in ctxs if x["__typename"] == "StatusContext"]
    by_run, by_st = {}, {}
    for r in runs:
        k = r["conclusion"] if r["status"] == "COMPLETED" else r["status"]
        by_run[k] = by_run.get(k, 0) + 1
    for x in sts:
        by_st[x["state"]] = by_st.get(x["state"], 0) + 1
    return _conn(ctxs, a, checkRunCount=len(runs), statusContextCount=len(sts),
                 checkRunCountsByState=[{"state": k, "count": v} for k, v in by_run.items()],
                 statusContextCountsByState=[{"state": k, "count": v} for k, v in by_st.items()])


@_r("CheckRun.isRequired", "StatusContext.isRequired")
def _is_required(f, s, a, c):
    if a.get("pullRequestId") is None and a.get("pullRequestNumber") is None:
        raise _gql_error("Either pullRequestId or pullRequestNumber must be provided", "INVALID_ARGUMENTS")
    repo = f._repo(s["_repo"])
    if a.get("pullRequestId") is not None:
        pr = _node(f, a["pullRequestId"], "PullRequest")
    else:
        try:
            pr = f.pr(repo, a["pullRequestNumber"])
        except KeyError:
            raise _not_found(f"Could not resolve to a PullRequest with the number of {a['pullRequestNumber']}.") \
                from None
    return f._is_required(repo, s, pr)


@_r("CheckRun.checkSuite")
def _run_suite(f, s, a, c):
    app, wf = s["_app"], s["_workflow"]
    full = s["_repo"]
    suite = {"__typename": "CheckSuite", "id": _node_id("CS", s["_suite"]), "databaseId": s["_suite"],
             "app": {"__typename": "App", "slug": app, "name": "GitHub Actions" if app == "github-actions" else app,
                     "id": _node_id("A", _stable_int(app)), "url": f"{WEB}/apps/{app}",
                     "databaseId": 15368 if app == "github-actions" else 1},
             "status": s["status"], "conclusion": s["conclusion"], "commit": f._commit(full, s["_sha"]),
             "url": f"{WEB}/{full}/commit/{s['_sha']}/checks?check_suite_id={s['_suite']}",
             "resourcePath": f"/{full}/commit/{s['_sha']}/checks?check_suite_id={s['_suite']}",
             "repository": f._repo(full), "workflowRun": None}
    if wf:
        url = f"{WEB}/{full}/actions/runs/{wf['databaseId']}"
        suite["workflowRun"] = {"__typename": "WorkflowRun", "id": wf["id"], "databaseId": wf["databaseId"],
                                "url": url, "resourcePath": url[len(WEB):], "runNumber": wf["databaseId"] % 1000,
                                "event": "pull_request", "createdAt": s["startedAt"], "updatedAt": s["startedAt"],
                                "workflow": {"__typename": "Workflow", "name": wf["name"],
                                             "id": _node_id("W", _stable_int(full, wf["name"])),
                                             "databaseId": _stable_int(full, wf["name"]),
                                             "url": f"{WEB}/{full}/actions", "resourcePath": f"/{full}/actions",
                                             "createdAt": s["startedAt"], "updatedAt": s["startedAt"]}}
    return suite


RESOLVERS[("CheckRun", "steps")] = RESOLVERS[("CheckRun", "annotations")] = lambda f, s, a, c: _conn([], a)
RESOLVERS[("StatusContext", "commit")] = lambda f, s, a, c: f._commit(s["_repo"], s["_sha"])
RESOLVERS[("StatusContext", "creator")] = lambda f, s, a, c: f._actor(s["_creator"])


# --- merge queue entries
RESOLVERS.update({
    ("MergeQueueEntry", "state"): lambda f, s, a, c: f._entry_state(s),
    ("MergeQueueEntry", "position"): lambda f, s, a, c: [e["id"] for e in f._entries(s["_repo"], s["_base"])]
    .index(s["id"]) + 1,
    ("MergeQueueEntry", "headCommit"): lambda f, s, a, c: f._commit(s["_repo"], s["_headOid"]),
    ("MergeQueueEntry", "baseCommit"): lambda f, s, a, c: f._commit(s["_repo"], s["_baseOid"]),
    ("MergeQueueEntry", "enqueuer"): lambda f, s, a, c: f._actor(s["_enqueuer"]),
    ("MergeQueueEntry", "mergeQueue"): lambda f, s, a, c: _queue_dict(f, f._repo(s["_repo"]), s["_base"]),
})


# --- Mutations
def _mut_pr(f, a, key="pullRequestId"):
    return _node(f, a["input"][key], "PullRequest")


def _check_head(f, pr, inp):
    if inp.get("expectedHeadOid") and inp["expectedHeadOid"] != f._head(pr):
        raise _gql_error("Head branch was modified. Review and try the merge again.", "UNPROCESSABLE")


@_r("Mutation.enqueuePullRequest")
def _m_enqueue(f, s, a, c):
    pr = _mut_pr(f, a)
    _writer(f, pr, "enqueuePullRequest", c)
    _check_head(f, pr, a["input"])
    if pr["isDraft"]:
        raise _gql_error("Pull request is in draft state", "UNPROCESSABLE")
    entry = _as_gql_error(lambda: f.enqueue(pr["_repo"], pr["number"], actor=c["login"],
                                            jump=bool(a["input"].get("jump"))))
    return {"mergeQueueEntry": entry, "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.dequeuePullRequest")
def _m_dequeue(f, s, a, c):
    pr = _mut_pr(f, a, "id")
    _writer(f, pr, "dequeuePullRequest", c)
    entry = f._entry_of(pr)
    if entry is None:
        raise _gql_error("Pull request is not in the merge queue", "UNPROCESSABLE")
    f.eject(pr["_repo"], pr["number"], reason="DEQUEUED", actor=c["login"])
    return {"mergeQueueEntry": entry, "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.enablePullRequestAutoMerge")
def _m_enable_auto_merge(f, s, a, c):
    pr = _mut_pr(f, a)
    _writer(f, pr, "enablePullRequestAutoMerge", c)
    _check_head(f, pr, a["input"])
    inp = a["input"]
    _as_gql_error(lambda: f.enable_auto_merge(pr["_repo"], pr["number"], actor=c["login"],
                                              merge_method=inp.get("mergeMethod") or "MERGE",
                                              headline=inp.get("commitHeadline"), body=inp.get("commitBody")))
    return {"pullRequest": pr, "actor": f._actor(c["login"]), "clientMutationId": inp.get("clientMutationId")}


@_r("Mutation.requestReviews")
def _m_request_reviews(f, s, a, c):
    """Review requests are kept as logins on the PR (``review_requests(repo, n)``); the PR's author cannot be
    asked, and ``union: false`` replaces the set as on GitHub."""
    inp = a["input"]
    pr = _mut_pr(f, a)
    _writer(f, pr, "requestReviews", c)
    logins = []
    for uid in inp.get("userIds") or []:
        user = next((u for u in f.users.values() if u["id"] == uid and not u["bot"]), None)
        if user is None:
            raise _not_found(f"Could not resolve to a node with the global id of '{uid}'")
        if user["login"] == pr["_author"]:
            raise _gql_error("Review cannot be requested from pull request author.", "UNPROCESSABLE")
        logins.append(user["login"])
    current = pr.get("_review_requests") or []
    pr["_review_requests"] = list(dict.fromkeys((current if inp.get("union") else []) + logins))
    return {"pullRequest": pr, "actor": f._actor(c["login"]), "clientMutationId": inp.get("clientMutationId")}


@_r("Mutation.disablePullRequestAutoMerge")
def _m_disable_auto_merge(f, s, a, c):
    pr = _mut_pr(f, a)
    _writer(f, pr, "disablePullRequestAutoMerge", c)
    f.disable_auto_merge(pr["_repo"], pr["number"], actor=c["login"])
    return {"pullRequest": pr, "actor": f._actor(c["login"]), "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.mergePullRequest")
def _m_merge(f, s, a, c):
    pr = _mut_pr(f, a)
    repo = _writer(f, pr, "mergePullRequest", c)
    _check_head(f, pr, a["input"])
    if repo["_merge_queue"] and pr["baseRefName"] == repo["_default"]:
        raise _gql_error("Changes must be made through the merge queue", "UNPROCESSABLE")
    if f.merge_state_status(pr, ctx=c) not in ("CLEAN", "UNSTABLE", "HAS_HOOKS"):
        raise _gql_error("Pull request is not mergeable", "UNPROCESSABLE")
    _as_gql_error(lambda: f.merge(pr["_repo"], pr["number"], actor=c["login"],
                                  method=a["input"].get("mergeMethod") or "MERGE"))
    return {"pullRequest": pr, "actor": f._actor(c["login"]), "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.closePullRequest")
def _m_close(f, s, a, c):
    pr = _mut_pr(f, a)
    _writer(f, pr, "closePullRequest", c)
    _as_gql_error(lambda: f.close(pr["_repo"], pr["number"], actor=c["login"]))
    return {"pullRequest": pr, "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.reopenPullRequest")
def _m_reopen(f, s, a, c):
    pr = _mut_pr(f, a)
    _writer(f, pr, "reopenPullRequest", c)
    _as_gql_error(lambda: f.reopen(pr["_repo"], pr["number"], actor=c["login"]))
    return {"pullRequest": pr, "clientMutationId": a["input"].get("clientMutationId")}


@_r("Mutation.addComment")
def _m_add_comment(f, s, a, c):
    inp = a["input"]
    pr = _node(f, inp["subjectId"], "PullRequest")
    if not inp["body"].strip():
        raise _gql_error("Body can't be blank", "UNPROCESSABLE")
    com = f._issue_comment(pr, c["login"], inp["body"])
    f.comments_posted.append({"repo": pr["_repo"], "number": pr["number"], "login": c["login"],
                              "body": com["body"], "id": com["databaseId"], "at": com["createdAt"]})
    return {"commentEdge": {"node": com, "cursor": _cursor([com["_seq"]])}, "subject": pr,
            "timelineEdge": {"node": com, "cursor": _cursor([com["_seq"]])},
            "clientMutationId": inp.get("clientMutationId")}


def _m_thread(resolved):
    def fn(f, s, a, c):
        thread = _node(f, a["input"]["threadId"], "PullRequestReviewThread")
        _writer(f, f.pulls[thread["_pr"]], "resolveReviewThread" if resolved else "unresolveReviewThread", c)
        f.resolve_thread(thread, by=c["login"], resolved=resolved)
        return {"thread": thread, "clientMutationId": a["input"].get("clientMutationId")}
    return fn


RESOLVERS[("Mutation", "resolveReviewThread")] = _m_thread(True)
RESOLVERS[("Mutation", "unresolveReviewThread")] = _m_thread(False)


# ------------------------------------------------------------------------- HTTP server
class _Handler(Handler):
    server_version = "FakeGitHub/1.0"

    def _serve(self, method):
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            status, headers, payload = fake._dispatch(self, method, body)
        except Exception as e:  # a bug in the fake: make it loud
            import traceback
            traceback.print_exc()
            status, headers, payload = 500, {}, {"message": f"FakeGitHub crashed: {e!r}"}
            fake._record_error("crash", f"FakeGitHub crashed: {e!r}", method=method, path=self.path)
        if status is None:
            self.drop()
            return
        self._send(status, headers, payload)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def _send(self, status, headers, payload):
        headers = {k.lower(): v for k, v in headers.items()}
        if payload is None or status in (204, 304):
            data = b""
        elif isinstance(payload, bytes):
            data = payload
            headers.setdefault("content-type", "text/plain; charset=utf-8")
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("content-type", "application/json; charset=utf-8")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)
