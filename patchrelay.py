#!/usr/bin/env python3
"""PatchRelay: delegate a Linear issue to a coding agent, get back a merged pull request.

A synchronous CLI run by cron, a systemd timer or `patchrelay watch`. Each
`patchrelay tick` reconciles runs, polls Linear and GitHub, decides, launches
detached workers that drive `codex app-server` over stdio JSON-RPC, and
publishes a Linear outbox. SQLite (WAL) holds all state on one host and is the
mailbox between tick and workers; PostgreSQL does the same for a fleet of hosts
(database.url). README.md explains how to run it and how it works.

Sections, in dependency order (each uses only what the sections above it define;
tests/test_structure.py checks it). Grep a banner: `# ==== 3. store`, `# ---- <name>`.
   1. errors and constants  exception types (one per boundary), shared constants, redaction
   2. config                YAML -> frozen dataclasses; every error names its key path
   3. store                 SQLite or PostgreSQL: schema, migrations, every SQL statement
   4. transport             one HTTP transport for both API clients; child processes
   5. linear                Linear GraphQL client: reads -> frozen observations, batched writes
   6. github                GitHub GraphQL + REST client: batched PR observation, PR creation
   7. codex                 blocking JSON-RPC client for `codex app-server`
   8. git                   worktrees, branches, commits, pushes, repository hooks
   9. factory               the transition table and every decision; pure, no I/O
  10. apply                 decisions written to the store; the Linear outbox published
  11. worker                drives one run (the detached worker and `patchrelay run`)
  12. tick                  one pass: reconcile, intake, observe, launch, publish
  13. cli                   click commands: parse, call, print
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import email.utils
import errno
import fcntl
import functools
import html
import json
import logging
import math
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NamedTuple, NoReturn, Sequence

import click
import yaml


def _lazy_module(name: str) -> Any:
    """`name`, imported at its first use (importlib.util.LazyLoader): most commands and every worker of a run
    without a pull request make no HTTP request, and importing requests costs a process a fifth of a second
    of CPU."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import requests
    import tenacity
else:
    requests = _lazy_module("requests")
    tenacity = _lazy_module("tenacity")

# ============================================================== 1. errors and constants
# Exception types, one per boundary, each carrying the one-line message the CLI
# prints, plus the constants every other section shares. No I/O here.

__version__ = "0.1.0"
log = logging.getLogger("patchrelay")


class PatchRelayError(Exception):
    """Base error: `str(err)` is the one line the CLI prints, stored and sent: redacted when it is made, so
    no secret an API or a tool echoed back travels further."""
    exit_code = 1

    named_secrets = True        # a config or usage error names keys like `linear.token`: not secrets

    def __init__(self, *args: Any):
        super().__init__(*(redact(a, named=self.named_secrets) if isinstance(a, str) else a for a in args))


class ConfigError(PatchRelayError):
    exit_code = 2
    named_secrets = False


class UsageError(PatchRelayError):
    exit_code = 2
    named_secrets = False


class StoreError(PatchRelayError):
    """The database cannot be opened, read or written."""


class ApiError(PatchRelayError):
    """A Linear or GitHub API failure. `transient` errors (transport, 5xx, rate limits) never change what we
    believe about an issue; they only postpone work. `code`: the API's own error code, when it gave one;
    `until`: when a rate limit ends (epoch seconds), for the rate-limit errors."""
    until: float | None = None

    def __init__(self, message: str, transient: bool = False, code: str | None = None):
        super().__init__(message)
        self.transient = transient
        self.code = code


class LinearError(ApiError):
    """A Linear API failure."""


class NotSent(LinearError):
    """A batched write that did not run (an earlier write of its request failed): send it again."""

    def __init__(self, message: str):
        super().__init__(message, transient=True)


class LinearRateLimited(LinearError):
    def __init__(self, message: str, until: float):
        super().__init__(message, transient=True, code="RATELIMITED")
        self.until = until


class GitHubError(ApiError):
    """A GitHub API failure."""


class GitHubRateLimited(GitHubError):
    def __init__(self, message: str, until: float):
        super().__init__(message, transient=True)
        self.until = until


class CodexError(PatchRelayError):
    pass


class GitError(PatchRelayError):
    pass


class HookError(PatchRelayError):
    pass


class IllegalTransition(PatchRelayError):
    """A factory state change the transition table forbids: always a bug."""


RUN_TYPES = ("implementation", "ci_repair", "review_fix", "queue_repair")
FINAL_STATES = frozenset({"done", "canceled", "failed", "escalated"})
CLOSED_STATES = frozenset({"done", "canceled"})
TOKEN_ENV_ALWAYS_STRIPPED = ("LINEAR_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "GH_ENTERPRISE_TOKEN",
                             "GITHUB_ENTERPRISE_TOKEN", "PATCHRELAY_TOKEN_KEY", "LINEAR_CLIENT_SECRET",
                             # the fleet's database: never the agent's
                             "PGPASSWORD", "PGPASSFILE", "PATCHRELAY_DATABASE_URL")
ISSUE_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,9}-[0-9]{1,9}", re.ASCII)
ISSUE_URL_RE = re.compile(r"https://linear\.app/[A-Za-z0-9_.-]+/issue/([A-Za-z][A-Za-z0-9]{0,9}-[0-9]{1,9})"
                          r"(?:/[A-Za-z0-9_.%-]*)?/?", re.ASCII)
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def shown(text: Any, limit: int = 80) -> str:
    """Text from outside (a key, a title, an argument), safe to print on one line: control, bidi and
    zero-width characters escaped, cut to `limit` characters."""
    s = _UNSAFE_CHARS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def issue_ref(text: str) -> str:
    """An issue key (`APP-123`, case-folded) or a Linear issue URL -> the key. Anything else is a usage error."""
    m = ISSUE_URL_RE.fullmatch(text or "")
    key = m.group(1) if m else text
    if not isinstance(key, str) or not ISSUE_KEY_RE.fullmatch(key):
        raise UsageError(f"{shown(text)}: not an issue key like APP-123 or a Linear issue URL")
    return key.upper()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None = None) -> str:
    t = t or utcnow()
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_iso(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def age_seconds(s: str | None, now: dt.datetime | None = None) -> float | None:
    t = parse_iso(s)
    return None if t is None else max(0.0, ((now or utcnow()) - t).total_seconds())


def one_line(text: str | None, limit: int = 240) -> str:
    s = " ".join((text or "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def tail(text: str | None, lines: int = 20, limit: int = 2000) -> str:
    t = "\n".join((text or "").strip().splitlines()[-lines:])
    return t[-limit:]


_SECRET_PATTERNS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)\b(lin_(?:api|oauth)_[A-Za-z0-9]+)"), "[redacted]"),
    (re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), "[redacted]"),
    (re.compile(r"(?i)((?:token|secret|password|api[_-]?key|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
     r"\1[redacted]"),
]


KNOWN_SECRETS: set[str] = set()      # every token PatchRelay has read, whatever its shape


def redact(text: str | None, secrets: Iterable[str] = (), named: bool = True) -> str:
    """Remove known secrets and token-shaped strings from text bound for logs, SQLite or Linear. `named`:
    also whatever follows `token=`, `password:` and the like (off for messages that name config keys)."""
    out = text or ""
    for s in sorted({*secrets, *KNOWN_SECRETS}, key=len, reverse=True):
        if s and len(s) >= 6:
            out = out.replace(s, "[redacted]")
    for pat, rep in _SECRET_PATTERNS if named else _SECRET_PATTERNS[:-1]:
        out = pat.sub(rep, out)
    return out


# ============================================================== 2. config
# YAML -> frozen dataclasses. Every error names its key path in one line and
# exits 2. Unknown keys are errors. Tokens only ever come from the environment
# (or `gh auth token`), never from the file.

def _xdg(var: str, fallback: str) -> Path:
    v = os.environ.get(var)
    return Path(v) if v else Path.home() / fallback


def default_config_path() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "patchrelay" / "patchrelay.yaml"


def default_state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "patchrelay"


def default_data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "patchrelay"


@dataclass(frozen=True)
class TrustedActors:
    ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        return bool(self.ids or self.names or self.emails or self.email_domains)


@dataclass(frozen=True)
class ProjectConfig:
    id: str
    repo_path: Path
    github_repo: str
    base_branch: str
    worktree_root: Path
    branch_prefix: str
    issue_key_prefixes: tuple[str, ...]
    linear_team_keys: tuple[str, ...]
    linear_team_ids: tuple[str, ...]
    trusted_actors: TrustedActors
    trusted_reviewers: tuple[str, ...] = ()

    @property
    def has_routing(self) -> bool:
        return bool(self.issue_key_prefixes or self.linear_team_keys or self.linear_team_ids)


@dataclass(frozen=True)
class LinearConfig:
    api_url: str = "https://api.linear.app/graphql"
    token_env: str = "LINEAR_API_KEY"
    mode: str = "auto"                      # auto | app | user
    delegation: tuple[str, ...] = ("delegate", "label")      # assignment is opt-in: see README
    delegation_label: str = "patchrelay"
    poll_overlap: float = 10.0
    timeout: float = 30.0
    retry_attempts: int = 4
    retry_max_wait: float = 30.0
    review_state: str = "In Review"
    max_writes_per_tick: int = 1000
    # app mode's OAuth connection (`patchrelay linear connect`): the names of the variables that hold the
    # client id, the client secret and the key that encrypts the stored tokens, and the redirect URI
    token_key_env: str = "PATCHRELAY_TOKEN_KEY"
    client_id_env: str = "LINEAR_CLIENT_ID"
    client_secret_env: str = "LINEAR_CLIENT_SECRET"
    redirect_uri: str = "http://localhost:8765/callback"


@dataclass(frozen=True)
class GitHubConfig:
    api_url: str = "https://api.github.com"
    graphql_url: str = "https://api.github.com/graphql"
    token_env: str = "GITHUB_TOKEN"
    use_gh_cli: bool = True
    timeout: float = 30.0
    retry_attempts: int = 3
    retry_max_wait: float = 30.0
    poll_interval: float = 30.0
    draft_prs: bool = False
    auto_merge: bool = False
    review_quiet_seconds: float = 60.0
    ci_repair_budget: int = 2
    queue_repair_budget: int = 2
    review_fix_budget: int = 3
    rerequest_review: bool = True       # ask the approvers again when a push makes their approval stale
    rerun_failed_checks: int = 1        # reruns of a failed Actions job on the same head before a repair run
    delete_merged_branches: bool = True  # delete a merged PR's branch on origin (unless GitHub already did)


@dataclass(frozen=True)
class CodexConfig:
    bin: str = "codex"
    args: tuple[str, ...] = ("app-server",)
    home: Path | None = None
    model: str | None = None
    model_provider: str | None = None
    approval_policy: str = "never"
    approval_decision: str = "decline"
    sandbox: str = "workspace-write"
    developer_instructions: str | None = None
    base_instructions: str | None = None     # replaces Codex's own base instructions (thread/start)
    shell: str | None = None                 # start the app-server through this login shell (`bash -lc`)
    request_timeout: float = 60.0
    stall_timeout: float = 600.0
    turn_timeout: float = 3600.0
    max_follow_up_turns: int = 5
    max_tokens_per_run: int | None = None       # token spend caps (None: no cap)
    max_tokens_per_issue: int | None = None
    max_tokens_per_day: int | None = None        # all runs, per UTC day
    capacity_backoff: float = 300.0     # seconds runs wait after the model provider refused (doubling, at most 1 h)


@dataclass(frozen=True)
class RunnerConfig:
    max_concurrent_runs: int = 2
    paused: bool = False
    retry_budget: int = 2
    retry_backoff: float = 60.0
    hook_timeout: float = 300.0
    inbox_poll_interval: float = 1.0
    git_author_name: str = "PatchRelay"
    git_author_email: str = "patchrelay@localhost"
    worktree_retention_hours: float = 24.0   # a closed issue's worktree is removed this long after it closed
    host: str = "localhost"             # this member of the fleet (default: the machine's hostname)
    host_timeout: float = 120.0         # a host silent this long is dead: its runs are taken over


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None        # Prometheus text written by every tick (node_exporter's textfile collector)
    html: Path | None = None            # the status page written by every tick
    public_url: str | None = None       # where html's directory is served: per-issue pages, linked from Linear


@dataclass(frozen=True)
class Config:
    path: Path | None
    linear: LinearConfig
    github: GitHubConfig
    codex: CodexConfig
    database_path: Path                 # SQLite's file; with database_url, where logs and lock files live
    runner: RunnerConfig
    projects: tuple[ProjectConfig, ...]
    database_retention_days: float = 90.0
    metrics: MetricsConfig = MetricsConfig()
    database_url: str | None = None     # postgresql://… : the fleet's shared PostgreSQL (password from the
                                        # environment or .pgpass)

    @property
    def database_label(self) -> str:
        """The database as messages name it (a URL's password is never shown)."""
        return redact_url(self.database_url) if self.database_url else str(self.database_path)

    def project(self, project_id: str) -> ProjectConfig:
        for p in self.projects:
            if p.id == project_id:
                return p
        raise ConfigError(f"projects: no project with id {project_id!r} (the database refers to it)")

    @property
    def state_dir(self) -> Path:
        return self.database_path.parent


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string value of a YAML tree."""
    if isinstance(value, str):
        return _ENV_RE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    return value


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


class _Section:
    """Reads one mapping of the config, naming the key path in every error."""

    def __init__(self, raw: Any, path: str, known: Iterable[str]):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {_kind(raw)}")
        known = list(known)
        for k in raw:
            if k not in known:
                raise ConfigError(f"{self._p(path, k)}: unknown key (expected one of: {', '.join(known)})")
        self.raw, self.path = raw, path

    @staticmethod
    def _p(path: str, key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    def key(self, k: str) -> str:
        return self._p(self.path, k)

    def text(self, k: str, default: Any = None, required: bool = False, choices: Iterable[str] | None = None,
            allow_empty: bool = False, path: bool = False) -> Any:
        v = self.raw.get(k)
        if v is None:
            if required:
                raise ConfigError(f"{self.key(k)}: required")
            return default
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not path:
            v = str(v)
        if path and not isinstance(v, str):
            raise ConfigError(f"{self.key(k)}: expected a path, got {_kind(v)}")
        if not isinstance(v, str):
            raise ConfigError(f"{self.key(k)}: expected a string, got {_kind(v)}")
        if not v.strip() and not allow_empty:
            if required:
                raise ConfigError(f"{self.key(k)}: must not be empty")
            return default
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.key(k)}: expected one of {', '.join(choices)}, got {v!r}")
        return v

    def num(self, k: str, default: float | None, minimum: float | None = None, integer: bool = False,
            maximum: float | None = None) -> Any:
        """A number within bounds; by default at most 1000 for counts and 7 days for seconds."""
        v = self.raw.get(k)
        if v is None:
            return default
        if isinstance(v, str):
            try:
                v = float(v) if not integer else int(v)
            except ValueError:
                raise ConfigError(f"{self.key(k)}: expected a number, got {shown(v)!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.key(k)}: expected a number, got {_kind(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{self.key(k)}: expected a finite number, got {v}")
        maximum = maximum if maximum is not None else (1000 if integer else 7 * 86400)
        if v > maximum:
            raise ConfigError(f"{self.key(k)}: must be at most {maximum:g}, got {v:g}")
        if integer and int(v) != v:
            raise ConfigError(f"{self.key(k)}: expected a whole number, got {v}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self.key(k)}: must be at least {minimum:g}, got {v}")
        return int(v) if integer else float(v)

    def flag(self, k: str, default: bool) -> bool:
        v = self.raw.get(k)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"{self.key(k)}: expected true or false, got {_kind(v)}")
        return v

    def strlist(self, k: str, default: tuple = ()) -> tuple[str, ...]:
        v = self.raw.get(k)
        if v is None:
            return tuple(default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise ConfigError(f"{self.key(k)}: expected a list of strings, got {_kind(v)}")
        out = []
        for i, item in enumerate(v):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                item = str(item)
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{self.key(k)}[{i}]: expected a non-empty string, got {_kind(item)}")
            out.append(item.strip())
        return tuple(out)

    def sub(self, k: str, known: Iterable[str]) -> "_Section":
        return _Section(self.raw.get(k), self.key(k), known)


def _path(v: str, base: Path | None) -> Path:
    p = Path(os.path.expanduser(v))
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:limit].strip("-")


def parse_config(raw: Any, path: Path | None = None) -> Config:
    """Validate a parsed YAML document and return a Config, or raise ConfigError (sections in file order,
    so the first error is the first a reader meets)."""
    raw = expand_env(raw)
    base = path.parent if path else None
    top = _Section(raw, "", ["linear", "github", "codex", "database", "runner", "projects", "metrics"])
    linear, github, codex = _parse_linear(top), _parse_github(top), _parse_codex(top, base)
    ds = top.sub("database", ["path", "retention_days", "url"])
    db = ds.text("path", path=True)
    database_path = _path(db, base) if db else default_state_dir() / "patchrelay.sqlite"
    runner = _parse_runner(top)
    projects_raw = top.raw.get("projects")
    if projects_raw is None:
        projects_raw = []
    if not isinstance(projects_raw, list):
        raise ConfigError(f"projects: expected a list, got {_kind(projects_raw)}")
    if not projects_raw:
        raise ConfigError("projects: at least one project is required (id, repo_path, github_repo); "
                          "`patchrelay init` writes an example")
    projects = tuple(_parse_project(p, f"projects[{i}]", base) for i, p in enumerate(projects_raw))
    _check_routing(projects)
    return Config(path=path, linear=linear, github=github, codex=codex, database_path=database_path,
                  runner=runner, projects=projects,
                  database_retention_days=ds.num("retention_days", 90.0, minimum=1, maximum=36500),
                  metrics=_parse_metrics(top, base), database_url=_database_url(ds))


def redact_url(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"^(\w+(?:\+\w+)?://[^:/@]+):[^@]*@", r"\1:***@", url)


def _database_url(ds: _Section) -> str | None:
    url = (os.environ.get("PATCHRELAY_DATABASE_URL") or "").strip() or ds.text("url")
    if not url:
        return None
    if not re.match(r"^postgres(ql)?://", url):
        raise ConfigError(f"database.url: expected postgresql://user@host[:port]/dbname, got {redact_url(url)!r}")
    m = re.match(r"^\w+://[^:/@]+:([^@]*)@", url)
    if m and m.group(1):
        KNOWN_SECRETS.add(m.group(1))       # better in PGPASSWORD or ~/.pgpass; never shown either way
    return url


def _parse_metrics(top: _Section, base: Path | None) -> MetricsConfig:
    ms = top.sub("metrics", ["textfile", "html", "public_url"])
    textfile, html = ms.text("textfile", path=True), ms.text("html", path=True)
    public = _url(ms, "public_url", "") if ms.raw.get("public_url") else None
    if public and not html:
        raise ConfigError("metrics.public_url: needs metrics.html (the pages are written beside it)")
    return MetricsConfig(textfile=_path(textfile, base) if textfile else None, html=_path(html, base) if html else None,
                         public_url=public.rstrip("/") + "/" if public else None)


def _parse_linear(top: _Section) -> LinearConfig:
    ls = top.sub("linear", ["api_url", "token_env", "mode", "delegation", "delegation_label", "poll_overlap",
                            "timeout", "retry", "review_state", "max_writes_per_tick", "token_key_env", "oauth"])
    lr = ls.sub("retry", ["attempts", "max_wait"])
    lo = ls.sub("oauth", ["client_id_env", "client_secret_env", "redirect_uri"])
    delegation = ls.strlist("delegation", LinearConfig.delegation)
    for i, d in enumerate(delegation):
        if d not in ("delegate", "assignee", "label"):
            raise ConfigError(f"linear.delegation[{i}]: expected delegate, assignee or label, got {d!r}")
    return LinearConfig(
        api_url=_url(ls, "api_url", LinearConfig.api_url),
        token_env=_envname(ls, "token_env", LinearConfig.token_env),
        mode=ls.text("mode", "auto", choices=("auto", "app", "user")),
        delegation=delegation,
        delegation_label=ls.text("delegation_label", LinearConfig.delegation_label),
        poll_overlap=ls.num("poll_overlap", 10.0, minimum=0),
        timeout=ls.num("timeout", 30.0, minimum=0.1),
        retry_attempts=lr.num("attempts", 4, minimum=1, integer=True),
        retry_max_wait=lr.num("max_wait", 30.0, minimum=0),
        review_state=ls.text("review_state", LinearConfig.review_state),
        max_writes_per_tick=ls.num("max_writes_per_tick", 1000, minimum=1, integer=True, maximum=5000),
        token_key_env=_envname(ls, "token_key_env", LinearConfig.token_key_env),
        client_id_env=_envname(lo, "client_id_env", LinearConfig.client_id_env),
        client_secret_env=_envname(lo, "client_secret_env", LinearConfig.client_secret_env),
        redirect_uri=_url(lo, "redirect_uri", LinearConfig.redirect_uri),
    )


def _parse_github(top: _Section) -> GitHubConfig:
    gs = top.sub("github", ["api_url", "graphql_url", "token_env", "use_gh_cli", "timeout", "retry", "poll_interval",
                            "draft_prs", "auto_merge", "review_quiet_seconds", "ci_repair_budget",
                            "queue_repair_budget", "review_fix_budget", "rerequest_review",
                            "rerun_failed_checks", "delete_merged_branches"])
    gr = gs.sub("retry", ["attempts", "max_wait"])
    gh_api = _url(gs, "api_url", GitHubConfig.api_url).rstrip("/")
    return GitHubConfig(
        api_url=gh_api,
        graphql_url=_url(gs, "graphql_url", gh_api + "/graphql"),
        token_env=_envname(gs, "token_env", GitHubConfig.token_env),
        use_gh_cli=gs.flag("use_gh_cli", True),
        timeout=gs.num("timeout", 30.0, minimum=0.1),
        retry_attempts=gr.num("attempts", 3, minimum=1, integer=True),
        retry_max_wait=gr.num("max_wait", 30.0, minimum=0),
        poll_interval=gs.num("poll_interval", 30.0, minimum=0),
        draft_prs=gs.flag("draft_prs", False),
        auto_merge=gs.flag("auto_merge", False),
        review_quiet_seconds=gs.num("review_quiet_seconds", 60.0, minimum=0),
        ci_repair_budget=gs.num("ci_repair_budget", 2, minimum=0, integer=True),
        queue_repair_budget=gs.num("queue_repair_budget", 2, minimum=0, integer=True),
        review_fix_budget=gs.num("review_fix_budget", 3, minimum=0, integer=True),
        rerequest_review=gs.flag("rerequest_review", True),
        rerun_failed_checks=gs.num("rerun_failed_checks", 1, minimum=0, integer=True, maximum=5),
        delete_merged_branches=gs.flag("delete_merged_branches", True),
    )


def _parse_codex(top: _Section, base: Path | None) -> CodexConfig:
    cs = top.sub("codex", ["bin", "args", "home", "model", "model_provider", "approval_policy",
                           "approval_decision", "sandbox", "developer_instructions", "request_timeout",
                           "stall_timeout", "turn_timeout", "max_follow_up_turns", "max_tokens_per_run",
                           "max_tokens_per_issue", "max_tokens_per_day", "capacity_backoff", "base_instructions",
                           "shell"])
    home = cs.text("home", path=True)
    return CodexConfig(
        bin=cs.text("bin", "codex"),
        args=cs.strlist("args", ("app-server",)),
        home=_path(home, base) if home else None,
        model=cs.text("model"),
        model_provider=cs.text("model_provider"),
        approval_policy=cs.text("approval_policy", "never", choices=("never", "on-request", "untrusted")),
        approval_decision=cs.text("approval_decision", "decline", choices=("accept", "decline", "cancel")),
        sandbox=cs.text("sandbox", "workspace-write", choices=("read-only", "workspace-write", "danger-full-access")),
        developer_instructions=cs.text("developer_instructions"),
        base_instructions=cs.text("base_instructions"),
        shell=cs.text("shell"),
        request_timeout=cs.num("request_timeout", 60.0, minimum=1),
        stall_timeout=cs.num("stall_timeout", 600.0, minimum=1),
        turn_timeout=cs.num("turn_timeout", 3600.0, minimum=1),
        max_follow_up_turns=cs.num("max_follow_up_turns", 5, minimum=0, integer=True),
        capacity_backoff=cs.num("capacity_backoff", 300.0, minimum=1, maximum=3600),
        **{k: cs.num(k, None, minimum=1, integer=True, maximum=10 ** 12)
           for k in ("max_tokens_per_run", "max_tokens_per_issue", "max_tokens_per_day")},
    )


def _parse_runner(top: _Section) -> RunnerConfig:
    rs = top.sub("runner", ["max_concurrent_runs", "paused", "retry_budget", "retry_backoff", "hook_timeout",
                            "inbox_poll_interval", "git_author_name", "git_author_email",
                            "worktree_retention_hours", "host", "host_timeout"])
    host = rs.text("host", socket.gethostname() or "localhost")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", host):
        raise ConfigError(f"runner.host: expected a host name (letters, digits, . _ -), got {host!r}")
    return RunnerConfig(
        host=host, host_timeout=rs.num("host_timeout", 120.0, minimum=10),
        max_concurrent_runs=rs.num("max_concurrent_runs", 2, minimum=1, integer=True),
        paused=rs.flag("paused", False),
        retry_budget=rs.num("retry_budget", 2, minimum=0, integer=True),
        retry_backoff=rs.num("retry_backoff", 60.0, minimum=0),
        hook_timeout=rs.num("hook_timeout", 300.0, minimum=1),
        worktree_retention_hours=rs.num("worktree_retention_hours", 24.0, minimum=0, maximum=24 * 3650),
        inbox_poll_interval=rs.num("inbox_poll_interval", 1.0, minimum=0.05),
        git_author_name=rs.text("git_author_name", RunnerConfig.git_author_name),
        git_author_email=rs.text("git_author_email", RunnerConfig.git_author_email),
    )


def _url(s: _Section, k: str, default: str) -> str:
    v = s.text(k, default)
    if not re.match(r"^https?://[^\s/]+", v):
        raise ConfigError(f"{s.key(k)}: expected an http(s) URL, got {v!r}")
    return v


_TOKEN_SHAPED = re.compile(r"^(lin_(api|oauth)_|gh[pousr]_|github_pat_)")


def _envname(s: _Section, k: str, default: str) -> str:
    v = s.text(k, default)
    if _TOKEN_SHAPED.search(v):
        raise ConfigError(f"{s.key(k)}: looks like a token, not the NAME of an environment variable "
                          "(tokens are never read from the config file; remove it from the file)")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
        raise ConfigError(f"{s.key(k)}: expected the NAME of an environment variable, got a value that is not one"
                          " (tokens are never read from the config file)")
    return v


def _parse_project(raw: Any, path: str, base: Path | None) -> ProjectConfig:
    s = _Section(raw, path, ["id", "repo_path", "github_repo", "base_branch", "worktree_root", "branch_prefix",
                             "issue_key_prefixes", "linear_team_keys", "linear_team_ids", "trusted_actors",
                             "trusted_reviewers"])
    pid = s.text("id", required=True)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", pid):
        raise ConfigError(f"{path}.id: expected letters, digits, '.', '_' or '-', got {pid!r}")
    repo_path = _path(s.text("repo_path", required=True, path=True), base)
    gh = s.text("github_repo", required=True)
    if not re.match(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", gh):
        raise ConfigError(f'{path}.github_repo: expected "owner/name", got "{gh}"')
    base_branch = s.text("base_branch", "main")
    if not _valid_ref_component(base_branch):
        raise ConfigError(f"{path}.base_branch: not a valid branch name: {base_branch!r}")
    wt = s.text("worktree_root", path=True)
    worktree_root = _path(wt, base) if wt else default_data_dir() / "worktrees" / pid
    prefix = s.text("branch_prefix") or _slug(pid) or "patchrelay"
    if not _valid_ref_component(prefix):
        raise ConfigError(f"{path}.branch_prefix: not a valid branch name prefix: {prefix!r}")
    ta = s.sub("trusted_actors", ["ids", "names", "emails", "email_domains"])
    emails = ta.strlist("emails")
    for i, e in enumerate(emails):
        if "@" not in e:
            raise ConfigError(f"{path}.trusted_actors.emails[{i}]: expected an email address, got {e!r}")
    return ProjectConfig(
        id=pid, repo_path=repo_path, github_repo=gh, base_branch=base_branch, worktree_root=worktree_root,
        branch_prefix=prefix,
        issue_key_prefixes=tuple(x.upper() for x in s.strlist("issue_key_prefixes")),
        linear_team_keys=tuple(x.upper() for x in s.strlist("linear_team_keys")),
        linear_team_ids=s.strlist("linear_team_ids"),
        trusted_actors=TrustedActors(ids=ta.strlist("ids"), names=ta.strlist("names"), emails=emails,
                                     email_domains=tuple(d.lstrip("@") for d in ta.strlist("email_domains"))),
        trusted_reviewers=tuple(x.lstrip("@").lower() for x in s.strlist("trusted_reviewers")),
    )


def _valid_ref_component(name: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", name)) and ".." not in name \
        and not name.endswith((".", "/", ".lock")) and "//" not in name


def _check_routing(projects: tuple[ProjectConfig, ...]) -> None:
    seen_ids: dict[str, int] = {}
    for i, p in enumerate(projects):
        if p.id in seen_ids:
            raise ConfigError(f"projects[{i}].id: {p.id!r} is already used by projects[{seen_ids[p.id]}]")
        seen_ids[p.id] = i
    if len(projects) > 1:
        for i, p in enumerate(projects):
            if not p.has_routing:
                raise ConfigError(f"projects[{i}]: with several projects each needs issue_key_prefixes, "
                                  "linear_team_keys or linear_team_ids")
    # A prefix or team key routes the same way (Linear identifiers are TEAMKEY-N), so they share a namespace.
    claims: dict[tuple[str, str], str] = {}
    for i, p in enumerate(projects):
        for field_name, kind, values in (("issue_key_prefixes", "key", p.issue_key_prefixes),
                                         ("linear_team_keys", "key", p.linear_team_keys),
                                         ("linear_team_ids", "id", p.linear_team_ids)):
            for j, v in enumerate(values):
                owner = claims.get((kind, v))
                if owner is not None and not owner.startswith(f"projects[{i}]."):
                    raise ConfigError(f"projects[{i}].{field_name}[{j}]: {v!r} is already routed by {owner}")
                claims.setdefault((kind, v), f"projects[{i}].{field_name}[{j}]")


def find_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("PATCHRELAY_CONFIG")
    if env:
        return Path(env).expanduser()
    return default_config_path()


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML without aliases (no alias bombs, no merge keys) and without duplicate keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in the config")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {shown(key)!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(explicit: str | None = None) -> Config:
    path = find_config_path(explicit)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (run `patchrelay init` to write one)")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    try:
        data = path.read_bytes()
        if len(data) > 1_000_000:
            raise ConfigError(f"{path}: larger than 1 MB; not a PatchRelay config")
        raw = yaml.load(data.decode("utf-8"), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    if raw is None:
        raise ConfigError(f"{path}: empty config (no projects); `patchrelay init --force` writes an example")
    return parse_config(raw, path.resolve())


def resolve_project(cfg: Config, issue_key: str | None, team_key: str | None, team_id: str | None
                    ) -> ProjectConfig | None:
    """Exactly one matching project, else None. A lone project without routing keys takes every issue (with
    several projects, each must say which issues it takes)."""
    prefix = (issue_key or "").split("-", 1)[0].upper()
    tk = (team_key or "").upper()
    matches = []
    for p in cfg.projects:
        if not p.has_routing:
            if len(cfg.projects) == 1:
                matches.append(p)
            continue
        if (prefix and prefix in p.issue_key_prefixes) or (tk and tk in p.linear_team_keys) \
                or (team_id and team_id in p.linear_team_ids):
            matches.append(p)
    return matches[0] if len(matches) == 1 else None


def actor_trusted(ta: TrustedActors, actor_id: str | None, name: str | None, email: str | None) -> bool:
    if not ta.configured:
        return True
    if actor_id and actor_id.strip() in ta.ids:
        return True
    if name and name.lower() in (n.lower() for n in ta.names):
        return True
    if email:
        e = email.lower()
        if e in (x.lower() for x in ta.emails):
            return True
        if e.rsplit("@", 1)[-1] in (d.lower() for d in ta.email_domains):
            return True
    return False


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an environment file (systemd's EnvironmentFile, `set -a; .` for cron): comments and
    blank lines skipped, one level of quotes removed."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            v = m.group(2).strip()
            out[m.group(1)] = v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v
    return out


class ConfigWatcher:
    """`watch`'s config reload: notices that the config file or the service's environment file changed
    (by content), and loads the new config between ticks. The environment file's variables replace those it
    set before. A config that does not validate is reported and the previous one stays in force."""

    def __init__(self, cfg: Config, explicit: str | None, env_file: Path | None):
        self.cfg, self.explicit, self.env_file = cfg, explicit, env_file
        self.env_set = read_env_file(env_file) if env_file and env_file.is_file() else {}
        self.seen = self._fingerprint()

    def _fingerprint(self) -> tuple[bytes | None, bytes | None]:
        def content(p: Path | None) -> bytes | None:
            try:
                return p.read_bytes() if p else None
            except OSError:
                return None
        return content(self.cfg.path), content(self.env_file)

    def check(self) -> tuple[Config | None, str | None]:
        """(the new config, what was reloaded) when a file changed and the config loads; (None, the error)
        when it does not; (None, None) when nothing changed."""
        now = self._fingerprint()
        if now == self.seen:
            return None, None
        env_changed = now[1] != self.seen[1]
        self.seen = now
        saved = dict(os.environ)
        if env_changed and self.env_file is not None:
            fresh = read_env_file(self.env_file) if now[1] is not None else {}
            for k in set(self.env_set) - set(fresh):
                os.environ.pop(k, None)
            os.environ.update(fresh)
        try:
            cfg = load_config(self.explicit or (str(self.cfg.path) if self.cfg.path else None))
        except ConfigError as e:
            os.environ.clear()
            os.environ.update(saved)
            return None, f"config reload: {e}; the previous config stays in force"
        if env_changed and self.env_file is not None:
            self.env_set = read_env_file(self.env_file) if now[1] is not None else {}
        self.cfg = cfg
        return cfg, "reloaded " + " and ".join(str(p) for p, changed in ((cfg.path, True), (self.env_file,
                                                                                              env_changed)) if changed)


def token_from_env(env_name: str) -> str | None:
    v = os.environ.get(env_name)
    tok = v.strip() if v and v.strip() else None
    if tok:
        KNOWN_SECRETS.add(tok)      # redact() removes it from everything bound for logs, SQLite or Linear
    return tok


def token_cipher(cfg: Config) -> Any:
    """The Fernet key (from linear.token_key_env) that encrypts the stored Linear OAuth tokens."""
    name = cfg.linear.token_key_env
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        raise ConfigError(f"linear.token_key_env: {name} is not set: it holds the key the stored Linear tokens are "
                          "encrypted with (`patchrelay linear connect` prints a new one)")
    try:
        from cryptography.fernet import Fernet
    except ImportError:
        raise ConfigError("Linear app mode stores its tokens encrypted and needs the cryptography package: "
                          "pip install cryptography") from None
    try:
        cipher = Fernet(raw.encode())
    except (ValueError, TypeError):
        raise ConfigError(f"linear.token_key_env: {name} is not a valid key (44 characters of url-safe base64; "
                          "`patchrelay linear connect` prints a new one)") from None
    KNOWN_SECRETS.add(raw)
    return cipher


def new_token_key() -> str:
    from cryptography.fernet import Fernet
    return Fernet.generate_key().decode()


def github_token(cfg: Config) -> str | None:
    tok = token_from_env(cfg.github.token_env)
    if tok or not cfg.github.use_gh_cli or not shutil.which("gh"):
        return tok
    try:
        out = subprocess.run(["gh", "auth", "token"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    tok = (out.stdout.strip() or None) if out.returncode == 0 else None
    if tok:
        KNOWN_SECRETS.add(tok)
    return tok


def stripped_child_env(cfg: Config, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Codex and repo hooks: PatchRelay's own tokens removed."""
    env = dict(os.environ)
    for name in {cfg.linear.token_env, cfg.github.token_env, cfg.linear.token_key_env, cfg.linear.client_secret_env,
                 *TOKEN_ENV_ALWAYS_STRIPPED}:
        env.pop(name, None)
    env.update(extra or {})
    return env


# ============================================================== 3. store
# SQLite on disk (WAL, busy timeout, foreign keys), schema versioned with
# PRAGMA user_version and forward migrations. Every SQL statement of the
# program lives in this section. Rows come back as plain dicts.

SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE issues (
  id INTEGER PRIMARY KEY,
  project_id TEXT NOT NULL,
  linear_id TEXT NOT NULL UNIQUE,
  key TEXT NOT NULL,
  title TEXT NOT NULL DEFAULT '',
  description TEXT NOT NULL DEFAULT '',
  url TEXT,
  team_id TEXT,
  team_key TEXT,
  linear_state TEXT,
  linear_state_type TEXT,
  delegated INTEGER NOT NULL DEFAULT 0,
  factory_state TEXT NOT NULL,
  pending_run_type TEXT,
  pending_context TEXT,
  pending_since TEXT,
  not_before TEXT,
  active_run_id INTEGER,
  agent_session_id TEXT,
  branch TEXT,
  worktree TEXT,
  thread_id TEXT,
  pr_number INTEGER,
  pr_url TEXT,
  pr_state TEXT,
  ci_repair_attempts INTEGER NOT NULL DEFAULT 0,
  queue_repair_attempts INTEGER NOT NULL DEFAULT 0,
  retries INTEGER NOT NULL DEFAULT 0,
  comments_synced INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX issues_key ON issues(key COLLATE NOCASE);
CREATE INDEX issues_pending ON issues(pending_run_type, active_run_id);
CREATE TABLE runs (
  id INTEGER PRIMARY KEY,
  issue_id INTEGER NOT NULL REFERENCES issues(id),
  run_type TEXT NOT NULL,
  status TEXT NOT NULL,
  trigger TEXT,
  context TEXT,
  prompt TEXT,
  attempt INTEGER NOT NULL DEFAULT 1,
  worker_pid INTEGER,
  worker_started TEXT,
  appserver_pid INTEGER,
  appserver_started TEXT,
  thread_id TEXT,
  turn_ids TEXT NOT NULL DEFAULT '[]',
  head_before TEXT,
  claimed_at TEXT NOT NULL,
  started_at TEXT,
  turn_started_at TEXT,
  heartbeat_at TEXT,
  ended_at TEXT,
  failure_reason TEXT,
  summary TEXT,
  report TEXT,
  tokens TEXT
);
CREATE INDEX runs_issue ON runs(issue_id, id);
CREATE INDEX runs_status ON runs(status);
CREATE TABLE inbox (
  id INTEGER PRIMARY KEY,
  issue_id INTEGER NOT NULL REFERENCES issues(id),
  kind TEXT NOT NULL,
  body TEXT NOT NULL DEFAULT '',
  author TEXT,
  source TEXT NOT NULL,
  source_id TEXT UNIQUE,
  created_at TEXT NOT NULL,
  delivered_at TEXT,
  delivered_run_id INTEGER,
  delivery TEXT
);
CREATE INDEX inbox_pending ON inbox(issue_id, delivered_at);
CREATE TABLE outbox (
  id INTEGER PRIMARY KEY,
  issue_id INTEGER REFERENCES issues(id),
  kind TEXT NOT NULL,
  session_id TEXT,
  client_id TEXT NOT NULL UNIQUE,
  payload TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'queued',
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT,
  lease_until REAL,
  created_at TEXT NOT NULL,
  sent_at TEXT
);
CREATE INDEX outbox_status ON outbox(status, id);
CREATE TABLE sessions (
  id TEXT PRIMARY KEY,
  issue_id INTEGER REFERENCES issues(id),
  creator TEXT,
  trusted INTEGER NOT NULL,
  activity_cursor TEXT,
  seen_updated_at TEXT,
  created_at TEXT NOT NULL
);
CREATE TABLE seen (source_id TEXT PRIMARY KEY, at TEXT NOT NULL);
CREATE TABLE cursors (stream TEXT PRIMARY KEY, value TEXT, updated_at TEXT NOT NULL);
CREATE TABLE events (
  id INTEGER PRIMARY KEY,
  issue_id INTEGER,
  run_id INTEGER,
  at TEXT NOT NULL,
  level TEXT NOT NULL,
  kind TEXT NOT NULL,
  message TEXT NOT NULL
);
CREATE INDEX events_issue ON events(issue_id, id);
CREATE TABLE api_budget (
  api TEXT PRIMARY KEY,
  requests_limit INTEGER,
  requests_remaining INTEGER,
  complexity_limit INTEGER,
  complexity_remaining INTEGER,
  reset_at TEXT,
  limited_until TEXT,
  last_error TEXT,
  updated_at TEXT NOT NULL
);
CREATE TABLE ticks (
  id INTEGER PRIMARY KEY,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  result TEXT,
  summary TEXT
);
"""

# Forward migrations: index i upgrades user_version i -> i+1. Never edit a shipped entry; append.
SCHEMA_V2 = """
ALTER TABLE inbox ADD COLUMN run_id INTEGER;
ALTER TABLE events ADD COLUMN issue_key TEXT;
CREATE INDEX events_key ON events(issue_key COLLATE NOCASE, id);
"""

SCHEMA_V3 = """
ALTER TABLE issues ADD COLUMN pr_node_id TEXT;
ALTER TABLE issues ADD COLUMN pr_head_sha TEXT;
ALTER TABLE issues ADD COLUMN pr_review TEXT;
ALTER TABLE issues ADD COLUMN pr_ci TEXT;
ALTER TABLE issues ADD COLUMN pr_queue TEXT;
ALTER TABLE issues ADD COLUMN gh_snapshot TEXT;
ALTER TABLE issues ADD COLUMN gh_observed_at TEXT;
ALTER TABLE issues ADD COLUMN gh_action TEXT;
ALTER TABLE issues ADD COLUMN pushed_sha TEXT;
ALTER TABLE issues ADD COLUMN pushed_at TEXT;
ALTER TABLE issues ADD COLUMN repair_counts TEXT NOT NULL DEFAULT '{}';
"""

SCHEMA_V4 = """
ALTER TABLE outbox ADD COLUMN lease_pid INTEGER;
ALTER TABLE outbox ADD COLUMN lease_started TEXT;
CREATE INDEX outbox_issue ON outbox(issue_id, id);
CREATE INDEX inbox_issue_kind ON inbox(issue_id, kind, delivered_at);
"""

SCHEMA_V5 = """
ALTER TABLE ticks ADD COLUMN pid INTEGER;
ALTER TABLE ticks ADD COLUMN pid_started TEXT;
"""

SCHEMA_V6 = """
CREATE INDEX outbox_sent ON outbox(status, kind, session_id);
CREATE INDEX seen_at ON seen(at);
CREATE INDEX events_at ON events(at);
CREATE INDEX issues_state ON issues(factory_state, updated_at);
"""

SCHEMA_V7 = """
ALTER TABLE issues ADD COLUMN paused TEXT;
"""

SCHEMA_V8 = """
ALTER TABLE runs ADD COLUMN tokens_spent INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_claimed_at ON runs(claimed_at);
"""

SCHEMA_V9 = """
UPDATE events SET kind = 'unrouted' WHERE issue_id IS NULL AND kind = 'intake' AND message LIKE '%no project routes it%';
"""

# Approvals pinned to a head: the clean base merges PatchRelay pushed (merge commit -> the head it merged into),
# the kind of run that made PatchRelay's last push, and the head that waits for a new review.
SCHEMA_V10 = """
ALTER TABLE issues ADD COLUMN clean_merges TEXT NOT NULL DEFAULT '{}';
ALTER TABLE issues ADD COLUMN pushed_run_type TEXT;
ALTER TABLE issues ADD COLUMN pr_waiting_review TEXT;
"""

# Linear app mode: the OAuth connection (one row; both tokens encrypted with linear.token_key_env's key,
# `generation` counts the pairs so that a refresh stores its pair only over the one it replaced), and named
# leases (one holder at a time until `until`, seconds since the epoch): the token refresh takes one. A run's
# `live` view: what its running turn shows `patchrelay live` (latest agent message, command and its output).
SCHEMA_V11 = """
CREATE TABLE linear_oauth (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  access_token TEXT NOT NULL,
  refresh_token TEXT,
  expires_at REAL,
  lifetime REAL,
  scope TEXT,
  client_id TEXT,
  app_user TEXT,
  app_user_id TEXT,
  connected_at TEXT NOT NULL,
  refreshed_at TEXT,
  refreshes INTEGER NOT NULL DEFAULT 0,
  refresh_error TEXT,
  generation INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE leases (
  name TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  until REAL NOT NULL
);
ALTER TABLE runs ADD COLUMN live TEXT;
ALTER TABLE runs ADD COLUMN host TEXT;
ALTER TABLE outbox ADD COLUMN lease_host TEXT;
ALTER TABLE issues ADD COLUMN host TEXT;
CREATE TABLE hosts (
  name TEXT PRIMARY KEY,
  seen_at REAL NOT NULL,
  started_at TEXT NOT NULL,
  pid INTEGER,
  max_runs INTEGER,
  version TEXT
);
ALTER TABLE issues ADD COLUMN page_slug TEXT;
CREATE INDEX events_kind ON events(kind, id);
"""

# v12: what each host records of its worktrees is its own (meta worktrees.usage:<host>, worktrees.kept:<host>)
SCHEMA_V12 = """
DELETE FROM meta WHERE key IN ('worktrees.usage', 'worktrees.kept');
"""

MIGRATIONS: list[str] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
                         SCHEMA_V9, SCHEMA_V10, SCHEMA_V11, SCHEMA_V12]

ISSUE_COLUMNS = frozenset({
    "project_id", "linear_id", "key", "title", "description", "url", "team_id", "team_key", "linear_state",
    "linear_state_type", "delegated", "factory_state", "pending_run_type", "pending_context", "pending_since",
    "not_before", "active_run_id", "agent_session_id", "branch", "worktree", "thread_id", "pr_number", "pr_url",
    "pr_state", "ci_repair_attempts", "queue_repair_attempts", "retries", "comments_synced", "pr_node_id",
    "pr_head_sha", "pr_review", "pr_ci", "pr_queue", "gh_snapshot", "gh_observed_at", "gh_action", "pushed_sha",
    "pushed_at", "repair_counts", "paused", "clean_merges", "pushed_run_type", "pr_waiting_review", "page_slug",
    "host"})
RUN_COLUMNS = frozenset({
    "status", "trigger", "context", "prompt", "attempt", "worker_pid", "worker_started", "appserver_pid",
    "appserver_started", "thread_id", "turn_ids", "head_before", "started_at", "turn_started_at", "heartbeat_at",
    "ended_at", "failure_reason", "summary", "report", "tokens", "tokens_spent", "live", "host"})


def _secure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StoreError(f"cannot create directory {path}: {e.strerror}") from None


def check_database_path(path: Path) -> None:
    """database.path must name a file whose directory is (or can be) a directory."""
    if path.is_dir():
        raise ConfigError(f"database.path: {path} is a directory; give the path of a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"database.path: {path} lies under {parent}, which is a file")
            break


def read_only_file(path: Path) -> bool:
    """A file its owner made read-only (root may write anyway; PatchRelay respects the owner's choice)."""
    return path.exists() and (not os.access(path, os.W_OK) or not path.stat().st_mode & stat.S_IWUSR)


# ---- PostgreSQL, behind the surface of sqlite3 the store uses (execute with `?` placeholders, rows by name and
# by position, rowcount, lastrowid). One SQL: statements are written in the subset both dialects share; what
# differs (placeholders, id columns and column types in the DDL, the schema version, locking) is here.

_ID_TABLES = frozenset({"issues", "runs", "inbox", "outbox", "events", "ticks"})
PG_WRITE_LOCK = 7_700_771       # the advisory lock that serializes write transactions, as SQLite does


def pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def pg_ddl(stmt: str) -> str:
    """A migration statement for PostgreSQL: identity ids, 64-bit integers, double precision."""
    stmt = re.sub(r"\((\w+) COLLATE NOCASE", r"(lower(\1)", stmt)     # case-insensitive keys: an index on lower()
    stmt = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", stmt)
    stmt = re.sub(r"\bINTEGER\b", "BIGINT", stmt)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", stmt)


class _PgRow(dict):
    def __getitem__(self, k: Any) -> Any:
        return list(self.values())[k] if isinstance(k, int) else super().__getitem__(k)


def _has_rows(cur: Any) -> bool:
    """The statement returned rows (a SELECT or a RETURNING). Read from the result's status: cursor.description
    would build a Column object per column of every statement."""
    res = cur.pgresult
    return res is not None and res.status == 2        # libpq PGRES_TUPLES_OK


class _PgCursor:
    def __init__(self, cur: Any, lastrowid: int | None):
        self._cur, self.lastrowid, self.rowcount = cur, lastrowid, cur.rowcount

    def fetchone(self) -> _PgRow | None:
        r = self._cur.fetchone() if _has_rows(self._cur) else None
        return _PgRow(r) if r is not None else None

    def fetchall(self) -> list[_PgRow]:
        return [_PgRow(r) for r in self._cur.fetchall()] if _has_rows(self._cur) else []


class PgConnection:
    """One psycopg 3 connection (autocommit: the store says BEGIN and COMMIT) that speaks like sqlite3's."""

    def __init__(self, url: str):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ConfigError("database.url: PostgreSQL needs psycopg 3: pip install 'patchrelay[postgres]'") from None
        self.where, self._error = redact_url(url), psycopg.Error
        try:
            self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10,
                                        application_name="patchrelay")
        except psycopg.Error as e:
            raise StoreError(f"database.url: cannot connect to {self.where}: {one_line(redact(str(e)), 300)}") from None

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _PgCursor:
        m = re.match(r"\s*INSERT INTO (\w+)", sql)
        want_id = bool(m and m.group(1) in _ID_TABLES and "RETURNING" not in sql.upper())
        q = pg_sql(sql) + (" RETURNING id" if want_id else "")
        params = tuple(int(a) if isinstance(a, bool) else a for a in args)
        try:        # without parameters: sent as it is (the simple protocol, several statements allowed)
            cur = self.conn.execute(q, params) if params else self.conn.execute(sql + (" RETURNING id" if want_id
                                                                                      else ""))
            rid = None
            if want_id:
                r = cur.fetchone()
                rid = r["id"] if r else None
        except self._error as e:
            raise StoreError(f"database {self.where}: {type(e).__name__}: {one_line(redact(str(e)), 300)}") from None
        return _PgCursor(cur, rid)

    def read_many(self, queries: Sequence[tuple[str, Sequence[Any]]]) -> list[list[dict]]:
        """Several reads in one round trip (a pipeline); each one's rows."""
        try:
            with self.conn.pipeline():
                curs = [self.conn.execute(pg_sql(q), tuple(int(a) if isinstance(a, bool) else a for a in args))
                        for q, args in queries]
            return [[dict(r) for r in c.fetchall()] if _has_rows(c) else [] for c in curs]
        except self._error as e:
            raise StoreError(f"database {self.where}: {type(e).__name__}: {one_line(redact(str(e)), 300)}") from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.executemany(pg_sql(sql), [tuple(int(a) if isinstance(a, bool) else a for a in r) for r in rows])
        except self._error as e:
            raise StoreError(f"database {self.where}: {type(e).__name__}: {one_line(redact(str(e)), 300)}") from None

    def close(self) -> None:
        self.conn.close()


# ---- the store: one API over either database

class Store:
    """The database (SQLite, or PostgreSQL for a fleet): every SQL statement of the program. It owns the
    connection (WAL, busy timeout, foreign keys), the schema and its forward migrations (PRAGMA user_version;
    the patchrelay_schema table on PostgreSQL), and the transaction depth (`tx` nests; `savepoint` undoes one
    unit inside it). Tables: issues (one row per tracked Linear issue: factory state, pending run, branch and
    worktree, PR fields, GitHub snapshot, host), runs, inbox (tick -> worker: prompts and stops), outbox
    (decisions -> Linear), sessions, seen (dedup keys), cursors, events, api_budget, ticks, meta, hosts and
    leases (a fleet's members and its once-per-fleet steps), linear_oauth. Rows come back as plain dicts."""

    def __init__(self, path: Path, readonly: bool = False, verify: bool = False, url: str | None = None):
        """`verify`: check the file (PRAGMA quick_check) before anything is written to it, and refuse a
        damaged one (an operator's write). `url`: PostgreSQL instead of the file at `path`."""
        self.path, self.url, self._depth = Path(path), url, 0
        self.pg = url is not None
        if url is not None:
            self.db: Any = PgConnection(url)
            self.migrate()
            return
        check_database_path(self.path)
        if not readonly and read_only_file(self.path):
            raise StoreError(f"database.path: {self.path} is read-only; PatchRelay will not write to it "
                             "(make it writable again with `chmod u+w` if that was not meant)")
        try:
            if not readonly:
                _secure_dir(self.path.parent)
                if not self.path.exists():
                    fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                    os.close(fd)
            elif not self.path.exists():
                raise StoreError(f"database.path: {self.path} does not exist yet: nothing is tracked (run "
                                 "`patchrelay tick` first)")
            self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                      check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"database.path: cannot open {self.path}: {e}") from None
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA foreign_keys = ON")
            if verify and (check := self.quick_check()) != "ok":
                self.db.close()
                raise StoreError(f"database.path: {self.path} is damaged ({one_line(check, 160)}); nothing "
                                 "written (`patchrelay doctor` says what to do)")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
                self.migrate()
            elif self.schema_version() < len(MIGRATIONS) and not read_only_file(self.path):
                self.migrate()          # a read after an upgrade, before any tick
        except sqlite3.Error as e:
            raise StoreError(f"database.path: {self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()

    @property
    def label(self) -> str:
        return self.db.where if self.pg else str(self.path)

    def quick_check(self) -> str:
        if self.pg:
            return "ok"
        return "; ".join(r[0] for r in self.db.execute("PRAGMA quick_check").fetchall()) or "ok"

    def server_info(self) -> dict:
        """PostgreSQL's version, the user, and whether it may create tables in the public schema."""
        r = self._one("SELECT current_setting('server_version') AS version, "
                      "CAST(current_setting('server_version_num') AS INTEGER) AS version_num, current_user AS user, "
                      "has_schema_privilege(current_user, 'public', 'CREATE') AS can_create")
        return self._required(r, "server information")

    def table_names(self) -> list[str]:
        """The tables PatchRelay's migrations made, in the order they can be filled (references first)."""
        return ["meta", "issues", "runs", "inbox", "outbox", "sessions", "seen", "cursors", "events", "api_budget",
                "ticks", "linear_oauth", "leases", "hosts"]

    def is_empty(self) -> bool:
        return all(self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] == 0 for t in self.table_names())

    def copy_to(self, target: "Store") -> dict[str, int]:
        """Every row of every table into `target` (an empty database, its schema made by its migrations), in one
        transaction there; the id sequences then continue after the copied ids."""
        counts: dict[str, int] = {}
        with target.tx():
            for t in self.table_names():
                rows = self._all(f"SELECT * FROM {t}")
                counts[t] = len(rows)
                if not rows:
                    continue
                cols = list(rows[0])
                sql = f"INSERT INTO {t} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                target.db.executemany(sql, [tuple(r[c] for c in cols) for r in rows])
            if target.pg:
                for t in sorted(_ID_TABLES):
                    target.db.execute(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                                      f"COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)")
        return counts

    def clock(self) -> float:
        """Now, in seconds since the epoch, by the database's clock (PostgreSQL's: one clock for a fleet)."""
        if self.pg:
            return float(self.db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS t").fetchone()["t"])
        return time.time()

    # ---- schema
    def schema_version(self) -> int:
        if self.pg:
            self.db.execute("CREATE TABLE IF NOT EXISTS patchrelay_schema (version INTEGER NOT NULL)")
            r = self.db.execute("SELECT version FROM patchrelay_schema").fetchone()
            return int(r["version"]) if r else 0
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        version = self.schema_version()
        if version > len(MIGRATIONS):
            raise StoreError(f"database {self.label} has schema version {version}, newer than this "
                             f"PatchRelay understands ({len(MIGRATIONS)}); upgrade PatchRelay")
        for i in range(version, len(MIGRATIONS)):
            with self.tx():
                if self.pg:         # under the write lock: the version read again, the migration run once
                    if self.schema_version() > i:
                        continue
                for stmt in [s.strip() for s in MIGRATIONS[i].split(";") if s.strip()]:
                    self.db.execute(pg_ddl(stmt) if self.pg else stmt)
                if self.pg:
                    self.db.execute("DELETE FROM patchrelay_schema")
                    self.db.execute("INSERT INTO patchrelay_schema (version) VALUES (?)", (i + 1,))
                else:
                    self.db.execute(f"PRAGMA user_version = {i + 1}")
        if self.pg:
            return
        for suffix in ("", "-wal", "-shm"):   # owner-only; never adds a permission the owner took away
            p = Path(str(self.path) + suffix)
            with contextlib.suppress(OSError):
                mode = p.stat().st_mode & 0o777
                if mode & 0o077:
                    os.chmod(p, mode & 0o700)

    @contextlib.contextmanager
    def tx(self, deferred: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE, or DEFERRED: the write lock is taken at the first
        write); nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        if self.pg:             # a writer takes the lock: one at a time, fleet-wide, as BEGIN IMMEDIATE on one host
            self.db.execute("BEGIN" if deferred else f"BEGIN; SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")
        else:
            self.db.execute("BEGIN DEFERRED" if deferred else "BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK")
            raise
        else:
            self._depth = 0
            self.db.execute("COMMIT")

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside the current transaction: on error only this unit is undone."""
        self._sp = getattr(self, "_sp", 0) + 1
        name = f"sp{self._sp}"
        self.db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.db.execute(f"ROLLBACK TO {name}")
            self.db.execute(f"RELEASE {name}")
            raise
        else:
            self.db.execute(f"RELEASE {name}")
        finally:
            self._sp -= 1

    def _same(self, column: str) -> str:
        """`column` equals the parameter, ignoring case (issue keys as people type them)."""
        return f"lower({column}) = lower(?)" if self.pg else f"{column} = ? COLLATE NOCASE"

    @staticmethod
    def _inserted(cur: Any) -> int:
        if cur.lastrowid is None:
            raise StoreError("an INSERT gave no row id")
        return cur.lastrowid

    @staticmethod
    def _required(row: dict | None, what: str) -> dict:
        if row is None:
            raise StoreError(f"{what}: not in the database")
        return row

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        r = self.db.execute(sql, args).fetchone()
        return dict(r) if r else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    def _reads(self, *queries: tuple[str, tuple]) -> list[list[dict]]:
        """Several reads: in one round trip on PostgreSQL (a pipeline), one after the other on SQLite."""
        if self.pg:
            return self.db.read_many(queries)
        return [self._all(q, a) for q, a in queries]

    # ---- meta and cursors
    def meta_get(self, key: str) -> str | None:
        r = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return r["value"] if r else None

    def meta_set(self, key: str, value: str | None) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    # ---- worktrees: what each host records of the worktrees on its disk (gc, each tick)
    def worktrees_recorded(self) -> dict:
        """Every host's worktrees, summed: {count, bytes, kept: [...], hosts: {host: {count, bytes, kept}}}."""
        hosts: dict[str, dict] = {}
        for r in self._all("SELECT key, value FROM meta WHERE key LIKE 'worktrees.%:%' ORDER BY key"):
            kind, _, host = r["key"].partition(":")
            value = json.loads(r["value"] or "null")
            h = hosts.setdefault(host, {"count": 0, "bytes": 0, "kept": []})
            if kind == "worktrees.usage" and value:
                h.update(count=value.get("count", 0), bytes=value.get("bytes", 0), at=value.get("at"))
            elif kind == "worktrees.kept" and value:
                h["kept"] = value
        return {"count": sum(h["count"] for h in hosts.values()), "bytes": sum(h["bytes"] for h in hosts.values()),
                "kept": [k for h in hosts.values() for k in h["kept"]], "hosts": hosts}

    def cursor_get(self, stream: str) -> str | None:
        r = self._one("SELECT value FROM cursors WHERE stream = ?", (stream,))
        return r["value"] if r else None

    def cursors_set(self, values: Mapping[str, str]) -> None:
        """Several cursors in one statement."""
        if values:
            self.db.execute(f"INSERT INTO cursors(stream, value, updated_at) VALUES "
                            f"{', '.join(['(?, ?, ?)'] * len(values))} ON CONFLICT(stream) DO UPDATE SET "
                            "value = excluded.value, updated_at = excluded.updated_at",
                            tuple(x for k, v in values.items() for x in (k, v, iso())))

    def cursor_set(self, stream: str, value: str) -> None:
        self.db.execute("INSERT INTO cursors(stream, value, updated_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(stream) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        (stream, value, iso()))

    # ---- leases: one holder per name until it releases or its time runs out
    def _begin_tick_pg(self, pid: int, pid_started: str | None, host: str, max_runs: int, leases: Sequence[str],
                       lease_seconds: float) -> tuple[int, dict[str, str], float]:
        """begin_tick in one statement (data-modifying CTEs): the tick's own row, this host's own heartbeat
        (whose time is the database's clock) and each lease's compare-and-set under its row lock, none of
        which needs the write lock; it returns the tick's id, the clock's reading and the leases held."""
        names = list(leases) or ["-"]
        r = self._required(self._one(
            "WITH t AS (INSERT INTO ticks (started_at, pid, pid_started) VALUES (?, ?, ?) RETURNING id), "
            "h AS (INSERT INTO hosts (name, seen_at, started_at, pid, max_runs, version) VALUES "
            "(?, EXTRACT(EPOCH FROM clock_timestamp()), ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
            "seen_at = excluded.seen_at, pid = excluded.pid, max_runs = excluded.max_runs, "
            "version = excluded.version RETURNING seen_at), "
            "l AS (INSERT INTO leases(name, holder, until) SELECT v.name, ?, h.seen_at + ? FROM h, "
            f"(VALUES {', '.join(['(CAST(? AS TEXT))'] * len(names))}) AS v(name) WHERE CAST(? AS INTEGER) = 1 "
            "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, until = excluded.until WHERE "
            "leases.holder = excluded.holder OR leases.until < excluded.until - ? RETURNING name) "
            "SELECT (SELECT id FROM t) AS tick_id, (SELECT seen_at FROM h) AS now, "
            "(SELECT string_agg(name, ',') FROM l) AS held",
            (iso(), pid, pid_started, host, iso(), pid, max_runs, __version__, host, lease_seconds, *names,
             bool(leases), lease_seconds)), "begin_tick")
        tick_id, now = int(r["tick_id"]), float(r["now"])
        holders = {name: host for name in (r["held"] or "").split(",") if name}
        if tick_id % 100 == 0:
            self.db.execute("DELETE FROM ticks WHERE id < ?", (tick_id - 1000,))
        if set(leases) - set(holders):       # who holds the others
            holders = {r["name"]: r["holder"] for r in self._all(
                "SELECT name, holder FROM leases WHERE until >= ?", (now,))}
        return tick_id, holders, now

    def lease_take(self, name: str, holder: str, seconds: float, now: float | None = None) -> bool:
        """Take (or extend) lease `name` for `holder`, unless another holder's lease still runs (the database's
        clock decides: `now` is a reading of it)."""
        now = self.clock() if now is None else now
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO leases(name, holder, until) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "holder = excluded.holder, until = excluded.until WHERE leases.holder = excluded.holder "
                "OR leases.until < ?", (name, holder, now + seconds, now))
            return cur.rowcount == 1

    def lease_release(self, name: str, holder: str) -> None:
        with self.tx():
            self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    # ---- Linear app mode's OAuth connection (tokens arrive and leave encrypted)
    def oauth_get(self) -> dict | None:
        return self._one("SELECT * FROM linear_oauth WHERE id = 1")

    def oauth_connect(self, fields: Mapping[str, Any]) -> None:
        """A new connection replaces any earlier one (and its refusal)."""
        with self.tx():
            old = self.oauth_get()
            self.db.execute("DELETE FROM linear_oauth")
            cols = {**fields, "id": 1, "connected_at": iso(), "generation": (old["generation"] + 1) if old else 1}
            self.db.execute(f"INSERT INTO linear_oauth({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            tuple(cols.values()))

    def oauth_refreshed(self, generation: int, fields: Mapping[str, Any]) -> bool:
        """Store a refreshed pair over generation `generation`; False when another pair replaced it first."""
        with self.tx():
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = self.db.execute(
                f"UPDATE linear_oauth SET {sets}, refreshed_at = ?, refreshes = refreshes + 1, refresh_error = NULL, "
                "generation = generation + 1 WHERE id = 1 AND generation = ?", (*fields.values(), iso(), generation))
            return cur.rowcount == 1

    def oauth_refused(self, generation: int, error: str) -> None:
        with self.tx():
            self.db.execute("UPDATE linear_oauth SET refresh_error = ? WHERE id = 1 AND generation = ?",
                            (error, generation))

    def oauth_forget(self) -> None:
        with self.tx():
            self.db.execute("DELETE FROM linear_oauth")

    # ---- issues
    def issue_by_id(self, issue_id: int) -> dict | None:
        return self._one("SELECT * FROM issues WHERE id = ?", (issue_id,))

    def issue(self, issue_id: int) -> dict:
        """An issue that must exist (a run's, a claim's)."""
        return self._required(self.issue_by_id(issue_id), f"issue {issue_id}")

    def issue_by_linear_id(self, linear_id: str) -> dict | None:
        return self._one("SELECT * FROM issues WHERE linear_id = ?", (linear_id,))

    def issue_by_key(self, key: str) -> dict | None:
        return self._one(f"SELECT * FROM issues WHERE {self._same('key')} ORDER BY id DESC LIMIT 1", (key,))

    def issues_listed(self, changed_since: str | None = None, state: str | None = None,
                      project: str | None = None, limit: int | None = None) -> list[dict]:
        """Issues with their active run's type and status (one query). With `changed_since`: those that need
        attention, i.e. not closed, or changed since then."""
        where, args = [], []
        if changed_since is not None:
            where.append("(i.factory_state NOT IN ('done', 'canceled') OR i.updated_at >= ?)")
            args.append(changed_since)
        if state:
            where.append("i.factory_state = ?")
            args.append(state)
        if project:
            where.append("i.project_id = ?")
            args.append(project)
        sql = ("SELECT i.*, r.run_type AS active_run_type, r.status AS active_run_status FROM issues i "
               "LEFT JOIN runs r ON r.id = i.active_run_id" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY i.updated_at DESC, i.id DESC" + (" LIMIT ?" if limit else ""))
        return self._all(sql, (*args, *([limit] if limit else [])))

    def issues_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM issues").fetchone()[0]

    def outbox_pending(self) -> list[dict]:
        """Queued and failed Linear writes with their issue's key."""
        return self._all("SELECT o.*, i.key AS issue_key FROM outbox o LEFT JOIN issues i ON i.id = o.issue_id "
                         "WHERE o.status IN ('queued', 'failed') ORDER BY o.status DESC, o.id")

    def mark_comments_synced(self, linear_ids: list[str]) -> None:
        self.db.executemany("UPDATE issues SET comments_synced = 1 WHERE linear_id = ?", [(i,) for i in linear_ids])

    def insert_issue(self, fields: Mapping[str, Any]) -> int:
        bad = set(fields) - ISSUE_COLUMNS
        if bad:
            raise StoreError(f"unknown issue columns {sorted(bad)}")
        now = iso()
        cols = list(fields) + ["created_at", "updated_at"]
        cur = self.db.execute(f"INSERT INTO issues ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                              [*fields.values(), now, now])
        return self._inserted(cur)

    def update_issue(self, issue_id: int, fields: Mapping[str, Any]) -> None:
        if not fields:
            return
        bad = set(fields) - ISSUE_COLUMNS
        if bad:
            raise StoreError(f"unknown issue columns {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE issues SET {sets}, updated_at = ? WHERE id = ?", [*fields.values(), iso(), issue_id])

    def closed_worktrees(self, host: str | None = None) -> list[dict]:
        """Issues in a final state that still have a worktree (on `host`: those it holds), oldest change first."""
        return self._all("SELECT * FROM issues WHERE factory_state IN ('done', 'canceled', 'failed', 'escalated') "
                         "AND worktree IS NOT NULL AND active_run_id IS NULL AND pending_run_type IS NULL "
                         "AND (CAST(? AS TEXT) IS NULL OR host IS NULL OR host = ?) ORDER BY updated_at, id", (host, host))

    def worktree_paths(self, host: str | None = None) -> list[dict]:
        """Every issue's recorded worktree (key, state, path), of `host` when given."""
        return self._all("SELECT key, factory_state, worktree FROM issues WHERE worktree IS NOT NULL "
                         "AND (CAST(? AS TEXT) IS NULL OR host IS NULL OR host = ?) ORDER BY id", (host, host))

    Q_WATCHED = ("SELECT * FROM issues WHERE factory_state NOT IN ('done', 'canceled') AND branch IS NOT NULL "
                 "AND (pr_number IS NOT NULL OR factory_state = 'ready_for_pr') ORDER BY id")

    def github_watched(self) -> list[dict]:
        """Issues GitHub is observed for: a pull request, or a pushed branch that needs one."""
        return self._all(self.Q_WATCHED)

    Q_RUNNABLE = ("SELECT * FROM issues WHERE pending_run_type IS NOT NULL AND active_run_id IS NULL "
                  "AND (not_before IS NULL OR not_before <= ?) AND factory_state NOT IN ('done', 'canceled') "
                  "ORDER BY pending_since, id")

    def runnable_issues(self, now: str) -> list[dict]:
        return self._all(self.Q_RUNNABLE, (now,))

    # ---- runs
    def run_by_id(self, run_id: int) -> dict | None:
        return self._one("SELECT * FROM runs WHERE id = ?", (run_id,))

    def run(self, run_id: int) -> dict:
        """A run that must exist."""
        return self._required(self.run_by_id(run_id), f"run {run_id}")

    def runs_for_issue(self, issue_id: int) -> list[dict]:
        return self._all("SELECT * FROM runs WHERE issue_id = ? ORDER BY id DESC", (issue_id,))

    def active_runs(self, host: str | None = None) -> list[dict]:
        """Claimed and running runs (of one host: those it claimed, and those claimed before hosts were kept)."""
        if host is None:
            return self._all("SELECT * FROM runs WHERE status IN ('claimed', 'running') ORDER BY id")
        return self._all(self.Q_ACTIVE_RUNS, (host,))

    Q_ACTIVE_RUNS = ("SELECT * FROM runs WHERE status IN ('claimed', 'running') AND (host = ? OR host IS NULL) "
                     "ORDER BY id")

    def run_is_current(self, run_id: int) -> bool:
        """The fence: the run is still its issue's active run (not finished, not taken over by another host)."""
        return self._one("SELECT r.id FROM runs r JOIN issues i ON i.active_run_id = r.id WHERE r.id = ? AND "
                         "r.status IN ('claimed', 'running')", (run_id,)) is not None

    # ---- hosts: the members of a fleet, by their heartbeats (the database's clock)
    def heartbeat(self, name: str, pid: int, max_runs: int, now: float | None = None) -> None:
        with self.tx():
            self.db.execute(
                "INSERT INTO hosts (name, seen_at, started_at, pid, max_runs, version) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET seen_at = excluded.seen_at, pid = excluded.pid, "
                "max_runs = excluded.max_runs, version = excluded.version",
                (name, self.clock() if now is None else now, iso(), pid, max_runs, __version__))

    def begin_tick(self, pid: int, pid_started: str | None, host: str, max_runs: int, leases: Sequence[str],
                   lease_seconds: float) -> tuple[int, dict[str, str], float]:
        """A tick's start in one transaction and one reading of the clock: its row, the host's heartbeat, and
        the once-per-fleet leases it can take (or keep). Returns the tick's id, each running lease's holder
        by name (this host for those it took) and the clock's reading."""
        if self.pg:
            return self._begin_tick_pg(pid, pid_started, host, max_runs, leases, lease_seconds)
        with self.tx():
            now = self.clock()
            tick_id = self.start_tick(pid, pid_started)
            self.heartbeat(host, pid, max_runs, now)
            for name in leases:
                self.lease_take(name, host, lease_seconds, now)
            holders = {r["name"]: r["holder"] for r in self._all(
                "SELECT name, holder FROM leases WHERE until >= ?", (now,))}
        return tick_id, holders, now

    def hosts(self, now: float | None = None, holders: Mapping[str, str] | None = None) -> list[dict]:
        """Every host with its heartbeat's age (`silent_seconds`), active runs and the leases it holds. `now`
        and `holders` (lease -> holder): a reading of the clock and the leases a caller already made."""
        now = self.clock() if now is None else now
        rows = self._all(self.Q_HOSTS)
        if holders is None:
            holders = {x["name"]: x["holder"] for x in
                       self._all("SELECT name, holder FROM leases WHERE until >= ?", (now,))}
        return self._hosts_shaped(rows, now, holders)

    Q_HOSTS = ("SELECT h.*, (SELECT COUNT(*) FROM runs r WHERE r.host = h.name AND r.status IN "
               "('claimed', 'running')) AS active_runs FROM hosts h ORDER BY h.name")

    @staticmethod
    def _hosts_shaped(rows: list[dict], now: float, holders: Mapping[str, str]) -> list[dict]:
        for h in rows:
            h["silent_seconds"] = round(now - float(h["seen_at"]), 1)
            h["leases"] = sorted(name for name, holder in holders.items() if holder == h["name"])
        return rows

    # ---- what a tick's steps read first, each in one round trip
    def reconcile_view(self, host: str, now: float, holders: Mapping[str, str]) -> tuple[list[dict], list[dict]]:
        """The hosts (as hosts() gives them) and this host's active runs."""
        hosts, runs = self._reads((self.Q_HOSTS, ()), (self.Q_ACTIVE_RUNS, (host,)))
        return self._hosts_shaped(hosts, now, holders), runs

    def intake_view(self, streams: Sequence[str], keys: Sequence[str]
                    ) -> tuple[dict | None, dict[str, str | None], list[dict]]:
        """Linear's budget; the cursors `streams` and meta settings `keys` (their names do not overlap; None for
        those not set); every tracked issue's Linear id, whether it is open, and whether its comments were read."""
        budget, named, tracked = self._reads(
            ("SELECT * FROM api_budget WHERE api = ?", ("linear",)),
            (f"SELECT stream AS name, value FROM cursors WHERE stream IN ({', '.join('?' * len(streams))}) "
             f"UNION ALL SELECT key AS name, value FROM meta WHERE key IN ({', '.join('?' * len(keys))})",
             (*streams, *keys)),
            ("SELECT linear_id, CASE WHEN factory_state IN ('done', 'canceled') THEN 0 ELSE 1 END AS open, "
             "comments_synced FROM issues ORDER BY id", ()))
        got = {r["name"]: r["value"] for r in named}
        return (budget[0] if budget else None), {k: got.get(k) for k in (*streams, *keys)}, tracked

    def launch_view(self, host: str, now: str) -> tuple[dict[str, str | None], int, list[dict]]:
        """The pause and the Codex hold (meta), this host's active runs counted, and the runnable issues."""
        meta, active, runnable = self._reads(
            ("SELECT key, value FROM meta WHERE key IN ('runner.paused', 'runner.codex_hold')", ()),
            (self.Q_ACTIVE_COUNT, (host,)), (self.Q_RUNNABLE, (now,)))
        got = {r["key"]: r["value"] for r in meta}
        return ({k: got.get(k) for k in ("runner.paused", "runner.codex_hold")}, int(active[0]["n"]), runnable)

    def observe_view(self) -> tuple[dict | None, list[dict]]:
        """GitHub's budget and the issues it is observed for (github_watched())."""
        budget, watched = self._reads(("SELECT * FROM api_budget WHERE api = ?", ("github",)), (self.Q_WATCHED, ()))
        return (budget[0] if budget else None), watched

    def lease_holder(self, name: str) -> str | None:
        r = self._one("SELECT holder FROM leases WHERE name = ? AND until >= ?", (name, self.clock()))
        return r["holder"] if r else None

    def tokens_spent(self, issue_id: int | None = None, since: str | None = None,
                     excluding_run: int | None = None) -> int:
        """Tokens spent by runs (of one issue, or claimed since a time), without one run."""
        if self.schema_version() < 8:       # read-only and not migrated: runs before spend was recorded
            return 0
        sql = "SELECT CAST(COALESCE(SUM(tokens_spent), 0) AS BIGINT) FROM runs WHERE id != ?"
        args: list[Any] = [excluding_run or 0]
        if issue_id is not None:
            sql, args = sql + " AND issue_id = ?", args + [issue_id]
        if since is not None:
            sql, args = sql + " AND claimed_at >= ?", args + [since]
        return self.db.execute(sql, args).fetchone()[0]

    def count_active_runs(self, host: str | None = None) -> int:
        if host is None:
            return self.db.execute("SELECT COUNT(*) FROM runs WHERE status IN ('claimed', 'running')").fetchone()[0]
        return int(self._required(self._one(self.Q_ACTIVE_COUNT, (host,)), "count")["n"])

    Q_ACTIVE_COUNT = "SELECT COUNT(*) AS n FROM runs WHERE status IN ('claimed', 'running') AND (host = ? OR host IS NULL)"

    def claim_run(self, issue_id: int, expected_type: str | None = None, host: str | None = None) -> int | None:
        """Atomically move the issue's pending run to a new `claimed` run row (of `host`, which the issue's
        worktree and thread then live on). None if lost the race."""
        with self.tx():
            issue = self.issue_by_id(issue_id)
            if not issue or issue["pending_run_type"] is None or issue["active_run_id"] is not None:
                return None
            if expected_type and issue["pending_run_type"] != expected_type:
                return None
            context = json.loads(issue["pending_context"] or "{}")
            cur = self.db.execute(
                "INSERT INTO runs (issue_id, run_type, status, trigger, context, attempt, claimed_at, host) "
                "VALUES (?, ?, 'claimed', ?, ?, ?, ?, ?)",
                (issue_id, issue["pending_run_type"], context.get("trigger"), issue["pending_context"],
                 int(context.get("attempt", 1)), iso(), host))
            run_id = cur.lastrowid
            n = self.db.execute(
                "UPDATE issues SET active_run_id = ?, pending_run_type = NULL, pending_context = NULL, "
                "pending_since = NULL, not_before = NULL, updated_at = ?, host = COALESCE(?, host) "
                "WHERE id = ? AND active_run_id IS NULL AND pending_run_type IS NOT NULL",
                (run_id, iso(), host, issue_id)).rowcount
            if n != 1:
                raise StoreError(f"claim of issue {issue_id} raced")  # rolls back; cannot happen under BEGIN IMMEDIATE
            return run_id

    def update_run(self, run_id: int, fields: Mapping[str, Any]) -> None:
        if not fields:
            return
        bad = set(fields) - RUN_COLUMNS
        if bad:
            raise StoreError(f"unknown run columns {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])

    def add_turn_id(self, run_id: int, turn_id: str) -> None:
        with self.tx():
            run = self.run(run_id)
            turns = json.loads(run["turn_ids"] or "[]")
            if turn_id not in turns:
                turns.append(turn_id)
            self.update_run(run_id, {"turn_ids": json.dumps(turns), "status": "running",
                                     "turn_started_at": run["turn_started_at"] or iso(), "heartbeat_at": iso()})

    # ---- inbox (tick -> worker mailbox: follow-up prompts and stop requests)
    def add_inbox(self, issue_id: int, kind: str, body: str, author: str | None, source: str,
                  source_id: str | None, run_id: int | None = None) -> bool:
        cur = self.db.execute(
            "INSERT INTO inbox (issue_id, kind, body, author, source, source_id, created_at, run_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (issue_id, kind, body, author, source, source_id, iso(), run_id))
        return cur.rowcount == 1

    def pending_inbox(self, issue_id: int) -> list[dict]:
        return self._all("SELECT * FROM inbox WHERE issue_id = ? AND delivered_at IS NULL ORDER BY id", (issue_id,))

    def pending_stops(self, issue_id: int, run_id: int) -> list[dict]:
        """Stops addressed to this run (a stop never outlives the run it was meant for)."""
        return self._all("SELECT * FROM inbox WHERE issue_id = ? AND kind = 'stop' AND delivered_at IS NULL "
                         "AND run_id = ? ORDER BY id", (issue_id, run_id))

    def drop_stops(self, issue_id: int, run_id: int | None) -> int:
        """When a run ends, undelivered stops for it (or for no run) are closed: they never reach a later run."""
        return self.db.execute(
            "UPDATE inbox SET delivered_at = ?, delivered_run_id = ?, delivery = 'dropped: the run had ended' "
            "WHERE issue_id = ? AND kind = 'stop' AND delivered_at IS NULL AND (run_id IS NULL OR run_id = ?)",
            (iso(), run_id, issue_id, run_id)).rowcount

    def mark_inbox(self, inbox_id: int, run_id: int | None, delivery: str) -> None:
        self.db.execute("UPDATE inbox SET delivered_at = ?, delivered_run_id = ?, delivery = ? WHERE id = ?",
                        (iso(), run_id, delivery, inbox_id))

    def inbox_for_issue(self, issue_id: int) -> list[dict]:
        return self._all("SELECT * FROM inbox WHERE issue_id = ? ORDER BY id", (issue_id,))

    # ---- outbox (decisions -> Linear)
    def add_outbox(self, issue_id: int | None, kind: str, session_id: str | None, payload: Mapping) -> int:
        cur = self.db.execute(
            "INSERT INTO outbox (issue_id, kind, session_id, client_id, payload, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (issue_id, kind, session_id, str(uuid.uuid4()), json.dumps(payload), iso()))
        return self._inserted(cur)

    def outbox_client_id(self, outbox_id: int) -> str:
        return self._required(self._one("SELECT client_id FROM outbox WHERE id = ?", (outbox_id,)),
                              f"outbox row {outbox_id}")["client_id"]

    def outbox_queued(self, issue_id: int | None = None) -> list[dict]:
        if issue_id is None:
            return self._all("SELECT * FROM outbox WHERE status = 'queued' ORDER BY id")
        return self._all("SELECT * FROM outbox WHERE status = 'queued' AND issue_id = ? ORDER BY id", (issue_id,))

    def outbox_for_issue(self, issue_id: int) -> list[dict]:
        return self._all("SELECT * FROM outbox WHERE issue_id = ? ORDER BY id", (issue_id,))

    def lease_outbox(self, outbox_ids: Iterable[int], pid: int, started: str | None,
                     holder_alive: Callable[[int | None, str | None], bool], seconds: float = 120,
                     host: str | None = None) -> set[int]:
        """Take rows for sending (one transaction); returns the ids taken. A lease belongs to a live process:
        one whose holder is gone (a killed tick or worker of this host) is taken over at once, not after it
        expires; another host's lease runs until it expires (the database's clock)."""
        now, taken = self.clock(), set()
        with self.tx():
            for outbox_id in outbox_ids:
                r = self._one("SELECT status, lease_until, lease_pid, lease_started, lease_host FROM outbox "
                              "WHERE id = ?", (outbox_id,))
                if not r or r["status"] != "queued":
                    continue
                mine = r["lease_host"] is None or r["lease_host"] == host
                if r["lease_until"] and r["lease_until"] >= now and \
                        (not mine or holder_alive(r["lease_pid"], r["lease_started"])):
                    continue
                self.db.execute("UPDATE outbox SET lease_until = ?, lease_pid = ?, lease_started = ?, lease_host = ? "
                                "WHERE id = ?", (now + seconds, pid, started, host, outbox_id))
                taken.add(outbox_id)
        return taken

    def outbox_result(self, outbox_id: int, status: str, error: str | None = None, attempt: bool = True) -> None:
        """Record a send's outcome; `attempt=False` when the row was not tried (it keeps its attempts)."""
        self.db.execute(
            "UPDATE outbox SET status = ?, attempts = attempts + ?, last_error = ?, lease_until = NULL, "
            "lease_pid = NULL, lease_started = NULL, "
            "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END WHERE id = ?",
            (status, int(attempt), error, status, iso(), outbox_id))

    def supersede_outbox(self, outbox_ids: Iterable[int]) -> None:
        """Queued updates that a newer one of the same kind replaces (a plan, an issue state): never sent."""
        with self.tx():
            self.db.executemany("UPDATE outbox SET status = 'superseded', sent_at = ?, lease_until = NULL, "
                                "lease_pid = NULL, lease_started = NULL WHERE id = ? AND status = 'queued'",
                                [(iso(), i) for i in outbox_ids])

    # ---- sessions
    def sessions_with_sent_activity(self) -> set[str]:
        return {r["session_id"] for r in self._all(
            "SELECT DISTINCT session_id FROM outbox WHERE status = 'sent' AND kind = 'activity' "
            "AND session_id IS NOT NULL")}

    def session(self, session_id: str) -> dict | None:
        return self._one("SELECT * FROM sessions WHERE id = ?", (session_id,))

    def sessions_by_id(self, ids: Sequence[str]) -> dict[str, dict]:
        return {r["id"]: r for r in self._all(
            f"SELECT * FROM sessions WHERE id IN ({', '.join('?' * len(ids))})", tuple(ids))} if ids else {}

    def upsert_session(self, session_id: str, issue_id: int | None, creator: str, trusted: bool,
                       activity_cursor: str | None, seen_updated_at: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO sessions (id, issue_id, creator, trusted, activity_cursor, seen_updated_at, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET issue_id = COALESCE(excluded.issue_id, sessions.issue_id), "
            "activity_cursor = COALESCE(excluded.activity_cursor, sessions.activity_cursor), "
            "seen_updated_at = COALESCE(excluded.seen_updated_at, sessions.seen_updated_at)",
            (session_id, issue_id, creator, int(trusted), activity_cursor, seen_updated_at, iso()))

    def seen(self, source_id: str) -> bool:
        return self._one("SELECT 1 AS x FROM seen WHERE source_id = ?", (source_id,)) is not None

    def mark_seen(self, source_id: str) -> None:
        self.db.execute("INSERT INTO seen (source_id, at) VALUES (?, ?) ON CONFLICT DO NOTHING", (source_id, iso()))

    # ---- events
    def add_event(self, issue_id: int | None, kind: str, message: str, level: str = "info",
                  run_id: int | None = None, issue_key: str | None = None) -> None:
        if issue_key is None and issue_id is not None:
            r = self._one("SELECT key FROM issues WHERE id = ?", (issue_id,))
            issue_key = r["key"] if r else None
        self.db.execute("INSERT INTO events (issue_id, run_id, at, level, kind, message, issue_key) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (issue_id, run_id, iso(), level, kind, message, issue_key))

    def feed(self, after_id: int = 0, limit: int | None = None, issue_key: str | None = None,
             project: str | None = None, kind: str | None = None, levels: Sequence[str] = ()) -> list[dict]:
        """Events of every issue and of none, oldest first: after `after_id`, or the newest `limit`."""
        where: list[str] = ["e.id > ?"]
        args: list[Any] = [after_id]
        for cond, val in (("e.issue_key = ?", issue_key), ("i.project_id = ?", project), ("e.kind = ?", kind)):
            if val is not None:
                where.append(cond)
                args.append(val)
        if levels:
            where.append(f"e.level IN ({', '.join('?' * len(levels))})")
            args += list(levels)
        sql = (f"SELECT e.*, i.project_id FROM events e LEFT JOIN issues i ON i.id = e.issue_id "
               f"WHERE {' AND '.join(where)} ORDER BY e.id {'DESC' if limit else 'ASC'}")
        rows = self._all(sql + (f" LIMIT {int(limit)}" if limit else ""), tuple(args))
        return rows[::-1] if limit else rows

    def run_events(self, run_id: int, kind: str, limit: int = 50) -> list[dict]:
        return self._all("SELECT * FROM (SELECT * FROM events WHERE run_id = ? AND kind = ? ORDER BY id DESC "
                         "LIMIT ?) AS e ORDER BY id", (run_id, kind, limit))

    def inbox_has_source(self, source_id: str) -> bool:
        return self._one("SELECT 1 AS x FROM inbox WHERE source_id = ?", (source_id,)) is not None

    def events_for_issue(self, issue_id: int, after_id: int = 0) -> list[dict]:
        return self._all("SELECT * FROM events WHERE issue_id = ? AND id > ? ORDER BY id", (issue_id, after_id))

    def unrouted(self) -> list[dict]:
        """Delegations and sessions no project routes (the newest event per issue key)."""
        return self._all("SELECT issue_key, at, message FROM events WHERE id IN (SELECT MAX(id) FROM events WHERE "
                         "issue_id IS NULL AND kind = 'unrouted' GROUP BY issue_key) ORDER BY at DESC LIMIT 50")

    def events_for_key(self, key: str, after_id: int = 0) -> list[dict]:
        """Events about an issue PatchRelay does not track (ignored sessions, unrouted delegations)."""
        return self._all(f"SELECT * FROM events WHERE {self._same('issue_key')} AND id > ? ORDER BY id",
                         (key, after_id))

    # ---- API budget and ticks
    def record_budget(self, api: str, fields: Mapping[str, Any]) -> None:
        """One statement (an upsert), atomic by itself: it needs no write transaction around it."""
        cols = ["requests_limit", "requests_remaining", "complexity_limit", "complexity_remaining", "reset_at",
                "limited_until", "last_error"]
        vals = {k: fields.get(k) for k in cols if k in fields}
        names = ["api", *vals, "updated_at"]
        sets = "".join(f"{k} = excluded.{k}, " for k in vals)
        self.db.execute(f"INSERT INTO api_budget ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                        f"ON CONFLICT(api) DO UPDATE SET {sets}updated_at = excluded.updated_at",
                        (api, *vals.values(), iso()))

    def budgets(self) -> list[dict]:
        return self._all("SELECT * FROM api_budget ORDER BY api")

    def budget(self, api: str) -> dict | None:
        return self._one("SELECT * FROM api_budget WHERE api = ?", (api,))

    def prune(self, before: str) -> dict:
        """Forget what is no longer needed: sent Linear writes, delivered messages, dedup keys, and the
        events of issues closed before `before`."""
        with self.tx():
            out = {
                "outbox": self.db.execute("DELETE FROM outbox WHERE status IN ('sent', 'superseded') AND sent_at < ?",
                                          (before,)).rowcount,
                "inbox": self.db.execute("DELETE FROM inbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
                                         (before,)).rowcount,
                "seen": self.db.execute("DELETE FROM seen WHERE at < ?", (before,)).rowcount,
                "events": self.db.execute(
                    "DELETE FROM events WHERE at < ? AND issue_id IN (SELECT id FROM issues WHERE factory_state IN "
                    "('done', 'canceled') AND updated_at < ?)", (before, before)).rowcount,
            }
            self.meta_set("prune.last", iso())
            return out

    def start_tick(self, pid: int, pid_started: str | None) -> int:
        with self.tx():
            tick_id = self._inserted(self.db.execute("INSERT INTO ticks (started_at, pid, pid_started) "
                                                     "VALUES (?, ?, ?)", (iso(), pid, pid_started)))
            if tick_id % 100 == 0:      # keep the last thousand or so
                self.db.execute("DELETE FROM ticks WHERE id < ?", (tick_id - 1000,))
            return tick_id

    def end_tick(self, tick_id: int, result: str, summary: Mapping) -> None:
        # one statement on this tick's own row: atomic by itself, no write transaction needed
        self.db.execute("UPDATE ticks SET ended_at = ?, result = ?, summary = ? WHERE id = ?",
                        (iso(), result, json.dumps(summary), tick_id))

    def last_tick(self) -> dict | None:
        return self._one("SELECT * FROM ticks ORDER BY id DESC LIMIT 1")

    def metrics_snapshot(self, now: str, hour_ago: str, day_start: str) -> dict:
        """What `metrics` reports, read in one transaction with aggregate queries (no row per issue or run)."""
        with self.tx(deferred=True):
            return {
                "runs": self._all("SELECT run_type, status, COUNT(*) AS n FROM runs GROUP BY run_type, status"),
                "issues": self._all("SELECT factory_state, COUNT(*) AS n FROM issues GROUP BY factory_state"),
                "pending": self._all(
                    "SELECT pending_run_type AS run_type, CASE WHEN paused IS NOT NULL THEN 1 ELSE 0 END AS paused, "
                    "CASE WHEN not_before > ? THEN 1 ELSE 0 END AS waiting, COUNT(*) AS n FROM issues "
                    "WHERE pending_run_type IS NOT NULL AND active_run_id IS NULL "
                    "GROUP BY 1, 2, 3", (now,)),
                "outbox": self._all("SELECT status, COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox "
                                    "WHERE status IN ('queued', 'failed') GROUP BY status"),
                "ticks": self._all("SELECT started_at, ended_at, result, summary FROM ticks WHERE started_at >= ? "
                                   "ORDER BY id", (hour_ago,)),
                "last_tick": self._one("SELECT started_at, ended_at, result FROM ticks WHERE ended_at IS NOT NULL "
                                       "ORDER BY id DESC LIMIT 1"),
                "tokens_today": self.tokens_spent(since=day_start),
                "meta": {r["key"]: r["value"] for r in self._all(
                    "SELECT key, value FROM meta WHERE key IN ('runner.paused', 'runner.codex_hold')")},
                "worktrees": self.worktrees_recorded(),
                "budgets": self.budgets(),
                "hosts": self.hosts(),
            }

    def page_runs(self, since: str) -> list[dict]:
        """The runs the status page draws: those of open issues and those claimed since `since`."""
        return self._all("SELECT r.id, r.issue_id, r.run_type, r.status, r.claimed_at, r.started_at, r.ended_at, "
                         "r.failure_reason FROM runs r JOIN issues i ON i.id = r.issue_id WHERE r.claimed_at >= ? "
                         "OR i.factory_state NOT IN ('done', 'canceled') ORDER BY r.id", (since,))

    def runs_per_day(self, since: str) -> list[dict]:
        return self._all("SELECT substr(claimed_at, 1, 10) AS day, status, COUNT(*) AS n FROM runs "
                         "WHERE claimed_at >= ? GROUP BY substr(claimed_at, 1, 10), status", (since,))

    def page_slug(self, issue_id: int) -> str:
        """The issue's page name: random, kept; nobody can guess another issue's from it."""
        row = self._one("SELECT page_slug FROM issues WHERE id = ?", (issue_id,))
        if row and row["page_slug"]:
            return row["page_slug"]
        slug = secrets.token_urlsafe(18)
        with self.tx():
            self.db.execute("UPDATE issues SET page_slug = ? WHERE id = ? AND page_slug IS NULL", (slug, issue_id))
        return self._required(self._one("SELECT page_slug FROM issues WHERE id = ?", (issue_id,)),
                              f"issue {issue_id}")["page_slug"]

    def recent_ticks(self, n: int = 30) -> list[dict]:
        """The newest finished ticks, newest first."""
        return self._all("SELECT started_at, summary FROM ticks WHERE ended_at IS NOT NULL ORDER BY id DESC "
                         "LIMIT ?", (n,))


# ============================================================== 4. transport
# How PatchRelay reaches other programs. HTTP: one transport under both API
# clients (timeouts, bounded retries and their waits, rate limits and budget
# recording, request counting, operation names, shape checks). Processes: start
# times, liveness and killing of the children PatchRelay starts (workers,
# app-servers, hooks). Knows nothing of issues and decides nothing.

# ---- HTTP

def _log_http(resp: requests.Response, *args: Any, **kwargs: Any) -> None:
    """-v: every HTTP call, its status and duration (never a header: tokens stay out of logs)."""
    req = resp.request
    url = re.sub(r"\?.*", "", req.url or "")
    log.debug("HTTP %s %s -> %s in %.0f ms", req.method, url, resp.status_code,
              resp.elapsed.total_seconds() * 1000)


def _log_retry(state: tenacity.RetryCallState) -> None:
    """-v: every retry wait, with the error that caused it (tenacity's before_sleep hook)."""
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0
    log.info("retry %d in %.1f s after: %s", state.attempt_number, wait, exc)


class _Retry(Exception):
    """An attempt that may be repeated: `err` is raised as itself when the attempts are spent; `wait` is how
    long the server asked us to wait (None: back off exponentially)."""

    def __init__(self, err: ApiError, wait: float | None = None):
        super().__init__(str(err))
        self.err, self.wait = err, wait


def operation_name(document: str, default: str = "query") -> str:
    """The name of a GraphQL document's operation (`query PatchRelayPoll(...)` -> PatchRelayPoll)."""
    m = re.search(r"(?:query|mutation)\s+(\w+)", document)
    return m.group(1) if m else default


@dataclass(frozen=True)
class BudgetHeaders:
    """Where an API's answers carry its rate-limit budget: (budget column, header) pairs, and the header
    with the reset time (in `reset_unit` seconds since the epoch)."""
    counts: tuple[tuple[str, str], ...]
    reset: str
    reset_unit: float = 1.0


class Transport:
    """One API's HTTP session, under its client. It owns the requests session and its headers (the token
    lives only there), the retry policy (`attempts`, waits capped at `max_wait`, a server's Retry-After
    honoured), the count of requests made (a tick's API cost), the server's clock (the Date header of its
    last answer) and the budget record: `on_budget` receives the rate-limit headers of every answer, a rate
    limit's end and the last error. Every error it makes names the API, the operation and the host."""

    def __init__(self, api: str, error: type[ApiError], base_url: str, *, timeout: float, attempts: int,
                 max_wait: float, headers: Mapping[str, str], budget: BudgetHeaders,
                 on_budget: Callable[[dict], None] | None = None):
        self.api, self.error, self.budget = api, error, budget
        self.timeout, self.attempts, self.max_wait, self.on_budget = timeout, attempts, max_wait, on_budget
        self.http = requests.Session()
        self.http.hooks["response"].append(_log_http)
        self.http.headers.update({"User-Agent": f"patchrelay/{__version__}", **headers})
        self.host = re.sub(r"^https?://", "", base_url).split("/")[0]
        self.requests_made = 0
        self.server_time: str | None = None
        self._headers: dict[str, Any] = {}   # the last answer's budget headers, written with what it meant

    def fail(self, what: str, detail: str, transient: bool = False) -> ApiError:
        """The error for operation `what`: "<API> <what> (<host>): <detail>"."""
        return self.error(f"{self.api} {what} ({self.host}): {detail}", transient=transient)

    def retrying(self, attempt: Callable[[], Any]) -> Any:
        """Call `attempt` until it returns or raises anything but _Retry, at most `attempts` times; the last
        _Retry's error is raised as itself."""
        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.attempts), wait=self._wait,
                                     retry=tenacity.retry_if_exception_type(_Retry), before_sleep=_log_retry,
                                     reraise=True)
        try:
            return retrying(attempt)
        except _Retry as t:
            raise t.err from None
        finally:
            if self._headers:      # an answer read without ok() or limited(): its headers still count
                self.note({})

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retry) and exc.wait is not None:
            return min(max(exc.wait, 0.0), self.max_wait)
        return min(self.max_wait, 0.5 * (2 ** (state.attempt_number - 1)))

    def send(self, method: str, url: str, what: str,
             rate_limit: Callable[[requests.Response], ApiError | None], **kw: Any) -> requests.Response:
        """One attempt, inside `retrying`: the answer, its headers recorded. A transport error, a 5xx, or a
        rate limit (as `rate_limit` reads the answer) short enough to wait for raise _Retry."""
        self.requests_made += 1
        try:
            resp = self.http.request(method, url, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            log.debug("HTTP %s %s (%s) -> transport error: %s", method, re.sub(r"\?.*", "", url), what, _cause(e))
            raise _Retry(self.fail(what, f"transport error: {_cause(e)}", transient=True)) from None
        self._record(resp)
        limited = rate_limit(resp)
        if limited is not None:
            self.limited(limited)
        if resp.status_code >= 500:
            raise _Retry(self.fail(what, f"HTTP {resp.status_code}", transient=True), _retry_after(resp.headers))
        return resp

    def limited(self, err: ApiError, wait_for_it: bool = True) -> NoReturn:
        """Record a rate limit until `err.until`. Wait for it (inside `retrying`) when it ends within
        `max_wait`, else raise it: longer than a tick may block; `status` shows the wait."""
        until = err.until or time.time()
        self.note({"limited_until": iso(dt.datetime.fromtimestamp(until, dt.timezone.utc)), "last_error": str(err)})
        wait = until - time.time()
        if not wait_for_it or wait > self.max_wait:
            raise err
        raise _Retry(err, wait)

    def ok(self) -> None:
        """An answer that was not refused: no rate limit, no error."""
        self.note({"limited_until": None, "last_error": None})

    def note(self, fields: dict) -> None:
        """One budget write: the last answer's headers and what it meant (ok, limited)."""
        fields, self._headers = {**self._headers, **fields}, {}
        if self.on_budget and fields:
            self.on_budget(fields)

    def _record(self, resp: requests.Response) -> None:
        date = resp.headers.get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                t = email.utils.parsedate_to_datetime(date)
                self.server_time = iso(t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc))
        if not self.on_budget:
            return
        fields: dict[str, Any] = {}
        for col, name in self.budget.counts:
            v = _int_header(resp.headers, name)
            if v is not None:
                fields[col] = v
        reset = _int_header(resp.headers, self.budget.reset)
        if reset:
            fields["reset_at"] = iso(dt.datetime.fromtimestamp(reset * self.budget.reset_unit, dt.timezone.utc))
        self._headers = fields


def shaped(fn: Callable) -> Callable:
    """A client read whose answer lacks a field it needs raises a transient error naming the operation,
    never a KeyError, and never passes for an empty result."""
    @functools.wraps(fn)
    def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
        try:
            return fn(self, *a, **kw)
        except (KeyError, TypeError, AttributeError) as e:
            raise self.transport.fail(fn.__name__, f"unexpected response shape ({type(e).__name__}: "
                                                   f"{one_line(str(e), 80)})", transient=True) from None
    return wrapper


def json_body(resp: requests.Response) -> dict | None:
    """The answer as a JSON object, or None."""
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def graphql_errors(body: dict | None) -> list[dict]:
    """A GraphQL answer's errors, each a dict (an API that answers with something else is not trusted)."""
    errors = (body or {}).get("errors") or []
    if not isinstance(errors, list):
        errors = [{"message": str(errors)}]
    return [e if isinstance(e, dict) else {"message": str(e)} for e in errors]


def _error_codes(errors: list[dict]) -> set[str]:
    """The codes of GraphQL errors: `extensions.code` and `extensions.type`, upper-cased ("" for none)."""
    return {str((e.get("extensions") or {}).get(k) or "").upper() if isinstance(e.get("extensions"), dict)
            else "" for e in errors for k in ("code", "type")}


def _cause(e: BaseException) -> str:
    """A transport error's kind and cause in a few words (never a URL with a token in it)."""
    text = str(e).lower()
    for needle, words in (("timed out", "timed out"), ("timeout", "timed out"), ("refused", "connection refused"),
                          ("reset", "connection reset"), ("name or service", "host not found"),
                          ("nodename", "host not found"), ("ssl", "TLS error"),
                          ("remote end closed", "connection closed without a response"),
                          ("connection aborted", "connection closed without a response")):
        if needle in text:
            return f"{type(e).__name__} ({words})"
    return type(e).__name__


def _retry_after(headers: Mapping[str, str]) -> float | None:
    v = headers.get("retry-after")
    if v is None:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        t = parse_iso(v)
        return max(0.0, (t - utcnow()).total_seconds()) if t else None


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    v = headers.get(name)
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


# ---- the OAuth redirect: one request on a loopback port

def receive_redirect(redirect_uri: str, timeout: float, page: str,
                     listening: Callable[[], None] = lambda: None) -> str | None:
    """Listen on the loopback host and port of `redirect_uri` for the browser's one redirect to its path and
    answer it with `page`; the full URL it asked for, or None when the port cannot be bound (the operator
    pastes the URL instead). Raises TimeoutError when nothing came within `timeout` seconds."""
    u = urllib.parse.urlsplit(redirect_uri)
    host, port = u.hostname or "localhost", u.port or 80
    try:
        srv = socket.create_server(("127.0.0.1" if host == "localhost" else host, port))
    except OSError:
        return None
    listening()                 # told only once the port is bound: a redirect from now on is received
    deadline = time.time() + timeout
    with srv:
        while True:
            srv.settimeout(max(0.1, deadline - time.time()))
            try:
                conn, _ = srv.accept()
            except (TimeoutError, socket.timeout):
                raise TimeoutError(f"no redirect reached {redirect_uri} within {timeout:.0f} s") from None
            with conn:
                conn.settimeout(10)
                try:
                    head = conn.recv(65536).decode("latin-1")
                except OSError:
                    continue
                line = head.split("\r\n", 1)[0].split(" ")
                target = line[1] if len(line) >= 2 and line[0] == "GET" else ""
                ours = urllib.parse.urlsplit(target).path == (u.path or "/")
                body = (page if ours else "Not found").encode()
                with contextlib.suppress(OSError):
                    conn.sendall(f"HTTP/1.1 {'200 OK' if ours else '404 Not Found'}\r\nContent-Type: text/html; "
                                 f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                                 .encode() + body)
                if ours:
                    return urllib.parse.urlunsplit((u.scheme, u.netloc, "", "", "")) + target
            if time.time() > deadline:
                raise TimeoutError(f"no redirect reached {redirect_uri} within {timeout:.0f} s")


# ---- processes

def proc_start_time(pid: int | None) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), or None if it is gone or a zombie."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] in ("Z", "X"):
        return None   # never reaped here: a Popen still waiting for it would read exit status 0
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int | None, started: str | None) -> bool:
    return bool(pid) and started is not None and proc_start_time(pid) == started


def kill_process_group(pid: int | None, started: str | None, grace: float = 3.0) -> bool:
    """Terminate the process group led by pid if pid is still the same process."""
    if not pid or not process_alive(pid, started):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline:
            if not process_alive(pid, started):
                return True
            time.sleep(0.05)
    return not process_alive(pid, started)


# ============================================================== 5. linear
# The Linear GraphQL client (requests + tenacity): timeouts on every call,
# bounded retries on transport errors, 5xx and rate limits, rate-limit headers
# recorded for `status`. Returns plain observations; decides nothing.

@dataclass(frozen=True)
class Actor:
    id: str | None
    name: str | None = None
    email: str | None = None
    app: bool = False

    def label(self) -> str:
        return self.name or self.email or self.id or "unknown"


@dataclass(frozen=True)
class LinearIssue:
    id: str
    key: str
    title: str
    description: str
    url: str | None
    team_id: str | None
    team_key: str | None
    state_name: str | None
    state_type: str | None
    delegate_id: str | None
    assignee_id: str | None
    labels: tuple[str, ...]
    updated_at: str | None


@dataclass(frozen=True)
class LinearSession:
    id: str
    issue: LinearIssue | None
    app_user_id: str | None
    creator: Actor
    created_at: str
    updated_at: str
    comment_body: str | None
    recent: tuple["LinearActivity", ...] = ()     # its newest activities, oldest first
    recent_all: bool = False                       # ... and there are no others


@dataclass(frozen=True)
class LinearActivity:
    id: str
    session_id: str
    created_at: str
    type: str               # prompt | thought | response | ...
    body: str
    signal: str | None
    user: Actor


@dataclass(frozen=True)
class LinearComment:
    id: str
    issue_linear_id: str
    body: str
    user: Actor
    created_at: str
    session_id: str | None
    edited_at: str | None = None        # set once a person edited it (the body is the edited one)


@dataclass(frozen=True)
class Viewer:
    id: str
    name: str
    app: bool


ISSUE_FIELDS = """id identifier title description url updatedAt
      state { id name type } team { id key } delegate { id } assignee { id }
      labels(first: 1, filter: { name: { eqIgnoreCase: $label } }) { nodes { name } }"""

Q_ACTIVITIES = """query PatchRelaySessionActivities($id: String!, $filter: AgentActivityFilter, $after: String) {
  agentSession(id: $id) {
    id
    activities(first: 50, after: $after, filter: $filter, orderBy: createdAt) {
      pageInfo { hasNextPage endCursor }
      nodes {
        id createdAt signal
        user { id name email app }
        content {
          __typename
          ... on AgentActivityPromptContent { body }
          ... on AgentActivityThoughtContent { body }
          ... on AgentActivityResponseContent { body }
          ... on AgentActivityErrorContent { body }
          ... on AgentActivityElicitationContent { body }
        }
      }
    }
  }
}"""

Q_COMMENTS = """query PatchRelayComments($filter: CommentFilter, $after: String) {
  comments(first: 250, after: $after, filter: $filter, orderBy: createdAt) {
    pageInfo { hasNextPage endCursor }
    nodes { id body createdAt user { id name email app } issue { id } agentSession { id } }
  }
}"""

Q_VIEWER = "query PatchRelayViewer { viewer { id name app } }"

Q_DELEGATED = """query PatchRelayDelegated($filter: IssueFilter) {
  issues(first: 250, filter: $filter) { pageInfo { hasNextPage } nodes { id } }
}"""

_ACTIVITY_FIELDS = """id createdAt signal user { id name email app }
        content { __typename ... on AgentActivityPromptContent { body } ... on AgentActivityThoughtContent { body }
          ... on AgentActivityResponseContent { body } ... on AgentActivityErrorContent { body }
          ... on AgentActivityElicitationContent { body } }"""

# A session's newest activities come with it: a new session (its prompt) or one that changed only by a few
# activities (PatchRelay's own writes among them) needs no read of its own.
RECENT_ACTIVITIES = 5
# The poll's page of newest agent sessions: five when little happens, and as many as changed within the last
# poll's overlap window (plus five) when runs keep their sessions busy, so a busy team or fleet is not read
# one extra page per tick; each session costs about 20 complexity points (its issue, five activities).
POLL_SESSIONS_MIN, POLL_SESSIONS_MAX = 5, 50
_SESSION_FIELDS = """id createdAt updatedAt appUser { id } creator { id name email app } comment { id body }
      issue { %s }
      activities(first: %d) { pageInfo { hasNextPage } nodes { %s } }""" % (ISSUE_FIELDS, RECENT_ACTIVITIES,
                                                                             _ACTIVITY_FIELDS)
_COMMENT_FIELDS = "id body createdAt updatedAt editedAt user { id name email app } issue { id } agentSession { id }"

# The idle tick: ONE request, whose size does not grow with the number of tracked issues. Changed issues and
# comments are read oldest first (`last` + `before` over Linear's newest-first order), so a read cut short
# resumes where it stopped; what is not ours is dropped client side.
Q_POLL = """query PatchRelayPoll($issueFilter: IssueFilter, $commentFilter: CommentFilter, $withComments: Boolean!,
                      $label: String!, $sessions: Int!) {
  viewer { id name app }
  agentSessions(first: $sessions, orderBy: updatedAt) { pageInfo { hasNextPage endCursor } nodes { %s } }
  issues(last: 25, filter: $issueFilter, orderBy: updatedAt) { pageInfo { hasPreviousPage startCursor } nodes { %s } }
  comments(last: 25, filter: $commentFilter, orderBy: updatedAt) @include(if: $withComments) {
    pageInfo { hasPreviousPage startCursor } nodes { %s } }
}""" % (_SESSION_FIELDS, ISSUE_FIELDS, _COMMENT_FIELDS)

Q_SESSIONS_PAGE = """query PatchRelaySessions($after: String, $label: String!) {
  agentSessions(first: 100, after: $after, orderBy: updatedAt) { pageInfo { hasNextPage endCursor } nodes { %s } }
}""" % _SESSION_FIELDS

Q_ISSUES_PAGE = """query PatchRelayIssues($filter: IssueFilter, $before: String, $label: String!) {
  issues(last: 200, before: $before, filter: $filter, orderBy: updatedAt) {
    pageInfo { hasPreviousPage startCursor } nodes { %s } }
}""" % ISSUE_FIELDS

Q_COMMENTS_PAGE = """query PatchRelayComments($filter: CommentFilter, $before: String) {
  comments(last: 250, before: $before, filter: $filter, orderBy: updatedAt) {
    pageInfo { hasPreviousPage startCursor } nodes { %s } }
}""" % _COMMENT_FIELDS

Q_ISSUE = """query PatchRelayIssue($id: String!, $label: String!) { issue(id: $id) { %s } }""" % ISSUE_FIELDS

Q_ISSUE_STATES = """query PatchRelayIssueStates($id: String!) {
  issue(id: $id) {
    id state { id type }
    team { id states(first: 100) { nodes { id name type position } } }
  }
}"""

Q_ACTIVITY_EXISTS = "query PatchRelayActivityExists($id: String!) { agentActivity(id: $id) { id } }"

Q_COMMENT_EXISTS = "query PatchRelayCommentExists($id: String!) { comment(id: $id) { id } }"

M_ACTIVITY = """mutation PatchRelayActivity($input: AgentActivityCreateInput!) {
  agentActivityCreate(input: $input) { success agentActivity { id } }
}"""

M_PLAN = """mutation PatchRelayPlan($id: String!, $input: AgentSessionUpdateInput!) {
  agentSessionUpdate(id: $id, input: $input) { success }
}"""

M_ISSUE_STATE = """mutation PatchRelayMoveIssue($id: String!, $stateId: String!) {
  issueUpdate(id: $id, input: { stateId: $stateId }) { success issue { id state { id name type } } }
}"""

M_COMMENT = """mutation PatchRelayComment($input: CommentCreateInput!) {
  commentCreate(input: $input) { success comment { id } }
}"""


class LinearClient:
    """Linear's GraphQL API: reads that return frozen observations, and writes (single or batched with
    aliases, idempotent by client id). Owns its Transport; holds no other state."""

    BUDGET = BudgetHeaders((("requests_limit", "x-ratelimit-requests-limit"),
                            ("requests_remaining", "x-ratelimit-requests-remaining"),
                            ("complexity_limit", "x-ratelimit-complexity-limit"),
                            ("complexity_remaining", "x-ratelimit-complexity-remaining")),
                           "x-ratelimit-requests-reset", reset_unit=0.001)

    def __init__(self, cfg: LinearConfig, token: str, on_budget: Callable[[dict], None] | None = None,
                 reauth: Callable[[str], str | None] | None = None):
        """`reauth(token)`: called once when Linear refuses `token`; a different token to retry with, or None."""
        self.cfg, self.reauth = cfg, reauth
        self.transport = Transport(
            "Linear", LinearError, cfg.api_url, timeout=cfg.timeout, attempts=cfg.retry_attempts,
            max_wait=cfg.retry_max_wait, budget=self.BUDGET, on_budget=on_budget,
            headers={"Content-Type": "application/json"})
        self.set_token(token)

    def set_token(self, token: str) -> None:
        self.token = token
        # personal API keys go bare, OAuth tokens as Bearer
        self.transport.http.headers["Authorization"] = token if token.startswith("lin_api_") else f"Bearer {token}"

    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def requests_made(self) -> int:
        return self.transport.requests_made

    @property
    def server_time(self) -> str | None:
        """Linear's clock: the Date header of its last answer."""
        return self.transport.server_time

    def query(self, document: str, variables: Mapping[str, Any] | None = None, partial: bool = False) -> dict:
        """The response's data. With `partial`, errors that name a top-level field (path[0]) do not raise:
        they come back as LinearErrors under data["__errors__"][field] (several mutations in one request)."""
        variables = dict(variables or {})
        if "$label: String!" in document:    # issues carry only the delegation label (one object, not twenty)
            variables.setdefault("label", self.cfg.delegation_label)
        try:
            return self.transport.retrying(lambda: self._post(document, variables, partial))
        except LinearError as e:
            fresh = self.reauth(self.token) if e.code == "AUTHENTICATION_ERROR" and self.reauth else None
            if not fresh or fresh == self.token:
                raise
            self.set_token(fresh)
        return self.transport.retrying(lambda: self._post(document, variables, partial))

    def _rate_limit(self, resp: requests.Response, op_name: str) -> LinearError | None:
        """HTTP 429 or a RATELIMITED error: limited until Retry-After (else a minute, or the reset)."""
        if resp.status_code != 429 and "RATELIMITED" not in _error_codes(graphql_errors(json_body(resp))):
            return None
        retry_after = _retry_after(resp.headers)
        until = time.time() + (retry_after if retry_after is not None else 60.0)
        reset = _int_header(resp.headers, "x-ratelimit-requests-reset")
        if retry_after is None and reset:
            until = max(until, reset / 1000.0)
        return LinearRateLimited(f"Linear {op_name} ({self.host}): rate limited (HTTP {resp.status_code})", until)

    def _post(self, document: str, variables: dict, partial: bool = False) -> dict:
        op_name = operation_name(document)
        resp = self.transport.send("POST", self.cfg.api_url, op_name, lambda r: self._rate_limit(r, op_name),
                                   json={"query": document, "variables": variables, "operationName": op_name})
        body = json_body(resp)
        errors = graphql_errors(body)
        fields: dict[str, list[dict]] = {}
        if errors and partial and body is not None and "data" in body and resp.status_code < 400:
            for e in errors:
                path = e.get("path")
                if not (isinstance(path, list) and path and isinstance(path[0], str)):
                    fields = {}
                    break
                fields.setdefault(path[0], []).append(e)
        if errors and not fields:
            raise self._graphql_error(op_name, errors, resp.status_code)
        if body is not None and fields:
            data = body["data"] if isinstance(body.get("data"), dict) else {}
            self.transport.ok()
            return {**data, "__errors__": {f: self._graphql_error(op_name, es, resp.status_code)
                                           for f, es in fields.items()}}
        if body is None or not isinstance(body.get("data"), dict):
            what = "not a JSON object" if body is None else "no data"
            raise _Retry(self.transport.fail(op_name, f"HTTP {resp.status_code}, unexpected response ({what})",
                                             transient=True), _retry_after(resp.headers))
        if resp.status_code >= 400:
            raise self.transport.fail(op_name, f"HTTP {resp.status_code}")
        self.transport.ok()
        return body["data"]

    def _graphql_error(self, op_name: str, errors: list[dict], status: int) -> "LinearError":
        codes = _error_codes(errors)
        msg = "; ".join(one_line(str(e.get("message")), 200) for e in errors)
        auth = "AUTHENTICATION_ERROR" in codes or status == 401
        known = {c for c in codes if c} - {"INTERNAL_SERVER_ERROR"}
        # a request error Linear explains (bad input, not found, auth) is final; anything else may pass
        return LinearError(f"Linear {op_name} ({self.host}): {msg}" + (" (check the Linear token)" if auth else ""),
                           transient=not known and not auth and status < 400 or "INTERNAL_SERVER_ERROR" in codes,
                           code="AUTHENTICATION_ERROR" if auth else next(iter(sorted(known)), None))

    # ---- reads
    def viewer(self) -> Viewer:
        return self._viewer(self.query(Q_VIEWER), "PatchRelayViewer")

    def _viewer(self, data: dict, op: str) -> Viewer:
        v = data.get("viewer")
        if not isinstance(v, dict) or not v.get("id"):
            raise LinearError(f"Linear {op} ({self.host}): response without viewer", transient=True)
        return Viewer(id=v["id"], name=v.get("name") or "", app=bool(v.get("app")))

    def _payload(self, data: dict, field_name: str) -> dict:
        """A mutation's payload; missing means we do not know whether it happened: transient."""
        p = data.get(field_name)
        if not isinstance(p, dict):
            raise LinearError(f"Linear {field_name} ({self.host}): response without {field_name}", transient=True)
        if not p.get("success"):
            raise LinearError(f"Linear {field_name} ({self.host}): success=false")
        return p

    def _paged(self, document: str, variables: dict, path: str, max_pages: int = 40,
               stop: Callable[[list], bool] | None = None) -> tuple[list, dict]:
        out: list = []
        after: str | None = None
        data: dict = {}
        op = operation_name(document)
        for _ in range(max_pages):
            data = self.query(document, {**variables, "after": after})
            conn: Any = data
            for part in path.split("."):
                conn = conn.get(part) if isinstance(conn, dict) else None
            if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
                raise LinearError(f"Linear {op} ({self.host}): response without {path}.nodes", transient=True)
            nodes = [n for n in conn["nodes"] if isinstance(n, dict)]
            out.extend(nodes)
            info = conn.get("pageInfo") or {}
            if not info.get("hasNextPage") or not info.get("endCursor") or (stop and stop(nodes)):
                break
            after = info["endCursor"]
        return out, data

    @shaped
    def issue(self, id_or_key: str) -> LinearIssue | None:
        data = self.query(Q_ISSUE, {"id": id_or_key})
        if "issue" not in data:
            raise LinearError(f"Linear PatchRelayIssue ({self.host}): response without issue", transient=True)
        n = data["issue"]
        return _issue(n) if n else None

    def activities(self, session_id: str, since: str | None) -> list[LinearActivity]:
        filt = {"createdAt": {"gt": since}} if since else None
        nodes, _ = self._paged(Q_ACTIVITIES, {"id": session_id, "filter": filt}, "agentSession.activities")
        out = [_activity(n, session_id) for n in nodes]
        out.sort(key=lambda a: (a.created_at, a.id))
        return out

    def delegated_count(self, filt: dict) -> tuple[int, bool]:
        """How many open issues a delegation filter matches (up to 250; True when there are more)."""
        data = self.query(Q_DELEGATED, {"filter": filt})
        conn = data.get("issues")
        if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
            raise LinearError(f"Linear PatchRelayDelegated ({self.host}): response without issues.nodes",
                              transient=True)
        return len(conn["nodes"]), bool((conn.get("pageInfo") or {}).get("hasNextPage"))

    # ---- the poll (one request when nothing changed) and its follow-up pages
    @shaped
    def poll(self, issue_filter: dict, comment_filter: dict | None, sessions: int = POLL_SESSIONS_MIN) -> dict:
        """Viewer, the newest `sessions` agent sessions, and the oldest page of changed issues and comments."""
        data = self.query(Q_POLL, {"issueFilter": issue_filter, "commentFilter": comment_filter or {},
                                   "withComments": comment_filter is not None, "sessions": sessions})
        out: dict[str, Any] = {"viewer": self._viewer(data, "PatchRelayPoll"), "date": self.server_time}
        for key in ("agentSessions", "issues") + (("comments",) if comment_filter is not None else ()):
            conn = data.get(key)
            if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
                raise LinearError(f"Linear PatchRelayPoll ({self.host}): response without {key}.nodes", transient=True)
            out[key] = conn
        return out

    @shaped
    def sessions_page(self, after: str | None) -> dict:
        data = self.query(Q_SESSIONS_PAGE, {"after": after})
        conn = data.get("agentSessions")
        if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
            raise LinearError(f"Linear PatchRelaySessions ({self.host}): response without agentSessions.nodes",
                              transient=True)
        return conn

    @shaped
    def older_page(self, kind: str, filt: dict, before: str) -> dict:
        doc = Q_ISSUES_PAGE if kind == "issues" else Q_COMMENTS_PAGE
        conn = self.query(doc, {"filter": filt, "before": before}).get(kind)
        if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
            raise LinearError(f"Linear {kind} page ({self.host}): response without {kind}.nodes", transient=True)
        return conn

    @shaped
    def activities_batch(self, wanted: list[tuple[str, str | None]]) -> dict[str, list[LinearActivity]]:
        """New activities of several sessions in one request (aliases); a session with more than one page
        is read on its own."""
        out: dict[str, list[LinearActivity]] = {}
        for start in range(0, len(wanted), 50):
            chunk = wanted[start:start + 50]
            defs: list[str] = []
            parts: list[str] = []
            variables: dict[str, Any] = {}
            for n, (sid, since) in enumerate(chunk):
                defs += [f"$s{n}: String!", f"$f{n}: AgentActivityFilter"]
                variables[f"s{n}"] = sid
                variables[f"f{n}"] = {"createdAt": {"gt": since}} if since else None
                parts.append(f"  s{n}: agentSession(id: $s{n}) {{ id activities(first: 20, filter: $f{n}, "
                             f"orderBy: createdAt) {{ pageInfo {{ hasNextPage endCursor }} nodes {{ {_ACTIVITY_FIELDS} }} }} }}")
            doc = "query PatchRelaySessionActivities(" + ", ".join(defs) + ") {\n" + "\n".join(parts) + "\n}"
            data = self.query(doc, variables)
            for n, (sid, since) in enumerate(chunk):
                node = data.get(f"s{n}")
                conn = (node or {}).get("activities") if isinstance(node, dict) else None
                if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
                    raise LinearError(f"Linear PatchRelaySessionActivities ({self.host}): response without "
                                      f"activities of session {sid}", transient=True)
                if (conn.get("pageInfo") or {}).get("hasNextPage"):
                    out[sid] = self.activities(sid, since)
                else:
                    out[sid] = sorted((_activity(a, sid) for a in conn["nodes"] if isinstance(a, dict)),
                                      key=lambda a: (a.created_at, a.id))
        return out

    def comment_history(self, issue_ids: list[str]) -> list[LinearComment]:
        """Every comment of newly tracked issues (later comments come with the poll)."""
        if not issue_ids:
            return []
        nodes, _ = self._paged(Q_COMMENTS, {"filter": {"issue": {"id": {"in": list(issue_ids)}}}}, "comments")
        return sorted((_comment(n) for n in nodes), key=lambda c: (c.created_at, c.id))

    # ---- writes
    def issue_states(self, issue_linear_id: str) -> tuple[dict, list[dict]]:
        """The issue's current state ({"id", "type"}) and its team's workflow states (one request)."""
        data = self.query(Q_ISSUE_STATES, {"id": issue_linear_id})
        if "issue" not in data:
            raise LinearError(f"Linear PatchRelayIssueStates ({self.host}): response without issue", transient=True)
        issue = data["issue"]
        if not isinstance(issue, dict):
            raise LinearError(f"Linear issue {issue_linear_id}: not found")
        return issue.get("state") or {}, ((issue.get("team") or {}).get("states") or {}).get("nodes") or []

    def write_batch(self, writes: Sequence["LinearWrite"]) -> list["LinearError | None"]:
        """Several writes in one request (aliases), executed by Linear in order. Returns, per write, None
        (done) or its LinearError; a write after one that failed may not have run: it gets a transient error
        and is simply sent again (creates are idempotent by their client id, updates set a value). A failure
        of the whole request raises."""
        if len(writes) == 1:
            self.write_one(writes[0])
            return [None]
        defs: list[str] = []
        parts: list[str] = []
        variables: dict[str, Any] = {}
        for n, w in enumerate(writes):
            field, input_type, with_id = _WRITE_FIELDS[w.kind]
            defs.append(f"$v{n}: {input_type}!")
            variables[f"v{n}"] = w.input
            args = f"input: $v{n}"
            if with_id:
                defs.append(f"$i{n}: String!")
                variables[f"i{n}"] = w.target_id
                args = f"id: $i{n}, " + args
            parts.append(f"  w{n}: {field}({args}) {{ success }}")
        doc = "mutation PatchRelayWrites(" + ", ".join(defs) + ") {\n" + "\n".join(parts) + "\n}"
        data = self.query(doc, variables, partial=True)
        errors: dict[str, LinearError] = data.get("__errors__", {})
        out: list[LinearError | None] = []
        failed = False
        for n, w in enumerate(writes):
            alias = f"w{n}"
            if alias in errors:
                err = errors[alias]
                # an earlier attempt (a lost answer) may already have created it
                out.append(None if not err.transient and w.kind in ("activity", "comment") and self._exists(w)
                           else err)
                failed = True
            elif failed or not isinstance(data.get(alias), dict):
                out.append(NotSent(f"Linear PatchRelayWrites ({self.host}): no answer for write {n + 1}"))
            elif not data[alias].get("success"):
                out.append(LinearError(f"Linear PatchRelayWrites ({self.host}): {_WRITE_FIELDS[w.kind][0]} "
                                       f"success=false"))
            else:
                out.append(None)
        return out

    def write_one(self, w: "LinearWrite") -> None:
        """One write in a request of its own."""
        if w.kind in ("activity", "comment"):
            # idempotent by client id: a resend after a crash or a lost response is looked up, never repeated
            try:
                data = self.query(M_ACTIVITY if w.kind == "activity" else M_COMMENT, {"input": w.input})
            except LinearError as e:
                if e.transient or not self._exists(w):
                    raise
                return      # an earlier attempt already created it
            self._payload(data, _WRITE_FIELDS[w.kind][0])
        elif w.kind == "session_update":
            self._payload(self.query(M_PLAN, {"id": w.target_id, "input": w.input}), "agentSessionUpdate")
        elif w.kind == "issue_update":
            self._payload(self.query(M_ISSUE_STATE, {"id": w.target_id, "stateId": w.input["stateId"]}),
                          "issueUpdate")
        else:
            raise LinearError(f"unknown Linear write {w.kind}")

    def _exists(self, w: "LinearWrite") -> bool:
        """Whether the activity or comment `w` creates exists already (by its client id)."""
        doc, entity = (Q_ACTIVITY_EXISTS, "agentActivity") if w.kind == "activity" else (Q_COMMENT_EXISTS, "comment")
        try:
            return bool(self.query(doc, {"id": w.input["id"]}).get(entity))
        except LinearError as miss:
            if miss.transient:
                raise
            return False    # "Entity not found": it really was not created


@dataclasses.dataclass(frozen=True)
class LinearWrite:
    """One mutation of a batched write: `input` is the mutation's input object, `target_id` the id argument
    of the updates."""
    kind: str                       # activity | comment | session_update | issue_update
    input: dict
    target_id: str | None = None


# kind -> (mutation field, input type, takes an id argument)
_WRITE_FIELDS = {"activity": ("agentActivityCreate", "AgentActivityCreateInput", False),
                 "comment": ("commentCreate", "CommentCreateInput", False),
                 "session_update": ("agentSessionUpdate", "AgentSessionUpdateInput", True),
                 "issue_update": ("issueUpdate", "IssueUpdateInput", True)}


# ---- app mode's OAuth: the authorize URL, the code exchange, the refresh and the revocation

OAUTH_SCOPES = "read,write,app:assignable,app:mentionable"


@dataclass(frozen=True)
class OAuthGrant:
    """What Linear's token endpoint issued: the pair, how long the access token lives, the scopes."""
    access_token: str
    refresh_token: str | None
    expires_in: float | None
    scope: str


class LinearOAuthRefused(LinearError):
    """Linear refused a grant (invalid_grant: a used, revoked or expired code or refresh token; invalid_client):
    final, until the operator connects again."""


class LinearOAuth:
    """Linear's OAuth endpoints, on the host of `linear.api_url` (the authorize page on linear.app for the
    real API). One attempt per grant: a code and a refresh token are single-use, so a grant whose answer was
    lost is not sent again (the next tick's refresh, or `linear connect`, follows)."""

    def __init__(self, cfg: LinearConfig, client_id: str, client_secret: str):
        self.client_id, self.client_secret = client_id, client_secret
        base = re.match(r"^https?://[^/]+", cfg.api_url)
        root = base.group(0) if base else cfg.api_url
        self.token_url, self.revoke_url = root + "/oauth/token", root + "/oauth/revoke"
        self.authorize_base = ("https://linear.app" if root == "https://api.linear.app" else root) + "/oauth/authorize"
        self.transport = Transport("Linear", LinearError, root, timeout=cfg.timeout, attempts=1,
                                   max_wait=cfg.retry_max_wait, budget=LinearClient.BUDGET,
                                   headers={"Accept": "application/json"})

    @property
    def host(self) -> str:
        return self.transport.host

    def authorize_url(self, redirect_uri: str, state: str) -> str:
        q = {"client_id": self.client_id, "redirect_uri": redirect_uri, "response_type": "code",
             "scope": OAUTH_SCOPES, "actor": "app", "state": state}
        return self.authorize_base + "?" + urllib.parse.urlencode(q, safe=",:")

    def exchange(self, code: str, redirect_uri: str) -> OAuthGrant:
        return self._grant("code exchange", {"grant_type": "authorization_code", "code": code,
                                             "redirect_uri": redirect_uri})

    def refresh(self, refresh_token: str) -> OAuthGrant:
        return self._grant("token refresh", {"grant_type": "refresh_token", "refresh_token": refresh_token})

    def revoke(self, token: str, hint: str) -> None:
        resp = self.transport.retrying(lambda: self.transport.send(
            "POST", self.revoke_url, "token revocation", self._limited,
            data={"token": token, "token_type_hint": hint, "client_id": self.client_id,
                  "client_secret": self.client_secret}))
        if resp.status_code >= 400:
            raise self._refused("token revocation", resp)

    def _limited(self, resp: requests.Response) -> LinearError | None:
        if resp.status_code != 429:
            return None
        wait = _retry_after(resp.headers)
        return LinearRateLimited(f"Linear OAuth ({self.host}): rate limited (HTTP 429)",
                                 time.time() + (wait if wait is not None else 60.0))

    def _refused(self, what: str, resp: requests.Response) -> LinearError:
        body = json_body(resp) or {}
        err = str(body.get("error") or f"HTTP {resp.status_code}")
        desc = one_line(str(body.get("error_description") or ""), 160)
        msg = f"Linear {what} ({self.host}): {err}" + (f" ({desc})" if desc else "")
        if err in ("invalid_grant", "invalid_client", "unauthorized_client"):
            return LinearOAuthRefused(msg, code=err)
        return LinearError(msg, transient=resp.status_code >= 500, code=err)

    def _grant(self, what: str, form: dict) -> OAuthGrant:
        form = {**form, "client_id": self.client_id, "client_secret": self.client_secret}
        resp = self.transport.retrying(lambda: self.transport.send("POST", self.token_url, what, self._limited,
                                                                   data=form))
        body = json_body(resp)
        if resp.status_code >= 400:
            raise self._refused(what, resp)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise self.transport.fail(what, f"HTTP {resp.status_code}, unexpected answer (no access_token)")
        access, refresh = body["access_token"], body.get("refresh_token")
        KNOWN_SECRETS.update(t for t in (access, refresh) if isinstance(t, str) and t)
        expires = body.get("expires_in")
        return OAuthGrant(access, refresh if isinstance(refresh, str) else None,
                          float(expires) if isinstance(expires, (int, float)) else None,
                          str(body.get("scope") or ""))


def _activity(n: dict, session_id: str) -> LinearActivity:
    content = n.get("content") or {}
    kind = re.sub(r"^AgentActivity(\w+)Content$", r"\1", content.get("__typename") or "").lower()
    u = n.get("user") or {}
    return LinearActivity(id=n["id"], session_id=session_id, created_at=n.get("createdAt") or "", type=kind,
                          body=content.get("body") or "", signal=n.get("signal"),
                          user=Actor(u.get("id"), u.get("name"), u.get("email"), bool(u.get("app"))))


def _session(n: dict) -> LinearSession:
    c = n.get("creator") or {}
    return LinearSession(
        id=n["id"], issue=_issue(n["issue"]) if n.get("issue") else None,
        app_user_id=(n.get("appUser") or {}).get("id"),
        creator=Actor(c.get("id"), c.get("name"), c.get("email"), bool(c.get("app"))),
        created_at=n.get("createdAt") or "", updated_at=n.get("updatedAt") or "",
        comment_body=(n.get("comment") or {}).get("body"), **_recent(n))


def _recent(n: dict) -> dict:
    conn = n.get("activities")
    if not isinstance(conn, dict) or not isinstance(conn.get("nodes"), list):
        return {}
    acts = sorted((_activity(a, n["id"]) for a in conn["nodes"] if isinstance(a, dict) and a.get("id")),
                  key=lambda a: (a.created_at, a.id))
    return {"recent": tuple(acts), "recent_all": not (conn.get("pageInfo") or {}).get("hasNextPage")}


def covered_by_recent(x: LinearSession, since: str | None) -> list[LinearActivity] | None:
    """The session's activities after `since` when its newest activities (read with it) hold them all,
    else None (read them)."""
    if not x.recent and not x.recent_all:
        return None
    if x.recent_all or (since is not None and x.recent[0].created_at <= since):
        return [a for a in x.recent if since is None or a.created_at > since]
    return None


def _comment(n: dict) -> LinearComment:
    u = n.get("user") or {}
    return LinearComment(id=n["id"], issue_linear_id=(n.get("issue") or {}).get("id") or "",
                         body=n.get("body") or "", created_at=n.get("createdAt") or "", edited_at=n.get("editedAt"),
                         user=Actor(u.get("id"), u.get("name"), u.get("email"), bool(u.get("app"))),
                         session_id=(n.get("agentSession") or {}).get("id"))


def _issue(n: dict) -> LinearIssue:
    state, team = n.get("state") or {}, n.get("team") or {}
    return LinearIssue(
        id=n["id"], key=n.get("identifier") or n["id"], title=n.get("title") or "",
        description=n.get("description") or "", url=n.get("url"), team_id=team.get("id"),
        team_key=team.get("key"), state_name=state.get("name"), state_type=state.get("type"),
        delegate_id=(n.get("delegate") or {}).get("id"), assignee_id=(n.get("assignee") or {}).get("id"),
        labels=tuple(x.get("name") or "" for x in ((n.get("labels") or {}).get("nodes") or [])),
        updated_at=n.get("updatedAt"))


# ============================================================== 6. github
# The GitHub client (requests + tenacity): one batched GraphQL query per
# repository and up to 50 branches / pull requests, REST only where GraphQL has
# nothing (opening a PR, job logs, reruns). Primary and secondary rate limits,
# 5xx and timeouts are handled here. Returns frozen observations; decides nothing.

@dataclass(frozen=True)
class CheckObs:
    name: str
    status: str                 # COMPLETED | IN_PROGRESS | QUEUED | ... (statuses: PENDING or COMPLETED)
    conclusion: str | None      # SUCCESS | FAILURE | ... (statuses mapped to SUCCESS / FAILURE)
    required: bool = False
    url: str | None = None
    job_id: int | None = None   # the GitHub Actions job id (REST check-run id)
    app: str | None = None
    title: str | None = None
    summary: str | None = None
    text: str | None = None


class ReviewComment(NamedTuple):
    """An inline comment of a review."""
    path: str
    line: int | None
    body: str


class ThreadComment(NamedTuple):
    """A comment in an unresolved review thread."""
    path: str
    line: int | None
    body: str
    author: str                 # login, lower-case
    association: str            # OWNER | MEMBER | COLLABORATOR | CONTRIBUTOR | NONE ...


class PrComment(NamedTuple):
    """A comment on the pull request's conversation."""
    id: str
    author: str
    association: str
    body: str
    created_at: str


class QueueRemoval(NamedTuple):
    """A RemovedFromMergeQueueEvent of the pull request."""
    id: str
    at: str
    reason: str


@dataclass(frozen=True)
class ReviewObs:
    id: str
    state: str
    body: str
    author: str
    association: str
    submitted_at: str
    commit: str | None
    comments: tuple[ReviewComment, ...] = ()
    author_id: str | None = None        # the reviewer's node id (a user's; None for an app)


@dataclass(frozen=True)
class PullRequestObs:
    number: int
    node_id: str
    url: str
    state: str                  # OPEN | CLOSED | MERGED
    merged: bool
    draft: bool
    head_ref: str
    head_sha: str
    base_ref: str
    head_repo: str | None
    author: str | None
    mergeable: str | None       # MERGEABLE | CONFLICTING | UNKNOWN
    review_decision: str | None
    in_queue: bool
    queue_state: str | None
    checks: tuple[CheckObs, ...] = ()
    base_checks: tuple[CheckObs, ...] = ()
    reviews: tuple[ReviewObs, ...] = ()
    threads: tuple[ThreadComment, ...] = ()       # comments of unresolved review threads
    comments: tuple[PrComment, ...] = ()
    removals: tuple[QueueRemoval, ...] = ()        # merge-queue removals, oldest first


@dataclass(frozen=True)
class OpenedPr:
    """A pull request PatchRelay opened (or found open for the branch when it tried)."""
    number: int
    url: str
    node_id: str | None
    head_sha: str | None


_CHECK_NODES = """__typename
          ... on CheckRun { databaseId name status conclusion detailsUrl title summary text%s
                            checkSuite { app { slug } } }
          ... on StatusContext { context state targetUrl description%s }"""

# What one observation reads, kept cheap by GitHub's cost formula (each connection costs one request per
# parent item): the state of every PR in one batched request, and the long texts (review bodies, inline
# comments, threads, PR comments) only for the PRs that have a review PatchRelay has not acted on yet.
_PR_CORE = """id number url state merged isDraft headRefName headRefOid baseRefName
    headRepository { nameWithOwner } author { login }"""

_PR_STATE = _PR_CORE + """ mergeable reviewDecision isInMergeQueue mergeQueueEntry { state position }
    reviews(last: 20) { nodes { id state submittedAt authorAssociation author { login ... on User { id } }
      commit { oid } } }
    timelineItems(last: 10, itemTypes: [REMOVED_FROM_MERGE_QUEUE_EVENT]) {
      nodes { __typename ... on RemovedFromMergeQueueEvent { id createdAt reason } } }"""

_PR_DETAIL = """id number
    reviews(last: 20) { nodes { id body comments(first: 30) { nodes { path line originalLine body } } } }
    reviewThreads(first: 30) { nodes { isResolved path line
      comments(first: 5) { nodes { body authorAssociation author { login } } } } }
    comments(last: 30) { nodes { id body createdAt authorAssociation author { login } } }"""


def _pr_selection(number: int | None) -> str:
    """The fields read for one pull request. Its checks (with `isRequired`, which needs the PR number)
    only when the number is known; a PR found by branch is read in full on the next observation."""
    if number is None:
        return _PR_CORE
    req = f" isRequired(pullRequestNumber: {int(number)})"
    return _PR_STATE + """
    commits(last: 1) { nodes { commit { oid statusCheckRollup { state contexts(first: 100) { nodes {
          %s } } } } } }""" % (_CHECK_NODES % (req, req))


def observe_document(items: list[tuple[str, str, int | None]]) -> tuple[str, dict]:
    """One GraphQL document for (alias, branch, pr_number) items of one repository, with the base branch's
    checks (for the base-red test) and whether it has a merge queue."""
    var_defs = ["$owner: String!", "$name: String!", "$base: String!", "$baseRef: String!"]
    variables: dict[str, str] = {}
    parts = ["    mergeQueue(branch: $base) { id }",
             "    baseHead: ref(qualifiedName: $baseRef) { target { ... on Commit { oid statusCheckRollup {\n"
             "      contexts(first: 100) { nodes { %s } } } } } }" % (_CHECK_NODES % ("", ""))]
    for alias, branch, number in items:
        if number is not None:
            parts.append(f"    {alias}: pullRequest(number: {int(number)}) {{ {_pr_selection(number)} }}")
        else:
            var_defs.append(f"${alias}: String!")
            variables[alias] = branch
            parts.append(f"    {alias}: pullRequests(headRefName: ${alias}, first: 5, states: [OPEN, MERGED, CLOSED], "
                         f"orderBy: {{field: CREATED_AT, direction: DESC}}) {{ nodes {{ {_pr_selection(None)} }} }}")
    doc = ("query PatchRelayPullRequests(" + ", ".join(var_defs) + ") {\n"
           "  rateLimit { limit cost remaining resetAt }\n  viewer { login }\n"
           "  repository(owner: $owner, name: $name) {\n" + "\n".join(parts) + "\n  }\n}")
    return doc, variables


def detail_document(numbers: list[int]) -> str:
    parts = [f"    d{int(n)}: pullRequest(number: {int(n)}) {{ {_PR_DETAIL} }}" for n in numbers]
    return ("query PatchRelayPullRequestDetails($owner: String!, $name: String!) {\n"
            "  repository(owner: $owner, name: $name) {\n" + "\n".join(parts) + "\n  }\n}")


# Merge requests are pinned to the head that was approved and green: GitHub refuses them if the head moved.
M_ENQUEUE = """mutation PatchRelayEnqueue($id: ID!, $head: GitObjectID!) {
  enqueuePullRequest(input: {pullRequestId: $id, expectedHeadOid: $head}) { mergeQueueEntry { id state } }
}"""
M_AUTO_MERGE = """mutation PatchRelayAutoMerge($id: ID!, $head: GitObjectID!) {
  enablePullRequestAutoMerge(input: {pullRequestId: $id, expectedHeadOid: $head}) { pullRequest { id } }
}"""
M_REQUEST_REVIEWS = """mutation PatchRelayRequestReviews($id: ID!, $users: [ID!]) {
  requestReviews(input: {pullRequestId: $id, userIds: $users, union: true}) { pullRequest { id } }
}"""
Q_IN_QUEUE = """query PatchRelayInMergeQueue($owner: String!, $name: String!, $number: Int!) {
  repository(owner: $owner, name: $name) { pullRequest(number: $number) { isInMergeQueue } }
}"""
Q_GH_REPO = """query PatchRelayRepository($owner: String!, $name: String!) {
  repository(owner: $owner, name: $name) { nameWithOwner viewerPermission mergeQueue { url } }
}"""


class GitHubClient:
    """GitHub's GraphQL API (observation, merge requests) and REST (PR creation, job logs, reruns). Owns
    its Transport; `login` is the token's user, learnt from the observation query."""

    BUDGET = BudgetHeaders((("requests_limit", "x-ratelimit-limit"), ("requests_remaining", "x-ratelimit-remaining")),
                           "x-ratelimit-reset")

    def __init__(self, cfg: GitHubConfig, token: str | None, on_budget: Callable[[dict], None] | None = None):
        self.cfg = cfg
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.transport = Transport("GitHub", GitHubError, cfg.api_url, timeout=cfg.timeout,
                                   attempts=cfg.retry_attempts, max_wait=cfg.retry_max_wait, headers=headers,
                                   budget=self.BUDGET, on_budget=on_budget)
        self.login: str | None = None          # the token's user, learnt from the observation query

    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def requests_made(self) -> int:
        return self.transport.requests_made

    def _send(self, method: str, url: str, what: str, **kw: Any) -> requests.Response:
        return self.transport.retrying(lambda: self.transport.send(
            method, url, what, lambda r: self._rate_limit(r, what), **kw))

    def _rate_limit(self, resp: requests.Response, what: str) -> GitHubRateLimited | None:
        """Primary (remaining 0 -> until reset) and secondary limits (403/429 with retry-after or the
        secondary-limit message -> at least a minute)."""
        if resp.status_code not in (403, 429):
            return None
        text = resp.text[:2000].lower() if resp.content else ""
        retry_after = _retry_after(resp.headers)
        if retry_after is not None or "secondary rate limit" in text or resp.status_code == 429:
            return GitHubRateLimited(f"GitHub {what} ({self.host}): secondary rate limit",
                                     time.time() + max(60.0, retry_after or 0.0))
        if resp.headers.get("x-ratelimit-remaining") == "0" or "rate limit" in text:
            reset = _int_header(resp.headers, "x-ratelimit-reset")
            return GitHubRateLimited(f"GitHub {what} ({self.host}): rate limit exhausted",
                                     float(reset) if reset and reset > time.time() else time.time() + 60.0)
        return None

    def graphql(self, document: str, variables: Mapping[str, Any] | None = None, strict: bool = False) -> dict:
        """The answer's data. `strict` (mutations): any error raises, even beside partial data."""
        what = operation_name(document, "graphql")
        body = {"query": document, "variables": dict(variables or {})}
        # read inside the attempt, so that the answer's budget headers and its ok() are one write
        return self.transport.retrying(lambda: self._graphql_data(what, self.transport.send(
            "POST", self.cfg.graphql_url, what, lambda r: self._rate_limit(r, what), json=body), strict))

    def _graphql_data(self, what: str, resp: requests.Response, strict: bool) -> dict:
        try:
            body = resp.json()
        except ValueError:
            raise GitHubError(f"GitHub {what} ({self.host}): HTTP {resp.status_code}, not JSON") from None
        if not isinstance(body, dict):
            raise GitHubError(f"GitHub {what} ({self.host}): unexpected response shape")
        errors = graphql_errors(body) if body.get("errors") else []
        if any(e.get("type") == "RATE_LIMITED" for e in errors):
            reset = _int_header(resp.headers, "x-ratelimit-reset")
            self.transport.limited(GitHubRateLimited(
                f"GitHub {what} ({self.host}): GraphQL rate limit",
                float(reset) if reset and reset > time.time() else time.time() + 60.0), wait_for_it=False)
        if resp.status_code == 401:
            raise GitHubError(f"GitHub {what} ({self.host}): bad credentials (check the GitHub token)")
        if errors and (strict or not body.get("data")):
            msg = "; ".join(one_line(str(e.get("message")), 200) for e in errors)
            raise GitHubError(f"GitHub {what} ({self.host}): {msg}", code=str(errors[0].get("type") or "") or None)
        if resp.status_code >= 400 or not isinstance(body.get("data"), dict):
            raise GitHubError(f"GitHub {what} ({self.host}): HTTP {resp.status_code} without data")
        self.transport.ok()
        return body["data"]

    def rest(self, method: str, path: str, ok: Iterable[int] = (200,), **kw: Any) -> requests.Response:
        what = f"{method} {re.sub(r'/[0-9a-f]{40}', '/<sha>', path)}"
        resp = self._send(method, self.cfg.api_url + path, what, **kw)
        if resp.status_code == 401:
            raise GitHubError(f"GitHub {what} ({self.host}): bad credentials (check the GitHub token)")
        if resp.status_code not in tuple(ok):
            try:
                detail = (resp.json() or {}).get("message") or ""
            except ValueError:
                detail = ""
            raise GitHubError(f"GitHub {what} ({self.host}): HTTP {resp.status_code}"
                              + (f": {one_line(detail, 200)}" if detail else ""))
        return resp

    # ---- reads
    def viewer_login(self) -> str:
        r = self.rest("GET", "/user")
        return (r.json() or {}).get("login") or "?"

    def repository(self, full_name: str) -> dict | None:
        owner, name = full_name.split("/", 1)
        try:
            return self.graphql(Q_GH_REPO, {"owner": owner, "name": name}).get("repository")
        except GitHubError as e:
            if "Could not resolve" in str(e) or "NOT_FOUND" in str(e):
                return None
            raise

    def observe(self, full_name: str, base: str, items: list[tuple[str, int | None]],
                needs_detail: Callable[[str, PullRequestObs], bool] | None = None
                ) -> tuple[dict[str, PullRequestObs | None], bool]:
        """The pull request of each (branch, pr_number) item, keyed by branch: one request per repository and
        50 items, plus one per 10 PRs for which `needs_detail` asks for review texts. Also whether `base`
        has a merge queue."""
        owner, name = full_name.split("/", 1)
        raw: dict[str, dict | None] = {}
        has_queue, base_commit = False, None
        for start in range(0, len(items), 50):
            chunk = items[start:start + 50]
            aliased = [(f"i{n}", b, num) for n, (b, num) in enumerate(chunk)]
            doc, variables = observe_document(aliased)
            data = self.graphql(doc, {"owner": owner, "name": name, "base": base, "baseRef": f"refs/heads/{base}",
                                      **variables})
            repo = data.get("repository")
            if not isinstance(repo, dict):
                raise GitHubError(f"GitHub PatchRelayPullRequests ({self.host}): repository {full_name} not found")
            has_queue = bool(repo.get("mergeQueue"))
            base_commit = (repo.get("baseHead") or {}).get("target") or base_commit
            self.login = ((data.get("viewer") or {}).get("login") or "").lower() or None
            for alias, branch, number in aliased:
                if alias not in repo:
                    raise GitHubError(f"GitHub PatchRelayPullRequests ({self.host}): response without {alias}")
                node = repo[alias]
                if number is None:
                    nodes = [n for n in ((node or {}).get("nodes") or []) if isinstance(n, dict)
                             and ((n.get("headRepository") or {}).get("nameWithOwner") or full_name).lower()
                             == full_name.lower()]
                    nodes.sort(key=lambda n: {"OPEN": 0, "MERGED": 1}.get(str(n.get("state")), 2))
                    node = nodes[0] if nodes else None
                raw[branch] = node if isinstance(node, dict) else None
        out = {b: (_pr_obs(n, base_commit) if n else None) for b, n in raw.items()}
        wanted = {o.number: b for b, o in out.items() if o is not None and needs_detail and needs_detail(b, o)}
        numbers = list(wanted)
        for start in range(0, len(numbers), 10):
            some = numbers[start:start + 10]
            data = self.graphql(detail_document(some), {"owner": owner, "name": name})
            repo = data.get("repository") or {}
            for number in some:
                b, d = wanted[number], repo.get(f"d{number}")
                if isinstance(d, dict):
                    node = dict(raw[b] or {})
                    texts = {r.get("id"): r for r in ((d.get("reviews") or {}).get("nodes") or []) if isinstance(r, dict)}
                    node["reviews"] = {"nodes": [{**r, **texts.get(r.get("id"), {})}
                                                 for r in ((node.get("reviews") or {}).get("nodes") or [])]}
                    node["reviewThreads"], node["comments"] = d.get("reviewThreads"), d.get("comments")
                    out[b] = _pr_obs(node, base_commit)
        return out, has_queue

    @shaped
    def in_merge_queue(self, full_name: str, number: int) -> bool:
        owner, name = full_name.split("/", 1)
        data = self.graphql(Q_IN_QUEUE, {"owner": owner, "name": name, "number": int(number)})
        return bool(data["repository"]["pullRequest"]["isInMergeQueue"])

    def find_open_pr(self, full_name: str, branch: str) -> dict | None:
        owner = full_name.split("/", 1)[0]
        r = self.rest("GET", f"/repos/{full_name}/pulls", params={"head": f"{owner}:{branch}", "state": "open"})
        prs = r.json() if isinstance(r.json(), list) else []
        return prs[0] if prs else None

    def job_log(self, full_name: str, job_id: int) -> str:
        r = self.rest("GET", f"/repos/{full_name}/actions/jobs/{int(job_id)}/logs")
        return r.text

    # ---- writes
    def create_pr(self, full_name: str, head: str, base: str, title: str, body: str, draft: bool) -> OpenedPr:
        """Open the PR, or return the open PR that already exists for this head (a resend after a crash or
        a lost response, or one a person opened): never a second PR."""
        resp = self.rest("POST", f"/repos/{full_name}/pulls", ok=(201, 422),
                         json={"title": title, "head": head, "base": base, "body": body, "draft": draft})
        found = resp.json() if resp.status_code == 201 else self.find_open_pr(full_name, head)
        if found:
            try:
                return OpenedPr(int(found["number"]), found["html_url"], found.get("node_id"),
                                (found.get("head") or {}).get("sha"))
            except (KeyError, TypeError, ValueError) as e:
                raise GitHubError(f"GitHub POST /repos/{full_name}/pulls ({self.host}): unexpected response shape "
                                  f"({type(e).__name__}: {e})") from None
        try:
            detail = json.dumps((resp.json() or {}).get("errors") or resp.json())
        except ValueError:
            detail = resp.text
        raise GitHubError(f"GitHub POST /repos/{full_name}/pulls ({self.host}): HTTP 422: {one_line(detail, 300)}")

    def rerun_job(self, full_name: str, job_id: int) -> None:
        self.rest("POST", f"/repos/{full_name}/actions/jobs/{int(job_id)}/rerun", ok=(201,))

    def merge_when_ready(self, node_id: str, queue: bool, head: str) -> None:
        """Enqueue the PR (or enable auto-merge), pinned to `head`: GitHub refuses it if the head moved."""
        self.graphql(M_ENQUEUE if queue else M_AUTO_MERGE, {"id": node_id, "head": head}, strict=True)

    def request_reviews(self, node_id: str, user_ids: Sequence[str]) -> None:
        """Ask these users (node ids) for a new review, beside whoever is asked already."""
        self.graphql(M_REQUEST_REVIEWS, {"id": node_id, "users": list(user_ids)}, strict=True)


def _pr_obs(n: dict, base_commit: dict | None = None) -> PullRequestObs:
    """A pull request node -> observation. A node without the fields asked for is a GitHubError."""
    try:
        def checks(commit: dict | None) -> tuple[CheckObs, ...]:
            roll = (commit or {}).get("statusCheckRollup") or {}
            out = []
            for c in ((roll.get("contexts") or {}).get("nodes") or []):
                if not isinstance(c, dict):
                    continue
                if c.get("__typename") == "StatusContext":
                    st = c.get("state")
                    out.append(CheckObs(name=c.get("context") or "?",
                                        status="PENDING" if st in ("PENDING", "EXPECTED") else "COMPLETED",
                                        conclusion=None if st in ("PENDING", "EXPECTED") else
                                        ("SUCCESS" if st == "SUCCESS" else "FAILURE"),
                                        required=bool(c.get("isRequired")), url=c.get("targetUrl"),
                                        summary=c.get("description")))
                else:
                    out.append(CheckObs(name=c.get("name") or "?", status=c.get("status") or "COMPLETED",
                                        conclusion=c.get("conclusion"), required=bool(c.get("isRequired")),
                                        url=c.get("detailsUrl"), job_id=c.get("databaseId"),
                                        app=((c.get("checkSuite") or {}).get("app") or {}).get("slug"),
                                        title=c.get("title"), summary=c.get("summary"), text=c.get("text")))
            return tuple(out)
        head_commit = None
        for cn in ((n.get("commits") or {}).get("nodes") or []):
            head_commit = (cn or {}).get("commit")
        reviews = tuple(ReviewObs(
            id=r["id"], state=r.get("state") or "", body=r.get("body") or "",
            author=((r.get("author") or {}).get("login") or "").lower(), association=r.get("authorAssociation") or "",
            submitted_at=r.get("submittedAt") or "", commit=(r.get("commit") or {}).get("oid"),
            author_id=(r.get("author") or {}).get("id"),
            comments=tuple(ReviewComment(c.get("path") or "", c.get("line") or c.get("originalLine"), c.get("body") or "")
                           for c in ((r.get("comments") or {}).get("nodes") or []) if isinstance(c, dict)))
            for r in ((n.get("reviews") or {}).get("nodes") or []) if isinstance(r, dict))
        threads: list[ThreadComment] = []
        for t in ((n.get("reviewThreads") or {}).get("nodes") or []):
            if not isinstance(t, dict) or t.get("isResolved"):
                continue
            for c in ((t.get("comments") or {}).get("nodes") or []):
                threads.append(ThreadComment(t.get("path") or "", t.get("line"), c.get("body") or "",
                                             ((c.get("author") or {}).get("login") or "").lower(),
                                             c.get("authorAssociation") or ""))
        comments = tuple(PrComment(c.get("id") or "", ((c.get("author") or {}).get("login") or "").lower(),
                          c.get("authorAssociation") or "", c.get("body") or "", c.get("createdAt") or "")
                         for c in ((n.get("comments") or {}).get("nodes") or []) if isinstance(c, dict))
        removals = tuple(QueueRemoval(e.get("id") or "", e.get("createdAt") or "", e.get("reason") or "removed")
                         for e in ((n.get("timelineItems") or {}).get("nodes") or [])
                         if isinstance(e, dict) and e.get("__typename") == "RemovedFromMergeQueueEvent")
        entry = n.get("mergeQueueEntry") or {}
        return PullRequestObs(
            number=int(n["number"]), node_id=n["id"], url=n["url"], state=n["state"], merged=bool(n.get("merged")),
            draft=bool(n.get("isDraft")), head_ref=n["headRefName"], head_sha=n["headRefOid"],
            base_ref=n.get("baseRefName") or "", head_repo=(n.get("headRepository") or {}).get("nameWithOwner"),
            author=((n.get("author") or {}).get("login") or "").lower() or None, mergeable=n.get("mergeable"),
            review_decision=n.get("reviewDecision"), in_queue=bool(n.get("isInMergeQueue")),
            queue_state=entry.get("state"), checks=checks(head_commit), base_checks=checks(base_commit),
            reviews=reviews, threads=tuple(threads), comments=comments, removals=removals)
    except (KeyError, TypeError, ValueError) as e:
        raise GitHubError(f"GitHub PatchRelayPullRequests: unexpected pull request shape ({type(e).__name__}: {e})") \
            from None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LOG_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z ?", re.M)


def log_tail(text: str, secrets: Iterable[str] = (), lines: int = 150, limit: int = 8000) -> str:
    """The end of a CI log, as the agent needs it: no ANSI colours, no timestamps, secrets redacted
    (the tokens PatchRelay read always are; `secrets` adds others)."""
    clean = _LOG_TS.sub("", _ANSI.sub("", text or ""))
    return redact(tail(clean, lines, limit), secrets)


# ============================================================== 7. codex
# A blocking JSON-RPC client for `codex app-server` over stdio (one JSON object
# per line). A reader thread only moves lines into a queue; every decision is
# made by the caller's thread. Server-to-client requests are answered at once.

class AppServer:
    """One `codex app-server` child. `request` blocks for its response; notifications that
    arrive meanwhile are kept for `next_message`."""

    def __init__(self, cfg: Config, cwd: Path | None, stderr_path: Path,
                 on_server_request: Callable[[dict], Any] | None = None):
        self.cfg = cfg
        self.on_server_request = on_server_request or (lambda msg: (_ for _ in ()).throw(
            CodexError(f"unsupported server request {msg.get('method')}")))
        extra = {"CODEX_HOME": str(cfg.codex.home)} if cfg.codex.home else {}
        if cfg.codex.home:
            cfg.codex.home.mkdir(parents=True, exist_ok=True)
        self.stderr_path = stderr_path
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(stderr_path, "ab")
        argv = [cfg.codex.bin, *cfg.codex.args]
        if cfg.codex.shell:         # a login shell: PATH and keys from the user's profile apply
            argv = [cfg.codex.shell, "-lc", "exec " + shlex.join(argv)]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                         env=stripped_child_env(cfg, extra), cwd=str(cwd) if cwd else None,
                                         start_new_session=True)
        except OSError as e:
            self._stderr.close()
            raise CodexError(f"codex.bin: cannot start {shlex.join(argv)}: {e.strerror}") from None
        self.pid = self.proc.pid
        self.started = proc_start_time(self.pid)
        self._q: queue.Queue = queue.Queue()
        self._backlog: list[dict] = []
        self._next_id = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                self._q.put(json.loads(line))
            except ValueError:
                self._q.put({"__invalid__": line[:500]})
        self._q.put(None)

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            self._stderr.flush()
            data = self.stderr_path.read_bytes()[-8000:].decode("utf-8", "replace")
        except OSError:
            return ""
        keep = [ln for ln in data.splitlines() if "Refusing to create helper binaries" not in ln]
        return redact(tail("\n".join(keep), lines))

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            assert self.proc.stdin is not None
            with self._lock:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise CodexError(self.exit_message("app-server closed its input")) from None

    def exit_message(self, what: str) -> str:
        code = self.proc.poll()
        t = self.stderr_tail()
        return f"{what}" + (f" (exit code {code})" if code is not None else "") + (f": {one_line(t, 600)}" if t else "")

    def notify(self, method: str, params: dict | None = None) -> None:
        self._send({"method": method} if params is None else {"method": method, "params": params})

    def _read(self, timeout: float) -> dict | None:
        """Next raw message, answering server requests on the way. None on timeout."""
        try:
            msg = self._q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if msg is None:
            self._q.put(None)  # keep the EOF visible to later reads
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            raise CodexError(self.exit_message("app-server exited"))
        if "__invalid__" in msg:
            raise CodexError(f"app-server wrote invalid JSON: {one_line(redact(msg['__invalid__']), 200)}")
        if "id" in msg and "method" in msg:
            self._answer(msg)
            return {"__server_request__": msg}
        return msg

    def _answer(self, msg: dict) -> None:
        try:
            result = self.on_server_request(msg)
            self._send({"id": msg["id"], "result": result})
        except CodexError as e:
            self._send({"id": msg["id"], "error": {"code": -32601, "message": str(e)}})

    def request(self, method: str, params: dict, timeout: float | None = None) -> dict:
        self._next_id += 1
        rid = self._next_id
        self._send({"id": rid, "method": method, "params": params})
        deadline = time.time() + (timeout or self.cfg.codex.request_timeout)
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise CodexError(f"{method}: no answer from app-server within {timeout or self.cfg.codex.request_timeout:g} s")
            msg = self._read(left)
            if msg is None:
                continue
            if msg.get("id") == rid and "method" not in msg:
                if "error" in msg:
                    err = msg["error"] or {}
                    raise CodexError(f"{method}: {one_line(str(err.get('message') or err), 300)}")
                return msg.get("result") or {}
            self._backlog.append(msg)

    def next_message(self, timeout: float) -> dict | None:
        if self._backlog:
            return self._backlog.pop(0)
        return self._read(timeout)

    def initialize(self) -> dict:
        r = self.request("initialize", {"clientInfo": {"name": "patchrelay", "title": "PatchRelay",
                                                       "version": __version__}, "capabilities": None})
        self.notify("initialized")
        return r

    def thread_params(self, cwd: Path) -> dict:
        c = self.cfg.codex
        p: dict[str, Any] = {"cwd": str(cwd), "approvalPolicy": c.approval_policy, "sandbox": c.sandbox}
        if c.model:
            p["model"] = c.model
        if c.model_provider:
            p["modelProvider"] = c.model_provider
        if c.developer_instructions:
            p["developerInstructions"] = c.developer_instructions
        if c.base_instructions:
            p["baseInstructions"] = c.base_instructions
        return p

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # tool processes the server left behind
        self._stderr.close()


SUPPORTED_CODEX = "0.169.0"     # the app-server protocol this PatchRelay speaks (codex-protocol/0.169.0)


# What PatchRelay sends and reads of the app-server protocol: checked against the installed Codex's own schema
# (`codex app-server generate-json-schema`) by tests/test_codex_contract.py and by `doctor`, so a renamed
# field fails a test that names it instead of a run in production. A field is a dotted path ("x[]" steps into
# an array), optionally with the JSON type PatchRelay expects.
CODEX_CONTRACT: dict[str, Any] = {
    "requests": {   # method: (params sent, response type, fields read from the response)
        "initialize": (("clientInfo", "capabilities"), "InitializeResponse", ()),
        "thread/start": (("cwd", "approvalPolicy", "sandbox", "model", "modelProvider", "developerInstructions",
                          "baseInstructions"), "ThreadStartResponse", ("thread.id:string",)),
        "thread/resume": (("threadId", "excludeTurns", "cwd", "approvalPolicy", "sandbox", "model", "modelProvider",
                           "developerInstructions", "baseInstructions"), "ThreadResumeResponse", ()),
        "turn/start": (("threadId", "input"), "TurnStartResponse", ("turn.id:string",)),
        "turn/steer": (("threadId", "expectedTurnId", "input"), "TurnSteerResponse", ()),
        "turn/interrupt": (("threadId", "turnId"), "TurnInterruptResponse", ()),
        "thread/turns/list": (("threadId", "limit", "itemsView"), "ThreadTurnsListResponse",
                              ("data:array", "data[].id:string", "data[].status", "data[].items:array")),
        "account/read": (("refreshToken",), "GetAccountResponse", ("account", "requiresOpenaiAuth:boolean")),
        "config/read": ((), "ConfigReadResponse", ("config",)),
        "account/rateLimits/read": ((), "GetAccountRateLimitsResponse",
                                    ("rateLimits.primary.resetsAt", "rateLimits.primary.usedPercent:integer")),
    },
    "notifications": {      # method: fields read from its params
        "turn/completed": ("turn.id:string", "turn.status", "turn.error.message:string", "turn.error.codexErrorInfo"),
        "item/completed": ("turnId:string", "item", "item.type:string"),
        "item/started": ("turnId:string", "item", "item.type:string"),
        "item/commandExecution/outputDelta": ("turnId:string", "itemId:string", "delta:string"),
        "thread/tokenUsage/updated": ("tokenUsage.total", "tokenUsage.last.totalTokens:integer"),
        "error": ("willRetry:boolean", "error.message:string", "error.codexErrorInfo"),
    },
    "server_requests": ("item/commandExecution/requestApproval", "item/fileChange/requestApproval",
                        "item/tool/requestUserInput", "execCommandApproval", "applyPatchApproval"),
}


class _ProtocolSchema:
    """Codex's JSON Schema bundle, walked the way PatchRelay reads messages: `$ref`s followed, every branch of
    an anyOf / oneOf / allOf considered (a field found in any branch exists)."""

    def __init__(self, bundle: Mapping[str, Any]):
        self.defs = bundle.get("definitions") or {}

    def deref(self, node: Any) -> Any:
        for _ in range(50):
            if not (isinstance(node, dict) and "$ref" in node):
                return node
            target: Any = self.defs
            for part in node["$ref"].removeprefix("#/definitions/").split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            node = target
        return node

    def branches(self, node: Any) -> list[dict]:
        node = self.deref(node)
        if not isinstance(node, dict):
            return []
        subs = [b for k in ("anyOf", "oneOf", "allOf") for b in node.get(k) or []]
        return [node] + [x for b in subs for x in self.branches(b)]

    def field(self, node: Any, path: str) -> list[dict] | None:
        """The schemas a dotted path can have, or None when no branch has it."""
        nodes = self.branches(node)
        for step in path.split("."):
            name = step.removesuffix("[]")
            found = [x for n in nodes if name in (n.get("properties") or {})
                     for x in self.branches(n["properties"][name])]
            if not found:
                return None
            nodes = [x for n in found for x in self.branches(n.get("items"))] if step.endswith("[]") else found
        return nodes

    def check(self, where: str, node: Any, spec: str) -> list[str]:
        path, _, want = spec.partition(":")
        found = self.field(node, path)
        if found is None:
            return [f"{where}: no field {path}"]
        have: set[str] = set()
        for n in found:
            t = n.get("type")
            have |= set(t) if isinstance(t, list) else ({t} if isinstance(t, str) else set())
        have.discard("null")
        if want and have and want not in have and not (want == "integer" and "number" in have):
            return [f"{where}: {path} is {'/'.join(sorted(have))}, not {want}"]
        return []

    def methods(self, kind: str) -> dict[str, Any]:
        """method -> its params schema, for ClientRequest, ServerNotification or ServerRequest."""
        return {b["properties"]["method"]["enum"][0]: (b["properties"].get("params") or {})
                for b in (self.defs.get(kind) or {}).get("oneOf") or []
                if isinstance(b, dict) and "method" in (b.get("properties") or {})}

    def type_named(self, name: str) -> Any:
        return (self.defs.get("v2") or {}).get(name) or self.defs.get(name)


def contract_problems(bundle: Mapping[str, Any]) -> list[str]:
    """Every method and field of CODEX_CONTRACT that `bundle` (Codex's codex_app_server_protocol.schemas.json)
    lacks or types otherwise, in words; [] when Codex speaks what PatchRelay expects."""
    schema = _ProtocolSchema(bundle)
    problems: list[str] = []
    requests, notes = schema.methods("ClientRequest"), schema.methods("ServerNotification")
    for method, (params, response, fields) in CODEX_CONTRACT["requests"].items():
        answer = schema.type_named(response)
        if method not in requests:
            problems.append(f"request {method}: not in the protocol")
        elif answer is None:
            problems.append(f"request {method}: no response type {response}")
        else:
            problems += [p for name in params for p in schema.check(f"request {method} params", requests[method], name)]
            problems += [p for spec in fields for p in schema.check(f"request {method} response", answer, spec)]
    for method, fields in CODEX_CONTRACT["notifications"].items():
        if method not in notes:
            problems.append(f"notification {method}: not in the protocol")
        else:
            problems += [p for spec in fields for p in schema.check(f"notification {method}", notes[method], spec)]
    server = schema.methods("ServerRequest")
    return problems + [f"server request {m}: not in the protocol" for m in CODEX_CONTRACT["server_requests"]
                       if m not in server]


def codex_protocol(cfg: Config) -> dict:
    """The installed Codex's own description of its app-server protocol (generate-json-schema)."""
    with tempfile.TemporaryDirectory(prefix="patchrelay-codex-schema-") as tmp:
        env = stripped_child_env(cfg, {"CODEX_HOME": str(cfg.codex.home)} if cfg.codex.home else {})
        p: subprocess.CompletedProcess | None = None
        try:
            p = subprocess.run([cfg.codex.bin, "app-server", "generate-json-schema", "--out", tmp],
                               capture_output=True, text=True, timeout=60, env=env)
            return json.loads((Path(tmp) / "codex_app_server_protocol.schemas.json").read_text())
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            said = one_line((p.stderr or p.stdout) if p else "", 200)
            raise CodexError(f"codex app-server generate-json-schema failed: {e}" + (f" ({said})" if said else "")) \
                from None


def provider_key(cfg: Config, conf: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The model provider runs use (codex.model_provider, else Codex's own config `conf`) and the environment
    variable it reads its key from, if any."""
    provider = cfg.codex.model_provider or conf.get("model_provider")
    key = ((conf.get("model_providers") or {}).get(provider) or {}).get("env_key") if provider else None
    return provider, key if isinstance(key, str) else None


def text_input(text: str) -> list[dict]:
    return [{"type": "text", "text": text, "text_elements": []}]


# ============================================================== 8. git
# Worktrees, branches, commits and pushes with real git. Paths and branch names
# that come from Linear are sanitised here. Every failure carries git's message.

def run_git(args: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, GIT_TERMINAL_PROMPT="0", **(env or {}))
    try:
        p = subprocess.run(["git", *args], cwd=str(cwd), env=full_env, capture_output=True, text=True,
                           timeout=timeout)
    except FileNotFoundError:
        raise GitError("git: not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]}: timed out after {timeout:g} s in {cwd}") from None
    except NotADirectoryError:
        raise GitError(f"git {args[0]}: {cwd} is not a directory") from None
    if check and p.returncode != 0:
        msg = one_line(redact(p.stderr or p.stdout), 500) or f"exit code {p.returncode}"
        raise GitError(f"git {args[0]} failed in {cwd}: {msg}")
    return p


def git_push_env(cfg: Config, remote_url: str) -> dict[str, str]:
    """Credentials for PatchRelay's own `git push` to an https GitHub remote, passed through git's
    GIT_CONFIG_* environment (never on a command line, never to Codex)."""
    if not remote_url.startswith("https://"):
        return {}
    host = re.match(r"https://([^/@]+@)?([^/]+)/", remote_url + "/")
    api_host = re.match(r"https?://([^/]+)", cfg.github.api_url)
    github_hosts = {"github.com"} | ({api_host.group(1).removeprefix("api.")} if api_host else set())
    if not host or host.group(2).lower() not in github_hosts:
        return {}                       # never hand the GitHub token to another host
    tok = github_token(cfg)
    if not tok:
        return {}
    import base64
    basic = base64.b64encode(f"x-access-token:{tok}".encode()).decode()
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"http.https://{host.group(2)}/.extraheader",
            "GIT_CONFIG_VALUE_0": f"AUTHORIZATION: basic {basic}"}


def safe_key(key: str) -> str:
    """An issue key reduced to a safe path segment / ref component."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", key or "")
    s = re.sub(r"\.{2,}", ".", s).strip(".-")
    s = re.sub(r"\.lock$", "", s)[:64].strip(".-")
    return s or "issue"


def branch_for(project: ProjectConfig, key: str, title: str) -> str:
    slug = _slug(title, 40)
    name = f"{project.branch_prefix}/{safe_key(key)}" + (f"-{slug}" if slug else "")
    if not _valid_ref_component(name):
        name = f"{project.branch_prefix}/{safe_key(key)}"
    return name


def worktree_for(project: ProjectConfig, key: str) -> Path:
    root = project.worktree_root.resolve()
    path = (root / safe_key(key)).resolve()
    if path.parent != root:
        raise GitError(f"issue {key!r}: worktree path {path} escapes worktree_root {root}")
    return path


@contextlib.contextmanager
def repo_lock(repo: Path, timeout: float = 600) -> Iterator[None]:
    """Serialise fetch / `worktree add` / `worktree remove` of one repository across workers (two at once
    can corrupt .git/worktrees). An fcntl lock on a file in the repository's git directory."""
    common = run_git(["rev-parse", "--git-common-dir"], repo).stdout.strip()
    lock_path = (repo / common).resolve() / "patchrelay.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.time() > deadline:
                    raise GitError(f"git: {repo} stayed locked by another PatchRelay worker for {timeout:g} s") \
                        from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def ensure_worktree(project: ProjectConfig, branch: str, path: Path, attempts: int = 3) -> str:
    """Create or reuse the issue's worktree, under the repository's lock; a transient git failure (a
    network hiccup during fetch, a ref lock a killed worker left) is retried before the run fails."""
    repo = project.repo_path
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise GitError(f"projects[{project.id}].repo_path: {repo} is not a git repository")
    for attempt in range(1, attempts + 1):
        try:
            with repo_lock(repo):
                return _ensure_worktree(project, branch, path)
        except GitError as e:
            if attempt == attempts or "is not" in str(e) or "exists but" in str(e) or "escapes" in str(e):
                raise
            log.info("git failed (%s); retrying (%d of %d)", e, attempt, attempts - 1)
            time.sleep(attempt)
    raise AssertionError("unreachable")


STALE_REF_LOCK_AGE = 2.0      # seconds; git holds a ref lock for milliseconds


def _clear_stale_ref_locks(repo: Path, refs: Iterable[str]) -> None:
    """Remove the ref locks of `refs` (in the repository's common git directory) that a killed fetch or
    `worktree add -b` left behind. Called under the repository's lock, where no PatchRelay git command writes
    these refs; the age check leaves alone a lock a person's own git command holds right now."""
    common = (repo / run_git(["rev-parse", "--git-common-dir"], repo).stdout.strip()).resolve()
    for ref in refs:
        lock = common / (ref + ".lock")
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > STALE_REF_LOCK_AGE:
                lock.unlink()
                log.warning("%s: removed the stale lock %s (a git command was killed)", repo, lock)


def _worktrees(repo: Path) -> set[Path]:
    listed = run_git(["worktree", "list", "--porcelain"], repo).stdout
    return {Path(line[9:]).resolve() for line in listed.splitlines() if line.startswith("worktree ")}


def _partial(path: Path) -> Path:
    """Where the issue's worktree is built before it is moved into place (so that `path` only ever
    holds a complete checkout)."""
    return path.with_name(f".{path.name}.partial")


def _final_of(path: Path) -> Path | None:
    """The worktree path a partial one is moved to (the inverse of `_partial`); None for any other path."""
    m = re.fullmatch(r"\.(.+)\.partial", path.name)
    return path.with_name(m.group(1)) if m else None


def _ensure_worktree(project: ProjectConfig, branch: str, path: Path) -> str:
    """Create or reuse the issue's worktree, branched from a freshly fetched base (never from the main
    checkout's HEAD), and never reset a branch that holds work: an existing local or remote branch is checked
    out as it is.
    Returns how: 'reused', 'checked out local branch', 'tracked remote branch' or 'created'.

    Crash safety: the checkout is made at a hidden partial path and renamed into place only once complete,
    so a worker killed inside `git worktree add` leaves a partial worktree, never a half-filled `path` that a
    later run would reuse (and commit as deletions). Everything here runs under the repository's lock, so a
    partial worktree found here is a leftover: it is removed, as are stale ref locks of the branch and base."""
    repo = project.repo_path
    _clear_stale_ref_locks(repo, [f"refs/heads/{branch}", f"refs/remotes/origin/{project.base_branch}",
                                  f"refs/remotes/origin/{branch}"])
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise GitError(f"worktree {path} exists but is not a directory")
    registered = _worktrees(repo)
    # A worker killed between the rename and `worktree repair` (of this issue or another one): git still
    # lists the partial path while the checkout sits at its final one. Repair those first, or the cleanup
    # below would take a moved worktree's records for a leftover's.
    moved = [q for p in registered if (q := _final_of(p)) and not p.exists()
             and q.is_dir() and (q / ".git").is_file() and q.resolve() not in registered]
    if moved:
        run_git(["worktree", "repair", *map(str, moved)], repo, check=False)
        registered = _worktrees(repo)
    for leftover in [p for p in registered if _final_of(p)]:
        run_git(["worktree", "unlock", str(leftover)], repo, check=False)     # `add` locks it while it runs
        run_git(["worktree", "remove", "--force", "--force", str(leftover)], repo, check=False)
        shutil.rmtree(leftover, ignore_errors=True)         # then `worktree prune` below drops its records
    shutil.rmtree(_partial(path), ignore_errors=True)
    if path.exists():
        if path.resolve() not in registered:
            raise GitError(f"worktree {path} exists but is not a worktree of {repo}; move it away")
        if run_git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], path, check=False).returncode == 0:
            return "reused"
        # git's placeholder HEAD (a checkout cut short by an older version): nothing was committed there
        run_git(["worktree", "remove", "--force", str(path)], repo, check=False)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
    run_git(["worktree", "prune"], repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_git(["fetch", "--quiet", "origin", project.base_branch], repo, timeout=300)
    partial = _partial(path)
    if run_git(["rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"], repo, check=False).returncode == 0:
        how, add = "checked out local branch", [str(partial), branch]
    elif run_git(["ls-remote", "--heads", "origin", branch], repo, timeout=120).stdout.strip():
        run_git(["fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}"], repo,
                timeout=300)
        how, add = "tracked remote branch", ["--no-track", "-b", branch, str(partial), f"origin/{branch}"]
    else:
        how, add = "created", ["--no-track", "-b", branch, str(partial), f"origin/{project.base_branch}"]
    run_git(["worktree", "add", *add], repo)
    os.rename(partial, path)
    run_git(["worktree", "repair", str(path)], repo)
    return how


def github_repo_of(url: str) -> str | None:
    """owner/name of a github.com remote URL (https, ssh or scp-like); None for anything else."""
    m = re.fullmatch(r"(?:https://(?:[^@/]+@)?github\.com/|(?:ssh://)?git@github\.com[:/])([^/]+/[^/]+?)(?:\.git)?/?",
                     url.strip())
    return m.group(1) if m else None


def git_head(path: Path) -> str | None:
    p = run_git(["rev-parse", "--verify", "--quiet", "HEAD"], path, check=False)
    return p.stdout.strip() or None


def clear_stale_git_locks(path: Path) -> bool:
    """A worker killed in the middle of `git add` / `git commit` / its push leaves index.lock, HEAD.lock or
    a ref lock of the issue's branch behind. The issue's worktree belongs to one run at a time and the agent
    cannot write its git directory, so such a lock is stale: remove it. True when one was removed."""
    gitdir = run_git(["rev-parse", "--absolute-git-dir"], path, check=False).stdout.strip()
    if not gitdir:
        return False
    common = run_git(["rev-parse", "--git-common-dir"], path, check=False).stdout.strip()
    branch = run_git(["symbolic-ref", "--quiet", "HEAD"], path, check=False).stdout.strip()
    locks = [Path(gitdir) / "index.lock", Path(gitdir) / "HEAD.lock"]
    if common and branch:
        locks.append((path / common).resolve() / (branch + ".lock"))
        if branch.startswith("refs/heads/"):     # our own update of the remote-tracking ref after a push
            locks.append((path / common).resolve() / "refs" / "remotes" / "origin" / (branch[11:] + ".lock"))
    removed = False
    for lock in locks:
        if lock.exists():
            with contextlib.suppress(OSError):
                lock.unlink()
                removed = True
    return removed


def commit_all(path: Path, message: str, runner: RunnerConfig) -> bool:
    """Commit whatever the agent changed. False when the tree was clean."""
    if clear_stale_git_locks(path):
        log.warning("%s: removed a stale git lock (a worker died while committing or pushing)", path)
    if not run_git(["status", "--porcelain"], path).stdout.strip():
        return False
    run_git(["add", "-A"], path)
    ident = ["-c", f"user.name={runner.git_author_name}", "-c", f"user.email={runner.git_author_email}"]
    has_ident = run_git(["config", "user.email"], path, check=False).returncode == 0
    p = subprocess.run(["git", *([] if has_ident else ident), "commit", "--no-verify", "-q", "-F", "-"],
                       cwd=str(path), input=message, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    if p.returncode != 0:
        raise GitError(f"git commit failed in {path}: {one_line(p.stderr or p.stdout, 500)}")
    return True


def merge_base_into(path: Path, project: ProjectConfig, runner: RunnerConfig) -> list[str]:
    """Fetch the base branch (under the repository's lock, like every fetch) and merge it into the
    worktree's branch (no rebase, so no force-push is ever needed). Returns the conflicted paths; on
    conflicts the markers stay for the agent to resolve."""
    base = project.base_branch
    with repo_lock(project.repo_path):
        _clear_stale_ref_locks(project.repo_path, [f"refs/remotes/origin/{base}"])
        run_git(["fetch", "--quiet", "origin", base], path, timeout=300)
    ident = ["-c", f"user.name={runner.git_author_name}", "-c", f"user.email={runner.git_author_email}"]
    has_ident = run_git(["config", "user.email"], path, check=False).returncode == 0
    p = run_git([*([] if has_ident else ident), "merge", "--no-edit", "--no-ff", f"origin/{base}"], path, check=False,
                timeout=300)
    conflicts = [ln for ln in run_git(["diff", "--name-only", "--diff-filter=U"], path).stdout.splitlines() if ln]
    if p.returncode != 0 and not conflicts:
        raise GitError(f"git merge origin/{base} failed in {path}: {one_line(p.stderr or p.stdout, 400)}")
    return conflicts


_CONFLICT_MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.M)


def unresolved_conflicts(path: Path) -> list[str]:
    """Unmerged or changed files that still hold conflict markers (the agent cannot `git add`, so an
    unmerged path whose markers are gone counts as resolved; PatchRelay stages it when it commits)."""
    out = set()
    candidates = set(ln for ln in run_git(["diff", "--name-only", "--diff-filter=U"], path).stdout.splitlines() if ln)
    candidates |= {ln[3:] for ln in run_git(["status", "--porcelain", "--no-renames"], path).stdout.splitlines()}
    for f in candidates:
        p = path / f
        try:
            if p.is_file() and p.stat().st_size < 5_000_000 and _CONFLICT_MARKER.search(p.read_text(errors="replace")):
                out.add(f)
        except OSError:
            pass
    return sorted(out)


def remove_worktree(project: ProjectConfig, path: Path, branch: str | None) -> str:
    """After a merge: remove the worktree and the local branch, unless anything in it is uncommitted."""
    if not path.is_dir():
        return "no worktree"
    if run_git(["status", "--porcelain"], path, check=False).stdout.strip():
        return "kept: it has uncommitted changes"
    with repo_lock(project.repo_path):
        run_git(["worktree", "remove", str(path)], project.repo_path)
        if branch:
            run_git(["branch", "-D", branch], project.repo_path, check=False)
    return "removed"


def work_held(path: Path) -> str | None:
    """What in a worktree would be lost with it: uncommitted changes, or commits no origin ref has."""
    if run_git(["status", "--porcelain"], path, check=False).stdout.strip():
        return "uncommitted changes"
    ahead = run_git(["rev-list", "--count", "HEAD", "--not", "--remotes=origin"], path, check=False).stdout.strip()
    return f"{ahead} unpushed commit(s)" if ahead and ahead != "0" else None


def delete_remote_branch(cfg: Config, project: ProjectConfig, branch: str) -> str:
    """Delete the branch on origin (with PatchRelay's push credentials); 'already gone' when GitHub did."""
    url = run_git(["remote", "get-url", "origin"], project.repo_path).stdout.strip()
    p = run_git(["push", "--quiet", "origin", "--delete", branch], project.repo_path, env=git_push_env(cfg, url),
                timeout=120, check=False)
    if p.returncode == 0:
        return "deleted"
    if "remote ref does not exist" in (p.stderr or p.stdout):
        return "already gone"
    raise GitError(f"git push --delete {branch} failed: {one_line(redact(p.stderr or p.stdout), 300)}")


def disk_use(path: Path) -> int:
    """Bytes of the files under `path` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def unpushed(path: Path, branch: str) -> bool:
    remote = run_git(["rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{branch}"], path, check=False)
    head = git_head(path)
    return bool(head) and remote.stdout.strip() != head


def push_branch(cfg: Config, path: Path, branch: str) -> None:
    url = run_git(["remote", "get-url", "origin"], path).stdout.strip()
    run_git(["push", "--quiet", "origin", f"HEAD:refs/heads/{branch}"], path, env=git_push_env(cfg, url),
            timeout=300)
    run_git(["update-ref", f"refs/remotes/origin/{branch}", "HEAD"], path)


def changed_files(path: Path, base: str | None, head: str | None) -> list[str]:
    if not base or not head or base == head:
        return []
    out = run_git(["diff", "--name-only", f"{base}..{head}"], path, check=False).stdout
    return [ln for ln in out.splitlines() if ln]


def run_hook(project: ProjectConfig, cfg: Config, name: str, worktree: Path, env: Mapping[str, str],
             on_start: Callable[[int, str | None], None] | None = None) -> bool:
    """Run `.patchrelay/hooks/<name>` from the repo, in the worktree, in its own process group (announced
    through `on_start`, so that whoever finds the worker dead can kill what it left). False when there is
    no hook."""
    hook = project.repo_path / ".patchrelay" / "hooks" / name
    if not hook.exists():
        return False
    if not os.access(hook, os.X_OK):
        raise HookError(f"{name} hook {hook} is not executable")
    # The hook starts only once its process is on record: a shell waits for a line on stdin, sent after
    # `on_start`, then execs the hook (same pid). A worker killed in between closes that pipe, and the
    # shell exits without running the hook, so nothing runs that reconcile would not know to stop.
    try:
        proc = subprocess.Popen(["sh", "-c", 'read -r _ || exit 0; exec "$0" </dev/null', str(hook)],
                                cwd=str(worktree), env=stripped_child_env(cfg, env), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as e:
        raise HookError(f"{name} hook could not start: {e.strerror}") from None
    started = proc_start_time(proc.pid)
    if on_start:
        on_start(proc.pid, started)
    try:
        _, err = proc.communicate(input="go\n", timeout=cfg.runner.hook_timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid, started, grace=2)
        proc.communicate()
        raise HookError(f"{name} hook timed out after {cfg.runner.hook_timeout:g} s") from None
    if proc.returncode != 0:
        raise HookError(f"{name} hook failed (exit {proc.returncode}): {one_line(redact(tail(err, 10)), 500)}")
    return True


# ============================================================== 9. factory
# The transition table and every decision. Pure: takes rows (dicts) and
# observations, returns a Decision (issue fields, inbox and outbox messages,
# events). No SQL, no HTTP, no subprocesses.

# Every move any actor can cause, from every state. Linear can close an issue (done / canceled) from
# anywhere, move it between the two closed states, reopen it (-> awaiting_input) or delegate it again
# (-> delegated); runs move the working states; GitHub moves the pull-request states. A move not listed
# here is a bug in a decision and raises.
_CLOSE = {"done", "canceled"}
_REACTIVE = {"repairing_ci", "changes_requested", "repairing_queue"}
_PR_IDLE = {"pr_open", "awaiting_queue"}
_CLAIMS = {"implementing", *_REACTIVE}        # a pending run starts from wherever the issue rests
TRANSITIONS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "delegated": {"implementing", *_REACTIVE, "awaiting_input", "failed", "escalated", *_CLOSE},
    "implementing": {"ready_for_pr", "pr_open", "awaiting_input", "delegated", "failed", "escalated", *_CLOSE},
    "ready_for_pr": {"pr_open", "delegated", *_CLAIMS, "awaiting_input", "failed", *_CLOSE},
    "pr_open": {*_CLAIMS, "awaiting_queue", "delegated", "awaiting_input", "failed", "escalated", *_CLOSE},
    "changes_requested": {*_PR_IDLE, "ready_for_pr", "awaiting_input", "delegated", "failed", "escalated", *_CLOSE},
    "repairing_ci": {*_PR_IDLE, "ready_for_pr", "awaiting_input", "delegated", "failed", "escalated", *_CLOSE},
    "repairing_queue": {*_PR_IDLE, "ready_for_pr", "awaiting_input", "delegated", "failed", "escalated", *_CLOSE},
    "awaiting_queue": {"pr_open", *_CLAIMS, "delegated", "awaiting_input", "failed", "escalated", *_CLOSE},
    "awaiting_input": {"delegated", *_CLAIMS, "ready_for_pr", *_PR_IDLE, "failed", "escalated", *_CLOSE},
    "escalated": {"delegated", *_CLAIMS, *_PR_IDLE, "awaiting_input", "failed", *_CLOSE},
    "failed": {"delegated", *_CLAIMS, *_PR_IDLE, "awaiting_input", "escalated", *_CLOSE},
    "done": {"canceled", "delegated", "awaiting_input"},
    "canceled": {"done", "delegated", "awaiting_input"},
}.items()}
FACTORY_STATES = tuple(TRANSITIONS)
CLAIM_STATE = {"implementation": "implementing", "ci_repair": "repairing_ci", "review_fix": "changes_requested",
               "queue_repair": "repairing_queue"}


def transition(current: str, new: str) -> str:
    """The one gate for factory state changes. Raises IllegalTransition on a move the table forbids."""
    if current == new:
        return new
    if new not in TRANSITIONS.get(current, ()):
        raise IllegalTransition(f"illegal factory transition {current} -> {new}")
    return new


def move_target(name: str | None, type: str, states: list[dict], current: dict) -> dict | None:
    """The team state to move an issue to, or None: never a closed issue, never backwards (an issue already
    started is not "started" again), never to where it is."""
    if current.get("type") in ("completed", "canceled"):
        return None
    if name:
        named = [s for s in states if (s.get("name") or "").lower() == name.lower()]
        if not named or named[0].get("id") == current.get("id") or \
                (current.get("name") or "").lower() == name.lower():
            return None
        return named[0]
    if current.get("type") == type:
        return None
    typed = [s for s in states if s.get("type") == type]
    return min(typed, key=lambda s: s.get("position") or 0) if typed else None


def may_transition(current: str, new: str) -> bool:
    """Whether the table allows the move; for a decision that moves only where it may (`transition`
    still makes the move)."""
    return current == new or new in TRANSITIONS.get(current, ())


@dataclass(frozen=True)
class Outbound:
    """A message for Linear, queued in the outbox."""
    kind: str                 # activity | plan | issue_state | session_link | session_page (comment: an activity
                              # without a session)
    payload: dict


class InboxMessage(NamedTuple):
    """A message for the agent (a prompt) or its run (a stop), kept in the inbox until a run takes it."""
    kind: str                 # prompt | stop
    body: str
    author: str | None
    source: str               # agent_session | agent_prompt | comment | linear
    source_id: str | None     # dedup key of what it came from
    run_id: int | None = None  # a stop is addressed to this run, and never reaches a later one


class Event(NamedTuple):
    """A line of an issue's event log."""
    level: str                # info | warn | error
    kind: str                 # intake | run | github | trust | stop | ...
    message: str


@dataclass(frozen=True)
class Decision:
    """What the factory decided about one issue; apply_decision writes it in one transaction. `fields` are
    issue columns; `track` False: an issue PatchRelay does not track (answers may still go to its session)."""
    fields: dict = field(default_factory=dict)
    outbox: tuple[Outbound, ...] = ()
    inbox: tuple[InboxMessage, ...] = ()
    events: tuple[Event, ...] = ()
    track: bool = True


# An issue without a pending run (a run claimed, dropped or made pointless)
NO_PENDING_RUN: dict[str, Any] = {"pending_run_type": None, "pending_context": None, "pending_since": None,
                                  "not_before": None}


def merge_decisions(*ds: Decision) -> Decision:
    """Several decisions about one issue as one (later fields win)."""
    fields: dict = {}
    for d in ds:
        fields.update(d.fields)
    return Decision(fields=fields, outbox=sum((d.outbox for d in ds), ()), inbox=sum((d.inbox for d in ds), ()),
                    events=sum((d.events for d in ds), ()), track=all(d.track for d in ds))


def rate_limited_until(budget: Mapping[str, Any] | None, now: dt.datetime) -> dt.datetime | None:
    """When an API's recorded rate limit ends, if it has not yet."""
    until = parse_iso((budget or {}).get("limited_until"))
    return until if until and until > now else None


def refresh_margin(lifetime: float | None) -> float:
    """How long before its expiry an access token is refreshed: a fifth of its lifetime, between 1 s and an
    hour (a day's token refreshes an hour early; a token of seconds in tests, a second or two early)."""
    return min(3600.0, max(1.0, 0.2 * lifetime)) if lifetime else 300.0


def token_due(conn: Mapping[str, Any], now: float) -> bool:
    """The stored connection's access token should be refreshed now (it has an expiry and is near it)."""
    return conn.get("expires_at") is not None and now >= conn["expires_at"] - refresh_margin(conn.get("lifetime"))


def token_expired(conn: Mapping[str, Any], now: float) -> bool:
    return conn.get("expires_at") is not None and now >= conn["expires_at"]


@dataclass(frozen=True)
class Identity:
    viewer_id: str
    app_mode: bool
    delegation: tuple[str, ...] = ("delegate", "label")
    label: str = "patchrelay"


def api_use(ticks: Sequence[Mapping[str, Any]], limits: Mapping[str, int | None]) -> dict:
    """Requests per tick and the projected hourly use of each API, from recent ticks (newest first: their
    start times and `api_cost`) at the rate they ran; `limits`: each API's hourly request limit, if known."""
    starts = [t for t in (parse_iso(x["started_at"]) for x in ticks) if t]
    gaps = sorted((a - b).total_seconds() for a, b in zip(starts, starts[1:]) if a > b)
    interval = gaps[len(gaps) // 2] if gaps else None
    out: dict[str, Any] = {"ticks": len(ticks), "interval_seconds": round(interval, 1) if interval else None}
    for api in ("linear", "github"):
        costs = [c for c in ((json.loads(x["summary"] or "{}").get("api_cost") or {}).get(f"{api}_requests")
                             for x in ticks) if isinstance(c, (int, float))]
        if not costs:
            continue
        per_tick = sum(costs) / len(costs)
        hourly = per_tick * 3600 / interval if interval else None
        limit = limits.get(api)
        out[api] = {"requests_per_tick": round(per_tick, 1),
                    "projected_per_hour": round(hourly) if hourly is not None else None,
                    "share_of_limit": round(100 * hourly / limit) if hourly is not None and limit else None}
    return out


def utc_day_start(now: dt.datetime | None = None) -> str:
    """The start of the current UTC day (the daily token cap's window)."""
    return iso((now or utcnow()).astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0))


def token_cap_crossed(c: CodexConfig, run_spent: int, issue_before: int, day_before: int) -> str | None:
    """What a run's spend crossed, told to the person (None while within every cap)."""
    for cap, spent, what, key, then in (
            (c.max_tokens_per_run, run_spent, "this run", "max_tokens_per_run",
             "Reply here to continue in a new run."),
            (c.max_tokens_per_issue, issue_before + run_spent, "this issue", "max_tokens_per_issue",
             "This issue gets no new run until the operator raises the cap."),
            (c.max_tokens_per_day, day_before + run_spent, "today's runs", "max_tokens_per_day",
             "New runs wait until 00:00 UTC, or until the operator raises the cap.")):
        if cap is not None and spent > cap:
            return f"I stopped: {what} spent {spent:,} tokens, over codex.{key} ({cap:,}). {then}"
    return None


def token_hold(c: CodexConfig, issue_spent: int, day_spent: int) -> str | None:
    """Why no run may start for an issue now because of the token caps (None: it may)."""
    if c.max_tokens_per_day is not None and day_spent >= c.max_tokens_per_day:
        return f"daily token cap: {day_spent:,} of {c.max_tokens_per_day:,} spent today; runs wait until 00:00 UTC"
    if c.max_tokens_per_issue is not None and issue_spent >= c.max_tokens_per_issue:
        return f"issue token cap: {issue_spent:,} of {c.max_tokens_per_issue:,} spent; raise codex.max_tokens_per_issue"
    return None


def run_label(run_type: str) -> str:
    return run_type.replace("_", " ")


def activity(kind: str, body: str, ephemeral: bool = False) -> Outbound:
    return Outbound("activity", {"content": {"type": kind, "body": body}, "ephemeral": ephemeral})


def plan(run_type: str, phase: str) -> Outbound:
    """The three-step plan shown in the Linear agent session."""
    steps = ["Prepare workspace", f"Run {run_label(run_type)}", "Review outcome"]
    status = {"preparing": ("inProgress", "pending", "pending"),
              "running": ("completed", "inProgress", "pending"),
              "completed": ("completed", "completed", "completed"),
              "awaiting_input": ("completed", "completed", "inProgress"),
              "failed": ("completed", "canceled", "canceled")}[phase]
    return Outbound("plan", {"plan": [{"content": c, "status": s} for c, s in zip(steps, status)]})


def is_delegated(issue: LinearIssue, ident: Identity) -> bool:
    """App token: the issue's delegate is our app user. Personal key: delegated to, assigned to, or
    labelled for the key's user, as configured in linear.delegation."""
    if issue.delegate_id and issue.delegate_id == ident.viewer_id:
        return True
    if ident.app_mode:
        return False
    if "assignee" in ident.delegation and issue.assignee_id and issue.assignee_id == ident.viewer_id:
        return True
    if "label" in ident.delegation and ident.label.lower() in (x.lower() for x in issue.labels):
        return True
    return False


def closed_state(state_type: str | None) -> str | None:
    return {"completed": "done", "canceled": "canceled", "duplicate": "canceled"}.get(state_type or "")


def observed_fields(obs: LinearIssue, delegated: bool | None) -> dict:
    f: dict[str, Any] = {"key": obs.key, "title": obs.title, "description": obs.description, "url": obs.url,
         "team_id": obs.team_id, "team_key": obs.team_key, "linear_state": obs.state_name,
         "linear_state_type": obs.state_type}
    if delegated is not None:
        f["delegated"] = int(delegated)
    return f


def start_work(row: dict | None, trigger: str, prompt: str | None, key: str, now: str) -> Decision:
    """Record a pending implementation run and acknowledge it in Linear."""
    current = row["factory_state"] if row else "delegated"
    state = transition(current, "delegated")
    context = {"trigger": trigger, "attempt": 1}
    if prompt:
        context["prompt"] = prompt
    fields = {"factory_state": state, "pending_run_type": "implementation", "pending_context": json.dumps(context),
              "pending_since": now, "not_before": None, "retries": 0}
    return Decision(fields=fields, outbox=(*_pickup(key), Outbound("issue_state", {})),
                    events=(Event("info", "intake", f"implementation queued ({trigger})"),))


def adopt_issue(obs: LinearIssue, project_id: str, trigger: str, prompt: str | None, now: str,
                delegated: bool | None = None) -> Decision:
    """An issue PatchRelay starts tracking, with its implementation run queued."""
    return merge_decisions(Decision(fields={**observed_fields(obs, delegated), "project_id": project_id,
                                            "linear_id": obs.id, "factory_state": "delegated"}),
                           start_work(None, trigger, prompt, obs.key, now))


def decide_unrouted(obs: LinearIssue | None, session_id: str | None) -> Decision:
    """A delegation (or an agent session) on an issue no project routes: not tracked. The operator sees it
    (`status` lists it); the person who opened a session is told why in it instead of facing silence."""
    key = obs.key if obs else None
    if session_id is None:
        return Decision(track=False, events=(Event("warn", "unrouted", f"{key}: delegated but no project routes it "
                                                   "(check issue_key_prefixes / linear_team_keys)"),))
    team = (obs.team_key if obs else None) or "?"
    return Decision(track=False, fields={"agent_session_id": session_id}, outbox=(activity(
        "response", f"No project of this PatchRelay takes team {team}, so I cannot work on "
                    f"{key or 'this issue'}; ask the operator to route it (projects[].linear_team_keys "
                    "or issue_key_prefixes)."),),
        events=(Event("warn", "unrouted", f"{key or '?'}: agent session but no project routes it "
                                          "(check issue_key_prefixes / linear_team_keys / linear_team_ids)"),))


def _pickup(key: str) -> tuple[Outbound, Outbound]:
    """The acknowledgement of a delegation in its agent session."""
    return (activity("thought", f"Picked up {key}. Preparing a worktree and starting the implementation run."),
            plan("implementation", "preparing"))


def _busy(row: dict) -> bool:
    return bool(row.get("active_run_id") or row.get("pending_run_type"))


def decide_issue(row: dict | None, obs: LinearIssue, ident: Identity, project_id: str, now: str,
                 session_required: bool = False) -> Decision:
    """An issue seen by the issues poll: new delegation, un-delegation, closing, reopening, or just new
    fields. Only a delegation starts work: a status change or an edit of an issue already being worked
    starts nothing, nor does a move to a closed state.
    `session_required` (app mode with trusted_actors): only a trusted agent session starts work,
    because the issue itself does not say who delegated it."""
    delegated = is_delegated(obs, ident)
    fields = observed_fields(obs, delegated)
    closed = closed_state(obs.state_type)
    if row is None:
        if not delegated or closed or session_required:
            return Decision(track=False)
        return adopt_issue(obs, project_id, "delegation", None, now, delegated)
    state = row["factory_state"]
    if closed:
        if state == closed:
            return Decision(fields=fields)
        return merge_decisions(Decision(fields=fields), close_issue(row, closed, obs.state_name or closed))
    if closed_state(row.get("linear_state_type")) and state in CLOSED_STATES:
        # Reopened in Linear: delegated to us -> work again; otherwise tracked, idle, until delegated.
        if delegated and not session_required and _busy(row):
            # the last run is still winding down: queue the work; it starts once that run has ended
            work = start_work(row, "reopened in Linear", None, obs.key, now)
            return merge_decisions(Decision(fields=fields), dataclasses.replace(
                work, fields={**work.fields, "factory_state": transition(state, "awaiting_input")}))
        if delegated and not session_required:
            return merge_decisions(Decision(fields=fields), start_work(row, "reopened in Linear", None, obs.key, now))
        return Decision(fields={**fields, "factory_state": transition(state, "awaiting_input")},
                        events=(Event("info", "intake", f"reopened in Linear ({obs.state_name}); waiting for a "
                                                   "delegation or a prompt"),))
    if delegated and not row["delegated"]:
        if not _busy(row) and not session_required and \
                state in FINAL_STATES | {"delegated", "awaiting_input"}:
            return merge_decisions(Decision(fields=fields), start_work(row, "delegation", None, obs.key, now))
        return Decision(fields=fields, events=(Event("info", "intake", f"delegated again while {state}"),))
    if not delegated and row["delegated"]:
        return merge_decisions(Decision(fields=fields), stop_issue(row, "the issue was un-delegated"))
    return Decision(fields=fields)


def stop_message(row: dict, reason: str) -> InboxMessage:
    """An inbox stop addressed to the issue's active run: it can never reach a later run."""
    return InboxMessage("stop", reason, None, "linear", None, row.get("active_run_id"))


def close_issue(row: dict, final: str, state_name: str) -> Decision:
    fields = {"factory_state": transition(row["factory_state"], final), **NO_PENDING_RUN}
    inbox = (stop_message(row, f"the Linear issue moved to {state_name}"),) if row.get("active_run_id") else ()
    return Decision(fields=fields, inbox=inbox,
                    events=(Event("info", "intake", f"Linear state {state_name}: issue is {final}"),))


def stop_issue(row: dict, reason: str) -> Decision:
    """A stop request: interrupts an active run, drops a pending one, and is a no-op otherwise."""
    if not row.get("active_run_id") and not row.get("pending_run_type"):
        return Decision(events=(Event("info", "stop", f"stop requested ({reason}); nothing was running"),))
    inbox = (stop_message(row, reason),) if row.get("active_run_id") else ()
    fields: dict = dict(NO_PENDING_RUN)
    out: tuple[Outbound, ...] = ()
    if not row.get("active_run_id"):
        out = (activity("response", f"Stopped: {reason}. No run was started."),)
        if row["factory_state"] not in CLOSED_STATES:
            fields["factory_state"] = transition(row["factory_state"], "awaiting_input")
    return Decision(fields=fields, inbox=inbox, outbox=out, events=(Event("info", "stop", f"stop requested: {reason}"),))


def _prompt_message(body: str, author: str | None, source: str, source_id: str | None) -> InboxMessage:
    return InboxMessage("prompt", body, author, source, source_id)


def decide_session(row: dict | None, s: LinearSession, trusted: bool, project_id: str, prompt: str | None,
                   ident: Identity, now: str) -> Decision:
    """A new agent session on a routed issue. Linear opens one on delegation and on a mention. A session
    on an issue delegated to us asks for work; a mention on an issue that is not delegated is answered
    in the session (the message is kept for the agent) and starts nothing: work starts only on delegation."""
    key = s.issue.key if s.issue else "?"
    if not trusted:
        return Decision(track=row is not None,
                        events=(Event("warn", "trust", f"ignored agent session from untrusted actor "
                                                  f"{s.creator.label()}"),))
    obs = s.issue
    delegated = is_delegated(obs, ident) if obs else False
    fields = observed_fields(obs, delegated) if obs else {}
    fields["agent_session_id"] = s.id
    closed = closed_state(obs.state_type) if obs else None
    if closed:
        return Decision(fields=fields, track=row is not None, outbox=(activity(
            "response", f"{key} is {closed} in Linear; I am not starting new work on it. Reopen the issue "
                        "(and delegate it to me) to continue."),),
            events=(Event("info", "intake", f"agent session on {closed} issue {key}: no run started"),))
    inbox = (_prompt_message(prompt, s.creator.label(), "agent_session", f"session:{s.id}"),) if prompt else ()
    if row is not None and _busy(row) and not row.get("agent_session_id") and not row.get("active_run_id") \
            and row.get("pending_run_type") == "implementation":
        # the delegation's own session, seen after the issue itself was taken: this is its pickup
        return Decision(fields=fields, inbox=inbox, outbox=_pickup(key))
    if row is not None and _busy(row):
        return Decision(fields=fields, inbox=inbox, outbox=(activity(
            "thought", f"Already working on {key} ({row['factory_state'].replace('_', ' ')}); "
                       "I'll include your message."),))
    if not delegated:
        answer = activity("response", f"I only work on issues delegated to me. Delegate {key} to me to have me "
                                      "implement it" + ("; I'll include your message." if prompt else "."))
        if row is None:
            return Decision(fields=fields, track=False, outbox=(answer,),
                            events=(Event("info", "intake", f"mention on {key} (not delegated): answered, no run"),))
        return Decision(fields=fields, inbox=inbox, outbox=(answer,),
                        events=(Event("info", "intake", "mention (not delegated): answered, no run started"),))
    assert obs is not None          # delegated: the session has its issue
    if row is None:
        return merge_decisions(adopt_issue(obs, project_id, "agent session", prompt, now, delegated),
                               Decision(fields={"agent_session_id": s.id}))
    return merge_decisions(Decision(fields=fields), start_work(row, "agent session", prompt, key, now))


def decide_prompt(row: dict, a: LinearActivity, trusted: bool, now: str) -> Decision:
    """A new prompt activity in a known session: steer, queue, stop, or start a follow-up run."""
    if a.type != "prompt" or a.user.app:
        return Decision()
    if not trusted:
        return Decision(events=(Event("warn", "trust", f"ignored prompt from untrusted actor {a.user.label()}"),))
    if a.signal == "stop":
        return stop_issue(row, f"stop requested in Linear by {a.user.label()}")
    if row["factory_state"] in CLOSED_STATES:
        return Decision(outbox=(activity("response", f"{row['key']} is {row['factory_state']}; I am not starting "
                                                     "new work on it. Reopen the issue or delegate it to me "
                                                     "again to continue."),),
                        events=(Event("info", "intake", "prompt on closed issue ignored"),))
    msg = (_prompt_message(a.body, a.user.label(), "agent_prompt", a.id),)
    if row.get("active_run_id"):
        return Decision(inbox=msg, outbox=(activity("thought", "Passing your message to the running agent.",
                                                    ephemeral=True),))
    if row.get("pending_run_type"):
        return Decision(inbox=msg)
    return merge_decisions(Decision(inbox=msg), start_work(row, "follow-up prompt", None, row["key"], now))


def decide_comment(row: dict, c: LinearComment, trusted: bool, ident: Identity, now: str) -> Decision:
    """A new comment on a tracked issue: input for the agent. It starts a run only where comments are the
    conversation (user mode, no agent session) and the agent is waiting for an answer (awaiting_input)."""
    if c.user.app or c.session_id or (ident.app_mode and c.user.id == ident.viewer_id):
        return Decision()   # an app's (ours included) or an agent-session thread (arrives as a prompt)
    if not trusted:
        return Decision(events=(Event("warn", "trust", f"ignored comment from untrusted actor {c.user.label()}"),))
    if row["factory_state"] in CLOSED_STATES:
        return Decision(events=(Event("info", "intake", f"comment by {c.user.label()} on {row['factory_state']} "
                                                   "issue ignored; no run started"),))
    msg = Decision(inbox=(_prompt_message(c.body, c.user.label(), "comment", c.id),),
                   events=(Event("info", "intake", f"comment by {c.user.label()} queued for the agent"),))
    if not ident.app_mode and not row.get("agent_session_id") and row["factory_state"] == "awaiting_input" \
            and row.get("delegated") and not _busy(row):
        return merge_decisions(msg, start_work(row, "reply in a comment", None, row["key"], now))
    return msg


def decide_comment_edit(row: dict, c: LinearComment, trusted: bool, ident: Identity, forwarded: bool) -> Decision:
    """A person edited a comment PatchRelay read before: when the comment reached the agent, the edited text
    follows as a message ("edited: ..."); it starts nothing."""
    if c.user.app or c.session_id or (ident.app_mode and c.user.id == ident.viewer_id) or not forwarded:
        return Decision()
    if not trusted:
        return Decision(events=(Event("warn", "trust", f"ignored comment edit from untrusted actor {c.user.label()}"),))
    if row["factory_state"] in CLOSED_STATES:
        return Decision(events=(Event("info", "intake", f"comment edit by {c.user.label()} on "
                                                       f"{row['factory_state']} issue ignored"),))
    return Decision(inbox=(_prompt_message(f"edited: {c.body}", c.user.label(), "comment", f"{c.id}@{c.edited_at}"),),
                    events=(Event("info", "intake", f"edited comment by {c.user.label()} queued for the agent"),))


def decide_claim(row: dict, run_type: str, branch: str, worktree: str) -> Decision:
    fields = {"factory_state": transition(row["factory_state"], CLAIM_STATE[run_type])}
    if not row.get("branch"):
        fields["branch"] = branch
    if not row.get("worktree"):
        fields["worktree"] = worktree
    return Decision(fields=fields, events=(Event("info", "run", f"{run_label(run_type)} run claimed"),))


@dataclass(frozen=True)
class RunOutcome:
    status: str                 # completed | failed | interrupted | stopped | awaiting_input | held | fresh_thread
    new_commits: int = 0
    has_work: bool = False      # the branch on origin is ahead of the base branch
    summary: str = ""
    reason: str = ""
    notice: str = ""            # held: what the issue's Linear session hears


# ---- Codex failures: classified by TurnError.codexErrorInfo, never by message text

CAPACITY_ERRORS = frozenset({"usageLimitExceeded", "rateLimitExceeded", "serverOverloaded", "flexUnavailable",
                             "policyCapacityUnavailable"})
CONFIGURATION_ERRORS = frozenset({"modelNotFound", "badRequest"})
TRANSPORT_ERRORS = frozenset({"responseTooManyFailedAttempts", "httpConnectionFailed", "responseStreamConnectionFailed",
                              "responseStreamDisconnected"})
MAX_HOLD_SECONDS = 3600.0


def failure_kind(info: Any) -> str | None:
    """The kind of a failed turn, from its codexErrorInfo: capacity (usage or rate limits, overload, 429 or
    5xx or no answer from the provider), account (401/403, unauthorized), context (the context window is
    full), configuration (unknown model, bad request), or None: an ordinary failure."""
    if isinstance(info, str):
        if info in CAPACITY_ERRORS:
            return "capacity"
        if info == "unauthorized":
            return "account"
        if info == "contextWindowExceeded":
            return "context"
        return "configuration" if info in CONFIGURATION_ERRORS else None
    if isinstance(info, dict) and len(info) == 1:
        name, detail = next(iter(info.items()))
        if name in TRANSPORT_ERRORS:
            status = (detail or {}).get("httpStatusCode") if isinstance(detail, dict) else None
            if status in (401, 403):
                return "account"
            if status is None or status == 429 or status >= 500:
                return "capacity"
    return None


def capacity_reason(info: Any) -> str:
    """A capacity or account refusal in words."""
    if info == "usageLimitExceeded":
        return "Codex usage limit reached"
    name, detail = next(iter(info.items())) if isinstance(info, dict) and info else (str(info), None)
    status = (detail or {}).get("httpStatusCode") if isinstance(detail, dict) else None
    if status in (401, 403) or info == "unauthorized":
        return f"the model provider refused Codex's credentials (HTTP {status or 401})"
    if status == 429 or info == "rateLimitExceeded":
        return "the model provider is rate limiting Codex (HTTP 429)"
    return f"the model provider is over capacity ({name}{f', HTTP {status}' if status else ''})"


def next_hold(previous: Mapping[str, Any] | None, kind: str, reason: str, fix: str | None, now: dt.datetime,
              base: float, reset_at: dt.datetime | None = None) -> dict:
    """The runner-wide hold after a capacity or account refusal: until Codex's reset time when it gave one,
    else for a backoff that doubles while the provider keeps refusing (a refusal within a backoff of the
    last hold's end), at most an hour. A standing hold is never shortened."""
    prev_until = parse_iso((previous or {}).get("until"))
    prev_backoff = float((previous or {}).get("backoff") or base)
    again = prev_until is not None and (now - prev_until).total_seconds() < prev_backoff
    backoff = min(MAX_HOLD_SECONDS, prev_backoff * 2) if again else base
    until = reset_at if reset_at and reset_at > now else now + dt.timedelta(seconds=backoff)
    if prev_until and prev_until > until:
        until = prev_until
    return {"kind": kind, "reason": reason, "fix": fix, "since": iso(now), "until": iso(until), "backoff": backoff}


def active_hold(hold: Mapping[str, Any] | None, now: dt.datetime) -> dict | None:
    """The hold, while it lasts (it lifts by itself)."""
    until = parse_iso((hold or {}).get("until"))
    return dict(hold) if hold and until and until > now else None


def hold_notice(hold: Mapping[str, Any]) -> str:
    """What a held issue's Linear session hears, once per hold."""
    until = parse_iso(hold["until"])
    when = until.strftime("%H:%M UTC") if until else "a later time"
    if hold["kind"] == "account":
        return f"Runs are on hold: {hold['reason']}. The operator needs to fix it ({hold.get('fix') or 'codex login'}); " \
               f"I try again at {when}."
    reason = hold["reason"]
    return f"{reason[0].upper()}{reason[1:]}; continuing at {when}."


def decide_run_end(row: dict, run: dict, out: RunOutcome, runner: RunnerConfig, now: dt.datetime) -> Decision:
    """Every run ends in a defined state and moves the factory state explicitly: a completed implementation
    with no work asks for input (it never stays `implementing`), an interrupted run is requeued within the
    retry budget, a reactive run that pushed nothing asks for input."""
    rt, branch = run["run_type"], row.get("branch") or "?"
    label = run_label(rt).capitalize()
    fields: dict = {"active_run_id": None}
    state = row["factory_state"]
    if state in CLOSED_STATES:
        return Decision(fields=fields, events=(Event("info", "run", f"{label} run ended ({out.status}) after the "
                                                               f"issue became {state}"),))
    if out.status in ("held", "fresh_thread"):
        # never a failure, no retry or repair budget spent: the same run is queued again
        context = json.loads(run.get("context") or "{}")
        if out.status == "fresh_thread":
            context["fresh_thread"] = True
            fields["thread_id"] = None
        fields.update(pending_run_type=rt, pending_context=json.dumps(context), pending_since=iso(now),
                      not_before=None, factory_state=transition(state, "delegated" if rt == "implementation" else state))
        said = out.notice if out.status == "held" else \
            "The conversation outgrew the model's context window; I am continuing in a fresh thread with a " \
            "summary of the work so far."
        return Decision(fields=fields, outbox=(activity("thought", said),) if said else (),
                        events=(Event("warn", "run", f"{label} run {'held' if out.status == 'held' else 'moves to a fresh thread'}: "
                                                     f"{out.reason}; requeued, no budget spent"),))
    if out.status == "interrupted":
        attempt = int(run.get("attempt") or 1)
        if attempt <= runner.retry_budget:
            delay = runner.retry_backoff * attempt
            context = json.loads(run.get("context") or "{}")
            context.update(attempt=attempt + 1, trigger=f"retry after: {out.reason}")
            fields.update(pending_run_type=rt, pending_context=json.dumps(context), pending_since=iso(now),
                          not_before=iso(now + dt.timedelta(seconds=delay)), retries=attempt,
                          factory_state=transition(state, "delegated" if rt == "implementation" else state))
            return Decision(fields=fields, outbox=(activity(
                "thought", f"{label} run was interrupted ({out.reason}); retrying"
                           f"{f' in {delay:g} s' if delay else ''} (retry {attempt} of {runner.retry_budget})."),),
                events=(Event("warn", "run", f"{label} run interrupted: {out.reason}; requeued "
                                        f"(retry {attempt} of {runner.retry_budget})"),))
        out = dataclasses.replace(out, status="failed",
                                  reason=f"{out.reason}; retry budget of {runner.retry_budget} used up")
    if out.status == "failed":
        fields["factory_state"] = transition(state, "failed")
        return Decision(fields=fields, outbox=(activity("error", f"{label} run failed: {out.reason}"),
                                               plan(rt, "failed")),
                        events=(Event("error", "run", f"{label} run failed: {out.reason}"),))
    summary = (out.summary or "").strip()
    if out.status == "stopped":
        fields["factory_state"] = transition(state, "ready_for_pr" if out.has_work and rt == "implementation"
                                             else "awaiting_input")
        return Decision(fields=fields, outbox=(activity("response", f"Stopped as requested ({out.reason})."
                                                        + (f" Work so far is on `{branch}`." if out.has_work else "")),
                                               plan(rt, "awaiting_input")),
                        events=(Event("info", "run", f"{label} run stopped: {out.reason}"),))
    if out.status == "completed" and rt != "implementation" and not out.new_commits:
        fields["factory_state"] = transition(state, "awaiting_input")
        body = (summary[:2000] or "I did not change anything.") + \
            f"\n\nThe {run_label(rt)} run pushed nothing, so the pull request is unchanged. Reply here to tell me " \
            "how to proceed, or push a fix yourself."
        return Decision(fields=fields, outbox=(activity("elicitation", body), plan(rt, "awaiting_input")),
                        events=(Event("warn", "run", f"{label} run pushed nothing; awaiting input"),))
    if out.status == "completed" and out.has_work:
        target = "pr_open" if row.get("pr_number") else "ready_for_pr"
        fields["factory_state"] = transition(state, target)
        pushed = (f"Pushed {out.new_commits} commit{'s' if out.new_commits != 1 else ''} to `{branch}`."
                  if out.new_commits else f"No new commits; `{branch}` is unchanged.")
        return Decision(fields=fields, outbox=(activity("response", f"{label} run completed. {pushed}"
                                                        + (f"\n\n{summary[:2000]}" if summary else "")),
                                               plan(rt, "completed")),
                        events=(Event("info", "run", f"{label} run completed; {pushed}"),))
    # completed without any work on the branch, or Codex asked for input
    fields["factory_state"] = transition(state, "awaiting_input")
    body = summary[:2000] or "I finished without changing anything."
    if out.status == "completed":
        body += "\n\nI made no changes. Reply here to tell me how to proceed."
    return Decision(fields=fields, outbox=(activity("elicitation", body), plan(rt, "awaiting_input")),
                    events=(Event("info", "run", f"{label} run needs input"),))


# ---- GitHub: pull-request decisions. Pure: the issue row, the stored snapshot and a fresh observation in;
# a Decision (state, pending reactive run, Linear messages, new snapshot) out.

PASSING = frozenset({"SUCCESS", "NEUTRAL", "SKIPPED"})
TRUSTED_ASSOCIATIONS = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})


def ci_state(checks: Iterable[CheckObs]) -> tuple[str, tuple[CheckObs, ...]]:
    """(none | pending | failure | success, failing checks) over the required checks, or all when the
    branch has none required. Nothing is decided until every counted check has completed."""
    checks = tuple(checks)
    relevant = tuple(c for c in checks if c.required) or checks
    if not relevant:
        return "none", ()
    if any(c.status != "COMPLETED" for c in relevant):
        return "pending", ()
    failing = tuple(c for c in relevant if (c.conclusion or "") not in PASSING)
    return ("failure" if failing else "success"), failing


def reviewer_trusted(login: str, association: str, trusted_reviewers: tuple[str, ...]) -> bool:
    if trusted_reviewers:
        return login.lower() in trusted_reviewers
    return association in TRUSTED_ASSOCIATIONS


@dataclass(frozen=True)
class PullRequestDecision:
    decision: Decision
    snapshot: dict
    failing: tuple[CheckObs, ...] = ()       # checks whose logs the ci_repair prompt needs
    merge_when_ready: bool = False           # ask GitHub to merge, pinned to the observed head
    cleanup: bool = False
    rereview: tuple[str, ...] = ()           # reviewers (node ids) to ask for a new review
    rerun: tuple[int, ...] = ()              # failed Actions jobs to rerun (REST)
    flaky: tuple[str, ...] = ()              # checks that failed and passed when rerun


@dataclass(frozen=True)
class Approval:
    """Whether the head of a pull request is approved, by PatchRelay's rule: a trusted reviewer (the rule of
    review fixes) whose latest opinion is an approval of this head, or of an earlier head when every commit
    since is a base merge PatchRelay made without conflicts. GitHub's reviewDecision alone never counts."""
    approved: bool                      # the current head is approved
    stale: bool                         # approved earlier, but not this head: it needs a new review
    approvers: tuple[str, ...] = ()     # trusted reviewers whose latest opinion is an approval (of any head)
    approver_ids: tuple[str, ...] = ()
    blocked_by: tuple[str, ...] = ()    # trusted reviewers whose latest opinion requests changes


def carries_over(approved: str | None, head: str, clean_merges: Mapping[str, str]) -> bool:
    """Whether an approval of `approved` holds for `head`: the same commit, or reached from `head` through
    clean base merges PatchRelay pushed (each maps its merge commit to the head it merged into)."""
    seen: set[str] = set()
    h = head
    while h != approved and h in clean_merges and h not in seen:
        seen.add(h)
        h = clean_merges[h]
    return approved is not None and h == approved


def pinned_approval(obs: PullRequestObs, trusted_reviewers: tuple[str, ...],
                    clean_merges: Mapping[str, str]) -> Approval:
    latest: dict[str, ReviewObs] = {}
    for r in sorted(obs.reviews, key=lambda r: r.submitted_at):
        if r.state in ("APPROVED", "CHANGES_REQUESTED", "DISMISSED") and \
                reviewer_trusted(r.author, r.association, trusted_reviewers):
            latest[r.author] = r         # a reviewer's newest opinion is theirs (a dismissal cancels it)
    approvals = [r for r in latest.values() if r.state == "APPROVED"]
    holding = [r for r in approvals if carries_over(r.commit, obs.head_sha, clean_merges)]
    return Approval(approved=bool(holding), stale=bool(approvals) and not holding,
                    approvers=tuple(sorted(r.author for r in approvals)),
                    approver_ids=tuple(sorted({r.author_id for r in approvals if r.author_id})),
                    blocked_by=tuple(sorted(a for a, r in latest.items() if r.state == "CHANGES_REQUESTED")))


def pr_fields(obs: PullRequestObs, ci: str) -> dict:
    return {"pr_number": obs.number, "pr_url": obs.url, "pr_node_id": obs.node_id, "pr_head_sha": obs.head_sha,
            "pr_state": obs.state.lower(), "pr_review": obs.review_decision, "pr_ci": ci,
            "pr_queue": (obs.queue_state or "QUEUED") if obs.in_queue else None}


def decide_pr_opened(row: dict, pr: OpenedPr, review_state: str, adopted_from: str | None) -> Decision:
    """A PR opened by PatchRelay (or a person's PR for the issue branch, adopted): record it, tell Linear."""
    fields = {"pr_number": pr.number, "pr_url": pr.url, "pr_state": "open", "pr_node_id": pr.node_id,
              "pr_head_sha": pr.head_sha,
              "factory_state": transition(row["factory_state"], "pr_open")
              if row["factory_state"] == "ready_for_pr" else row["factory_state"]}
    said = f"Found pull request #{pr.number}, opened by {adopted_from}; I'll watch it: {pr.url}" if adopted_from \
        else f"Opened pull request #{pr.number}: {pr.url}"
    return Decision(fields=fields, outbox=(activity("response", said),
                                           Outbound("session_link", {"label": f"Pull request #{pr.number}",
                                                                     "url": pr.url}),
                                           Outbound("issue_state", {"name": review_state})),
                    events=(Event("info", "github", said),))


def opened_from(obs: PullRequestObs) -> OpenedPr:
    return OpenedPr(obs.number, obs.url, obs.node_id, obs.head_sha)


@dataclass
class PrMemory:
    """What PatchRelay has already answered on a pull request, kept in the issue's GitHub snapshot (its
    `acted` key), so that each cause starts at most one run however often it is observed."""
    removals: list[str] = field(default_factory=list)   # merge-queue removal events answered
    conflict_head: str | None = None        # the head whose merge conflict was answered
    ci_head: str | None = None              # the head whose CI failure was answered
    reviews: list[str] = field(default_factory=list)    # reviews answered or ignored (ids)
    comments_at: str | None = None          # the newest PR comment a review fix has seen
    merge_head: str | None = None           # the head GitHub was asked to merge
    stale_head: str | None = None           # the head whose stale approval was told (and re-requested)
    reruns: dict[str, int] = field(default_factory=dict)   # "head:check" -> reruns asked of its failed job
    rerun_jobs: list[int] = field(default_factory=list)    # failed jobs asked to rerun (while they still show)
    rerun_refused: str | None = None        # the head on which GitHub refused a rerun: repair instead
    flaky_said: list[str] = field(default_factory=list)    # "head:check" reruns that passed, told once

    @classmethod
    def load(cls, acted: Mapping[str, Any] | None) -> "PrMemory":
        a = acted or {}
        return cls(removals=list(a.get("removals") or []), conflict_head=a.get("conflict_head"),
                   ci_head=a.get("ci_head"), reviews=list(a.get("reviews") or []),
                   comments_at=a.get("comments_at"), merge_head=a.get("merge_head"),
                   stale_head=a.get("stale_head"), reruns=dict(a.get("reruns") or {}),
                   rerun_jobs=list(a.get("rerun_jobs") or []), rerun_refused=a.get("rerun_refused"),
                   flaky_said=list(a.get("flaky_said") or []))

    def dump(self) -> dict:
        """As stored: only what was set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [], {})}


@dataclass(frozen=True)
class PrView:
    """What every pull-request trigger reads: the issue row, the fresh observation and the rules."""
    row: dict
    obs: PullRequestObs
    gh: GitHubConfig
    trusted_reviewers: tuple[str, ...]
    now: dt.datetime
    ci: str                             # none | pending | failure | success (ci_state)
    failing: tuple[CheckObs, ...]
    approval: Approval


@dataclass(frozen=True)
class RepairRequest:
    """A reactive run a trigger asks for; the budget helper grants it or escalates."""
    run_type: str
    budget_key: str                     # repair budgets count per failure signature
    budget: int
    what: str                           # the cause, in words
    context: dict                       # the run's prompt context
    failing: tuple[CheckObs, ...] = ()


@dataclass(frozen=True)
class Reaction:
    """A trigger's answer: a decision, or a repair run to ask the budget for."""
    decision: Decision = field(default_factory=Decision)
    repair: RepairRequest | None = None
    merge_when_ready: bool = False
    rereview: tuple[str, ...] = ()
    rerun: tuple[int, ...] = ()         # failed Actions jobs to rerun before any repair


def _queue_removal(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """Removed from the merge queue (a removal not answered yet): repair."""
    removals = [r for r in v.obs.removals if r.id not in memory.removals]
    if not removals or v.obs.in_queue:
        return None
    memory.removals = memory.removals + [r.id for r in removals]
    reason = removals[-1].reason
    return Reaction(repair=RepairRequest("queue_repair", f"queue:{reason}", v.gh.queue_repair_budget,
                                         f"removed from the merge queue ({reason})", {"queue_reason": reason}))


def _merge_conflict(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """A conflict with the base branch, once per head: repair."""
    head = v.obs.head_sha
    if v.obs.mergeable != "CONFLICTING" or memory.conflict_head == head or v.obs.in_queue:
        return None
    memory.conflict_head = head
    return Reaction(repair=RepairRequest("queue_repair", "queue:conflict", v.gh.queue_repair_budget,
                                         "merge conflict with the base branch",
                                         {"queue_reason": "conflicts with the base branch"}))


def _in_merge_queue(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """In the merge queue: wait for it (nothing below applies to a queued PR)."""
    if not v.obs.in_queue:
        return None
    state = v.row["factory_state"]
    if state != "awaiting_queue" and may_transition(state, "awaiting_queue"):
        return Reaction(Decision(fields={"factory_state": transition(state, "awaiting_queue")}))
    return Reaction()


def _ci_failure(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """CI failed on this head (answered once per head): repair, unless the same checks fail on the base."""
    head, n = v.obs.head_sha, v.obs.number
    if v.ci != "failure" or memory.ci_head == head:
        return None
    names = sorted({c.name for c in v.failing})
    base_ci, base_failing = ci_state(v.obs.base_checks)
    if base_ci == "failure" and set(names) <= {c.name for c in base_failing}:
        memory.ci_head = head
        return Reaction(Decision(outbox=(activity(
            "response", f"CI fails on pull request #{n} ({', '.join(names)}), but the same checks fail on "
                        f"`{v.obs.base_ref}` too. That is not this change: I am not repairing it and will wait "
                        "for the base branch to be fixed."),),
            events=(Event("warn", "github", f"base branch red ({', '.join(names)}): no repair"),)))
    # a flaky job often passes when simply rerun: rerun each failed Actions job (up to
    # github.rerun_failed_checks times on this head) before a repair run; any other failing check repairs at once
    if memory.rerun_refused != head and all(
            c.app == "github-actions" and c.job_id and memory.reruns.get(f"{head}:{c.name}", 0) <
            v.gh.rerun_failed_checks for c in v.failing):
        for c in v.failing:
            memory.reruns[f"{head}:{c.name}"] = memory.reruns.get(f"{head}:{c.name}", 0) + 1
            memory.rerun_jobs.append(int(c.job_id or 0))
        return Reaction(Decision(events=(Event("info", "github", f"CI failed ({', '.join(names)}) on {head[:8]}: "
                                                                 "rerunning before any repair"),)),
                        rerun=tuple(int(c.job_id or 0) for c in v.failing))
    memory.ci_head = head
    return Reaction(repair=RepairRequest(
        "ci_repair", "ci:" + ",".join(names), v.gh.ci_repair_budget, f"CI failed ({', '.join(names)})",
        {"checks": [{"name": c.name, "conclusion": c.conclusion, "url": c.url, "job_id": c.job_id, "app": c.app,
                     "title": c.title, "summary": c.summary, "text": c.text} for c in v.failing]},
        failing=v.failing))


def _review(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """Changes requested by a trusted reviewer (others are logged and ignored): once the reviewer has been
    quiet for github.review_quiet_seconds, one review fix with every trusted text."""
    obs, trusted_reviewers = v.obs, v.trusted_reviewers
    seen = set(memory.reviews)
    new = [r for r in obs.reviews if r.id not in seen and r.state == "CHANGES_REQUESTED"]
    untrusted = [r for r in new if not reviewer_trusted(r.author, r.association, trusted_reviewers)]
    trusted = [r for r in new if r not in untrusted]
    if untrusted:
        memory.reviews = sorted(seen | {r.id for r in untrusted})
        seen = set(memory.reviews)
        events.extend(Event("warn", "trust", f"ignored review by {r.author} ({r.association or 'no association'}): "
                                             "not a trusted reviewer") for r in untrusted)
    if not trusted:
        return None
    newest = max(parse_iso(r.submitted_at) or v.now for r in trusted)
    if (v.now - newest).total_seconds() < v.gh.review_quiet_seconds:
        return Reaction()          # a review being written lands as one run
    memory.reviews = sorted(seen | {r.id for r in trusted})
    since = memory.comments_at or ""
    comments = [{"author": c.author, "body": c.body} for c in obs.comments
                if c.created_at > since and reviewer_trusted(c.author, c.association, trusted_reviewers)]
    memory.comments_at = max([c.created_at for c in obs.comments] + [since])
    threads = [{"path": t.path, "line": t.line, "author": t.author, "body": t.body} for t in obs.threads
               if reviewer_trusted(t.author, t.association, trusted_reviewers)]
    return Reaction(repair=RepairRequest(
        "review_fix", "review", v.gh.review_fix_budget,
        f"changes requested by {', '.join(sorted({r.author for r in trusted}))}",
        {"reviews": [{"author": r.author, "body": r.body, "commit": r.commit,
                      "comments": [{"path": c.path, "line": c.line, "body": c.body} for c in r.comments]}
                     for r in trusted],
         "threads": threads, "pr_comments": comments}))


def remembered(snapshot: dict, **changes: Any) -> dict:
    """A snapshot whose PR memory has `changes` (after GitHub refused what was decided: a rerun -> repair
    instead, `rerun_refused=head, rerun_jobs=[]`; a merge request -> ask again, `merge_head=None`)."""
    memory = dataclasses.replace(PrMemory.load(snapshot.get("acted")), **changes)
    return {**snapshot, "acted": memory.dump()}


PUSHED_WHAT = {"implementation": "new work", "ci_repair": "a CI fix", "review_fix": "review fixes",
               "queue_repair": "a merge of the base branch that needed the agent"}


def _stale_approval(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """A trusted approval of an earlier head that does not carry over: said once per head (and the approvers
    asked for a new review, unless github.rerequest_review is off); nothing merges until a new approval."""
    a, head, row = v.approval, v.obs.head_sha, v.row
    if not a.stale or a.blocked_by or memory.stale_head == head:
        return None
    memory.stale_head = head
    who = ", ".join(a.approvers)
    if head == row.get("pushed_sha"):
        said = f"I pushed {PUSHED_WHAT.get(row.get('pushed_run_type') or '', 'new commits')} after the approval " \
               f"by {who}; it needs a new review of `{head[:7]}` before it can merge."
    else:
        said = f"New commits arrived after the approval by {who}; `{head[:7]}` needs a new review before it " \
               "can merge."
    state = row["factory_state"]
    return Reaction(Decision(
        fields={"factory_state": transition(state, "pr_open")} if state in ("awaiting_queue", "ready_for_pr") else {},
        outbox=(activity("response", said),),
        events=(Event("info", "github", f"approval by {who} is for an earlier head: waiting for a review of "
                                        f"{head[:8]}"),)),
        rereview=a.approver_ids if v.gh.rerequest_review else ())


def _approval(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """Approved (PatchRelay's rule: Approval) and green: ready for the merge queue (and, with
    github.auto_merge, GitHub is asked once per head to merge it, pinned to that head)."""
    a = v.approval
    if not a.approved or a.blocked_by or v.ci not in ("success", "none") or \
            v.obs.review_decision in ("CHANGES_REQUESTED", "REVIEW_REQUIRED"):
        return None
    state, head, n = v.row["factory_state"], v.obs.head_sha, v.obs.number
    if state == "awaiting_queue" or not may_transition(state, "awaiting_queue"):
        return Reaction()
    ask = v.gh.auto_merge and memory.merge_head != head
    if ask:
        memory.merge_head = head
    return Reaction(Decision(fields={"factory_state": transition(state, "awaiting_queue")}, outbox=(activity(
        "response", f"Pull request #{n} is approved and green at {head[:8]}"
                    + ("; I asked GitHub to merge it when ready." if ask else "; it is ready to merge.")),),
        events=(Event("info", "github", f"pull request #{n} approved and green"),)), merge_when_ready=ask)


def _settled(v: PrView, memory: PrMemory, events: list[Event]) -> Reaction | None:
    """Nothing to act on: an issue waiting for the queue (or for its PR) is back to watching it."""
    state = v.row["factory_state"]
    if state in ("awaiting_queue", "ready_for_pr"):
        return Reaction(Decision(fields={"factory_state": transition(state, "pr_open")}))
    return Reaction()


# The order is the rule of which cause wins when several hold at once: the first trigger that answers decides.
PR_TRIGGERS: tuple[Callable[[PrView, PrMemory, list[Event]], Reaction | None], ...] = (
    _queue_removal, _merge_conflict, _in_merge_queue, _ci_failure, _review, _stale_approval, _approval, _settled)


def grant_repair(row: dict, req: RepairRequest, counts: dict[str, int], head: str, number: int,
                 now: dt.datetime) -> tuple[Decision, dict[str, int]]:
    """The budget helper: a repair run within its budget (counted per failure signature), else escalation.
    Returns the decision and the new counts."""
    state, used, label = row["factory_state"], counts.get(req.budget_key, 0), run_label(req.run_type)
    if used >= req.budget:
        return Decision(fields={"factory_state": transition(state, "escalated")}, outbox=(activity(
            "error", f"{req.what} on pull request #{number}, and {used} {label} run(s) did not fix it (budget "
                     f"{req.budget}). A person needs to look: fix it on `{row.get('branch')}` and push, or run "
                     f"`patchrelay retry {row['key']} --type {req.run_type}` to give me another try."),),
            events=(Event("warn", "github", f"{req.what}: {label} budget of {req.budget} used up; escalated"),)), counts
    context = {"trigger": req.what, "attempt": 1, "head": head, **req.context}
    return Decision(
        fields={"pending_run_type": req.run_type, "pending_context": json.dumps(context), "pending_since": iso(now),
                "not_before": None, "retries": 0,
                **({"factory_state": transition(state, "pr_open")} if state == "ready_for_pr" else {})},
        outbox=(activity("thought", f"{req.what} on pull request #{number}; starting a {label} run "
                                    f"({used + 1} of {req.budget})."),),
        events=(Event("info", "github", f"{req.what}: {label} queued ({used + 1} of {req.budget})"),)), \
        {**counts, req.budget_key: used + 1}


def decide_pull_request(row: dict, snap: dict, obs: PullRequestObs, gh: GitHubConfig,
                        trusted_reviewers: tuple[str, ...], now: dt.datetime) -> PullRequestDecision:
    """What a fresh observation of the issue's PR means. A merge or a close ends the work; otherwise
    reactive runs are decided only while the issue is idle (no active or pending run; what changed
    meanwhile is decided from the snapshot after it), by the first of PR_TRIGGERS that answers."""
    state, head, n = row["factory_state"], obs.head_sha, obs.number
    ci, failing = ci_state(obs.checks)
    fields = pr_fields(obs, ci)
    active = bool(row.get("active_run_id"))
    if obs.merged or obs.state == "MERGED":
        fields.update(factory_state=transition(state, "done"), **NO_PENDING_RUN)
        inbox = (stop_message(row, f"pull request #{n} was merged"),) if active else ()
        return PullRequestDecision(Decision(
            fields=fields, inbox=inbox,
            outbox=(activity("response", f"Pull request #{n} was merged. Done."), plan("implementation", "completed"),
                    Outbound("issue_state", {"type": "completed"})),
            events=(Event("info", "github", f"pull request #{n} merged: done"),)),
            {**snap, "head": head, "state": "MERGED"}, cleanup=True)
    if obs.state == "CLOSED":
        fields.update(factory_state=transition(state, "failed"), **NO_PENDING_RUN)
        inbox = (stop_message(row, f"pull request #{n} was closed"),) if active else ()
        return PullRequestDecision(Decision(
            fields=fields, inbox=inbox,
            outbox=(activity("error", f"Pull request #{n} was closed without merging. I stopped working on it; the "
                                      f"worktree and branch `{row.get('branch')}` are kept. Reopen the pull request "
                                      "and run `patchrelay retry`, or delegate the issue again."),),
            events=(Event("warn", "github", f"pull request #{n} closed without merging: failed"),)),
            {**snap, "head": head, "state": "CLOSED"})
    if active or row.get("pending_run_type"):
        return PullRequestDecision(Decision(fields=fields), snap)   # decided from the fresh snapshot after the run

    memory = PrMemory.load(snap.get("acted"))
    shown_jobs = {c.job_id for c in obs.checks if c.job_id}
    memory.rerun_jobs = [j for j in memory.rerun_jobs if j in shown_jobs]    # a rerun replaces its job
    if ci == "failure" and any(c.job_id in memory.rerun_jobs for c in failing):
        ci, failing = "pending", ()                                          # the rerun has not shown yet
        fields["pr_ci"] = ci
    flaky = [c.name for c in obs.checks if f"{head}:{c.name}" in memory.reruns and f"{head}:{c.name}" not in
             memory.flaky_said and c.status == "COMPLETED" and (c.conclusion or "") in PASSING]
    memory.flaky_said += [f"{head}:{name}" for name in flaky]
    counts: dict[str, int] = json.loads(row.get("repair_counts") or "{}")
    events: list[Event] = []
    if snap.get("head") and snap["head"] != head and head != row.get("pushed_sha"):
        if counts:
            events.append(Event("info", "github", f"head {head[:8]} was pushed by someone else: repair budgets reset"))
        counts = {}
    if ci == "success":
        counts = {k: v for k, v in counts.items() if not k.startswith("ci:")}
    approval = pinned_approval(obs, trusted_reviewers, json.loads(row.get("clean_merges") or "{}"))
    fields["pr_waiting_review"] = head if approval.stale and not approval.blocked_by else None
    view = PrView(row, obs, gh, trusted_reviewers, now, ci, failing, approval)
    reaction = Reaction()
    for trigger in PR_TRIGGERS:
        answer = trigger(view, memory, events)
        if answer is not None:
            reaction = answer
            break
    decision = reaction.decision
    if reaction.repair is not None:
        decision, counts = grant_repair(row, reaction.repair, counts, head, n, now)
    new_snap = {"head": head, "state": obs.state, "ci": ci, "in_queue": obs.in_queue,
                "checks": {c.name: c.conclusion or c.status for c in obs.checks}, "acted": memory.dump()}
    told = Decision(outbox=tuple(activity("response", f"CI check `{name}` failed on {head[:8]} and passed when "
                                                      "rerun: a flaky check, no repair needed.") for name in flaky),
                    events=tuple(Event("info", "github", f"flaky check {name} on {head[:8]}: passed when rerun")
                                 for name in flaky))
    return PullRequestDecision(
        merge_decisions(Decision(fields={**fields, "repair_counts": json.dumps(counts, sort_keys=True)},
                                 events=tuple(events)), told, decision),
        new_snap, failing=reaction.repair.failing if reaction.repair else (),
        merge_when_ready=reaction.merge_when_ready, rereview=reaction.rereview, rerun=reaction.rerun,
        flaky=tuple(flaky))


# ---- operator decisions: release, retry, and the next action `why` names

def decide_release(row: dict, reason: str, who: str) -> Decision:
    """`patchrelay release`: PatchRelay lets the issue go (closed, pending run dropped); its session is told."""
    if row["active_run_id"]:
        raise UsageError(f"issue {row['key']}: run {row['active_run_id']} is active; `patchrelay stop` it first")
    state = row["factory_state"]
    fields = {**NO_PENDING_RUN, "factory_state": state if state in CLOSED_STATES else transition(state, "canceled")}
    return Decision(fields=fields, outbox=(activity(
        "response", f"An operator released {row['key']} from PatchRelay: {reason}. I will not work on it "
                    "unless it is delegated to me again."),),
        events=(Event("info", "release", f"released by {who}: {reason}"),))


def decide_retry(row: dict, run_type: str, reason: str, now: str) -> Decision:
    """`patchrelay retry`: a new run of `run_type` queued, its repair budgets re-armed. A usage error when the
    issue cannot take one (a run is active, no pull request for a repair, a state that allows none)."""
    if row["active_run_id"]:
        raise UsageError(f"issue {row['key']}: run {row['active_run_id']} is active; `patchrelay stop` it first")
    context = {"trigger": "patchrelay retry" + (f": {reason}" if reason else ""), "attempt": 1, "reason": reason}
    if run_type == "implementation":
        target = "delegated"
    elif not row["pr_number"]:
        raise UsageError(f"issue {row['key']}: a {run_label(run_type)} run needs a pull request, and "
                         f"{row['key']} has none; use --type implementation")
    else:
        target = "pr_open"
    try:
        transition(target, CLAIM_STATE[run_type])
        new_state = transition(row["factory_state"], target)
    except IllegalTransition:
        raise UsageError(f"issue {row['key']}: cannot queue a {run_label(run_type)} run from state "
                         f"{row['factory_state']}") from None
    fields = {"pending_run_type": run_type, "pending_context": json.dumps(context), "pending_since": now,
              "not_before": None, "retries": 0, "factory_state": new_state, "repair_counts": "{}"}
    return Decision(fields=fields, events=(
        Event("info", "retry", f"{run_label(run_type)} run queued by operator" + (f": {reason}" if reason else "")),))


@dataclass(frozen=True)
class Gates:
    """What stands between an issue and its next step (read by `why`)."""
    active: dict | None                 # the active run row
    worker_alive: bool
    paused_runner: bool
    paused_issue: bool
    holders: tuple[str, ...]            # issues whose runs hold the concurrency slots
    max_runs: int
    token_hold: str | None
    provider_hold: str | None = None    # Codex's provider refused: every launch waits until then


def next_action(row: dict, g: Gates, now: dt.datetime) -> str:
    """The one next step for an issue, and who takes it, in words."""
    st, pending = row["factory_state"], row["pending_run_type"]
    if g.active:
        return f"wait: {run_label(g.active['run_type'])} run {g.active['id']} is {g.active['status']}" + \
            ("" if g.worker_alive else "; its worker is gone, the next tick resolves it")
    if st in CLOSED_STATES:
        return f"nothing: the issue is {st}; reopen or delegate it again in Linear to continue"
    if pending:
        not_before = parse_iso(row["not_before"])
        if g.paused_runner or g.paused_issue:
            return "a person: `patchrelay resume`" + ("" if g.paused_runner else f" {row['key']}")
        if g.provider_hold:
            return f"wait: {g.provider_hold}"
        if not_before and not_before > now:
            return f"launch the {run_label(pending)} run after {row['not_before']} (retry backoff)"
        if len(g.holders) >= g.max_runs:
            return f"launch the {run_label(pending)} run when a slot frees ({', '.join(g.holders)})"
        if g.token_hold:
            return f"wait: {g.token_hold}"
        return f"launch the {run_label(pending)} run at the next tick"
    if st == "escalated":
        return f"a person: fix the pull request, or `patchrelay retry {row['key']} --type ci_repair` (or " \
               "review_fix, queue_repair) to re-arm the budget"
    if st == "awaiting_input":
        return "a person: reply in Linear (or `patchrelay retry`) — the agent is waiting"
    if st == "failed":
        return f"a person: see `patchrelay show {row['key']}`, then `patchrelay retry {row['key']}`"
    if st == "ready_for_pr":
        return "open the pull request at the next tick"
    if st in ("pr_open", "awaiting_queue") and row.get("pr_waiting_review"):
        return f"a person: review {row['pr_waiting_review'][:8]} on pull request #{row['pr_number']} (waiting for " \
               "a review of this head: the approval was for an earlier one)"
    if st in ("pr_open", "awaiting_queue"):
        return "watch the pull request: CI, reviews and the merge queue decide the next run"
    return "wait for the next tick"



# ---- prompts and reports

DEFAULT_WORKFLOW = {
    "workspace-write": (
        "Implement the issue in this working tree. Keep the change focused, follow the repository's "
        "conventions, and run the relevant tests. Do not run `git commit` or `git push`: PatchRelay commits "
        "your changes and pushes the branch when you finish. End with a short summary of what you changed and "
        "how you verified it. If the request is unclear or needs a human decision, change nothing and ask your "
        "question in your final message."),
    "danger-full-access": (
        "Implement the issue in this working tree. Keep the change focused, follow the repository's "
        "conventions, run the relevant tests and commit your work with a clear message; PatchRelay pushes the "
        "branch when you finish (and commits anything you left uncommitted). End with a short summary. If the "
        "request is unclear or needs a human decision, change nothing and ask your question in your final message."),
}


def build_prompt(issue: dict, run: dict, project: ProjectConfig, sandbox: str, workflow: str | None,
                 follow_ups: list[dict], handoff: str | None = None) -> str:
    """The turn input: the issue (key, title, description), the request that started the run, follow-up
    messages, the branch (always known: it is decided at the claim), the PR, the run's own context, and how to
    work (the repository's workflow file, else a default for the sandbox)."""
    context = json.loads(run.get("context") or "{}")
    lines = [f"Linear issue {issue['key']}: {issue['title']}"]
    if issue.get("url"):
        lines.append(f"URL: {issue['url']}")
    lines += [f"Repository: {project.github_repo} (base branch `{project.base_branch}`)",
              f"Branch: `{issue['branch']}` (checked out in your working directory)",
              f"Run type: {run_label(run['run_type'])}"]
    if issue.get("pr_number"):
        lines.append(f"Pull request: #{issue['pr_number']} {issue.get('pr_url') or ''}".rstrip())
    lines += ["", "## Issue description", "", (issue.get("description") or "").strip() or "(no description)"]
    if context.get("prompt"):
        lines += ["", "## Request", "", str(context["prompt"]).strip()]
    if handoff:
        why = f"host {context['moved_from']} that held the earlier thread and worktree went silent" \
            if context.get("moved_from") else "the earlier one outgrew the model's context window"
        lines += ["", f"## Work so far (a fresh thread: {why})", "", handoff.strip()]
    lines += reactive_context(run["run_type"], context, project)
    if follow_ups:
        lines += ["", "## Follow-up messages", ""]
        lines += [f"- {m.get('author') or 'someone'}: {m['body'].strip()}" for m in follow_ups]
    lines += ["", "## How to work", "", (workflow or DEFAULT_WORKFLOW.get(sandbox)
                                         or DEFAULT_WORKFLOW["workspace-write"]).strip()]
    return "\n".join(lines) + "\n"


REACTIVE_WORKFLOW = {
    "ci_repair": "Find the cause of each failing check below, fix the code (not the test's expectations, unless "
                 "the test is wrong), and run the relevant tests. If you conclude the failure is unrelated to this "
                 "change, change nothing and explain why in your final message.",
    "review_fix": "Address every point of the review below, each inline comment at its path and line, and run the "
                  "relevant tests. If you disagree with a point, leave it and explain why in your final message.",
    "queue_repair": "Bring the branch up to date with the base branch. PatchRelay has already merged the base into "
                    "your working tree; where it stopped on conflicts, the files contain conflict markers "
                    "(<<<<<<<, =======, >>>>>>>): resolve every one of them keeping the intent of both sides, and "
                    "run the relevant tests. PatchRelay refuses to commit while any marker remains.",
}


def reactive_context(run_type: str, context: dict, project: ProjectConfig) -> list[str]:
    """The run-specific part of a reactive run's prompt: failing checks with their log tails, the review
    with its inline comments, or the merge-queue removal."""
    if run_type == "ci_repair":
        out = ["", "## Failing checks", ""]
        for c in context.get("checks") or []:
            out.append(f"### {c.get('name')}: {str(c.get('conclusion') or 'failed').lower()}"
                       + (f" ({c['url']})" if c.get("url") else ""))
            for k in ("title", "summary", "text"):
                if c.get(k):
                    out.append(one_line(c[k], 600))
            if c.get("log"):
                out += ["", "Last lines of its log:", "```", c["log"], "```"]
            out.append("")
        return out + ["## What to do", "", REACTIVE_WORKFLOW["ci_repair"]]
    if run_type == "review_fix":
        out = ["", "## Review", ""]
        for r in context.get("reviews") or []:
            out.append(f"{r.get('author')} requested changes" + (f" on {str(r['commit'])[:8]}" if r.get("commit") else "")
                       + ":")
            if (r.get("body") or "").strip():
                out += ["", r["body"].strip(), ""]
            for c in r.get("comments") or []:
                out.append(f"- `{c.get('path')}` line {c.get('line')}: {c.get('body', '').strip()}")
        if context.get("threads"):
            out += ["", "Unresolved review threads:"]
            out += [f"- `{t.get('path')}` line {t.get('line')} ({t.get('author')}): {t.get('body', '').strip()}"
                    for t in context["threads"]]
        if context.get("pr_comments"):
            out += ["", "Comments on the pull request:"]
            out += [f"- {c.get('author')}: {c.get('body', '').strip()}" for c in context["pr_comments"]]
        return out + ["", "## What to do", "", REACTIVE_WORKFLOW["review_fix"]]
    if run_type == "queue_repair":
        out = ["", "## Merge queue", "", f"The pull request left the merge queue without merging: "
                                         f"{context.get('queue_reason') or 'removed'}."]
        if context.get("merge"):
            out += ["", context["merge"]]
        return out + ["", "## What to do", "", REACTIVE_WORKFLOW["queue_repair"]]
    return []


def handoff_text(summaries: list[str], diffstat: str) -> str:
    """A compact hand-off for a fresh thread: what the earlier runs said, and what the branch changes."""
    parts = [f"- {one_line(x, 600)}" for x in summaries if x.strip()][-5:] or ["- (no summaries)"]
    return "Earlier runs said:\n" + "\n".join(parts) + "\n\nThe branch changes (against the base):\n" + \
        (tail(diffstat, 40, 3000) or "(nothing yet)")


def follow_up_text(msgs: list[dict]) -> str:
    parts = ["New messages arrived while you were working. Address them, then summarise again:"]
    parts += [f"- {m.get('author') or 'someone'}: {m['body'].strip()}" for m in msgs]
    return "\n".join(parts)


def steer_text(msg: dict) -> str:
    return f"New message from {msg.get('author') or 'the requester'} while you are working:\n\n{msg['body'].strip()}"


_TOOL_ITEMS = ("mcpToolCall", "dynamicToolCall", "collabAgentToolCall", "webSearch", "imageView")


def build_report(items: list[dict], changed: list[str], tokens: dict | None, duration: float | None,
                 turn_ids: list[str]) -> dict:
    """A run's report, from the run's own turns only (a reactive run shares its thread with earlier runs)."""
    messages, commands, files, tools = [], [], [], []
    for it in items:
        t = it.get("type")
        if t in _TOOL_ITEMS:
            name = it.get("tool") or it.get("name") or it.get("query") or it.get("path") or ""
            tools.append(f"{t}:{'/'.join(str(x) for x in (it.get('server'), name) if x)}")
        elif t == "agentMessage" and it.get("text"):
            messages.append(it["text"])
        elif t == "commandExecution":
            commands.append({"command": it.get("command"), "exit_code": it.get("exitCode"),
                             "status": it.get("status"), "duration_ms": it.get("durationMs")})
        elif t == "fileChange":
            for ch in it.get("changes") or []:
                if ch.get("path") and ch["path"] not in files:
                    files.append(ch["path"])
    for f in changed:
        if f not in files:
            files.append(f)
    return {"turns": turn_ids, "messages": messages, "commands": commands, "changed_files": files,
            "tool_calls": tools, "tokens": tokens or {}, "duration_seconds": round(duration, 3) if duration is not None else None}


# ============================================================== 10. apply
# Decisions made durable and told: the API clients a pass needs (tokens from the
# environment, budgets recorded in the store), apply_decision (one factory
# Decision written in the caller's transaction) and the publisher that sends
# the Linear outbox. Used by the worker and the tick alike.


class LinearTokens:
    """Where the Linear token comes from: linear.token_env's variable when set (it wins), else the app
    connection stored by `patchrelay linear connect`, decrypted with linear.token_key_env's key. A stored
    token is refreshed before it expires and when Linear refuses it, by one process at a time (a lease in
    the store that every tick, worker and command takes); the new pair is stored before it is used."""

    LEASE = "linear-token-refresh"

    def __init__(self, cfg: Config, store: Store | None):
        self.cfg, self.store = cfg, store

    def current(self) -> str:
        """The token to use now (refreshed first when it is due). ConfigError when there is none."""
        token = token_from_env(self.cfg.linear.token_env)
        if token:
            return token
        return self._stored(refused=None)

    def refused(self, token: str) -> str | None:
        """Linear refused `token`: a fresh one from a refresh, or None (an environment token is not ours to
        refresh)."""
        if token_from_env(self.cfg.linear.token_env) or self.store is None:
            return None
        return self._stored(refused=token)

    # ---- the stored connection
    def _missing(self) -> ConfigError:
        return ConfigError(f"linear.token_env: environment variable {self.cfg.linear.token_env} is not set and no "
                           "Linear app is connected (`patchrelay linear connect`)")

    def _conn(self) -> dict:
        conn = self.store.oauth_get() if self.store is not None else None
        if conn is None:
            raise self._missing()
        return conn

    def _decrypt(self, cipher: Any, blob: str | None, what: str) -> str:
        from cryptography.fernet import InvalidToken
        try:
            value = cipher.decrypt((blob or "").encode()).decode()
        except (InvalidToken, ValueError):
            raise ConfigError(f"linear.token_key_env: the stored Linear {what} cannot be decrypted with "
                              f"{self.cfg.linear.token_key_env} (another key?): set the key it was stored with, or "
                              "run `patchrelay linear connect` again") from None
        KNOWN_SECRETS.add(value)
        return value

    def _stored(self, refused: str | None) -> str:
        conn = self._conn()
        cipher = token_cipher(self.cfg)
        token = self._decrypt(cipher, conn["access_token"], "access token")
        now = time.time()
        if token != refused and not token_due(conn, now):
            return token
        if conn["refresh_error"] or not conn["refresh_token"]:
            if token != refused and not token_expired(conn, now):
                return token                # still good for a while; status and doctor say what to do
            raise LinearOAuthRefused(f"{conn['refresh_error'] or 'Linear: the token expired and there is no refresh token'}"
                                     " — run `patchrelay linear connect`", code="invalid_grant")
        return self._refresh(cipher, conn, token, refused)

    def _refresh(self, cipher: Any, conn: dict, token: str, refused: str | None) -> str:
        store = self.store
        assert store is not None
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        hold = 2 * self.cfg.linear.timeout + 10         # longer than one token request can take
        deadline = time.time() + hold
        while not store.lease_take(self.LEASE, holder, hold):
            time.sleep(0.05)
            now_conn = self._conn()
            if now_conn["generation"] != conn["generation"]:        # another process refreshed (or reconnected)
                return self._decrypt(cipher, now_conn["access_token"], "access token")
            if time.time() > deadline:
                if token != refused and not token_expired(conn, time.time()):
                    return token
                raise LinearError(f"Linear token refresh: another process has held the refresh for {hold:.0f} s",
                                  transient=True)
        try:
            now_conn = self._conn()
            if now_conn["generation"] != conn["generation"]:        # refreshed just before we took the lease
                return self._decrypt(cipher, now_conn["access_token"], "access token")
            if now_conn["refresh_error"]:
                raise LinearOAuthRefused(f"{now_conn['refresh_error']} — run `patchrelay linear connect`",
                                         code="invalid_grant")
            oauth = oauth_client(self.cfg)
            try:
                grant = oauth.refresh(self._decrypt(cipher, conn["refresh_token"], "refresh token"))
            except LinearOAuthRefused as e:
                msg = redact(str(e))
                with store.tx():
                    store.oauth_refused(conn["generation"], msg)
                    store.add_event(None, "linear", f"{msg}: the Linear writes wait in the outbox until "
                                    "`patchrelay linear connect`", level="error")
                raise LinearOAuthRefused(f"{msg} — run `patchrelay linear connect`", code=e.code) from None
            store.oauth_refreshed(conn["generation"], self._encrypted(cipher, grant, conn))
            log.info("Linear token refreshed (expires in %s)", f"{grant.expires_in:.0f} s" if grant.expires_in else "?")
            return grant.access_token
        finally:
            store.lease_release(self.LEASE, holder)

    @staticmethod
    def _encrypted(cipher: Any, grant: OAuthGrant, conn: Mapping[str, Any] | None = None) -> dict:
        old_refresh = conn.get("refresh_token") if conn else None
        return {"access_token": cipher.encrypt(grant.access_token.encode()).decode(),
                "refresh_token": cipher.encrypt(grant.refresh_token.encode()).decode() if grant.refresh_token
                else old_refresh,
                "expires_at": time.time() + grant.expires_in if grant.expires_in else None,
                "lifetime": grant.expires_in, "scope": grant.scope}


def oauth_client(cfg: Config) -> LinearOAuth:
    """Linear's OAuth endpoints with the app's client id and secret (from linear.oauth's variables)."""
    lc = cfg.linear
    cid, secret = token_from_env(lc.client_id_env), token_from_env(lc.client_secret_env)
    for name, value, key in ((lc.client_id_env, cid, "client_id_env"), (lc.client_secret_env, secret,
                                                                        "client_secret_env")):
        if not value:
            raise ConfigError(f"linear.oauth.{key}: {name} is not set (the Linear OAuth application's "
                              f"{key.replace('_env', '').replace('_', ' ')}; see README, Linear setup)")
    assert cid and secret
    return LinearOAuth(lc, cid, secret)


def linear_client(cfg: Config, store: Store | None, record: bool = True) -> LinearClient:
    """A Linear client with the current token (see LinearTokens). `record`: its rate-limit budget is written
    to the store (not by a dry run)."""
    tokens = LinearTokens(cfg, store)
    token = tokens.current()

    def on_budget(fields: dict) -> None:
        if store is not None and record:
            store.record_budget("linear", fields)       # one upsert: atomic by itself
    return LinearClient(cfg.linear, token, on_budget, reauth=tokens.refused)


def github_client(cfg: Config, store: Store | None) -> GitHubClient:
    token = github_token(cfg)
    if not token:
        raise ConfigError(f"github.token_env: environment variable {cfg.github.token_env} is not set "
                          "(and `gh auth token` gave nothing)")

    def on_budget(fields: dict) -> None:
        if store is not None:
            store.record_budget("github", fields)       # one upsert: atomic by itself
    return GitHubClient(cfg.github, token, on_budget)


def linear_token_status(cfg: Config, store: Store | None) -> dict:
    """Where the Linear token comes from, and for a connected app: its user, expiry, refreshes and refusal."""
    conn = store.oauth_get() if store is not None else None
    source = "environment" if token_from_env(cfg.linear.token_env) else "connected" if conn else None
    out: dict[str, Any] = {"source": source}
    if conn:
        out.update(app_user=conn["app_user"], connected_at=conn["connected_at"],
                   expires_at=iso(dt.datetime.fromtimestamp(conn["expires_at"], dt.timezone.utc))
                   if conn["expires_at"] is not None else None,
                   refreshed_at=conn["refreshed_at"], refreshes=conn["refreshes"], refresh_error=conn["refresh_error"])
    return out


def apply_decision(store: Store, row: dict | None, d: Decision, run_id: int | None = None,
                   key: str | None = None) -> int | None:
    """Write one decision: issue fields, inbox, outbox and events, inside the caller's transaction.
    A decision about an issue PatchRelay does not track may still answer in its agent session."""
    issue_id = row["id"] if row else None
    if row is None and d.track and d.fields.get("linear_id"):
        issue_id = store.insert_issue(d.fields)
    elif row is not None:
        store.update_issue(row["id"], d.fields)
    if issue_id is not None:
        for m in d.inbox:
            store.add_inbox(issue_id, m.kind, m.body, m.author, m.source, m.source_id, m.run_id)
    session = d.fields.get("agent_session_id") or (row or {}).get("agent_session_id")
    for ob in d.outbox:
        if ob.kind in ("session_link", "session_page"):
            if session:
                store.add_outbox(issue_id, ob.kind, session, ob.payload)
        elif ob.kind in ("activity", "plan"):
            if session:
                store.add_outbox(issue_id, ob.kind, session, ob.payload)
            elif issue_id is not None and ob.kind == "activity" and ob.payload["content"]["type"] != "thought":
                cid = store.add_outbox(issue_id, "comment", None, {"body": ob.payload["content"]["body"]})
                # our own comment (user mode posts as the key's owner): intake must never read it as input
                store.mark_seen(f"comment:{store.outbox_client_id(cid)}")
        elif issue_id is not None:
            store.add_outbox(issue_id, ob.kind, None, ob.payload)
    key = (row or d.fields).get("key") or key
    for level, kind, message in d.events:
        store.add_event(issue_id, kind, message, level, run_id, issue_key=key)
        getattr(log, "warning" if level == "warn" else level, log.info)("%s%s", f"{key}: " if key else "", message)
    return issue_id


def codex_hold(store: Store | None) -> dict | None:
    """The runner-wide hold after Codex's provider refused (capacity or account), while it lasts."""
    return active_hold(json.loads(store.meta_get("runner.codex_hold") or "null"), utcnow()) if store else None


def runner_paused(cfg: Config, store: Store | None) -> dict | None:
    """The global pause: `patchrelay pause` (stored, with who/when/why) or runner.paused in the config
    (the boot-time default, until `patchrelay resume` overrides it; alone when there is no database yet)."""
    return paused_setting(cfg, store.meta_get("runner.paused") if store else None)


def paused_setting(cfg: Config, stored: str | None) -> dict | None:
    """The global pause from its stored value (meta `runner.paused`; None when never set) and the config."""
    if stored is not None:
        return json.loads(stored) or None
    return {"by": "config", "reason": "runner.paused: true", "at": None} if cfg.runner.paused else None


# ---- metrics and the status page: what every tick reports (and `metrics`, `status --html` print)

def _prom_escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Prom:
    """Prometheus text exposition: HELP and TYPE once per metric, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float | int | None]]) -> None:
        self.lines += [f"# HELP patchrelay_{name} {help_text}", f"# TYPE patchrelay_{name} {kind}"]
        for labels, value in samples:
            if value is None:
                continue
            lab = ",".join(f'{k}="{_prom_escape(v)}"' for k, v in labels.items())
            num = repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))
            self.lines.append(f"patchrelay_{name}{{{lab}}} {num}" if lab else f"patchrelay_{name} {num}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _hour_requests(ticks: list[dict]) -> dict[str, int]:
    out = {"linear": 0, "github": 0}
    for t in ticks:
        cost = (json.loads(t["summary"] or "{}").get("api_cost") or {})
        for api in out:
            v = cost.get(f"{api}_requests")
            out[api] += int(v) if isinstance(v, (int, float)) else 0
    return out


def _run_metrics(m: _Prom, snap: dict) -> None:
    runs = snap["runs"]
    started: dict[str, int] = {t: 0 for t in RUN_TYPES}
    finished: dict[tuple[str, str], int] = {}
    active: dict[str, int] = {t: 0 for t in RUN_TYPES}
    for r in runs:
        started[r["run_type"]] = started.get(r["run_type"], 0) + r["n"]
        if r["status"] in ("claimed", "running"):
            active[r["run_type"]] = active.get(r["run_type"], 0) + r["n"]
        else:
            finished[(r["run_type"], r["status"])] = finished.get((r["run_type"], r["status"]), 0) + r["n"]
    m.metric("runs_started_total", "counter", "Runs claimed, by run type.",
             (({"run_type": t}, n) for t, n in sorted(started.items())))
    m.metric("runs_finished_total", "counter", "Runs that ended, by run type and outcome.",
             (({"run_type": t, "outcome": o}, n) for (t, o), n in sorted(finished.items())))
    m.metric("runs_active", "gauge", "Runs claimed or running now, by run type.",
             (({"run_type": t}, n) for t, n in sorted(active.items())))
    pending = {t: 0 for t in RUN_TYPES}
    for p in snap["pending"]:
        pending[p["run_type"]] = pending.get(p["run_type"], 0) + p["n"]
    m.metric("runs_pending", "gauge", "Runs queued to launch, by run type.",
             (({"run_type": t}, n) for t, n in sorted(pending.items())))


def _held_metrics(m: _Prom, cfg: Config, snap: dict, now: dt.datetime) -> None:
    """Pending runs that wait, by the first reason that holds them (a run is counted once)."""
    paused = paused_setting(cfg, snap["meta"].get("runner.paused"))
    hold = active_hold(json.loads(snap["meta"].get("runner.codex_hold") or "null"), now)
    cap = cfg.codex.max_tokens_per_day
    free = max(0, cfg.runner.max_concurrent_runs - sum(r["n"] for r in snap["runs"] if r["status"] in
                                                        ("claimed", "running")))
    held = {"paused": 0, "issue_paused": 0, "capacity": 0, "token_cap": 0, "backoff": 0, "concurrency": 0}
    ready = 0
    for p in snap["pending"]:
        reason = "paused" if paused else "issue_paused" if p["paused"] else "capacity" if hold else \
            "token_cap" if cap is not None and snap["tokens_today"] >= cap else "backoff" if p["waiting"] else None
        if reason:
            held[reason] += p["n"]
        else:
            ready += p["n"]
    held["concurrency"] = max(0, ready - free)
    m.metric("runs_held", "gauge", "Pending runs that wait, by reason (paused, issue_paused, capacity: Codex's "
             "provider refused, token_cap, backoff, concurrency).", (({"reason": k}, v) for k, v in held.items()))


def metrics_text(cfg: Config, snap: dict, now: dt.datetime, linear_token: Mapping[str, Any] | None = None) -> str:
    """The Prometheus text of one store snapshot (Store.metrics_snapshot)."""
    m = _Prom()
    m.metric("info", "gauge", "PatchRelay's version.", [({"version": __version__}, 1)])
    _run_metrics(m, snap)
    _held_metrics(m, cfg, snap, now)
    states = {s: 0 for s in TRANSITIONS}
    for r in snap["issues"]:
        states[r["factory_state"]] = r["n"]
    m.metric("issues", "gauge", "Tracked issues, by factory state.", (({"state": k}, v) for k, v in sorted(states.items())))
    box = {r["status"]: r for r in snap["outbox"]}
    m.metric("outbox_rows", "gauge", "Linear writes not sent yet, by status.",
             (({"status": st}, (box.get(st) or {}).get("n", 0)) for st in ("queued", "failed")))
    oldest = parse_iso((box.get("queued") or {}).get("oldest"))
    m.metric("outbox_oldest_queued_age_seconds", "gauge", "Age of the oldest queued Linear write (0: none).",
             [({}, round((now - oldest).total_seconds(), 3) if oldest else 0)])
    hour = _hour_requests(snap["ticks"])
    limits = {b["api"]: b["requests_limit"] for b in snap["budgets"]}
    m.metric("api_requests_last_hour", "gauge", "Requests the ticks of the last hour made, by API.",
             (({"api": a}, n) for a, n in hour.items()))
    m.metric("api_hourly_limit_ratio", "gauge", "Those requests as a share of the API's hourly request limit.",
             (({"api": a}, round(n / limits[a], 4) if limits.get(a) else None) for a, n in hour.items()))
    last = snap["last_tick"]
    ended, started = parse_iso(last["ended_at"]) if last else None, parse_iso(last["started_at"]) if last else None
    m.metric("last_tick_age_seconds", "gauge", "Seconds since the last tick ended.",
             [({}, round((now - ended).total_seconds(), 3) if ended else None)])
    m.metric("last_tick_duration_seconds", "gauge", "How long the last tick took.",
             [({}, round((ended - started).total_seconds(), 3) if ended and started else None)])
    m.metric("last_tick_success", "gauge", "1 when every step of the last tick worked.",
             [({}, (1 if last["result"] == "ok" else 0) if last else None)])
    m.metric("ticks_last_hour", "gauge", "Ticks started in the last hour.", [({}, len(snap["ticks"]))])
    m.metric("tokens_spent_today", "gauge", "Model tokens the runs claimed today (UTC) spent.",
             [({}, snap["tokens_today"])])
    cx = cfg.codex
    m.metric("token_cap", "gauge", "The configured token caps.",
             (({"scope": k}, v) for k, v in (("day", cx.max_tokens_per_day), ("issue", cx.max_tokens_per_issue),
                                             ("run", cx.max_tokens_per_run))))
    wt = snap["worktrees"]
    m.metric("worktrees", "gauge", "Worktrees on disk (every host's).", [({}, wt["count"])])
    m.metric("worktrees_bytes", "gauge", "Their disk use (measured when their number changes, else hourly).",
             [({}, wt["bytes"])])
    if len(snap.get("hosts") or ()) > 1:         # a fleet: each member's heartbeat and runs
        m.metric("host_last_seen_seconds", "gauge", "Seconds since each host of the fleet last ticked.",
                 (({"host": h["name"]}, h["silent_seconds"]) for h in snap["hosts"]))
        m.metric("host_active_runs", "gauge", "Runs active on each host of the fleet.",
                 (({"host": h["name"]}, h["active_runs"]) for h in snap["hosts"]))
    if linear_token and linear_token.get("source") == "connected":
        exp = parse_iso(linear_token.get("expires_at"))
        m.metric("linear_token_expiry_seconds", "gauge", "Seconds until the connected app's access token expires.",
                 [({}, round((exp - now).total_seconds(), 3) if exp else None)])
        m.metric("linear_token_refresh_refused", "gauge", "1 while Linear refuses the token refresh.",
                 [({}, 1 if linear_token.get("refresh_error") else 0)])
    return m.text()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader never sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_metrics(cfg: Config, store: Store) -> str:
    now = utcnow()
    snap = store.metrics_snapshot(iso(now), iso(now - dt.timedelta(hours=1)), utc_day_start(now))
    return metrics_text(cfg, snap, now, linear_token_status(cfg, store))


_PAGE_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:980px;padding:12px;color:#1d1d1f}
h1{font-size:20px}h2{font-size:16px;margin-top:24px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%}td,th{padding:4px 6px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}.wrap{overflow-x:auto}.att li{margin:4px 0}.bad{color:#b00020}.warn{color:#a15c00}
.bar{background:#eee;border-radius:3px;height:10px;width:100%}.bar i{display:block;height:10px;border-radius:3px;
background:#3867d6}.muted{color:#666}.k{font-weight:600;white-space:nowrap}svg{max-width:100%;height:auto}"""

RUN_COLOURS = {"completed": "#2e9d4f", "failed": "#c62828", "running": "#3867d6", "claimed": "#7fa7ff",
               "stopped": "#8d8d8d", "interrupted": "#8d8d8d", "held": "#e68a00"}


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _timeline_svg(runs: list[dict], now: dt.datetime, width: int = 600) -> str:
    """An issue's runs as bars over time, coloured by outcome (running runs reach `now`)."""
    spans = []
    for r in runs:
        a = parse_iso(r["started_at"] or r["claimed_at"])
        b = parse_iso(r["ended_at"]) or now
        if a:
            spans.append((a, max(b, a), r))
    if not spans:
        return '<span class="muted">no runs</span>'
    t0, t1 = min(a for a, _, _ in spans), max(now, max(b for _, b, _ in spans))
    total = max((t1 - t0).total_seconds(), 1.0)
    bars = []
    for a, b, r in spans:
        x = (a - t0).total_seconds() / total * width
        w = max(2.0, (b - a).total_seconds() / total * width)
        bars.append(f'<rect x="{x:.1f}" y="2" width="{w:.1f}" height="14" fill="{RUN_COLOURS.get(r["status"], "#999")}">'
                    f'<title>{_e(r["run_type"])} #{r["id"]} {_e(r["status"])} {_e(r["claimed_at"])}</title></rect>')
    return (f'<svg viewBox="0 0 {width} 18" width="{width}" height="18" role="img" aria-label="runs over time">'
            + "".join(bars) + "</svg>")


def _per_day_svg(rows: list[dict], now: dt.datetime, days: int = 14) -> str:
    """Runs claimed per day, the last `days` days, stacked: completed, failed, other."""
    per: dict[str, dict[str, int]] = {}
    for r in rows:
        k = "completed" if r["status"] == "completed" else "failed" if r["status"] == "failed" else "other"
        per.setdefault(r["day"], {}).setdefault(k, 0)
        per[r["day"]][k] += r["n"]
    day_list = [(now - dt.timedelta(days=i)).strftime("%Y-%m-%d") for i in range(days - 1, -1, -1)]
    top = max([sum(per.get(d, {}).values()) for d in day_list] + [1])
    w, h, bw = 28, 80, 20
    out = []
    for i, d in enumerate(day_list):
        y = float(h)
        for k, colour in (("completed", "#2e9d4f"), ("failed", "#c62828"), ("other", "#8d8d8d")):
            n = per.get(d, {}).get(k, 0)
            if n:
                bh = n / top * (h - 4)
                y -= bh
                out.append(f'<rect x="{i * w + 4}" y="{y:.1f}" width="{bw}" height="{bh:.1f}" fill="{colour}">'
                           f'<title>{d}: {n} {k}</title></rect>')
        out.append(f'<text x="{i * w + 14}" y="{h + 12}" font-size="9" text-anchor="middle">{d[8:]}</text>')
    return (f'<svg viewBox="0 0 {days * w + 8} {h + 16}" width="{days * w + 8}" height="{h + 16}" role="img" '
            f'aria-label="runs per day">' + "".join(out) + "</svg>")


def _bar(used: float, limit: float | None) -> str:
    if not limit:
        return f'{used:,.0f} <span class="muted">(no limit set or known)</span>'
    pct = min(100.0, 100.0 * used / limit)
    return f'<div class="bar"><i style="width:{pct:.1f}%"></i></div><span class="muted">{used:,.0f} of {limit:,.0f}</span>'


def _attention(cfg: Config, store: Store, snap: dict, now: dt.datetime, issues: list[dict]) -> list[str]:
    items = []
    paused = runner_paused(cfg, store)
    if paused:
        items.append(f'<li class="warn">Paused by {_e(paused.get("by"))}: {_e(paused.get("reason"))}</li>')
    hold = codex_hold(store)
    if hold:
        items.append(f'<li class="warn">Runs held until {_e(hold["until"])}: {_e(hold["reason"])}</li>')
    lt = linear_token_status(cfg, store)
    if lt.get("refresh_error"):
        items.append(f'<li class="bad">Linear refuses the token refresh: run <code>patchrelay linear connect</code>'
                     f' ({_e(lt["refresh_error"])})</li>')
    box = {r["status"]: r for r in snap["outbox"]}
    oldest = parse_iso((box.get("queued") or {}).get("oldest"))
    if oldest and (now - oldest).total_seconds() > 600:
        items.append(f'<li class="bad">Linear outbox stuck: {box["queued"]["n"]} write(s) queued, the oldest since '
                     f'{_e(iso(oldest))}</li>')
    if box.get("failed"):
        items.append(f'<li class="bad">{box["failed"]["n"]} Linear write(s) failed for good</li>')
    last = snap["last_tick"]
    ended = parse_iso(last["ended_at"]) if last else None
    if ended is None or (now - ended).total_seconds() > 300:
        items.append('<li class="bad">No tick has ended in the last 5 minutes</li>')
    elif last["result"] != "ok":
        items.append('<li class="warn">The last tick had a failed step (<code>patchrelay status</code>)</li>')
    for u in store.unrouted()[:10]:
        items.append(f'<li class="warn">{_e(u["issue_key"])}: delegated, but no project routes it</li>')
    for i in issues:
        if i["paused"] and i["factory_state"] not in ("done", "canceled"):
            items.append(f'<li class="warn">{_e(i["key"])} paused: {_e(one_line(i["title"], 80))}</li>')
        if i["factory_state"] in ("failed", "escalated", "awaiting_input"):
            cls = "warn" if i["factory_state"] == "awaiting_input" else "bad"
            items.append(f'<li class="{cls}">{_e(i["key"])} {_e(i["factory_state"].replace("_", " "))}: '
                         f'{_e(one_line(i["title"], 80))}</li>')
    return items


def status_page(cfg: Config, store: Store) -> str:
    """One self-contained HTML page (no script, no outside resource): what needs attention first, every open
    issue (and those changed in the last day) with its state, PR and checks and its runs over time, runs per
    day for two weeks, API use against the hourly limits, token spend against the caps."""
    now = utcnow()
    snap = store.metrics_snapshot(iso(now), iso(now - dt.timedelta(hours=1)), utc_day_start(now))
    issues = store.issues_listed(changed_since=iso(now - dt.timedelta(days=1)))
    runs_of: dict[int, list[dict]] = {}
    for r in store.page_runs(iso(now - dt.timedelta(days=1))):
        runs_of.setdefault(r["issue_id"], []).append(r)
    att = _attention(cfg, store, snap, now, issues)
    rows = []
    for i in issues:
        key = f'<a href="{_e(i["url"])}">{_e(i["key"])}</a>' if i["url"] else _e(i["key"])
        pr = f'<a href="{_e(i["pr_url"])}">#{i["pr_number"]}</a>' if i["pr_number"] and i["pr_url"] else ""
        run = f'{_e(i["active_run_type"])} ({_e(i["active_run_status"])})' if i.get("active_run_type") else ""
        rows.append(f'<tr><td class="k">{key}</td><td>{_e(one_line(i["title"], 90))}</td>'
                    f'<td>{_e(i["factory_state"])}{" (paused)" if i["paused"] else ""}</td><td>{pr}</td><td>{_e(i["pr_ci"] or "")}</td>'
                    f'<td>{run}</td><td>{_timeline_svg(runs_of.get(i["id"], []), now, 240)}</td></tr>')
    hour = _hour_requests(snap["ticks"])
    limits = {b["api"]: b["requests_limit"] for b in snap["budgets"]}
    api = "".join(f"<tr><td>{a.capitalize()}</td><td>{_bar(n, limits.get(a))}</td></tr>" for a, n in hour.items())
    cx = cfg.codex
    tokens = f"<tr><td>today</td><td>{_bar(snap['tokens_today'], cx.max_tokens_per_day)}</td></tr>"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
             f'content="width=device-width,initial-scale=1"><title>PatchRelay</title><style>{_PAGE_CSS}</style>'
             f"</head><body><h1>PatchRelay</h1><p class=muted>as of {_e(iso(now))}</p>",
             "<h2>Needs attention</h2>" + (f'<ul class="att">{"".join(att)}</ul>' if att else
                                           "<p>Nothing needs attention.</p>"),
             "<h2>Issues</h2>" + (f'<div class="wrap"><table><tr><th>issue</th><th>title</th><th>state</th><th>PR'
                                   f'</th><th>checks</th><th>active run</th><th>runs</th></tr>{"".join(rows)}</table>'
                                   "</div>" if rows else "<p>No open issues.</p>"),
             "<h2>Runs per day</h2>" + _per_day_svg(store.runs_per_day(iso(now - dt.timedelta(days=14))), now),
             f"<h2>API use, last hour</h2><table>{api}</table>",
             f"<h2>Tokens</h2><table>{tokens}</table>", "</body></html>"]
    return "\n".join(parts)


def issue_page(store: Store, row: dict) -> str:
    """One issue's page (for its Linear session's link): title and link, the active run, its runs with type,
    outcome, start and end, its pull request and checks."""
    now = utcnow()
    runs = store.runs_for_issue(row["id"])
    snap = json.loads(row.get("gh_snapshot") or "{}")
    checks = "".join(f"<li>{_e(k)}: {_e(str(v).lower())}</li>" for k, v in sorted((snap.get("checks") or {}).items()))
    active = next((r for r in runs if r["status"] in ("claimed", "running")), None)
    said = (json.loads(active.get("live") or "null") or {}).get("message") if active else None
    trs = "".join(f'<tr><td>#{r["id"]}</td><td>{_e(r["run_type"])}</td><td style="color:'
                  f'{RUN_COLOURS.get(r["status"], "#333")}">{_e(r["status"])}</td><td>{_e(r["started_at"] or r["claimed_at"])}'
                  f'</td><td>{_e(r["ended_at"] or "")}</td></tr>' for r in reversed(runs))
    pr = (f'<p>Pull request <a href="{_e(row["pr_url"])}">#{row["pr_number"]}</a> ({_e(row["pr_state"])}), checks: '
          f'{_e(row["pr_ci"] or "?")}</p><ul>{checks}</ul>') if row["pr_number"] else "<p>No pull request yet.</p>"
    act = (f"<p>Active run: {_e(active['run_type'])} #{active['id']} ({_e(active['status'])})"
           + (f"<br><span class=muted>{_e(one_line(said, 400))}</span>" if said else "") + "</p>") if active else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,"
            f"initial-scale=1\"><meta name=robots content=noindex><title>{_e(row['key'])}</title><style>{_PAGE_CSS}"
            f"</style></head><body><h1>{_e(row['key'])}: {_e(row['title'])}</h1><p><a href=\"{_e(row['url'])}\">Linear"
            f"</a> · {_e(row['factory_state'])} · as of {_e(iso(now))}</p>{act}{pr}<h2>Runs</h2>"
            f"{_timeline_svg(runs, now)}<div class=wrap><table><tr><th>run</th><th>type</th><th>outcome</th>"
            f"<th>started</th><th>ended</th></tr>{trs}</table></div></body></html>")


# ---- publish: the Linear outbox, batched


WRITE_BATCH = 100                # Linear writes per request (aliases)


_OPTIONAL_WRITES = ("plan", "issue_state")


_LATEST_WINS = ("plan", "issue_state")


def _lane(row: Mapping[str, Any]) -> str:
    """Writes of one lane are sent in order, one per request; lanes are independent. Messages (activities,
    comments) keep their order per session (or issue); a plan, a link and a state move are lanes of their own."""
    kind = "msg" if row["kind"] in ("activity", "comment") else row["kind"]
    return f"{kind}:{row['session_id'] or 'issue:%s' % row['issue_id']}"


def publish(cfg: Config, store: Store, client: LinearClient | None, issue_id: int | None = None) -> dict:
    """Send queued Linear writes, batched (several mutations per request, one per lane), first responses to
    new sessions first, up to `linear.max_writes_per_tick` per tick (all of one issue's when `issue_id`).
    Transport errors leave rows queued; a lane whose write failed is skipped for the rest of the pass to
    keep its order; nothing is sent while a recorded rate limit lasts."""
    rows = store.outbox_queued(issue_id)
    if client is None:
        return {"sent": 0, "queued": len(rows), "failed": 0}
    budget = store.budget("linear") or {}
    until = rate_limited_until(budget, utcnow())
    if rows and until:
        return {"sent": 0, "failed": 0, "queued": len(rows), "skipped": f"rate limited until {iso(until)}"}
    p = _Publisher(cfg, store, client)
    try:
        p.send(p.schedule(rows), cfg.linear.max_writes_per_tick if issue_id is None else len(rows),
               optional_yield=_budget_low(budget) and issue_id is None)
    except LinearRateLimited:
        pass                            # the rest waits for the recorded limit; status shows it
    return {**p.stats, "queued": len(store.outbox_queued(issue_id))}


class _Publisher:
    """One pass over the Linear outbox. Writes are grouped in lanes (`_lane`): a lane's writes go in order,
    one per request; a request carries up to WRITE_BATCH writes of different lanes. A row is leased (to this
    process) before it is sent, so a tick and a worker never send the same row; a lane whose write failed or
    is leased elsewhere is blocked for the rest of the pass, to keep its order."""

    def __init__(self, cfg: Config, store: Store, client: LinearClient):
        self.cfg, self.store, self.client = cfg, store, client
        self.stats = {"sent": 0, "failed": 0, "busy": 0, "deferred": 0}     # the pass's report
        self.blocked: set[str] = set()                                      # lanes skipped for the rest of the pass
        self.pending: list[tuple[dict, LinearWrite, str | None]] = []     # the next request: (row, write, state moved to)
        self.pending_lanes: set[str] = set()                                # one write per lane per request
        self.me = os.getpid()                                               # the lease holder
        self.me_started = proc_start_time(self.me)
        self.issues: dict[int, dict | None] = {}                            # issue rows read in this pass

    def schedule(self, rows: list[dict]) -> list[dict]:
        """Drop queued updates a newer one replaces; then first responses to new sessions first (Linear shows
        a session as unresponsive ~10 s without one), and round by round: the next write of every lane."""
        latest = {_lane(r): r["id"] for r in rows if r["kind"] in _LATEST_WINS}
        stale = {r["id"] for r in rows if r["kind"] in _LATEST_WINS and latest[_lane(r)] != r["id"]}
        if stale:
            self.store.supersede_outbox(stale)
            rows = [r for r in rows if r["id"] not in stale]
        answered = self.store.sessions_with_sent_activity()
        firsts: dict[str, int] = {}
        for r in rows:
            if r["kind"] == "activity" and r["session_id"] and r["session_id"] not in answered:
                firsts.setdefault(r["session_id"], r["id"])
        first_ids = set(firsts.values())
        rank: dict[str, int] = collections.defaultdict(int)
        keyed = []
        for r in rows:
            lane = _lane(r)
            keyed.append(((rank[lane], 0 if r["id"] in first_ids else 1, r["id"]), r))
            rank[lane] += 1
        return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]

    def send(self, order: list[dict], cap: int, optional_yield: bool) -> None:
        used = 0
        for row in order:
            lane = _lane(row)
            if lane in self.blocked:
                continue
            if used >= cap:
                self.stats["deferred"] += 1
                continue                    # a burst spreads over ticks instead of exhausting the hour
            if optional_yield and row["kind"] in _OPTIONAL_WRITES:
                self.stats["deferred"] += 1  # optional writes yield while the budget is low
                self.blocked.add(lane)
                continue
            if len(self.pending) >= WRITE_BATCH or lane in self.pending_lanes:
                self.flush()
                if lane in self.blocked:
                    continue
            used += 1
            payload = json.loads(row["payload"])
            issue = self.issue_of(row)
            if row["kind"] == "issue_state":
                self.add_move(row, issue, payload)
                continue
            write = _outbox_write(row, payload, issue)
            if write is None:
                with self.store.tx():
                    self.store.outbox_result(row["id"], "failed", f"unknown outbox kind {row['kind']}")
                self.stats["failed"] += 1
                continue
            self.enqueue(row, write, None)
        self.flush()

    def issue_of(self, row: dict) -> dict | None:
        if not row["issue_id"]:
            return None
        if row["issue_id"] not in self.issues:
            self.issues[row["issue_id"]] = self.store.issue_by_id(row["issue_id"])
        return self.issues[row["issue_id"]]

    def add_move(self, row: dict, issue: dict | None, payload: dict) -> None:
        """Moving an issue is one batched write with its team's cached workflow states (a day) and its last
        seen state; without them it is sent alone (it reads them, and fills the cache for the next ones)."""
        store = self.store
        if not issue:
            with store.tx():
                store.outbox_result(row["id"], "sent", "issue no longer tracked")
            return
        key = f"linear.team_states.{issue['team_id']}"
        cached: dict | None = json.loads(store.meta_get(key) or "null") if issue.get("team_id") else None
        fresh = cached is not None and (age_seconds(cached.get("at")) or 1e9) < 86400
        cached_states: list[dict] | None = cached["states"] if cached is not None and fresh else None
        current = {"name": issue["linear_state"], "type": issue["linear_state_type"]} \
            if issue.get("linear_state_type") else None
        name, type_ = payload.get("name"), payload.get("type", "started")
        if cached_states is not None and current:
            target = move_target(name, type_, cached_states, current)
            if target:
                self.enqueue(row, LinearWrite("issue_update", {"stateId": target["id"]}, issue["linear_id"]),
                             target["name"])
            else:
                with store.tx():
                    store.outbox_result(row["id"], "sent")    # already there (or past it): nothing to send
                self.stats["sent"] += 1
            return
        if not self.lease([row]):
            return
        try:
            states = cached_states
            if states is None or current is None:
                current, states = self.client.issue_states(issue["linear_id"])
            target = move_target(name, type_, states, current)
            if target:
                self.client.write_one(LinearWrite("issue_update", {"stateId": target["id"]}, issue["linear_id"]))
            moved = target["name"] if target else None
        except LinearError as e:
            if fresh and not e.transient:      # a stale cache (a state was deleted): read again
                with store.tx():
                    store.meta_set(key, None)
            self.fail([row], e)
            return
        except Exception as e:  # noqa: BLE001 - a bug must not leave the row leased; it is retried next tick
            self.release([row], e)
            raise
        with store.tx():
            if issue.get("team_id"):
                store.meta_set(key, json.dumps({"at": iso(), "states": states}))
            if moved:
                store.add_event(issue["id"], "linear", f"moved the Linear issue to {moved}")
            store.outbox_result(row["id"], "sent")
        self.stats["sent"] += 1

    def lease(self, rows: list[dict]) -> list[dict]:
        taken = self.store.lease_outbox([r["id"] for r in rows], self.me, self.me_started, process_alive,
                                        host=self.cfg.runner.host)
        for r in rows:
            if r["id"] not in taken:
                self.blocked.add(_lane(r))  # another process is sending this lane; keep its order
                self.stats["busy"] += 1
        return [r for r in rows if r["id"] in taken]

    def release(self, rows: list[dict], e: BaseException | None) -> None:
        """Back to the queue untried (not an attempt)."""
        with self.store.tx():
            for r in rows:
                self.store.outbox_result(r["id"], "queued", redact(f"{type(e).__name__}: {e}") if e else None,
                                         attempt=False)

    def fail(self, rows: list[dict], e: LinearError) -> None:
        with self.store.tx():
            for row in rows:
                self.failed(row, e)
        if isinstance(e, LinearRateLimited):
            raise e

    def failed(self, row: dict, e: LinearError) -> None:
        """Record a failed send (inside a transaction); a final error gives up after 5 attempts. Its lane
        waits for the next pass, to keep its order."""
        give_up = not e.transient and row["attempts"] + 1 >= 5
        self.store.outbox_result(row["id"], "failed" if give_up else "queued", redact(str(e)))
        self.blocked.add(_lane(row))
        self.stats["failed"] += 1

    def enqueue(self, row: dict, write: LinearWrite, moved: str | None) -> None:
        self.pending.append((row, write, moved))
        self.pending_lanes.add(_lane(row))

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.pending_lanes.clear()
        taken = {r["id"] for r in self.lease([r for r, _, _ in batch])}
        batch = [b for b in batch if b[0]["id"] in taken]
        if batch:
            self.send_batch(batch)

    def send_batch(self, batch: list[tuple[dict, LinearWrite, str | None]]) -> None:
        rows = [r for r, _, _ in batch]
        try:
            results = self.client.write_batch([w for _, w, _ in batch])
        except LinearError as e:
            if len(batch) > 1 and not e.transient:
                # the request as a whole was refused (one bad write spoils the document): each alone, so that
                # the others go through and only the bad one counts the attempt
                for item in batch:
                    if _lane(item[0]) in self.blocked:
                        self.release([item[0]], None)
                    else:
                        self.send_batch([item])
                return
            self.fail(rows, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug must not leave rows leased; they are retried next tick
            self.release(rows, e)
            raise
        again = [item for item, err in zip(batch, results) if isinstance(err, NotSent)]
        with self.store.tx():
            for (row, _, moved), err in zip(batch, results):
                if isinstance(err, NotSent):
                    continue
                if err is None:
                    self.store.outbox_result(row["id"], "sent")
                    if moved and row["issue_id"]:
                        self.store.add_event(row["issue_id"], "linear", f"moved the Linear issue to {moved}")
                    self.stats["sent"] += 1
                else:
                    self.failed(row, err)
        if again:       # fewer than before (at least one write failed): terminates
            self.release([r for r, _, _ in again if _lane(r) in self.blocked], None)
            again = [item for item in again if _lane(item[0]) not in self.blocked]
            if again:
                self.send_batch(again)


def _outbox_write(row: Mapping[str, Any], payload: dict, issue: Mapping[str, Any] | None) -> LinearWrite | None:
    kind = row["kind"]
    if kind == "activity":
        return LinearWrite("activity", {"id": row["client_id"], "agentSessionId": row["session_id"],
                                        "content": payload["content"], "ephemeral": bool(payload.get("ephemeral"))})
    if kind == "plan":
        return LinearWrite("session_update", {"plan": payload["plan"]}, row["session_id"])
    if kind == "session_page":
        return LinearWrite("session_update", {"externalLink": payload["url"]}, row["session_id"])
    if kind == "session_link":
        return LinearWrite("session_update", {"addedExternalUrls": [{"label": payload["label"],
                                                                     "url": payload["url"]}]}, row["session_id"])
    if kind == "comment" and issue:
        return LinearWrite("comment", {"id": row["client_id"], "issueId": issue["linear_id"], "body": payload["body"]})
    return None


def _budget_low(budget: Mapping[str, Any]) -> bool:
    """Less than 20 % of either Linear budget (requests, complexity) left before the reset."""
    for left, limit in (("requests_remaining", "requests_limit"), ("complexity_remaining", "complexity_limit")):
        if budget.get(left) is not None and budget.get(limit) and budget[left] < 0.2 * budget[limit]:
            return True
    return False


def publish_quietly(cfg: Config, store: Store, issue_id: int) -> None:
    """Best-effort immediate publish from a worker; the next tick retries whatever is left."""
    try:
        client = linear_client(cfg, store)
    except ConfigError:
        return
    try:
        deadline = time.time() + 20
        while publish(cfg, store, client, issue_id).get("busy") and time.time() < deadline:
            time.sleep(0.3)  # a tick is sending this session's earlier messages; then send ours in order
    except Exception as e:  # noqa: BLE001 - the tick's publish step retries
        log.warning("publish deferred to the next tick: %s", redact(str(e)))


# ============================================================== 11. worker
# Drives one run: worktree, hook, app-server, turns (steering and stopping from
# the SQLite inbox), then git bookkeeping, report and the run's final state.
# Also resolves the runs of dead workers for reconcile.


@dataclass
class TurnResult:
    turn_id: str
    status: str                       # completed | interrupted | failed
    error: str | None = None
    items: list[dict] = field(default_factory=list)
    error_info: Any = None            # TurnError.codexErrorInfo of a failed turn


class LiveView:
    """What a running turn shows as it happens: the agent's messages, the commands it runs (with exit codes)
    and the files it changes become the run's `agent` events when they complete; the latest message, the
    latest command and the tail of what it printed are the run's `live` column (written at once when an item
    starts or ends, at most once a second while a command prints). Text is cut and secrets redacted."""

    MESSAGE, COMMAND, OUTPUT = 1000, 300, 1500

    def __init__(self, store: Store, run_id: int, issue_id: int):
        self.store, self.run_id, self.issue_id = store, run_id, issue_id
        self.state: dict[str, Any] = {"message": None, "command": None, "exit_code": None, "output": "",
                                      "changed": None, "at": None}
        self.dirty, self.written = False, 0.0

    def started(self, item: dict) -> None:
        if item.get("type") == "commandExecution":
            self.state.update(command=redact(one_line(str(item.get("command")), self.COMMAND)), exit_code=None,
                              output="")
            self.flush(force=True)

    def output(self, delta: str) -> None:
        self.state["output"] = redact((self.state["output"] + delta)[-self.OUTPUT:])
        self.dirty = True
        self.flush()

    def completed(self, item: dict) -> None:
        t, event = item.get("type"), None
        if t == "agentMessage" and item.get("text"):
            self.state["message"] = redact(str(item["text"])[:self.MESSAGE])
            event = f"agent: {self.state['message']}"
        elif t == "commandExecution":
            cmd, code = redact(one_line(str(item.get("command")), self.COMMAND)), item.get("exitCode")
            out = redact(str(item.get("aggregatedOutput") or self.state["output"])[-self.OUTPUT:])
            self.state.update(command=cmd, exit_code=code, output=out)
            last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
            event = f"$ {cmd} (exit {code if code is not None else item.get('status') or '?'})" + \
                (f": {one_line(last, 200)}" if code not in (0, None) and last else "")
        elif t == "fileChange":
            paths = [str(ch.get("path", "?")) for ch in item.get("changes") or []]
            self.state["changed"] = redact(one_line(", ".join(paths), self.COMMAND))
            event = f"changed: {self.state['changed']}"
        if event is None:
            return
        with self.store.tx():
            self.store.add_event(self.issue_id, "agent", event, run_id=self.run_id)
            self._write()

    def flush(self, force: bool = False) -> None:
        if (force or self.dirty) and (force or time.time() - self.written >= 1.0):
            with self.store.tx():
                self._write()

    def _write(self) -> None:
        self.state["at"] = iso()
        self.store.update_run(self.run_id, {"live": json.dumps(self.state)})
        self.dirty, self.written = False, time.time()


class TurnDriver:
    """Drives the turns of one run on its app-server: starts each turn, reads its notifications until it
    completes, answers the server's requests (approvals, questions), checks the inbox for stops and steers,
    heartbeats, counts tokens against the caps, and interrupts a turn that stalls, runs too long or must stop.
    What it learns decides how the run ends (drive_run reads it)."""

    def __init__(self, cfg: Config, store: Store, run_id: int, issue: dict,
                 echo: Callable[[str], None] | None = None):
        self.cfg, self.store, self.run_id, self.issue = cfg, store, run_id, issue
        self.echo = echo or (lambda s: None)
        self.app: AppServer | None = None           # set by drive_run once the app-server runs
        self.stop_reason: str | None = None         # a stop from the inbox: the run ends `stopped`
        self.interrupt_reason: str | None = None    # why PatchRelay interrupted the turn (stall, timeout, cap)
        self.question: str | None = None            # the agent asked for input (or a cap was crossed)
        self.items: list[dict] = []                 # completed items of every turn: the run's report
        self.tokens: dict | None = None             # Codex's running total usage of the thread
        self.spent = 0              # tokens of this run: the sum of each model response's usage
        self.issue_before = store.tokens_spent(issue["id"], excluding_run=run_id) \
            if cfg.codex.max_tokens_per_issue is not None else 0
        self.last_error: str | None = None          # the last non-retried error notification
        self.last_error_info: Any = None            # ... and its codexErrorInfo
        self.live = LiveView(store, run_id, issue["id"])

    # -- server -> client requests (answered at once; never stall a run)
    def server_request(self, msg: dict) -> Any:
        method, params = msg.get("method"), msg.get("params") or {}
        decision = self.cfg.codex.approval_decision
        if method in ("item/commandExecution/requestApproval", "item/fileChange/requestApproval"):
            self._event(f"approval request ({method.split('/')[1]}) answered {decision}")
            return {"decision": decision}
        if method in ("execCommandApproval", "applyPatchApproval"):
            self._event(f"legacy approval request {method} answered {decision}")
            return {"decision": {"accept": "approved", "cancel": "abort"}.get(
                decision, {"denied": {"rejection": "PatchRelay declines approvals in unattended runs"}})}
        if method == "item/tool/requestUserInput":
            qs = [q.get("question") or q.get("header") or "" for q in params.get("questions") or []]
            self.question = "\n".join(q for q in qs if q) or "The agent asked for input."
            self.interrupt_reason = "the agent asked for input"
            self._event("agent asked for user input; ending the turn as awaiting input")
            return {"answers": {}}
        raise CodexError(f"PatchRelay does not handle {method}")

    def _event(self, message: str, level: str = "info") -> None:
        with self.store.tx():
            self.store.add_event(self.issue["id"], "codex", message, level, self.run_id)
        self.echo(message)

    def run_turn(self, thread_id: str, text: str) -> TurnResult:
        assert self.app is not None
        c = self.cfg.codex
        turn = self.app.request("turn/start", {"threadId": thread_id, "input": text_input(text)})["turn"]
        turn_id = turn["id"]
        self.store.add_turn_id(self.run_id, turn_id)
        self.echo(f"turn {turn_id} started")
        started = last_output = last_inbox = last_beat = time.time()
        interrupt_at: float | None = None
        items: list[dict] = []
        poll = self.cfg.runner.inbox_poll_interval
        while True:
            msg = self.app.next_message(timeout=poll)
            now = time.time()
            if msg is not None:
                last_output = now
                ended = self._on_message(msg, turn_id, items)
                if ended is not None:
                    return ended
            if now - last_inbox >= poll and interrupt_at is None:
                last_inbox = now
                self._check_inbox(thread_id, turn_id)
            self.live.flush()
            if now - last_beat >= 5:
                last_beat = now
                with self.store.tx():
                    self.store.update_run(self.run_id, {"heartbeat_at": iso()})
                if self.stop_reason is None and not self.store.run_is_current(self.run_id):
                    self.stop_reason = "the run was taken over by another host"    # the fence: stop early
            if interrupt_at is None:
                reason = self.interrupt_reason or self.stop_reason
                if reason is None and now - last_output > c.stall_timeout:
                    reason = self.interrupt_reason = f"stalled: no output from Codex for {c.stall_timeout:g} s"
                elif reason is None and now - started > c.turn_timeout:
                    reason = self.interrupt_reason = f"turn timed out after {c.turn_timeout:g} s"
                if reason:
                    self.echo(f"interrupting turn: {reason}")
                    interrupt_at = now
                    try:
                        self.app.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id}, timeout=15)
                    except CodexError as e:
                        # e.g. "no active turn": the turn ended as the stop arrived; turn/completed follows
                        log.info("turn/interrupt not accepted (%s); waiting for the turn to end", e)
            elif now - interrupt_at > 30:
                raise CodexError(f"{self.interrupt_reason or self.stop_reason}; the turn did not end after "
                                 "turn/interrupt")

    def _on_message(self, msg: dict, turn_id: str, items: list[dict]) -> TurnResult | None:
        """One notification of the running turn: its end (the result), a completed item, token usage (checked
        against the caps), or an error Codex will not retry."""
        method, params = msg.get("method"), msg.get("params") or {}
        if method == "turn/completed" and (params.get("turn") or {}).get("id") == turn_id:
            t = params["turn"]
            err = (t.get("error") or {}).get("message") or self.last_error
            self.items.extend(items)
            return TurnResult(turn_id, t.get("status") or "failed", err, items,
                              (t.get("error") or {}).get("codexErrorInfo") or self.last_error_info)
        if method == "item/completed" and params.get("turnId") == turn_id:
            item = params.get("item") or {}
            items.append(item)
            self._echo_item(item)
            self.live.completed(item)
        elif method == "item/started" and params.get("turnId") == turn_id:
            self.live.started(params.get("item") or {})
        elif method == "item/commandExecution/outputDelta" and params.get("turnId") == turn_id:
            self.live.output(str(params.get("delta") or ""))
        elif method == "thread/tokenUsage/updated":
            self._on_usage(params.get("tokenUsage") or {})
        elif method == "error" and not params.get("willRetry"):
            self.last_error = one_line(str((params.get("error") or {}).get("message")), 300)
            self.last_error_info = (params.get("error") or {}).get("codexErrorInfo")
        return None

    def _on_usage(self, usage: dict) -> None:
        """Record the run's spend; a crossed cap ends the turn as awaiting input."""
        self.tokens = usage.get("total")
        self.spent += int((usage.get("last") or {}).get("totalTokens") or 0)
        with self.store.tx():
            self.store.update_run(self.run_id, {"tokens": json.dumps(self.tokens), "tokens_spent": self.spent})
        day_before = self.store.tokens_spent(since=utc_day_start(), excluding_run=self.run_id) \
            if self.cfg.codex.max_tokens_per_day is not None else 0     # concurrent runs spend too
        crossed = token_cap_crossed(self.cfg.codex, self.spent, self.issue_before, day_before)
        if crossed and self.question is None:
            self.question = self.interrupt_reason = crossed
            self._event(crossed, "warn")

    def _echo_item(self, item: dict) -> None:
        t = item.get("type")
        if t == "commandExecution":
            self.echo(f"$ {one_line(str(item.get('command')), 160)}  (exit {item.get('exitCode')})")
        elif t == "agentMessage":
            self.echo(f"agent: {one_line(item.get('text'), 300)}")
        elif t == "fileChange":
            self.echo("changed: " + ", ".join(ch.get("path", "?") for ch in item.get("changes") or []))

    def _check_inbox(self, thread_id: str, turn_id: str) -> None:
        assert self.app is not None
        for m in self.store.pending_stops(self.issue["id"], self.run_id):
            if m["kind"] == "stop":
                self.stop_reason = m["body"] or "stop requested"
                with self.store.tx():
                    self.store.mark_inbox(m["id"], self.run_id, "interrupted the turn")
                    self.store.add_event(self.issue["id"], "stop", f"stop: {self.stop_reason}", run_id=self.run_id)
                return
        for m in self.store.pending_inbox(self.issue["id"]):
            if m["kind"] != "prompt":
                continue
            try:
                self.app.request("turn/steer", {"threadId": thread_id, "expectedTurnId": turn_id,
                                                "input": text_input(steer_text(m))}, timeout=15)
            except CodexError as e:
                log.info("steer not accepted (%s); the message becomes the next turn's input", e)
                return
            with self.store.tx():
                self.store.mark_inbox(m["id"], self.run_id, "steered into the running turn")
                self.store.add_event(self.issue["id"], "codex", f"steered a message from {m['author'] or '?'} "
                                                                "into the running turn", run_id=self.run_id)
            self.echo(f"steered message from {m['author'] or '?'}")


def _load_run(store: Store, cfg: Config, run_id: int) -> tuple[dict, dict, ProjectConfig]:
    run = store.run_by_id(run_id)
    if not run:
        raise UsageError(f"run {run_id}: no such run")
    issue = store.issue(run["issue_id"])
    return run, issue, cfg.project(issue["project_id"])


def read_workflow(project: ProjectConfig, run_type: str) -> str | None:
    name = "REVIEW_WORKFLOW.md" if run_type == "review_fix" else "IMPLEMENTATION_WORKFLOW.md"
    try:
        text = (project.repo_path / name).read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def start_thread(app: AppServer, issue: dict, worktree: Path, echo: Callable[[str], None]) -> str:
    """Resume the issue's thread with `thread/resume` (a fresh app-server has not loaded it; `turn/start`
    alone would fail) or, when it cannot be read, start a new one."""
    if issue.get("thread_id"):
        try:
            params = {**app.thread_params(worktree), "threadId": issue["thread_id"], "excludeTurns": True}
            app.request("thread/resume", params)
            echo(f"resumed thread {issue['thread_id']}")
            return issue["thread_id"]
        except CodexError as e:
            echo(f"could not resume thread {issue['thread_id']} ({e}); starting a new one")
    thread = app.request("thread/start", app.thread_params(worktree))["thread"]
    echo(f"started thread {thread['id']}")
    return thread["id"]


def _failed_turn(cfg: Config, store: Store, app: AppServer, run: dict, result: TurnResult,
                 interrupted: str | None) -> tuple[str, str, str]:
    """(status, reason, notice) of a failed turn, by its kind. Capacity and account refusals hold every launch
    until a time (recorded for the runner) and requeue the run; a full context window moves the run to a fresh
    thread once; a configuration error fails naming the keys to fix."""
    reason = interrupted or f"turn {result.status}" + (f": {result.error}" if result.error else "")
    kind = None if interrupted else failure_kind(result.error_info)
    if kind in ("capacity", "account"):
        fix = None
        if kind == "account":
            try:
                _, key = provider_key(cfg, app.request("config/read", {}, timeout=15).get("config") or {})
            except CodexError:
                key = None
            fix = "run `codex login` as this user" + (f", or set ${key} in PatchRelay's environment" if key else "")
        hold = next_hold(json.loads(store.meta_get("runner.codex_hold") or "null"), kind,
                         capacity_reason(result.error_info), fix, utcnow(), cfg.codex.capacity_backoff,
                         _codex_reset_at(app) if kind == "capacity" else None)
        with store.tx():
            store.meta_set("runner.codex_hold", json.dumps(hold))
            store.mark_seen(f"hold:{hold['since']}:{run['issue_id']}")      # this issue hears it from its run
            store.add_event(None, "hold", f"runs held until {hold['until']}: {hold['reason']}", "warn")
        return "held", f"{hold['reason']} ({result.error or kind})", hold_notice(hold)
    if kind == "context":
        if json.loads(run.get("context") or "{}").get("fresh_thread"):
            return "failed", "the model's context window is full again, after a fresh thread with a hand-off", ""
        return "fresh_thread", "the model's context window is full", ""
    if kind == "configuration":
        return "failed", (f"Codex refused the model configuration ({result.error_info}): check codex.model "
                          f"({cfg.codex.model or 'Codex default'}) and codex.model_provider; {result.error or ''}"), ""
    return "failed", reason, ""


def _codex_reset_at(app: AppServer) -> dt.datetime | None:
    """When Codex says the account's exhausted rate-limit window resets, if it says (a ChatGPT login does; an
    API key usually cannot tell)."""
    try:
        snap = (app.request("account/rateLimits/read", {}, timeout=10).get("rateLimits") or {})
    except CodexError:
        return None
    resets = [int(w["resetsAt"]) for w in (snap.get("primary"), snap.get("secondary"))
              if isinstance(w, dict) and (w.get("usedPercent") or 0) >= 100 and isinstance(w.get("resetsAt"), int)]
    return dt.datetime.fromtimestamp(max(resets), dt.timezone.utc) if resets else None


def _handoff(store: Store, issue: dict, project: ProjectConfig, worktree: Path) -> str:
    stat = run_git(["diff", "--stat", f"origin/{project.base_branch}...HEAD"], worktree, check=False).stdout
    summaries = [r["summary"] or "" for r in reversed(store.runs_for_issue(issue["id"]))]
    return handoff_text(summaries, stat)


def _merge_base(cfg: Config, store: Store, run: dict, issue: dict, project: ProjectConfig, worktree: Path,
                echo: Callable[[str], None]) -> dict:
    """A queue repair first merges the base branch into the worktree; the run's context says how it went
    (the prompt tells the agent) and, for a clean merge, which commit it made on which head."""
    before = git_head(worktree)
    conflicts = merge_base_into(worktree, project, cfg.runner)
    note = (f"Merging `{project.base_branch}` stopped on conflicts in: {', '.join(conflicts)}." if conflicts
            else f"`{project.base_branch}` merged cleanly; check that everything still works together.")
    context = json.loads(run.get("context") or "{}")
    context["merge"] = note
    merged = git_head(worktree)
    if not conflicts and before and merged and merged != before:
        # a clean base merge: if it is all this run pushes, an approval of `before` still holds
        context["clean_merge"] = {"head": merged, "parent": before}
    echo(note)
    with store.tx():
        store.update_run(run["id"], {"context": json.dumps(context)})
        store.add_event(issue["id"], "git", note, run_id=run["id"])
    return {**run, "context": json.dumps(context)}


def drive_run(cfg: Config, store: Store, run_id: int, echo: Callable[[str], None] | None = None) -> dict:
    """The worker: claim → worktree → hook → Codex turns → commit, push, report → final state."""
    echo = echo or (lambda s: None)
    run, issue, project = _load_run(store, cfg, run_id)
    if run["status"] != "claimed":
        raise UsageError(f"run {run_id}: is {run['status']}, not claimed")
    me = os.getpid()
    with store.tx():
        store.update_run(run_id, {"worker_pid": me, "worker_started": proc_start_time(me), "started_at": iso(),
                                  "heartbeat_at": iso()})
        apply_decision(store, issue, Decision(outbox=(
            activity("thought", f"Started the {run_label(run['run_type'])} run on branch `{issue['branch']}`.",
                     ephemeral=True), plan(run["run_type"], "running"))), run_id)
    publish_quietly(cfg, store, issue["id"])
    echo(f"{issue['key']}: {run_label(run['run_type'])} run {run_id} on {issue['branch']}")
    driver = TurnDriver(cfg, store, run_id, issue, echo)
    worktree = Path(issue["worktree"])
    status, reason, notice, t0 = "failed", "", "", time.time()
    try:
        how = ensure_worktree(project, issue["branch"], worktree)
        with store.tx():
            store.add_event(issue["id"], "git", f"worktree {worktree} ({how})", run_id=run_id)
        echo(f"worktree {worktree} ({how})")
        hook_env = {"PATCHRELAY_ISSUE_KEY": issue["key"], "PATCHRELAY_BRANCH": issue["branch"],
                    "PATCHRELAY_RUN_TYPE": run["run_type"], "PATCHRELAY_WORKTREE": str(worktree),
                    "PATCHRELAY_STAGE": run["run_type"]}      # the reference system's name, for its hooks
        def hook_started(pid: int, started: str | None) -> None:
            with store.tx():      # reconcile kills this group if the worker dies during the hook
                store.update_run(run_id, {"appserver_pid": pid, "appserver_started": started})
        if run_hook(project, cfg, "prepare-worktree", worktree, hook_env, hook_started):
            echo("prepare-worktree hook passed")
        if run["run_type"] == "queue_repair":
            run = _merge_base(cfg, store, run, issue, project, worktree, echo)
        follow_ups = [m for m in store.pending_inbox(issue["id"]) if m["kind"] == "prompt"]
        handoff = _handoff(store, issue, project, worktree) \
            if json.loads(run.get("context") or "{}").get("fresh_thread") else None
        prompt = build_prompt(issue, run, project, cfg.codex.sandbox, read_workflow(project, run["run_type"]),
                              follow_ups, handoff)
        with store.tx():
            store.update_run(run_id, {"prompt": prompt, "head_before": git_head(worktree)})
            for m in follow_ups:
                store.mark_inbox(m["id"], run_id, "included in the run's prompt")
        app = driver.app = AppServer(cfg, worktree, cfg.state_dir / "logs" / f"run-{run_id}.codex.log",
                                     driver.server_request)
        try:
            with store.tx():
                store.update_run(run_id, {"appserver_pid": app.pid, "appserver_started": app.started})
            app.initialize()
            thread_id = start_thread(app, issue, worktree, echo)
            with store.tx():
                store.update_issue(issue["id"], {"thread_id": thread_id})
                store.update_run(run_id, {"thread_id": thread_id})
            text = prompt
            for n in range(cfg.codex.max_follow_up_turns + 1):
                result = driver.run_turn(thread_id, text)
                echo(f"turn {result.turn_id} {result.status}")
                if result.status != "completed" or driver.stop_reason or driver.question:
                    break
                more = [m for m in store.pending_inbox(issue["id"]) if m["kind"] == "prompt"]
                if not more or n == cfg.codex.max_follow_up_turns:
                    break
                text = follow_up_text(more)
                with store.tx():
                    for m in more:
                        store.mark_inbox(m["id"], run_id, "sent as a follow-up turn")
            if driver.stop_reason:
                status, reason = "stopped", driver.stop_reason
            elif driver.question:
                status = "awaiting_input"
            elif result.status == "completed":
                status = "completed"
            else:
                status, reason, notice = _failed_turn(cfg, store, app, run, result, driver.interrupt_reason)
        finally:
            app.close()
    except (GitError, HookError, CodexError) as e:
        status, reason = "failed", str(e)
    summary = next((i.get("text") for i in reversed(driver.items) if i.get("type") == "agentMessage"), "") or ""
    if driver.question:
        summary = driver.question + (f"\n\n{summary}" if summary else "")
    return finish_run(cfg, store, run_id, RunOutcome(status, summary=summary, reason=redact(reason), notice=notice),
                      items=driver.items, tokens=driver.tokens, duration=time.time() - t0, echo=echo)


def finish_run(cfg: Config, store: Store, run_id: int, outcome: RunOutcome, items: list[dict] | None = None,
               tokens: dict | None = None, duration: float | None = None,
               echo: Callable[[str], None] | None = None) -> dict:
    """Git bookkeeping (commit what the agent changed, push the branch), report, final state, Linear."""
    echo = echo or (lambda s: None)
    run, issue, project = _load_run(store, cfg, run_id)
    if not store.run_is_current(run_id):
        return _fenced(store, run, issue, echo)
    worktree = Path(issue["worktree"]) if issue.get("worktree") else None
    new_commits, has_work, changed = 0, False, []
    pushed_sha = None
    if worktree and worktree.is_dir() and outcome.status not in ("interrupted", "held", "fresh_thread"):
        try:
            left = unresolved_conflicts(worktree)
            if left:
                raise GitError(f"conflict markers or unmerged paths remain in {', '.join(left[:10])}; "
                               "nothing was committed")
            title = one_line(issue["title"], 72)
            body = one_line(outcome.summary, 1500)
            committed = commit_all(worktree, f"{issue['key']}: {title}\n\n{body}\n\nRun-Type: {run['run_type']}\n"
                                             f"PatchRelay-Run: {run_id}\n", cfg.runner)
            head = git_head(worktree)
            changed = changed_files(worktree, run["head_before"], head)
            if run["head_before"] and head and head != run["head_before"]:
                new_commits = int(run_git(["rev-list", "--count", f"{run['head_before']}..{head}"], worktree)
                                  .stdout.strip() or 0)
            if committed:
                echo("committed the agent's changes")
            ahead = run_git(["rev-list", "--count", f"origin/{project.base_branch}..HEAD"], worktree, check=False)
            ahead_of_base = ahead.returncode == 0 and int(ahead.stdout.strip() or 0) > 0
            if ahead_of_base and outcome.status in ("completed", "stopped", "awaiting_input") \
                    and unpushed(worktree, issue["branch"]):
                if _queued_on_github(cfg, store, issue, project):
                    raise GitError(f"pull request #{issue['pr_number']} is in the merge queue; PatchRelay never "
                                   "pushes to a queued branch")
                if not store.run_is_current(run_id):
                    return _fenced(store, run, issue, echo)
                push_branch(cfg, worktree, issue["branch"])
                pushed_sha = git_head(worktree)
                echo(f"pushed {issue['branch']}")
            has_work = ahead_of_base and not unpushed(worktree, issue["branch"])
        except GitError as e:
            outcome = dataclasses.replace(outcome, status="failed", reason=str(e))
    outcome = dataclasses.replace(outcome, new_commits=new_commits, has_work=has_work)
    if outcome.status == "interrupted" and int(run.get("attempt") or 1) > cfg.runner.retry_budget:
        outcome = dataclasses.replace(outcome, status="failed", reason=f"{outcome.reason}; retry budget of "
                                                                        f"{cfg.runner.retry_budget} used up")
    report = build_report(items or [], changed, tokens, duration, json.loads(run["turn_ids"] or "[]"))
    run_status = {"awaiting_input": "completed", "fresh_thread": "interrupted"}.get(outcome.status, outcome.status)
    with store.tx():
        if not store.run_is_current(run_id):
            return _fenced(store, run, issue, echo)
        row = store.issue(issue["id"])
        store.update_run(run_id, {"status": run_status, "ended_at": iso(), "summary": outcome.summary or None,
                                  "failure_reason": outcome.reason or None, "report": json.dumps(report),
                                  **({"tokens": json.dumps(tokens)} if tokens else {})})
        d = decide_run_end(row, run, outcome, cfg.runner, utcnow())
        apply_decision(store, row, d, run_id)
        store.drop_stops(issue["id"], run_id)
        if pushed_sha:   # our own push: not a reason to reset repair budgets; observe GitHub at once
            clean = (json.loads(run.get("context") or "{}").get("clean_merge") or {})
            merges = json.loads(row.get("clean_merges") or "{}")
            if clean.get("head") == pushed_sha:
                merges[pushed_sha] = clean["parent"]
            store.update_issue(issue["id"], {"pushed_sha": pushed_sha, "pushed_at": iso(),
                                             "pushed_run_type": run["run_type"],
                                             "clean_merges": json.dumps(merges, sort_keys=True)})
    publish_quietly(cfg, store, issue["id"])
    echo(f"run {run_id} {run_status}" + (f": {outcome.reason}" if outcome.reason else ""))
    return {"run_id": run_id, "status": run_status, "outcome": outcome.status, "reason": outcome.reason,
            "new_commits": new_commits}


def _fenced(store: Store, run: dict, issue: dict, echo: Callable[[str], None]) -> dict:
    """A run that is no longer its issue's active run (another host took it over, or it ended elsewhere): it
    pushes nothing and writes no final state."""
    msg = f"run {run['id']} is no longer {issue['key']}'s active run (taken over elsewhere); stopped without " \
          "pushing or writing its end"
    with store.tx():
        store.add_event(issue["id"], "fleet", msg, "warn", run["id"])
    echo(msg)
    return {"run_id": run["id"], "status": "fenced", "outcome": "fenced", "reason": msg, "new_commits": 0}


def _queued_on_github(cfg: Config, store: Store, issue: dict, project: ProjectConfig) -> bool:
    """Whether the issue's PR is in the merge queue right now: asked of GitHub just before a push (a person may
    have queued it during the run); the last observation when GitHub cannot say."""
    observed = bool(json.loads(issue.get("gh_snapshot") or "{}").get("in_queue"))
    if not issue.get("pr_number"):
        return observed
    try:
        return github_client(cfg, store).in_merge_queue(project.github_repo, issue["pr_number"])
    except (GitHubError, ConfigError) as e:
        log.info("could not ask GitHub whether PR #%s is queued (%s); the last observation says %s",
                 issue["pr_number"], e, observed)
        return observed


@dataclass(frozen=True)
class OpenPlan:
    """What `open` resumes: the worktree (rebuilt from the pushed branch when it was gone), the thread to
    resume, or, when it cannot be read, the hand-off a fresh thread starts with; and what was repaired."""
    worktree: Path
    thread_id: str | None
    handoff: str | None
    repaired: tuple[str, ...]


def prepare_open(cfg: Config, store: Store, row: dict) -> OpenPlan:
    """Make ISSUE openable: its worktree exists (rebuilt from the pushed branch, as a run would) and its Codex
    thread can be read (else a fresh thread starts with the issue's history)."""
    if not any(p.id == row["project_id"] for p in cfg.projects):
        raise UsageError(f"issue {row['key']}: its project {row['project_id']} is not in the config")
    project = cfg.project(row["project_id"])
    if not row["branch"]:
        raise UsageError(f"issue {row['key']}: has no branch yet (no run has started)")
    worktree = Path(row["worktree"]) if row["worktree"] else worktree_for(project, row["key"])
    repaired: list[str] = []
    if not worktree.is_dir():
        how = ensure_worktree(project, row["branch"], worktree)
        repaired.append(f"rebuilt the worktree {worktree} from {row['branch']} ({how})")
        with store.tx():
            store.update_issue(row["id"], {"worktree": str(worktree)})
            store.add_event(row["id"], "git", f"`open` {repaired[-1]}")
    thread_id, handoff = row["thread_id"], None
    if thread_id:
        logs = cfg.state_dir / "logs"
        try:
            app = AppServer(cfg, worktree, logs / f"open-{row['key']}.codex.log")
            try:
                app.initialize()
                app.request("thread/resume", {**app.thread_params(worktree), "threadId": thread_id,
                                              "excludeTurns": True}, timeout=30)
            finally:
                app.close()
        except CodexError as e:
            repaired.append(f"thread {thread_id} cannot be read ({one_line(str(e), 160)}); a fresh thread "
                            "starts with the issue's history")
            thread_id = None
    if thread_id is None:
        handoff = (f"You are continuing work on {row['key']}: {row['title']}\n\n"
                   + _handoff(store, row, project, worktree))
    return OpenPlan(worktree, thread_id, handoff, tuple(repaired))


def recover_run(cfg: Config, store: Store, run: dict) -> str:
    """A running run whose worker died: read its turn back on a fresh app-server. Completed → finish
    it normally; in progress, interrupted or unreadable → interrupted (requeued within budget)."""
    issue = store.issue(run["issue_id"])
    turn_ids = json.loads(run["turn_ids"] or "[]")
    status, reason = None, "worker died mid-turn"
    items: list[dict] = []
    if run["thread_id"] and turn_ids and issue.get("worktree") and Path(issue["worktree"]).is_dir():
        app = None
        try:
            app = AppServer(cfg, Path(issue["worktree"]), cfg.state_dir / "logs" / f"run-{run['id']}.codex.log")
            app.initialize()
            app.request("thread/resume", {**app.thread_params(Path(issue["worktree"])),
                                          "threadId": run["thread_id"], "excludeTurns": True})
            turns = app.request("thread/turns/list", {"threadId": run["thread_id"], "limit": 20,
                                                       "itemsView": "full"}).get("data") or []
            mine = [t for t in turns if t.get("id") in turn_ids]
            last = next((t for t in mine if t.get("id") == turn_ids[-1]), None)
            if last is not None:
                status = last.get("status")
                for t in sorted(mine, key=lambda t: turn_ids.index(t["id"])):
                    items.extend(t.get("items") or [])
                if status != "completed":
                    reason = f"worker died; its turn is {status}"
        except CodexError as e:
            reason = f"worker died; thread unreadable: {e}"
        finally:
            if app:
                app.close()
    if status == "completed":
        summary = next((i.get("text") for i in reversed(items) if i.get("type") == "agentMessage"), "") or ""
        finish_run(cfg, store, run["id"], RunOutcome("completed", summary=summary), items=items,
                   tokens=json.loads(run["tokens"]) if run["tokens"] else None)
        return "completed"
    finish_run(cfg, store, run["id"], RunOutcome("interrupted", reason=reason))
    return "interrupted"


# ============================================================== 12. tick
# One pass: reconcile runs, poll Linear and decide, launch workers, publish the
# outbox. Holds an exclusive lock; each step's failure is reported and the
# other steps still run. Decisions come from the factory section.

class TickLocked(Exception):
    pass


@contextlib.contextmanager
def tick_lock(cfg: Config) -> Iterator[None]:
    check_database_path(cfg.database_path)
    _secure_dir(cfg.state_dir)
    path = Path(str(cfg.database_path) + ".tick.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as e:
        raise StoreError(f"database.path: cannot create the tick lock {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise TickLocked() from None
            raise
        yield
    finally:
        os.close(fd)


class TickContext:
    """What the steps of one tick share: the config, the store, whether it is a dry run, the API clients
    (made on first use, so a pass that needs no API spends nothing), and what it did, in words."""

    def __init__(self, cfg: Config, store: Store, dry_run: bool = False):
        self.cfg, self.store, self.dry_run = cfg, store, dry_run
        self.actions: list[str] = []                    # printed by `tick`, stored in the tick's summary
        self._linear: LinearClient | None = None
        self._github: GitHubClient | None = None
        self.merge_queue: dict[str, bool] = {}          # repository -> whether its base branch has a merge queue
        self.leases: dict[str, str] = {}                # lease name -> its holder, read as the tick began
        self.began: float | None = None                 # the database's clock as the tick began
        self._hosts: list[dict] | None = None

    def hosts(self) -> list[dict]:
        """The fleet's members, read once per tick (Store.hosts, against the clock and leases read as it
        began)."""
        if self._hosts is None:
            self._hosts = self.store.hosts(self.began, self.leases if self.began is not None else None)
        return self._hosts

    def linear(self) -> LinearClient:
        if self._linear is None:
            self._linear = linear_client(self.cfg, self.store, record=not self.dry_run)
        return self._linear

    def github(self) -> GitHubClient:
        if self._github is None:
            self._github = github_client(self.cfg, None if self.dry_run else self.store)
        return self._github

    def note(self, message: str) -> None:
        self.actions.append(message)
        log.info("%s", message)


# ---- intake: Linear, read since the cursors and decided

def _minus(ts: str | None, seconds: float) -> str | None:
    t = parse_iso(ts)
    return iso(t - dt.timedelta(seconds=seconds)) if t else None


def delegation_rule(cfg: Config, app_mode: bool) -> str:
    """The delegation rule in words."""
    if app_mode:
        return "delegated to the app"
    return " or ".join({"delegate": "delegated to you", "assignee": "assigned to you",
                        "label": f"labelled {cfg.linear.delegation_label}"}[d] for d in cfg.linear.delegation)


def delegated_filter(cfg: Config, ident: Identity) -> dict:
    """The open issues the delegation rule gives us, in the routed teams (the first poll)."""
    who: list[dict] = [{"delegate": {"isMe": {"eq": True}}}]
    if not ident.app_mode:
        if "assignee" in ident.delegation:
            who.append({"assignee": {"isMe": {"eq": True}}})
        if "label" in ident.delegation:
            who.append({"labels": {"some": {"name": {"eqIgnoreCase": ident.label}}}})
    filt: dict[str, Any] = {"or": who, "state": {"type": {"nin": ["completed", "canceled"]}}}
    scope = team_scope(cfg)
    if scope:
        filt["team"] = scope
    return filt


@dataclass
class LinearReads:
    ident: Identity
    ours: list[LinearSession]
    session_acts: dict[str, list[LinearActivity]]
    issues: list[LinearIssue]           # oldest change first
    comments: list[LinearComment]
    unsynced: list[str]
    cursors: dict[str, str]
    meta: dict[str, str | None]


READ_PAGE_CAP = 40        # follow-up pages per stream and tick; a longer read resumes on the next tick


def team_scope(cfg: Config) -> dict | None:
    """The routed teams as an IssueFilter fragment (None when one project takes every issue)."""
    if not all(p.has_routing for p in cfg.projects):
        return None
    keys = sorted({k for p in cfg.projects for k in (*p.issue_key_prefixes, *p.linear_team_keys)})
    ids = sorted({i for p in cfg.projects for i in p.linear_team_ids})
    scope = ([{"key": {"in": keys}}] if keys else []) + ([{"id": {"in": ids}}] if ids else [])
    return scope[0] if len(scope) == 1 else {"or": scope}


def _read_sessions(stored: Mapping[str, str | None], lc: LinearClient, first: dict, floor_at: str
                   ) -> tuple[list[dict], bool, dict[str, str | None]]:
    """The agent sessions that changed since the sessions cursor, as raw nodes; whether the read finished; and
    the resume point to store.

    Linear's agentSessions connection has no filter: it is read newest first (by updatedAt), down to the
    cursor (the floor). `stored`: the cursor and the meta keys below, as read_linear got them. A read longer
    than READ_PAGE_CAP pages is cut, and the cursor does not move; the cut is remembered in two meta keys, in
    the same transaction as what was read:
      linear.sessions.resume      the endCursor where the read stopped: the next tick goes on from there,
      linear.sessions.resume_top  the newest updatedAt of the cut read: the next tick first reads what
                                  arrived above it (the newest pages), then resumes below.
    When a read reaches the floor, both keys are cleared and the cursor moves to `floor_at`."""
    floor = stored["linear.poll.sessions"]
    resume, resume_top = stored["linear.sessions.resume"], stored["linear.sessions.resume_top"]
    nodes = [n for n in first["nodes"] if isinstance(n, dict)]
    pages = 0

    def page_down(after: str | None, stop_at: str | None) -> tuple[str | None, bool]:
        """Read pages after `after` until an item at or below `stop_at`; (endCursor, finished)."""
        nonlocal pages
        while after and pages < READ_PAGE_CAP:
            pages += 1
            c = lc.sessions_page(after)
            got = [n for n in c["nodes"] if isinstance(n, dict)]
            nodes.extend(got)
            if stop_at and any((n.get("updatedAt") or "") <= stop_at for n in got):
                return None, True
            if not (c.get("pageInfo") or {}).get("hasNextPage"):
                return None, True
            after = (c.get("pageInfo") or {}).get("endCursor")
        return after, not after

    def reached(mark: str | None) -> bool:
        return bool(mark) and any((n.get("updatedAt") or "") <= (mark or "") for n in nodes)

    top_info = first.get("pageInfo") or {}
    cut: str | None = None
    finished = True
    if resume:
        # new arrivals above the top of the cut read, then on from where it stopped
        if not reached(resume_top) and top_info.get("hasNextPage"):
            page_down(top_info.get("endCursor"), resume_top)
        cut, finished = page_down(resume, floor)
    elif not reached(floor) and top_info.get("hasNextPage"):
        cut, finished = page_down(top_info.get("endCursor"), floor)
    if finished:
        return nodes, True, {"linear.sessions.resume": None, "linear.sessions.resume_top": None}
    return nodes, False, {"linear.sessions.resume": cut, "linear.sessions.resume_top":
                          resume_top or max((n.get("updatedAt") or "" for n in nodes), default=floor_at)}


POLL_CURSORS = ("linear.poll.issues", "linear.poll.comments", "linear.poll.sessions")
POLL_META = ("linear.viewer_id", "linear.mode", "linear.sessions.resume", "linear.sessions.resume_top",
             "linear.sessions.recent")


def poll_sessions(recent: str | None) -> int:
    """The poll's page of sessions: the sessions that changed within the last poll's overlap window, plus five."""
    return max(POLL_SESSIONS_MIN, min(POLL_SESSIONS_MAX, int(recent or 0) + POLL_SESSIONS_MIN))


def read_linear(cfg: Config, store: Store, lc: LinearClient, stored: Mapping[str, str | None],
                tracked_rows: list[dict]) -> LinearReads:
    """Everything that changed in Linear since the cursors: one request when nothing did. Cursors come
    from Linear's clock (its Date header) minus linear.poll_overlap, and move only past what was fully
    read; a read cut short (page cap, rate limit) resumes where it stopped. `stored` (the cursors and
    settings of POLL_CURSORS and POLL_META) and `tracked_rows`: as Store.intake_view read them."""
    overlap = cfg.linear.poll_overlap
    scope = team_scope(cfg)
    issues_since, comments_since = stored["linear.poll.issues"], stored["linear.poll.comments"]
    viewer_id = stored["linear.viewer_id"]
    if issues_since:
        ifilter: dict = {"updatedAt": {"gt": issues_since}, **({"team": scope} if scope else {})}
    else:
        # First poll: the open issues delegated to us (the rule needs the viewer; learnt once, then cached).
        mode = stored["linear.mode"]
        if not viewer_id or not mode:
            v = lc.viewer()
            viewer_id, mode = v.id, "app" if v.app else "user"
        app0 = mode == "app" if cfg.linear.mode == "auto" else cfg.linear.mode == "app"
        ifilter = delegated_filter(cfg, Identity(viewer_id, app0, cfg.linear.delegation,
                                                 cfg.linear.delegation_label))
    open_ids = [r["linear_id"] for r in tracked_rows if r["open"]]
    # comments by their last change: new ones, and edits of those already read
    cfilter = {"updatedAt": {"gt": comments_since}, **({"issue": {"team": scope}} if scope else {})} \
        if comments_since and open_ids else None
    r = lc.poll(ifilter, cfilter, sessions=poll_sessions(stored["linear.sessions.recent"]))
    viewer = r["viewer"]
    read_at = r["date"] or iso()
    app_mode = viewer.app if cfg.linear.mode == "auto" else cfg.linear.mode == "app"
    ident = Identity(viewer.id, app_mode, cfg.linear.delegation, cfg.linear.delegation_label)
    cursors: dict[str, str] = {}
    meta: dict[str, str | None] = {"linear.viewer_id": viewer.id, "linear.mode": "app" if app_mode else "user"}
    floor_at = _minus(read_at, overlap) or read_at

    nodes, finished, resume_at = _read_sessions(stored, lc, r["agentSessions"], floor_at)
    if finished:
        cursors["linear.poll.sessions"] = floor_at
    meta.update(resume_at)
    # how many sessions the next poll will find again within its overlap window: its first page's size
    meta["linear.sessions.recent"] = str(sum(1 for n in nodes if (n.get("updatedAt") or "") > floor_at))
    meta = {k: v for k, v in meta.items() if v != stored.get(k)}        # only what changed is written
    sessions = [_session(n) for n in {n["id"]: n for n in nodes}.values()]
    ours = [x for x in sessions if x.app_user_id == viewer.id]
    stored_sessions = store.sessions_by_id([x.id for x in ours])
    want = []
    for x in ours:
        known = stored_sessions.get(x.id)
        if known and known["seen_updated_at"] and x.updated_at <= known["seen_updated_at"]:
            continue  # nothing new in this session since we last read it
        want.append((x, _minus(known["activity_cursor"], overlap) if known and known["activity_cursor"] else None))
    session_acts = {x.id: acts for x, since in want if (acts := covered_by_recent(x, since)) is not None}
    rest = [(x.id, since) for x, since in want if x.id not in session_acts]
    session_acts.update(lc.activities_batch(rest) if rest else {})
    ours = [x for x in ours if x.id in session_acts]

    # -- issues and comments: oldest first; a cut read stops the cursor at the last item read
    def ascending(kind: str, first: dict, filt: dict) -> tuple[list[dict], bool]:
        items = list(reversed([n for n in first["nodes"] if isinstance(n, dict)]))
        info, n_pages = first.get("pageInfo") or {}, 0
        while info.get("hasPreviousPage") and info.get("startCursor"):
            if n_pages >= READ_PAGE_CAP:
                return items, False
            n_pages += 1
            try:
                c = lc.older_page(kind, filt, info["startCursor"])
            except LinearError:
                if not items:
                    raise
                return items, False            # keep what was read; the cursor stops at it
            items.extend(reversed([n for n in c["nodes"] if isinstance(n, dict)]))
            info = c.get("pageInfo") or {}
        return items, True

    issue_nodes, complete = ascending("issues", r["issues"], ifilter)
    issues = [_issue(n) for n in issue_nodes]
    cursors["linear.poll.issues"] = floor_at if complete else \
        (_minus(issue_nodes[-1].get("updatedAt"), 0.001) or issues_since or floor_at)
    comments: list[LinearComment] = []
    if cfilter is not None:
        comment_nodes, complete = ascending("comments", r["comments"], cfilter)
        comments = [_comment(n) for n in comment_nodes]
        cursors["linear.poll.comments"] = floor_at if complete else \
            (_minus(comment_nodes[-1].get("updatedAt"), 0.001) or comments_since or floor_at)
    elif open_ids or not comments_since:
        cursors["linear.poll.comments"] = floor_at
    # every comment of issues tracked since the last tick (their history), only when there are some
    unsynced = [r["linear_id"] for r in tracked_rows if r["open"] and not r["comments_synced"]]
    if unsynced:
        comments += lc.comment_history(unsynced)
        comments.sort(key=lambda c: (c.created_at, c.id))
    # what changed but is not ours is dropped here, client side
    tracked = {r["linear_id"] for r in tracked_rows}
    issues = [i for i in issues if i.id in tracked or is_delegated(i, ident)]
    comments = [c for c in comments if c.issue_linear_id in tracked]
    return LinearReads(ident, ours, session_acts, issues, comments, unsynced, cursors, meta)


def intake(ctx: TickContext) -> dict:
    cfg, store = ctx.cfg, ctx.store
    budget, stored, tracked = store.intake_view(POLL_CURSORS, POLL_META)
    until = rate_limited_until(budget, utcnow())
    if until:
        ctx.note(f"Linear rate limit: skipping intake until {iso(until)}")
        return {"skipped": "rate limited", "until": iso(until)}
    lc = ctx.linear()
    reads = read_linear(cfg, store, lc, stored, tracked)
    ident = reads.ident
    ours, session_acts, issues, comments = reads.ours, reads.session_acts, reads.issues, reads.comments
    unsynced = reads.unsynced
    summary: dict[str, Any] = {"sessions": len(ours), "issues": len(issues), "comments": len(comments),
                               "queued": [], "errors": []}
    notes: list[str] = []   # printed only once the transaction that stored them has committed

    def guarded(key: str | None, issue_linear_id: str | None, fn: Callable[[], None]) -> None:
        """Apply one observation. A decision that fails (an illegal transition is a bug) is undone on its
        own, recorded on its issue, and reported; every other issue's intake and the cursors still commit."""
        mark = len(notes)
        try:
            with store.savepoint():
                fn()
        except (IllegalTransition, StoreError) as e:
            del notes[mark:]
            row = store.issue_by_linear_id(issue_linear_id) if issue_linear_id else None
            store.add_event(row["id"] if row else None, "intake", f"could not apply a Linear change: {e}", "error",
                            issue_key=key)
            summary["errors"].append(f"{key or '?'}: {e}")
            log.error("%s: could not apply a Linear change: %s", key or "?", e)

    # a poll that found nothing only moves its cursors: one statement, atomic by itself
    quiet = not (ours or issues or comments or unsynced or reads.meta)
    with contextlib.nullcontext() if quiet else store.tx(deferred=ctx.dry_run):
        now = iso()
        for s in sorted(ours, key=lambda x: x.created_at):
            obs = s.issue
            guarded(obs.key if obs else None, obs.id if obs else None,
                    functools.partial(_intake_session, ctx, s, obs, session_acts[s.id], ident, now, summary, notes))
        for obs in sorted(issues, key=lambda i: i.updated_at or ""):
            guarded(obs.key, obs.id, functools.partial(_intake_issue, ctx, obs, ident, now, summary, notes))
        for c in comments:
            edit = f"comment-edit:{c.id}:{c.edited_at}" if c.edited_at else None
            if store.seen(f"comment:{c.id}"):
                if edit is None or store.seen(edit):
                    continue
                store.mark_seen(edit)           # an edit of a comment read before: the edited text follows
                fn = _intake_comment_edit
            else:
                store.mark_seen(f"comment:{c.id}")
                if edit:
                    store.mark_seen(edit)       # first read after an edit: the body is already the edited one
                fn = _intake_comment
            row = store.issue_by_linear_id(c.issue_linear_id)
            if row is None:
                continue
            guarded(row["key"], row["linear_id"], functools.partial(fn, ctx, c, row, ident, now, summary, notes))
        # Cursors advance in the same transaction that stored what was read.
        store.cursors_set(reads.cursors)
        for name, setting in reads.meta.items():
            store.meta_set(name, setting)
        if unsynced:
            store.mark_comments_synced(unsynced)
    for n in notes:
        ctx.note(n)
    return summary


def _queued(summary: dict, notes: list[str], key: str, why: str) -> None:
    summary["queued"].append(key)
    notes.append(f"{key}: {why} -> implementation queued")


def _intake_session(ctx: TickContext, s: LinearSession, obs: LinearIssue | None, acts: list[LinearActivity],
                    ident: Identity, now: str, summary: dict, notes: list[str]) -> None:
    cfg, store = ctx.cfg, ctx.store
    known = store.session(s.id)
    project = resolve_project(cfg, obs.key, obs.team_key, obs.team_id) if obs else None
    if obs is None or project is None:
        if not known:
            store.upsert_session(s.id, None, s.creator.label(), False, s.updated_at, s.updated_at)
            store.mark_seen(f"unrouted:{obs.id}" if obs else f"unrouted-session:{s.id}")
            _unrouted(store, decide_unrouted(obs, s.id), obs, notes)
        return
    row = store.issue_by_linear_id(obs.id)
    if known is None:
        trusted = actor_trusted(project.trusted_actors, s.creator.id, s.creator.name, s.creator.email)
        prompts = [a for a in acts if a.type == "prompt" and not a.user.app]
        prompt = "\n\n".join(a.body for a in prompts if a.body.strip()) or (s.comment_body or None)
        d = decide_session(row, s, trusted, project.id, prompt, ident, now)
        issue_id = apply_decision(store, row, d, key=obs.key)
        for a in acts:
            store.mark_seen(f"activity:{a.id}")
        store.upsert_session(s.id, issue_id, s.creator.label(), trusted,
                             max([a.created_at for a in acts] + [s.created_at]), s.updated_at)
        if d.fields.get("pending_run_type"):
            _queued(summary, notes, obs.key, "new agent session")
        elif not trusted:
            notes.append(f"{obs.key}: ignored session from untrusted {s.creator.label()}")
        elif d.outbox:
            notes.append(f"{obs.key}: agent session answered, no run started")
        return
    for a in acts:
        if store.seen(f"activity:{a.id}"):
            continue
        store.mark_seen(f"activity:{a.id}")
        row = store.issue_by_linear_id(obs.id)
        if row is None:
            continue
        trusted = actor_trusted(project.trusted_actors, a.user.id, a.user.name, a.user.email)
        d = decide_prompt(row, a, trusted, now)
        apply_decision(store, row, d)
        if d.fields.get("pending_run_type"):
            _queued(summary, notes, row["key"], "follow-up prompt")
    store.upsert_session(s.id, None, s.creator.label(), bool(known["trusted"]),
                         max([a.created_at for a in acts] + [known["activity_cursor"] or ""]) or None, s.updated_at)


def _unrouted(store: Store, d: Decision, obs: LinearIssue | None, notes: list[str]) -> None:
    """Record an unrouted delegation or session: its event, and the answer in its session (if any)."""
    for ob in d.outbox:
        store.add_outbox(None, ob.kind, d.fields["agent_session_id"], ob.payload)
    for e in d.events:
        store.add_event(None, e.kind, e.message, e.level, issue_key=obs.key if obs else None)
        notes.append(e.message)


def _intake_issue(ctx: TickContext, obs: LinearIssue, ident: Identity, now: str, summary: dict,
                  notes: list[str]) -> None:
    cfg, store = ctx.cfg, ctx.store
    row = store.issue_by_linear_id(obs.id)
    project = cfg.project(row["project_id"]) if row and any(p.id == row["project_id"] for p in cfg.projects) \
        else resolve_project(cfg, obs.key, obs.team_key, obs.team_id)
    if project is None:
        if row is None and is_delegated(obs, ident):
            key = f"unrouted:{obs.id}"
            if not store.seen(key):
                store.mark_seen(key)
                _unrouted(store, decide_unrouted(obs, None), obs, notes)
        return
    d = decide_issue(row, obs, ident, project.id, now,
                     session_required=ident.app_mode and project.trusted_actors.configured)
    apply_decision(store, row, d)
    if d.fields.get("pending_run_type"):
        trigger = json.loads(d.fields["pending_context"])["trigger"]
        _queued(summary, notes, obs.key, "delegated" if trigger == "delegation" else trigger)


def _intake_comment(ctx: TickContext, c: LinearComment, row: dict, ident: Identity, now: str, summary: dict,
                    notes: list[str]) -> None:
    project = ctx.cfg.project(row["project_id"])
    trusted = actor_trusted(project.trusted_actors, c.user.id, c.user.name, c.user.email)
    d = decide_comment(row, c, trusted, ident, now)
    apply_decision(ctx.store, row, d)
    if d.fields.get("pending_run_type"):
        _queued(summary, notes, row["key"], "reply in a comment")


def _intake_comment_edit(ctx: TickContext, c: LinearComment, row: dict, ident: Identity, now: str, summary: dict,
                         notes: list[str]) -> None:
    project = ctx.cfg.project(row["project_id"])
    trusted = actor_trusted(project.trusted_actors, c.user.id, c.user.name, c.user.email)
    apply_decision(ctx.store, row, decide_comment_edit(row, c, trusted, ident,
                                                       ctx.store.inbox_has_source(c.id)))


# ---- reconcile: runs whose worker is gone

def reconcile(ctx: TickContext) -> dict:
    """A run is running only while its worker lives. A dead worker's run is resolved here, whatever its
    last turn's status, and a claim whose worker never started is requeued: no run blocks its issue forever."""
    cfg, store = ctx.cfg, ctx.store
    result: dict[str, Any] = {"alive": 0, "relaunched": [], "recovered": [], "interrupted": []}
    if ctx.began is not None:           # the hosts and this host's runs in one round trip
        ctx._hosts, runs = store.reconcile_view(cfg.runner.host, ctx.began, ctx.leases)
    else:
        runs = store.active_runs(host=cfg.runner.host)
    taken = _take_over(ctx)             # a dead host's runs (never this host's)
    if taken:
        result["taken_over"] = taken
    for run in runs:                    # a pid means something only on its own host
        if process_alive(run["worker_pid"], run["worker_started"]):
            result["alive"] += 1
            continue
        issue = store.issue(run["issue_id"])
        if run["status"] == "claimed" and not run["worker_pid"] and (age_seconds(run["claimed_at"]) or 0) < 15:
            continue  # a claim whose worker is being spawned right now
        if ctx.dry_run:
            ctx.note(f"{issue['key']}: would resolve run {run['id']} (worker gone)")
            continue
        if kill_process_group(run["appserver_pid"], run["appserver_started"]):
            store.add_event(issue["id"], "reconcile", f"killed app-server left by run {run['id']}", "warn", run["id"])
        if run["status"] == "claimed":
            finish_run(cfg, store, run["id"], RunOutcome("interrupted", reason="worker exited before the turn started"))
            result["relaunched"].append(issue["key"])
            ctx.note(f"{issue['key']}: run {run['id']} never started; requeued")
            continue
        outcome = recover_run(cfg, store, run)
        result["recovered" if outcome == "completed" else "interrupted"].append(issue["key"])
        ctx.note(f"{issue['key']}: run {run['id']} worker gone; {outcome}")
    return result


def _take_over(ctx: TickContext) -> list[str]:
    """The runs of a host silent for runner.host_timeout: interrupted and requeued within the retry budget (the
    issue's session hears it once), to start on a live host from the pushed branch in a fresh worktree and a
    fresh thread with a hand-off. The silent host's workers, if they still run, find their run fenced off."""
    cfg, store = ctx.cfg, ctx.store
    dead = {h["name"]: h for h in ctx.hosts()
            if h["name"] != cfg.runner.host and h["silent_seconds"] >= cfg.runner.host_timeout}
    taken: list[str] = []
    for run in store.active_runs() if dead else ():
        if run["host"] not in dead:
            continue
        issue = store.issue(run["issue_id"])
        if ctx.dry_run:
            ctx.note(f"{issue['key']}: would take over run {run['id']} of silent host {run['host']}")
            continue
        silent = dead[run["host"]]["silent_seconds"]
        with store.tx():    # while the run is still active, nobody claims the issue: it moves before it requeues
            if not store.run_is_current(run["id"]):
                continue                     # another host took it first
            context = {**json.loads(store.run(run["id"])["context"] or "{}"), "fresh_thread": True,
                       "moved_from": run["host"]}
            store.update_run(run["id"], {"context": json.dumps(context)})      # the requeued run inherits it
            store.update_issue(issue["id"], {"host": None, "worktree": None, "thread_id": None})
            store.add_event(issue["id"], "fleet", f"run {run['id']} of silent host {run['host']} taken over by "
                            f"{cfg.runner.host}", "warn", run["id"])
        finish_run(cfg, store, run["id"], RunOutcome("interrupted", reason=f"host {run['host']} went silent "
                                                                           f"{silent:.0f} s ago"))
        taken.append(issue["key"])
        ctx.note(f"{issue['key']}: run {run['id']} of silent host {run['host']} taken over")
    return taken


# ---- observe: GitHub, one batched read per repository

def observe(ctx: TickContext) -> dict:
    """Poll GitHub for every issue with a pull request (or a pushed branch that needs one): one batched
    request per repository and 50 issues, at most every github.poll_interval seconds per repository and
    at once after our own push. Opens missing pull requests, then decides from each observation."""
    cfg, store = ctx.cfg, ctx.store
    budget, watched = store.observe_view()
    until = rate_limited_until(budget, utcnow())
    if until:
        ctx.note(f"GitHub rate limit: not observing until {iso(until)}")
        return {"skipped": "rate limited", "until": iso(until)}
    by_repo: dict[str, list[dict]] = {}
    for row in watched:
        try:
            by_repo.setdefault(cfg.project(row["project_id"]).github_repo, []).append(row)
        except ConfigError:
            continue
    result: dict[str, Any] = {"repos": 0, "observed": 0, "opened": [], "errors": []}
    now = utcnow()
    for repo, rows in by_repo.items():
        due = [r for r in rows if not r["gh_observed_at"] or (r["pushed_at"] or "") > r["gh_observed_at"]
               or (age_seconds(r["gh_observed_at"], now) or 0) >= cfg.github.poll_interval]
        if not due:
            continue
        gh = ctx.github()
        base = cfg.project(rows[0]["project_id"]).base_branch
        acted = {r["branch"]: set((json.loads(r["gh_snapshot"] or "{}").get("acted") or {}).get("reviews") or ())
                 for r in rows}

        def needs_detail(branch: str, o: PullRequestObs) -> bool:   # a review not acted on yet: read its texts
            return any(rv.state == "CHANGES_REQUESTED" and rv.id not in acted.get(branch, ()) for rv in o.reviews)
        try:
            observed, has_queue = gh.observe(repo, base, [(r["branch"], r["pr_number"]) for r in rows],
                                             needs_detail)
        except GitHubRateLimited:
            raise
        except GitHubError as e:          # one repository's failure must not stop the others
            result["errors"].append(f"{repo}: {e}")
            continue
        ctx.merge_queue[repo] = has_queue
        result["repos"] += 1
        result["observed"] += len(rows)
        for row in rows:
            try:
                _observe_issue(ctx, gh, repo, row, observed.get(row["branch"]), result)
            except (GitHubError, GitError, IllegalTransition) as e:
                if isinstance(e, GitHubRateLimited):
                    raise
                result["errors"].append(f"{row['key']}: {e}")
                if not ctx.dry_run:
                    with store.tx():
                        store.add_event(row["id"], "github", str(e), "error")
    return result


def _observe_issue(ctx: TickContext, gh: GitHubClient, repo: str, row: dict, obs: PullRequestObs | None,
                   result: dict) -> None:
    """One issue's observation: open the pull request it needs, record one found for its branch, or decide
    from its pull request."""
    if obs is None or (obs.state != "OPEN" and not row["pr_number"]):
        _open_pr(ctx, gh, repo, row, result)
    elif not row["pr_number"]:
        _record_found_pr(ctx, gh, row, obs)
    else:
        _decide_pr(ctx, gh, repo, row, obs)


def _open_pr(ctx: TickContext, gh: GitHubClient, repo: str, row: dict, result: dict) -> None:
    """A pushed branch ready for a pull request gets one (its body: the last run's summary and the issue)."""
    cfg, store = ctx.cfg, ctx.store
    if row["factory_state"] != "ready_for_pr" or row["pr_number"] or row["active_run_id"]:
        if not ctx.dry_run:
            with store.tx():
                store.update_issue(row["id"], {"gh_observed_at": iso()})
        return
    if ctx.dry_run:
        ctx.note(f"{row['key']}: would open a pull request for {row['branch']}")
        return
    last = next((r for r in store.runs_for_issue(row["id"]) if r["summary"]), None)
    body = "\n\n".join(x for x in (
        (last or {}).get("summary") or "", f"Linear issue: [{row['key']}]({row['url']})" if row["url"] else "",
        f"Opened by PatchRelay for {row['key']}.") if x)
    pr = gh.create_pr(repo, row["branch"], cfg.project(row["project_id"]).base_branch,
                      f"{row['key']}: {one_line(row['title'], 200)}", body, cfg.github.draft_prs)
    with store.tx():
        fresh = store.issue(row["id"])
        apply_decision(store, fresh, decide_pr_opened(fresh, pr, cfg.linear.review_state, None))
        store.update_issue(row["id"], {"gh_observed_at": None})    # observe the new PR on the next tick
    result["opened"].append(row["key"])
    ctx.note(f"{row['key']}: opened pull request #{pr.number}")


def _record_found_pr(ctx: TickContext, gh: GitHubClient, row: dict, obs: PullRequestObs) -> None:
    """An open pull request for the issue's branch that PatchRelay has not recorded: ours (opened by an
    earlier tick whose answer was lost) or a person's, adopted."""
    store = ctx.store
    adopter = None if obs.author and obs.author == gh.login else (obs.author or "someone")
    if ctx.dry_run:
        ctx.note(f"{row['key']}: would record pull request #{obs.number}")
        return
    with store.tx():
        fresh = store.issue(row["id"])
        apply_decision(store, fresh, decide_pr_opened(fresh, opened_from(obs), ctx.cfg.linear.review_state, adopter))
        store.update_issue(row["id"], {"gh_observed_at": None})
    ctx.note(f"{row['key']}: " + (f"adopted pull request #{obs.number} (opened by {adopter})" if adopter
                                  else f"opened pull request #{obs.number}"))


def _with_job_logs(gh: GitHubClient, repo: str, d: Decision) -> Decision:
    """A ci_repair run's context with the tail of each failing GitHub Actions job's log."""
    context = json.loads(d.fields["pending_context"])
    for c in context.get("checks") or []:
        if c.get("job_id") and c.get("app") == "github-actions":
            try:
                c["log"] = log_tail(gh.job_log(repo, c["job_id"]))
            except GitHubError as e:
                c["log"] = f"(log unavailable: {e})"
    return dataclasses.replace(d, fields={**d.fields, "pending_context": json.dumps(context)})


def _decide_again(store: Store, row: dict, why: str, **memory: Any) -> None:
    """GitHub refused what was decided: the PR memory changes (`remembered`), the next tick observes the PR
    again and decides anew, and the event says why."""
    with store.tx():
        fresh = store.issue(row["id"])
        snapshot = remembered(json.loads(fresh["gh_snapshot"] or "{}"), **memory)
        store.update_issue(row["id"], {"gh_observed_at": None, "gh_snapshot": json.dumps(snapshot, sort_keys=True)})
        store.add_event(row["id"], "github", why, "warn")


def _rerun_jobs(ctx: TickContext, gh: GitHubClient, repo: str, row: dict, obs: PullRequestObs,
                jobs: tuple[int, ...]) -> None:
    """Rerun failed Actions jobs; a rerun GitHub refuses sends the failure to a repair run (next observation)."""
    store = ctx.store
    try:
        for job in jobs:
            gh.rerun_job(repo, job)
    except GitHubError as err:
        _decide_again(store, row, f"could not rerun a failed job ({err}); repairing instead",
                      rerun_refused=obs.head_sha, rerun_jobs=[])
        return
    ctx.note(f"{row['key']}: reran {len(jobs)} failed CI job(s) on {obs.head_sha[:8]}")


def _ask_to_merge(ctx: TickContext, gh: GitHubClient, repo: str, row: dict, obs: PullRequestObs) -> None:
    """Ask GitHub to merge the PR, pinned to the head that was approved and green. Refused because the head
    moved: recorded, the request forgotten, and the next observation decides again."""
    store = ctx.store
    try:
        gh.merge_when_ready(obs.node_id, queue=ctx.merge_queue.get(repo, False), head=obs.head_sha)
    except GitHubError as err:
        if "head branch was modified" in str(err).lower():
            _decide_again(store, row, f"GitHub refused to merge {obs.head_sha[:8]}: the head moved since; deciding "
                                      "again from the next observation", merge_head=None)
        else:
            with store.tx():
                store.add_event(row["id"], "github", f"could not ask GitHub to merge: {err}", "warn")


def _decide_pr(ctx: TickContext, gh: GitHubClient, repo: str, row: dict, obs: PullRequestObs) -> None:
    """Decide from the issue's pull request and apply it (unless a run started or ended meanwhile), then ask
    GitHub to merge, or clean up after a merge, as decided."""
    cfg, store = ctx.cfg, ctx.store
    project = cfg.project(row["project_id"])
    pd = decide_pull_request(row, json.loads(row["gh_snapshot"] or "{}"), obs, cfg.github, project.trusted_reviewers,
                             utcnow())
    d = pd.decision
    if ctx.dry_run:
        for e in d.events:
            ctx.note(f"{row['key']}: {e.message}")
        return
    if pd.failing and d.fields.get("pending_run_type") == "ci_repair":
        d = _with_job_logs(gh, repo, d)
    with store.tx():
        fresh = store.issue(row["id"])
        if fresh["active_run_id"] != row["active_run_id"] or fresh["pending_run_type"] != row["pending_run_type"]:
            return          # a run started or ended meanwhile: decide on the next observation
        apply_decision(store, fresh, d)
        store.update_issue(row["id"], {"gh_observed_at": iso(), "gh_snapshot": json.dumps(pd.snapshot, sort_keys=True)})
    for e in d.events:
        if e.kind == "github":
            ctx.note(f"{row['key']}: {e.message}")
    if pd.rerun:
        _rerun_jobs(ctx, gh, repo, row, obs, pd.rerun)
    if pd.flaky:
        with store.tx():
            counts = json.loads(store.meta_get("ci.flaky") or "{}")
            for name in pd.flaky:
                counts[name] = counts.get(name, 0) + 1
            store.meta_set("ci.flaky", json.dumps(counts, sort_keys=True))
    if pd.merge_when_ready:
        _ask_to_merge(ctx, gh, repo, row, obs)
    if pd.rereview:
        try:
            gh.request_reviews(obs.node_id, pd.rereview)
            message, level = f"asked for a new review of {obs.head_sha[:8]}", "info"
        except GitHubError as err:
            message, level = f"could not ask for a new review: {err}", "warn"
        with store.tx():
            store.add_event(row["id"], "github", message, level)
    if pd.cleanup and row["worktree"] and not row["active_run_id"] and row.get("host") in (None, ctx.cfg.runner.host):
        how = remove_worktree(project, Path(row["worktree"]), row["branch"])       # the host that holds it
        with store.tx():
            store.add_event(row["id"], "git", f"worktree {row['worktree']}: {how}",
                            "warn" if how.startswith("kept") else "info")


# ---- launch: claim pending runs and start their workers, up to the cap

def launch(ctx: TickContext) -> dict:
    cfg, store = ctx.cfg, ctx.store
    me = cfg.runner.host
    stored, active, runnable = store.launch_view(me, iso())
    if paused_setting(cfg, stored["runner.paused"]):
        return {"paused": True, "launched": [], "waiting": [i["key"] for i in runnable]}
    provider = active_hold(json.loads(stored["runner.codex_hold"] or "null"), utcnow())
    if provider:
        return _hold_launches(ctx, provider)
    free = cfg.runner.max_concurrent_runs - active
    alive = {h["name"] for h in ctx.hosts() if h["silent_seconds"] < cfg.runner.host_timeout} | {me}
    launched, waiting, held = [], [], {}
    capped = cfg.codex.max_tokens_per_issue is not None or cfg.codex.max_tokens_per_day is not None
    day_spent = store.tokens_spent(since=utc_day_start()) if capped else 0
    for issue in runnable:
        if issue.get("paused") or (issue.get("host") and issue["host"] in alive - {me}):
            waiting.append(issue["key"])        # paused, or its worktree and thread live on another host
            continue
        hold = token_hold(cfg.codex, store.tokens_spent(issue["id"]) if capped else 0, day_spent)
        if hold:
            waiting.append(issue["key"])
            held[issue["key"]] = hold
            continue
        if free <= 0:
            waiting.append(issue["key"])
            continue
        try:
            project = cfg.project(issue["project_id"])
        except ConfigError:
            waiting.append(issue["key"])
            continue
        if ctx.dry_run:
            ctx.note(f"{issue['key']}: would launch a {run_label(issue['pending_run_type'])} run")
            free -= 1
            continue
        try:
            run_id = claim(cfg, store, issue["id"], project)
        except IllegalTransition as e:
            with store.tx():  # never let one bad pending run block the others
                store.update_issue(issue["id"], NO_PENDING_RUN)
                store.add_event(issue["id"], "run", f"pending {issue['pending_run_type']} run dropped: {e}", "error")
            ctx.note(f"{issue['key']}: pending run dropped: {e}")
            continue
        if run_id is None:
            continue
        pid = spawn_worker(cfg, run_id)
        with store.tx():
            store.update_run(run_id, {"worker_pid": pid, "worker_started": proc_start_time(pid)})
            store.add_event(issue["id"], "run", f"worker {pid} launched for run {run_id}", run_id=run_id)
        launched.append({"issue": issue["key"], "run_id": run_id, "pid": pid})
        ctx.note(f"{issue['key']}: launched run {run_id} (pid {pid})")
        free -= 1
    return {"launched": launched, "waiting": waiting, **({"held": held} if held else {})}


def _hold_launches(ctx: TickContext, hold: dict) -> dict:
    """Codex's provider refused: nothing launches until the hold ends. Each waiting issue's session hears it once
    per hold."""
    store = ctx.store
    runnable = store.runnable_issues(iso())
    if not ctx.dry_run:
        with store.tx():
            for issue in runnable:
                seen = f"hold:{hold['since']}:{issue['id']}"
                if not store.seen(seen):
                    store.mark_seen(seen)
                    apply_decision(store, issue, Decision(outbox=(activity("thought", hold_notice(hold)),)))
    if runnable:
        ctx.note(f"runs held until {hold['until']}: {hold['reason']}")
    return {"launched": [], "waiting": [i["key"] for i in runnable], "codex_hold": hold,
            **({"held": {i["key"]: f"Codex: {hold['reason']} (until {hold['until']})" for i in runnable}}
               if runnable else {})}


def claim(cfg: Config, store: Store, issue_id: int, project: ProjectConfig) -> int | None:
    """Atomic claim: the pending run becomes a `claimed` run row and the factory state moves."""
    with store.tx():
        row = store.issue_by_id(issue_id)
        if not row:
            return None
        branch = row["branch"] or branch_for(project, row["key"], row["title"])
        worktree = row["worktree"] or str(worktree_for(project, row["key"]))
        run_id = store.claim_run(issue_id, host=cfg.runner.host)
        if run_id is None:
            return None
        run = store.run(run_id)
        apply_decision(store, store.issue(issue_id), decide_claim(row, run["run_type"], branch, worktree),
                       run_id)
        return run_id


def spawn_worker(cfg: Config, run_id: int) -> int:
    """Start `patchrelay run --run-id N` detached, in its own process group; returns its pid."""
    logs = cfg.state_dir / "logs"
    _secure_dir(logs)
    # Import the module (its bytecode is cached) instead of running the file as a script (recompiled at
    # every start): a worker starts faster.
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); import patchrelay; "
            "sys.argv[0] = 'patchrelay'; patchrelay.main()", here]
    if cfg.path:
        argv += ["--config", str(cfg.path)]
    argv += ["run", "--run-id", str(run_id)]
    with open(logs / f"run-{run_id}.log", "ab") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    _SPAWNED.append(p)
    return p.pid


_SPAWNED: list[subprocess.Popen] = []


def reap_workers() -> None:
    """Collect the exit status of workers this process launched and that have ended (watch mode runs for
    days; only the Popen that launched a child may reap it, or a concurrent wait would read status 0)."""
    _SPAWNED[:] = [p for p in _SPAWNED if p.poll() is None]


# ---- gc: worktrees of closed issues reclaimed

_LAST_RUN: dict[tuple[str, str], float] = {}    # (step, key) -> time.monotonic() this process last ran it


def _once_a_minute(step: str, key: str) -> bool:
    """True, and remembered, when this process has not run `step` for `key` in the last minute: a `watch`
    ticks every few seconds, and some steps need not run that often (a cron tick is a new process each time)."""
    last = _LAST_RUN.get((step, key))
    if last is not None and time.monotonic() - last < 60.0:
        return False
    _LAST_RUN[(step, key)] = time.monotonic()
    return True


def collect_worktrees(ctx: TickContext) -> dict:
    """Remove the worktree (and local branch) of every issue closed (done, canceled, failed, escalated or
    released) more than runner.worktree_retention_hours ago, unless it holds work (uncommitted changes,
    unpushed commits): that one is kept and `status` lists it. A merged PR's remote branch goes too
    (github.delete_merged_branches); a failed or canceled issue's stays. An issue that comes back gets its
    worktree rebuilt from the pushed branch."""
    cfg, store = ctx.cfg, ctx.store
    if not ctx.dry_run and not _once_a_minute("gc", cfg.runner.host):
        return {"skipped": "ran less than a minute ago"}        # watch: once a minute is enough
    before = iso(utcnow() - dt.timedelta(hours=cfg.runner.worktree_retention_hours))
    result: dict[str, Any] = {"removed": [], "kept": [], "errors": []}
    for row in store.closed_worktrees(host=cfg.runner.host):      # each host collects the worktrees it holds
        if row["updated_at"] > before:
            break
        try:
            project = cfg.project(row["project_id"])
        except ConfigError:
            continue
        path = Path(row["worktree"])
        try:
            held = work_held(path) if path.is_dir() else None
            if held:
                result["kept"].append({"issue": row["key"], "worktree": str(path), "holds": held})
                continue
            if ctx.dry_run:
                ctx.note(f"{row['key']}: would remove worktree {path}")
                continue
            how = remove_worktree(project, path, row["branch"]) if path.is_dir() else "already gone"
            remote = delete_remote_branch(cfg, project, row["branch"]) \
                if row["factory_state"] == "done" and row["branch"] and cfg.github.delete_merged_branches else None
        except GitError as e:
            result["errors"].append(f"{row['key']}: {e}")
            continue
        with store.tx():
            store.update_issue(row["id"], {"worktree": None})
            store.add_event(row["id"], "git", f"worktree {path}: {how} ({row['factory_state']} for longer than "
                                              f"runner.worktree_retention_hours)" +
                            (f"; remote branch {row['branch']}: {remote}" if remote else ""))
        result["removed"].append(row["key"])
        ctx.note(f"{row['key']}: removed worktree {path}")
    if not ctx.dry_run:
        _record_worktrees(store, cfg.runner.host, result["kept"], force=bool(result["removed"]))
    return result


def _record_worktrees(store: Store, host: str, kept: list[dict], force: bool = False) -> None:
    """What `status` shows of this host's worktrees, kept cheap to read: the ones kept for the work they hold
    (each pass), and how many exist with their disk use (measured when their number changes, else at most
    hourly: walking big checkouts costs). Each host of a fleet records its own disk."""
    recorded = store.worktrees_recorded()["hosts"].get(host) or {}
    if recorded.get("kept", []) != kept:
        with store.tx():
            store.meta_set(f"worktrees.kept:{host}", json.dumps(kept))
    paths = [Path(r["worktree"]) for r in store.worktree_paths(host) if Path(r["worktree"]).is_dir()]
    if not force and recorded.get("at") and recorded.get("count") == len(paths) \
            and (age_seconds(recorded.get("at")) or 1e9) < 3600:
        return
    with store.tx():
        store.meta_set(f"worktrees.usage:{host}", json.dumps({"at": iso(), "count": len(paths),
                                                             "bytes": sum(disk_use(p) for p in paths)}))


# ---- the tick: every step, each failure reported, the others still run

class _DryRunRollback(Exception):
    pass


def once_per_fleet(name: str, fn: Callable[[TickContext], dict]) -> Callable[[TickContext], dict]:
    """A step one host of a fleet takes per tick: the holder of its lease (kept while it ticks, so one host
    polls; when it falls silent the lease runs out and the next host carries on from the stored cursors)."""
    def run(c: TickContext) -> dict:
        holder = c.leases.get(f"step:{name}")
        if not c.dry_run and holder != c.cfg.runner.host:
            return {"skipped": f"held by {holder or 'another host'}"}
        return fn(c)
    return run


FLEET_STEPS = ("intake", "observe", "publish")     # once per fleet per tick: their leases are taken at its start


def _prune_due(cfg: Config, store: Store) -> bool:
    """A daily step, looked at (one read) at most once a minute per process."""
    if not _once_a_minute("prune", cfg.database_label):
        return False
    last = parse_iso(store.meta_get("prune.last"))
    return last is None or (utcnow() - last).total_seconds() > 86400


def run_tick(cfg: Config, store: Store, dry_run: bool = False) -> dict:
    """One pass. A dry run takes every step against a transaction that is rolled back at the end, so it
    shows what the pass would do (launches of the runs its own intake would queue included) and what it
    would cost in API requests, and changes nothing."""
    ctx = TickContext(cfg, store, dry_run)
    report: dict[str, Any] = {"result": "ok", "dry_run": dry_run, "steps": {}, "errors": []}
    tick_id = None
    if not dry_run:
        tick_id, ctx.leases, ctx.began = store.begin_tick(
            os.getpid(), proc_start_time(os.getpid()), cfg.runner.host, cfg.runner.max_concurrent_runs,
            [f"step:{n}" for n in FLEET_STEPS], cfg.runner.host_timeout / 2)

    def step(name: str, fn: Callable[[TickContext], dict]) -> None:
        try:
            result = report["steps"][name] = fn(ctx)
        except PatchRelayError as e:
            report["result"] = "failed"
            report["errors"].append(f"{name}: {e}")
            report["steps"][name] = {"error": str(e)}
            report["exit_code"] = max(report.get("exit_code", 1), e.exit_code)   # a config error is 2
            log.info("%s failed: %s", name, e)  # the CLI prints the error once
            return
        except sqlite3.Error as e:
            report["result"] = "failed"
            report["errors"].append(f"{name}: database {cfg.database_label}: {type(e).__name__}: {e}")
            report["steps"][name] = {"error": f"{type(e).__name__}: {e}"}
            return
        except Exception as e:  # noqa: BLE001 - a step's bug must not stop the other steps
            report["result"] = "failed"
            report["errors"].append(f"{name}: {type(e).__name__}: {redact(str(e))}")
            report["steps"][name] = {"error": f"{type(e).__name__}: {e}"}
            log.exception("%s failed", name)
            return
        for err in (result or {}).get("errors") or ():   # a step that went on past one issue's failure
            report["result"] = "failed"
            report["errors"].append(f"{name}: {err}")

    def steps() -> None:
        step("reconcile", reconcile)
        step("intake", once_per_fleet("intake", intake))
        step("observe", once_per_fleet("observe", observe))
        step("launch", launch)
        step("gc", collect_worktrees)
        if dry_run:
            queued = store.outbox_queued()
            writes = sum(2 if o["kind"] == "issue_state" else 1 for o in queued)
            reads = ctx._linear.requests_made if ctx._linear else 0
            report["steps"]["publish"] = {"would_send": len(queued)}
            report["api_cost"] = {"linear_reads": reads, "linear_writes": writes, "linear_requests": reads + writes}
            if queued:
                ctx.note(f"would send {len(queued)} queued Linear message(s)")
            ctx.note(f"would cost {reads + writes} Linear request(s): {reads} read(s) made, "
                     f"up to {writes} write(s) to send")
            taken = (report["steps"].get("intake") or {}).get("queued") or []
            if "intake" in report["steps"] and not {"skipped", "error"} & set(report["steps"]["intake"]):
                rule = delegation_rule(cfg, store.meta_get("linear.mode") == "app")
                ctx.note(f"would take {len(taken)} issue(s) ({rule})")
        else:
            step("publish", once_per_fleet("publish", lambda c: publish(cfg, store, c.linear(), None)
                                           if store.outbox_queued() else {"sent": 0, "failed": 0, "queued": 0}))
            report["api_cost"] = {"linear_requests": ctx._linear.requests_made if ctx._linear else 0,
                                  "github_requests": ctx._github.requests_made if ctx._github else 0}
            if _prune_due(cfg, store):
                step("prune", lambda c: store.prune(iso(utcnow() - dt.timedelta(days=cfg.database_retention_days))))

    if dry_run:
        try:
            with store.tx(deferred=True):
                steps()
                raise _DryRunRollback()
        except _DryRunRollback:
            pass
    else:
        steps()
    report["actions"] = ctx.actions
    if tick_id is not None:
        store.end_tick(tick_id, report["result"], {k: v for k, v in report.items() if k != "actions"})
        _reports_written(cfg, store, report)
    return report


def _reports_written(cfg: Config, store: Store, report: dict) -> None:
    if not (cfg.metrics.textfile or cfg.metrics.html):
        return
    try:
        write_reports(cfg, store)
    except (OSError, PatchRelayError, sqlite3.Error) as e:
        report["result"] = "failed"
        report["errors"].append(f"metrics: {redact(str(e))}")


def write_reports(cfg: Config, store: Store) -> None:
    """What every tick writes when asked: the Prometheus textfile, the status page and, with metrics.public_url,
    a page per issue under a name nobody can guess, linked once from the issue's Linear agent session."""
    m = cfg.metrics
    if m.textfile:
        write_atomic(m.textfile, current_metrics(cfg, store))
    if not m.html:
        return
    public = m.public_url
    write_atomic(m.html, status_page(cfg, store))       # it lists no issue page: it may be public itself
    if not public:
        return
    for row in store.issues_listed(changed_since=iso(utcnow() - dt.timedelta(days=1))):
        slug = store.page_slug(row["id"])
        write_atomic(m.html.parent / f"issue-{slug}.html", issue_page(store, store.issue(row["id"])))
        if row["agent_session_id"] and not store.seen(f"page-link:{row['id']}"):
            with store.tx():
                store.mark_seen(f"page-link:{row['id']}")
                apply_decision(store, row, Decision(outbox=(Outbound("session_page", {
                    "url": f"{public}issue-{slug}.html"}),)))


# ============================================================== 13. cli
# click commands. Parse, call, print (tabulate or --json). Errors become one
# line on stderr and an exit code: 1 for a failed step or run, 2 for usage and
# config errors.

# ---- the command group: context, output helpers, errors to exit codes

def example_config() -> str:
    """The commented example config: patchrelay.yaml.example, beside this file in a checkout, or installed as
    data (share/patchrelay/) by pip. It lives once."""
    import site
    for d in (Path(__file__).resolve().parent, Path(sys.prefix) / "share" / "patchrelay",
              Path(sysconfig.get_path("data")) / "share" / "patchrelay",
              Path(site.getuserbase()) / "share" / "patchrelay"):     # pip install --user
        with contextlib.suppress(OSError):
            return (d / "patchrelay.yaml.example").read_text()
    raise UsageError("patchrelay.yaml.example is missing from this installation; reinstall PatchRelay")


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False


class App:
    """A command's context: the config and the store, each opened on first use (a read never creates the
    database)."""

    def __init__(self, config_path: str | None, verbose: bool):
        self.config_path, self.verbose = config_path, verbose
        self._cfg: Config | None = None
        self._store: Store | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self.config_path)
        return self._cfg

    def store(self, readonly: bool = False, verify: bool = False) -> Store:
        """The database. `verify`: an operator's write (pause, retry, ...) first checks that the file is
        sound (PRAGMA quick_check), so a damaged database is never written to by hand."""
        if self._store is None:
            self._store = Store(self.cfg.database_path, readonly=readonly, verify=verify, url=self.cfg.database_url)
        return self._store

    def has_database(self) -> bool:
        """Whether the database exists (a read never creates it); a database.path that cannot be one is an
        error here too."""
        if self.cfg.database_url:
            return True
        check_database_path(self.cfg.database_path)
        return self.cfg.database_path.exists()


def _issue_or_fail(store: Store, key: str) -> dict:
    key = issue_ref(key)
    row = store.issue_by_key(key)
    if not row:
        raise UsageError(f"issue {key}: not tracked by PatchRelay (see `patchrelay status`)")
    return row


def _late_config(click_ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and isinstance(click_ctx.obj, App):
        click_ctx.obj.config_path, click_ctx.obj._cfg = value, None


def _late_verbose(click_ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and isinstance(click_ctx.obj, App):
        click_ctx.obj.verbose = True
        _setup_logging(True)


def _common_options() -> list[click.Parameter]:
    """--config and -v, accepted after the subcommand too (`patchrelay status --config X -v`)."""
    return [click.Option(["--config"], metavar="PATH", expose_value=False, is_eager=True, callback=_late_config,
                         help="Config file (also accepted before the command)."),
            click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_late_verbose,
                         help="Log what happens to stderr: every HTTP call and retry wait.")]


class CLI(click.Group):
    """The command group: errors become one line, and every command (of nested groups too) takes the
    common options."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_common_options())
        super().add_command(cmd, name)

    def invoke(self, click_ctx: click.Context) -> Any:
        try:
            return super().invoke(click_ctx)
        except PatchRelayError as e:
            click.echo(f"patchrelay: {e}", err=True)
            click_ctx.exit(e.exit_code)
        except sqlite3.Error as e:
            obj = click_ctx.obj if isinstance(click_ctx.obj, App) else None
            where = obj._cfg.database_path if obj and obj._cfg else "the database"
            click.echo(f"patchrelay: database {where}: {type(e).__name__}: {e} (`patchrelay doctor` checks it)",
                       err=True)
            click_ctx.exit(1)
        except TickLocked:
            click.echo("patchrelay: another tick is running; skipped")
            click_ctx.exit(0)


@click.group(cls=CLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", help="Config file (default: $PATCHRELAY_CONFIG, then "
              "$XDG_CONFIG_HOME/patchrelay/patchrelay.yaml).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.version_option(__version__, prog_name="patchrelay")
@click.pass_context
def cli(click_ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """PatchRelay: delegate a Linear issue, get back a pushed branch."""
    _setup_logging(verbose)
    click_ctx.obj = App(config_path, verbose)
    click_ctx.call_on_close(lambda: click_ctx.obj._store and click_ctx.obj._store.close())


# ---- core commands: the tick, and what is tracked

@cli.command("tick")
@click.option("--dry-run", is_flag=True, help="Poll and print what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def tick_cmd(app: App, dry_run: bool, as_json: bool) -> None:
    """One pass: reconcile, poll Linear, decide, launch workers, publish."""
    with tick_lock(app.cfg):
        report = run_tick(app.cfg, app.store(), dry_run)
    if as_json:
        _dump(report)
    else:
        for a in report["actions"]:
            click.echo(("would: " if dry_run and not a.startswith("would") else "") + a)
        for e in report["errors"]:
            click.echo(f"failed: {e}", err=True)
        if not report["actions"] and not report["errors"]:
            click.echo("nothing to do")
    if report["result"] != "ok":
        raise click.exceptions.Exit(report.get("exit_code", 1))


@cli.command("watch")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.2), help="Seconds from one tick's start to the next's.")
@click.pass_obj
def watch_cmd(app: App, interval: float) -> None:
    """Tick in a loop in the foreground; Ctrl-C stops between ticks."""
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cfg, store = app.cfg, app.store()
    watcher = ConfigWatcher(cfg, app.config_path, service_env_file())
    click.echo(f"watching every {interval:g} s; Ctrl-C to stop; {cfg.path} is reloaded when it changes")
    due = time.monotonic()
    while not stop["now"]:
        # a fixed cadence, as a timer's: a tick starts `interval` seconds after the last one started (at once
        # when that one ran longer), so a host polls at one rate whether its ticks are light or heavy, and a
        # fleet's lease holder polls as often as one host would
        due = max(due, time.monotonic()) + interval
        fresh, said = watcher.check()
        if said:
            click.echo(f"{time.strftime('%H:%M:%S')} {said}", err=fresh is None)
            if fresh is not None and fresh.database_label != cfg.database_label:
                store.close()
                store = app._store = Store(fresh.database_path, url=fresh.database_url)
            if fresh is not None:
                cfg = app._cfg = fresh
            with store.tx():
                store.add_event(None, "config", said, level="info" if fresh is not None else "error")
        try:
            with tick_lock(cfg):
                report = run_tick(cfg, store)
            for a in report["actions"]:
                click.echo(f"{time.strftime('%H:%M:%S')} {a}")
            for e in report["errors"]:
                click.echo(f"{time.strftime('%H:%M:%S')} failed: {e}", err=True)
        except TickLocked:
            pass
        reap_workers()
        while not stop["now"] and time.monotonic() < due:
            time.sleep(min(0.1, max(0.0, due - time.monotonic())))
    click.echo("stopped")


def _active_run(store: Store, row: dict) -> dict | None:
    return store.run_by_id(row["active_run_id"]) if row.get("active_run_id") else None


def _issue_item(r: Mapping[str, Any], detail: bool = False) -> dict:
    """One issue in every command's JSON (status, list, show): the same key names everywhere, documented in
    the README. `r` is an issues row with active_run_type / active_run_status (Store.issues_listed); `detail`
    adds what `show` says of one issue."""
    out = {"key": r["key"], "title": r["title"], "project": r["project_id"],
           "linear_state": r["linear_state"], "factory_state": r["factory_state"],
           "pending_run": r["pending_run_type"],
           "active_run": {"id": r["active_run_id"], "type": r["active_run_type"], "status": r["active_run_status"]}
           if r["active_run_id"] and r.get("active_run_type") else None,
           "paused": json.loads(r["paused"]) if r["paused"] else None,
           "pr": {"number": r["pr_number"], "url": r["pr_url"], "state": r["pr_state"], "ci": r["pr_ci"],
                  "review": r["pr_review"], "queue": r["pr_queue"],
                  "waiting_review_of": r.get("pr_waiting_review")} if r["pr_number"] else None,
           "age_seconds": round(age_seconds(r["created_at"]) or 0), "updated_at": r["updated_at"]}
    if detail:
        out.update({"url": r["url"], "delegated": bool(r["delegated"]), "agent_session_id": r["agent_session_id"],
                    "branch": r["branch"], "worktree": r["worktree"], "thread_id": r["thread_id"],
                    "retries": r["retries"], "pending_since": r["pending_since"], "not_before": r["not_before"],
                    "pending_context": json.loads(r["pending_context"]) if r["pending_context"] else None,
                    "created_at": r["created_at"]})
    return out


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    """A table: aligned on a terminal, tab-separated (with its header line) when piped."""
    if sys.stdout.isatty():
        from tabulate import tabulate
        return tabulate(rows, headers=headers)
    clean = lambda v: "" if v is None else str(v).replace("\t", " ").replace("\n", " ")  # noqa: E731
    return "\n".join("\t".join(clean(v) for v in row) for row in [headers, *rows])


def _tokens_status(cfg: Config, store: Store | None) -> dict:
    cx = cfg.codex
    return {"today": store.tokens_spent(since=utc_day_start()) if store else 0, "day_cap": cx.max_tokens_per_day,
            "issue_cap": cx.max_tokens_per_issue, "run_cap": cx.max_tokens_per_run}


def _review_column(pr: dict | None) -> str:
    if pr and pr.get("waiting_review_of"):
        return f"waiting for a review of {pr['waiting_review_of'][:7]}"
    return ((pr or {}).get("review") or "").lower().replace("_", " ")


def _issue_table(issues: list[dict]) -> str:
    return _table([[i["key"], shown(one_line(i["title"]), 40), i["linear_state"] or "",
                    i["factory_state"] + (" (paused)" if i["paused"] else ""),
                    i["pending_run"] or "",
                    f"{i['active_run']['type']} #{i['active_run']['id']} {i['active_run']['status']}"
                    if i["active_run"] else "",
                    f"#{i['pr']['number']}" if i["pr"] else "", (i["pr"] or {}).get("ci") or "",
                    _review_column(i["pr"]),
                    ((i["pr"] or {}).get("queue") or "").lower(), _age(i["age_seconds"])] for i in issues],
                  headers=["issue", "title", "linear", "state", "pending", "active run", "pr", "checks",
                           "review", "queue", "age"])


@cli.command("list")
@click.option("--state", help="only issues in this factory state (e.g. done, pr_open, awaiting_input)")
@click.option("--project", help="only issues of this project id")
@click.option("--limit", type=click.IntRange(min=1), help="at most this many, most recently changed first")
@click.option("--json", "as_json", is_flag=True, help="one JSON document: {\"issues\": [...]}")
@click.pass_obj
def list_issues(app: App, state: str | None, project: str | None, limit: int | None, as_json: bool) -> None:
    """Every tracked issue (closed ones too), most recently changed first."""
    rows = [] if not app.has_database() else \
        app.store(readonly=True).issues_listed(state=state, project=project, limit=limit)
    issues = [_issue_item(r) for r in rows]
    if as_json:
        _dump({"issues": issues})
    else:
        click.echo(_issue_table(issues) if issues else "No matching issues.")


def _status_data(cfg: Config, store: Store | None, show_all: bool) -> dict:
    """`status` as data (its --json): what needs attention, the outbox, the APIs, the last tick."""
    if store is None:
        return {"issues": [], "others": 0, "outbox": [], "api": [], "api_use": api_use([], {}), "last_tick": None,
                "paused": runner_paused(cfg, None), "unrouted": [], "tokens": _tokens_status(cfg, None),
                "codex_hold": None, "flaky_checks": {}, "worktrees": {"count": 0, "bytes": 0, "kept": []},
                "linear_token": linear_token_status(cfg, None), "hosts": []}
    day_ago = iso(utcnow() - dt.timedelta(days=1))
    issues = [_issue_item(r) for r in store.issues_listed(changed_since=None if show_all else day_ago)]
    others = 0 if show_all else store.issues_count() - len(issues)
    outbox = [{"id": o["id"], "issue": o["issue_key"], "kind": o["kind"], "status": o["status"],
               "attempts": o["attempts"], "last_error": o["last_error"]} for o in store.outbox_pending()]
    api = [{"api": b["api"], "requests_remaining": b["requests_remaining"], "requests_limit": b["requests_limit"],
            "complexity_remaining": b["complexity_remaining"], "reset_at": b["reset_at"],
            "limited_until": b["limited_until"], "last_error": b["last_error"]} for b in store.budgets()]
    t = store.last_tick()
    last = None
    if t:
        result = t["result"] or ("running" if process_alive(t["pid"], t["pid_started"]) else "interrupted")
        errors = (json.loads(t["summary"]) if t["summary"] else {}).get("errors") or []
        last = {"started_at": t["started_at"], "ended_at": t["ended_at"], "result": result, "errors": errors}
    worktrees = store.worktrees_recorded()
    return {"issues": issues, "others": others, "outbox": outbox, "api": api,
            "api_use": api_use(store.recent_ticks(), {b["api"]: b["requests_limit"] for b in api}),
            "last_tick": last, "paused": runner_paused(cfg, store),
            "unrouted": [{"key": u["issue_key"], "at": u["at"], "message": u["message"]} for u in store.unrouted()],
            "tokens": _tokens_status(cfg, store), "codex_hold": codex_hold(store),
            "flaky_checks": json.loads(store.meta_get("ci.flaky") or "{}"),
            "worktrees": {k: v for k, v in worktrees.items() if k != "hosts"},
            "linear_token": linear_token_status(cfg, store), "hosts": _hosts_status(cfg, store, worktrees["hosts"])}


def _hosts_status(cfg: Config, store: Store, disks: Mapping[str, dict]) -> list[dict]:
    """The fleet's members: name, last seen, alive, active runs, their cap, the once-per-fleet steps they hold,
    the worktrees on their disk (`disks`: Store.worktrees_recorded()["hosts"])."""
    return [{"name": h["name"], "last_seen": iso(dt.datetime.fromtimestamp(float(h["seen_at"]), dt.timezone.utc)),
             "silent_seconds": h["silent_seconds"], "alive": h["silent_seconds"] < cfg.runner.host_timeout,
             "active_runs": h["active_runs"], "max_concurrent_runs": h["max_runs"],
             "holds": [x.removeprefix("step:") for x in h["leases"] if x.startswith("step:")],
             "worktrees": {k: (disks.get(h["name"]) or {}).get(k, 0) for k in ("count", "bytes")}}
            for h in store.hosts()]


def _render_attention(data: dict) -> None:
    """What holds everything up, first: unrouted delegations, a pause, a hold of Codex's provider."""
    for u in data["unrouted"]:
        click.echo(f"unrouted: {u['key'] or '?'} (delegated {u['at']}; no project routes it)")
    if data["unrouted"]:
        click.echo()
    paused = data["paused"]
    if paused:
        click.echo(f"PAUSED by {paused.get('by')}" + (f" at {paused['at']}" if paused.get("at") else "")
                   + (f": {paused['reason']}" if paused.get("reason") else "") + " (`patchrelay resume`)\n")
    lt = data["linear_token"]
    if lt.get("refresh_error"):
        click.echo(f"LINEAR: {lt['refresh_error']}; Linear writes wait in the outbox (`patchrelay linear connect`)\n")
    hold = data["codex_hold"]
    if hold:
        click.echo(f"HELD until {hold['until']}: {hold['reason']}" + (f"; fix: {hold['fix']}" if hold.get("fix") else
                                                                     " (lifts by itself)") + "\n")


def _render_linear_token(lt: dict) -> None:
    if lt["source"] == "connected":
        click.echo(f"Linear token: connected app {lt['app_user']}, expires {lt['expires_at'] or 'never'} "
                   f"(refreshes itself; {lt['refreshes']} so far)")
    elif lt["source"] == "environment":
        click.echo("Linear token: from the environment")


def _render_fleet(hosts: list[dict]) -> None:
    if len(hosts) > 1:
        click.echo("fleet: " + "; ".join(
            f"{h['name']} {'up' if h['alive'] else 'SILENT'} ({h['active_runs']}/{h['max_concurrent_runs']} runs"
            + (f", holds {', '.join(h['holds'])}" if h["holds"] else "") + f", seen {_age(h['silent_seconds'])} ago)"
            for h in hosts))


def _render_status(data: dict, cx: CodexConfig) -> None:
    _render_attention(data)
    issues, others = data["issues"], data["others"]
    if issues:
        click.echo(_issue_table(issues))
    elif not others:
        click.echo("No tracked issues yet.")
    if others:
        click.echo(f"... and {others} closed issue(s) unchanged for a day (`patchrelay status --all`, "
                   "`patchrelay list`)")
    caps = ", ".join(f"{k} {v:,}" for k, v in (("per run", cx.max_tokens_per_run), ("per issue",
                     cx.max_tokens_per_issue), ("per day", cx.max_tokens_per_day)) if v is not None)
    if data["tokens"]["today"] or caps:
        click.echo(f"tokens today: {data['tokens']['today']:,}" + (f" (caps: {caps})" if caps else ""))
    click.echo()
    if data["outbox"]:
        click.echo(_table([[o["id"], o["issue"] or "", o["kind"], o["status"], o["attempts"],
                              one_line(o["last_error"], 60)] for o in data["outbox"]],
                            headers=["outbox", "issue", "kind", "status", "attempts", "last error"]))
    else:
        click.echo("Linear outbox: empty")
    for b in data["api"]:
        line = f"{b['api']} API: {b['requests_remaining'] if b['requests_remaining'] is not None else '?'}" \
               f"/{b['requests_limit'] or '?'} requests left"
        if b["complexity_remaining"] is not None:
            line += f", {b['complexity_remaining']} complexity points left"
        if rate_limited_until(b, utcnow()):
            line += f"; rate limited until {b['limited_until']}"
        click.echo(line)
    _render_linear_token(data["linear_token"])
    _render_fleet(data["hosts"])
    use = data["api_use"]
    for name in ("linear", "github"):
        per = use.get(name)
        if per and per["projected_per_hour"] is not None:
            click.echo(f"{name} use: {per['requests_per_tick']:g} request(s) per tick, ~{per['projected_per_hour']:,}/h "
                       f"at one tick every {use['interval_seconds']:g} s"
                       + (f" ({per['share_of_limit']} % of the hourly limit)" if per["share_of_limit"] is not None
                          else ""))
    wt = data["worktrees"]
    if wt["count"]:
        click.echo(f"worktrees: {wt['count']}, {wt['bytes'] / 2 ** 20:,.0f} MiB" + (f" (as of {wt['at']})"
                                                                                   if wt.get("at") else ""))
    for k in wt["kept"]:
        click.echo(f"  kept: {k['issue']} {k['worktree']} holds {k['holds']}")
    if data["flaky_checks"]:
        click.echo("flaky checks (passed when rerun): " + ", ".join(f"{k} {v}" for k, v in
                                                                   sorted(data["flaky_checks"].items())))
    last = data["last_tick"]
    click.echo(f"last tick: {last['started_at']} {last['result']}" if last else "last tick: never")
    for e in (last or {}).get("errors") or []:
        click.echo(f"  {one_line(e, 200)}")


@cli.command("status")
@click.option("--all", "show_all", is_flag=True, help="every tracked issue, closed ones too (see also `list`)")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.option("--html", "html_path", metavar="PATH", help="Write the status page (one self-contained HTML file) "
              "to PATH.")
@click.pass_obj
def status_cmd(app: App, as_json: bool, show_all: bool, html_path: str | None) -> None:
    """What needs attention: open issues and those changed in the last day (a count of the rest; `--all` or
    `list` shows them), queued Linear messages, API budget, last tick (from SQLite only)."""
    store = app.store(readonly=True) if app.has_database() else None      # a read never creates the database
    if html_path:
        if store is None:
            raise UsageError(f"no database at {app.cfg.database_path} yet: nothing to show (the first "
                             "`patchrelay tick` creates it)")
        write_atomic(Path(html_path), status_page(app.cfg, store))
        click.echo(f"wrote {html_path}")
        return
    data = _status_data(app.cfg, store, show_all)
    if as_json:
        _dump(data)
    elif store is None:
        click.echo(f"No tracked issues yet (no database at {app.cfg.database_path}; the first "
                   "`patchrelay tick` creates it).")
    else:
        _render_status(data, app.cfg.codex)


def _age(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _untracked_events(store: Store, key: str) -> list[dict]:
    """What PatchRelay saw of an issue it does not track (ignored sessions, unrouted delegations)."""
    return [{"at": e["at"], "level": e["level"], "kind": e["kind"], "message": e["message"]}
            for e in store.events_for_key(key)]


def _show_data(store: Store, row: dict) -> dict:
    """`show` as data (its --json): the issue, its pull request, runs, events, outbox and inbox."""
    runs = [{k: r[k] for k in ("id", "run_type", "status", "attempt", "trigger", "thread_id", "claimed_at",
                               "started_at", "ended_at", "failure_reason", "summary", "worker_pid")}
            for r in store.runs_for_issue(row["id"])]
    events = [{"at": e["at"], "level": e["level"], "kind": e["kind"], "message": e["message"], "run_id": e["run_id"]}
              for e in store.events_for_issue(row["id"])]
    outbox = [{"id": o["id"], "kind": o["kind"], "status": o["status"], "attempts": o["attempts"],
               "payload": json.loads(o["payload"]), "last_error": o["last_error"]}
              for o in store.outbox_for_issue(row["id"])]
    inbox = [{"id": m["id"], "kind": m["kind"], "author": m["author"], "source": m["source"], "body": m["body"],
              "delivered_at": m["delivered_at"], "delivery": m["delivery"]} for m in store.inbox_for_issue(row["id"])]
    snap = json.loads(row.get("gh_snapshot") or "{}")
    pull = {"number": row["pr_number"], "url": row["pr_url"], "state": row["pr_state"], "head_sha": row["pr_head_sha"],
            "ci": row["pr_ci"], "checks": snap.get("checks") or {}, "review": row["pr_review"],
            "reviews_seen": len(PrMemory.load(snap.get("acted")).reviews), "queue": row["pr_queue"],
            "budgets_used": json.loads(row.get("repair_counts") or "{}")} if row["pr_number"] else None
    active = _active_run(store, row)
    item = _issue_item({**row, "active_run_type": active and active["run_type"],
                        "active_run_status": active and active["status"]}, detail=True)
    view = json.loads(active.get("live") or "null") if active else None
    live = {"run": active["id"], "message": view.get("message"), "command": view.get("command"),
            "exit_code": view.get("exit_code"), "at": view.get("at")} if active and view else None
    return {"issue": item, "pull_request": pull, "runs": runs, "events": events, "outbox": outbox, "inbox": inbox,
            "live": live}


# (label, key of the issue item) of the fields `show` prints, when set
_SHOWN_FIELDS = (("url", "url"), ("project_id", "project"), ("linear_state", "linear_state"),
                 ("factory_state", "factory_state"), ("delegated", "delegated"), ("pending_run_type", "pending_run"),
                 ("agent_session_id", "agent_session_id"), ("branch", "branch"), ("worktree", "worktree"),
                 ("thread_id", "thread_id"), ("retries", "retries"))


def _render_show(data: dict) -> None:
    item, pull, runs, inbox = data["issue"], data["pull_request"], data["runs"], data["inbox"]
    click.echo(f"{item['key']}  {shown(one_line(item['title']), 200)}")
    for label, k in _SHOWN_FIELDS:
        v = int(item[k]) if isinstance(item[k], bool) else item[k]
        if v not in (None, ""):
            click.echo(f"  {label}: {shown(v, 300)}")
    if item["paused"]:
        pz = item["paused"]
        click.echo(f"  paused: by {pz.get('by')} at {pz.get('at')}" + (f": {shown(pz['reason'], 200)}"
                                                                       if pz.get("reason") else ""))
    if pull:
        click.echo(f"\nPull request #{pull['number']} ({pull['state']}): {pull['url']}")
        click.echo(f"  head: {pull['head_sha'] or '?'}   checks: {pull['ci'] or '?'}   review: "
                   f"{(pull['review'] or 'none').lower()}   queue: {(pull['queue'] or 'not queued').lower()}")
        for name, concl in sorted(pull["checks"].items()):
            click.echo(f"    {name}: {str(concl).lower()}")
        if pull["budgets_used"]:
            click.echo("  repair budget used: " + ", ".join(f"{k} {v}" for k, v in sorted(pull["budgets_used"].items())))
    if runs:
        click.echo("\nRuns:")
        click.echo(_table([[r["id"], r["run_type"], r["status"], r["started_at"] or r["claimed_at"],
                              shown(one_line(r["failure_reason"] or r["summary"]), 70)] for r in runs],
                            headers=["run", "type", "status", "started", "summary / reason"]))
    if inbox:
        click.echo("\nMessages for the agent:")
        for m in inbox:
            click.echo(f"  [{m['kind']}] {shown(m['author'] or m['source'], 60)}: {shown(one_line(m['body']), 80)}"
                       f"  ({m['delivery'] or 'pending'})")
    if data["live"] and data["live"]["message"]:
        click.echo(f"\nAgent (run {data['live']['run']}, `patchrelay live {item['key']}`): "
                   f"{shown(one_line(data['live']['message'], 300), 300)}")
    click.echo("\nEvents:")
    for e in data["events"]:
        click.echo(f"  {e['at']} {e['level']:5} {e['kind']:9} {shown(e['message'], 500)}")


@cli.command("metrics")
@click.pass_obj
def metrics_cmd(app: App) -> None:
    """Prometheus metrics (text exposition format), read from the store in one pass."""
    if not app.has_database():
        raise UsageError(f"no database at {app.cfg.database_path} yet: nothing to measure (the first "
                         "`patchrelay tick` creates it)")
    click.echo(current_metrics(app.cfg, app.store(readonly=True)), nl=False)


@cli.command("show")
@click.argument("key", metavar="ISSUE")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def show_cmd(app: App, key: str, as_json: bool) -> None:
    """Everything known about one issue, and its event log."""
    key = issue_ref(key)
    store = app.store(readonly=True)
    row = store.issue_by_key(key)
    if row is not None:
        data = _show_data(store, row)
        _dump(data) if as_json else _render_show(data)
        return
    evs = _untracked_events(store, key)
    if not evs:
        raise UsageError(f"issue {key}: not tracked by PatchRelay and never seen (see `patchrelay status`)")
    if as_json:
        _dump({"issue": None, "key": key.upper(), "tracked": False, "events": evs})
        return
    click.echo(f"{key.upper()}: not tracked by PatchRelay\n\nEvents:")
    for e in evs:
        click.echo(f"  {e['at']} {e['level']:5} {e['kind']:9} {shown(e['message'], 500)}")


@cli.command("run")
@click.argument("key", metavar="ISSUE", required=False)
@click.option("--run-id", type=int, hidden=True, help="Worker mode: drive this claimed run (used by tick).")
@click.option("--force", is_flag=True, help="Run even though the issue is done or canceled.")
@click.pass_obj
def run_cmd(app: App, key: str | None, run_id: int | None, force: bool) -> None:
    """Run ISSUE's pending run (or a new implementation run) in the foreground."""
    cfg, store = app.cfg, app.store()
    if run_id is not None:         # a worker: what it does goes to its log (logs/run-N.log), line by line
        result = drive_run(cfg, store, run_id, echo=lambda line: click.echo(f"{time.strftime('%H:%M:%S')} "
                                                                            f"{redact(line)}"))
        raise click.exceptions.Exit(0 if result["status"] == "completed" else 1)
    if key is None:
        raise UsageError("run: give an ISSUE key (or a Linear issue URL)")
    key = issue_ref(key)
    row = store.issue_by_key(key)
    if row is None:
        try:
            obs = linear_client(cfg, store).issue(key)
        except LinearError as e:
            if e.transient:
                raise
            obs = None          # "Entity not found" and the like: the key is simply not in Linear
        if obs is None:
            raise UsageError(f"issue {key}: not found in Linear")
        project = resolve_project(cfg, obs.key, obs.team_key, obs.team_id)
        if project is None:
            raise UsageError(f"issue {obs.key}: no project routes it (check issue_key_prefixes / linear_team_keys)")
        with store.tx():
            apply_decision(store, None, adopt_issue(obs, project.id, "patchrelay run", None, iso()))
        row = _issue_or_fail(store, obs.key)
    if row["active_run_id"]:
        raise UsageError(f"issue {row['key']}: run {row['active_run_id']} is already active")
    if not row["pending_run_type"]:
        if row["factory_state"] in CLOSED_STATES:
            if not force:
                raise UsageError(f"issue {row['key']}: is {row['factory_state']}; add --force to run it anyway "
                                 "(or `patchrelay retry` to queue it for the next tick)")
        with store.tx():
            apply_decision(store, row, start_work(row, "patchrelay run", None, row["key"], iso()))
    run_id = claim(cfg, store, row["id"], cfg.project(row["project_id"]))
    if run_id is None:
        raise UsageError(f"issue {row['key']}: another worker claimed it first")
    result = drive_run(cfg, store, run_id, echo=click.echo)
    raise click.exceptions.Exit(0 if result["status"] == "completed" else 1)


@cli.command("report")
@click.argument("key", metavar="ISSUE")
@click.option("--run", "run_id", type=click.IntRange(min=1), help="Only this run.")
@click.option("--type", "run_type", type=click.Choice(RUN_TYPES), help="Only runs of this type.")
@click.option("--prompt", "with_prompt", is_flag=True, help="Also print each run's prompt (always in --json).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def report_cmd(app: App, key: str, run_id: int | None, run_type: str | None, with_prompt: bool,
               as_json: bool) -> None:
    """Per-run reports: prompt, agent messages, commands, tool calls, changed files, tokens."""
    key = issue_ref(key)
    store = app.store(readonly=True)
    row = _issue_or_fail(store, key)
    all_runs = store.runs_for_issue(row["id"])
    if run_id is not None and not any(r["id"] == run_id for r in all_runs):
        raise UsageError(f"issue {row['key']}: has no run {run_id}"
                         + (f" (its runs: {', '.join(str(r['id']) for r in all_runs)})" if all_runs else ""))
    runs = []
    for r in all_runs:
        if (run_id is not None and r["id"] != run_id) or (run_type and r["run_type"] != run_type):
            continue
        runs.append({"id": r["id"], "run_type": r["run_type"], "status": r["status"], "started_at": r["started_at"],
                     "ended_at": r["ended_at"], "failure_reason": r["failure_reason"], "summary": r["summary"],
                     "thread_id": r["thread_id"], "prompt": r["prompt"],
                     "report": json.loads(r["report"]) if r["report"] else None,
                     "tokens": json.loads(r["tokens"]) if r["tokens"] else None})
    if as_json:
        _dump({"issue": row["key"], "runs": runs})
        return
    if not runs:
        click.echo(f"{row['key']}: no runs yet")
    for r in runs:
        rep = r["report"] or {}
        click.echo(f"{r['run_type']} #{r['id']} {r['status']}  {r['started_at'] or ''} -> {r['ended_at'] or ''}")
        if r["failure_reason"]:
            click.echo(f"  reason: {r['failure_reason']}")
        if r["summary"]:
            click.echo(f"  summary: {one_line(r['summary'], 300)}")
        if with_prompt and r["prompt"]:
            click.echo("  prompt:\n" + "".join(f"    {ln}\n" for ln in r["prompt"].splitlines()).rstrip("\n"))
        for cmd in rep.get("commands") or []:
            click.echo(f"  $ {one_line(str(cmd['command']), 120)}  (exit {cmd['exit_code']})")
        if rep.get("tool_calls"):
            click.echo(f"  tool calls: {', '.join(rep['tool_calls'])}")
        if rep.get("changed_files"):
            click.echo(f"  changed: {', '.join(rep['changed_files'])}")
        tok = rep.get("tokens") or r["tokens"] or {}
        if tok:
            click.echo(f"  tokens: {tok.get('totalTokens', '?')} total ({tok.get('inputTokens', '?')} in, "
                       f"{tok.get('outputTokens', '?')} out)")
        if rep.get("duration_seconds") is not None:
            click.echo(f"  duration: {rep['duration_seconds']:.1f} s")


@cli.command("events")
@click.argument("key", metavar="ISSUE")
@click.option("--follow", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {\"issue\", \"events\": [...]}; with "
              "--follow, one JSON object per line.")
@click.pass_obj
def events_cmd(app: App, key: str, follow: bool, as_json: bool) -> None:
    """ISSUE's event log."""
    key = issue_ref(key)
    store = app.store(readonly=True)
    row = _issue_or_fail(store, key)
    last = 0
    if as_json and not follow:
        _dump({"issue": row["key"], "events": [{k: e[k] for k in ("id", "at", "level", "kind", "message", "run_id")}
                                               for e in store.events_for_issue(row["id"], 0)]})
        return
    try:
        while True:
            for e in store.events_for_issue(row["id"], last):
                last = e["id"]
                if as_json:
                    click.echo(json.dumps({k: e[k] for k in ("id", "at", "level", "kind", "message", "run_id")}))
                else:
                    click.echo(f"{e['at']} {e['level']:5} {e['kind']:9} {shown(e['message'], 500)}")
            if not follow:
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        return                          # Ctrl-C ends --follow quietly, exit 0


# ---- seeing the agent work: live, logs, feed

def _live_data(store: Store, row: dict) -> dict:
    """`live` as data: the issue's active run (else its last run) and what its turn shows now."""
    run = _active_run(store, row) or next(iter(store.runs_for_issue(row["id"])), None)    # newest first
    if run is None:
        return {"issue": row["key"], "run": None}
    view = json.loads(run.get("live") or "null") or {}
    since = parse_iso(run.get("turn_started_at") or run.get("started_at") or run.get("claimed_at"))
    active = run["status"] in ("claimed", "running")
    return {"issue": row["key"], "title": row["title"], "factory_state": row["factory_state"],
            "run": {"id": run["id"], "type": run["run_type"], "status": run["status"], "active": active,
                    "turn_age_seconds": round((utcnow() - since).total_seconds()) if since and active else None,
                    "ended_at": run["ended_at"], "failure_reason": run["failure_reason"]},
            "message": view.get("message"), "command": view.get("command"), "exit_code": view.get("exit_code"),
            "output": view.get("output") or "", "changed": view.get("changed"), "updated_at": view.get("at"),
            "agent": [e["message"] for e in store.run_events(run["id"], "agent", 5)]}


def _render_live(d: dict, lines: int = 12) -> str:
    if d["run"] is None:
        return f"{d['issue']}: no run yet"
    r = d["run"]
    head = f"{d['issue']}  {shown(one_line(d['title']), 80)}  [{d['factory_state']}]\n" \
           f"run {r['id']} ({r['type']}) {r['status']}" + \
           (f", turn running for {_age(r['turn_age_seconds'])}" if r["active"] and r["turn_age_seconds"] is not None
            else f", ended {r['ended_at'] or '?'}" + (f": {one_line(r['failure_reason'], 120)}"
                                                     if r["failure_reason"] else ""))
    out = [head]
    if d["message"]:
        out.append(f"agent: {shown(one_line(d['message'], 600), 600)}")
    if d["command"]:
        state = "running" if d["exit_code"] is None and r["active"] else f"exit {d['exit_code']}"
        out.append(f"$ {shown(d['command'], 300)}   ({state})")
        tail = [ln for ln in d["output"].splitlines() if ln.strip()][-lines:]
        out += [f"  | {shown(ln, 200)}" for ln in tail]
    if d["changed"]:
        out.append(f"changed: {shown(d['changed'], 300)}")
    if not (d["message"] or d["command"] or d["changed"]):
        out.append("(nothing from the agent yet)")
    return "\n".join(out)


def _follow(render: Callable[[], tuple[str, bool]], interval: float) -> None:
    """Print `render()`'s screen, again when it changes (cleared first on a terminal), until it says it is done
    or Ctrl-C (exit 0)."""
    last, tty = None, sys.stdout.isatty()
    try:
        while True:
            screen, done = render()
            if screen != last:
                click.echo(("\x1b[H\x1b[2J" if tty else ("\n" if last is not None else "")) + screen)
                last = screen
            if done:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@cli.command("live")
@click.argument("key", metavar="ISSUE")
@click.option("--follow", is_flag=True, help="Refresh every couple of seconds until the run ends (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (with --follow: one per change).")
@click.pass_obj
def live_cmd(app: App, key: str, follow: bool, as_json: bool) -> None:
    """ISSUE's running turn: its status and age, the agent's latest message, the latest command and what it
    printed last (else the last run's end)."""
    store = app.store(readonly=True)
    row = _issue_or_fail(store, key)

    def render() -> tuple[str, bool]:
        d = _live_data(store, store.issue(row["id"]))
        done = not follow or d["run"] is None or not d["run"]["active"]
        return (json.dumps(d, indent=None if follow else 2) if as_json else _render_live(d)), done
    if not follow:
        click.echo(render()[0])
        return
    _follow(render, 2.0)


@cli.command("logs")
@click.argument("key", metavar="ISSUE")
@click.option("--run", "run_id", type=int, help="This run (default: the active run, else the last one).")
@click.option("--codex", "codex_log", is_flag=True, help="The Codex app-server's own log (stderr) instead.")
@click.option("--follow", is_flag=True, help="Keep printing what is appended until the run ends.")
@click.pass_obj
def logs_cmd(app: App, key: str, run_id: int | None, codex_log: bool, follow: bool) -> None:
    """Print the log file of ISSUE's run (the worker's: turns, commands, agent messages)."""
    store = app.store(readonly=True)
    row = _issue_or_fail(store, key)
    runs = store.runs_for_issue(row["id"])
    run = next((r for r in runs if r["id"] == run_id), None) if run_id else (_active_run(store, row)
                                                                            or (runs[0] if runs else None))
    if run is None:
        raise UsageError(f"issue {row['key']}: " + (f"has no run {run_id}" if run_id else "no run yet")
                         + (f" (its runs: {', '.join(str(r['id']) for r in runs)})" if runs else ""))
    path = app.cfg.state_dir / "logs" / f"run-{run['id']}{'.codex' if codex_log else ''}.log"
    if not path.exists():
        raise UsageError(f"issue {row['key']} run {run['id']}: no log at {path} (removed, or written on another host)")
    pos = 0
    try:
        while True:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
            pos += len(data)
            if data:
                click.echo(redact(data.decode("utf-8", "replace")), nl=False)
            now_run = store.run_by_id(run["id"]) or run
            if not follow or now_run["status"] not in ("claimed", "running") and not data:
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        return


_FEED_KEYS = ("id", "at", "level", "kind", "issue_key", "project_id", "run_id", "message")


@cli.command("feed")
@click.option("--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@click.option("--issue", "issue_key", metavar="KEY", help="Only this issue's events.")
@click.option("--project", help="Only the events of this project's issues.")
@click.option("--kind", help="Only events of this kind (agent, run, github, linear, intake, ...).")
@click.option("--level", type=click.Choice(["info", "warn", "error"]),
              help="Only events of this level or worse.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="How many of the latest events to start with.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def feed_cmd(app: App, follow: bool, issue_key: str | None, project: str | None, kind: str | None,
             level: str | None, limit: int, as_json: bool) -> None:
    """One stream of the events of every issue, newest last, with those of no issue (pause, resume, rate
    limits, a failed tick)."""
    if not app.has_database():
        click.echo(f"No events yet (no database at {app.cfg.database_path}).")
        return
    store = app.store(readonly=True)
    levels = ("info", "warn", "error")[("info", "warn", "error").index(level):] if level else ()
    filt: dict[str, Any] = {"issue_key": issue_ref(issue_key) if issue_key else None, "project": project,
                            "kind": kind, "levels": levels}
    rows, last = store.feed(limit=limit, **filt), 0
    try:
        while True:
            for e in rows:
                last = e["id"]
                if as_json:
                    click.echo(json.dumps({k: e[k] for k in _FEED_KEYS}))
                else:
                    click.echo(f"{e['at']} {e['level']:5} {e['kind']:9} {shown(e['issue_key'] or '-', 12):12} "
                               f"{shown(e['message'], 500)}")
            if not follow:
                return
            time.sleep(1.0)
            rows = store.feed(after_id=last, **filt)
    except KeyboardInterrupt:
        return


@cli.command("worktree")
@click.argument("key", metavar="ISSUE")
@click.option("--cd", "cd_only", is_flag=True, help="Print only the path (for `cd $(patchrelay worktree X --cd)`).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def worktree_cmd(app: App, key: str, cd_only: bool, as_json: bool) -> None:
    """Where ISSUE's worktree and branch are."""
    key = issue_ref(key)
    row = _issue_or_fail(app.store(readonly=True), key)
    if not row["worktree"]:
        raise UsageError(f"issue {row['key']}: has no worktree yet")
    if as_json:
        _dump({"issue": row["key"], "worktree": row["worktree"], "branch": row["branch"],
               "project": row["project_id"], "exists": Path(row["worktree"]).is_dir()})
    elif cd_only:
        click.echo(row["worktree"])
    else:
        click.echo(f"issue: {row['key']}\nworktree: {row['worktree']}\nbranch: {row['branch']}\n"
                   f"project: {row['project_id']}")


@cli.command(name="open")
@click.argument("key", metavar="ISSUE")
@click.option("--print", "print_only", is_flag=True, help="Print the command instead of running it.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def open_cmd(app: App, key: str, print_only: bool, as_json: bool) -> None:
    """Resume ISSUE's Codex thread interactively in its worktree."""
    cfg = app.cfg
    key = issue_ref(key)
    store = app.store(verify=True)
    row = _issue_or_fail(store, key)
    if row["active_run_id"]:
        raise UsageError(f"issue {row['key']}: run {row['active_run_id']} is active; `patchrelay stop` it first "
                         f"(`patchrelay live {row['key']}` shows it)")
    plan = prepare_open(cfg, store, row)
    wt = str(plan.worktree)
    argv = [cfg.codex.bin, "-C", wt] + (["resume", plan.thread_id] if plan.thread_id else [plan.handoff or ""])
    env_prefix = f"CODEX_HOME={shlex.quote(str(cfg.codex.home))} " if cfg.codex.home else ""
    if as_json:
        _dump({"issue": row["key"], "worktree": wt, "thread_id": plan.thread_id, "argv": argv,
               "codex_home": str(cfg.codex.home) if cfg.codex.home else None, "repaired": list(plan.repaired)})
        return
    for r in plan.repaired:
        click.echo(f"{row['key']}: {r}", err=True)
    if print_only:
        click.echo(f"cd {shlex.quote(wt)} && {env_prefix}{shlex.join(argv)}")
        return
    env = stripped_child_env(cfg, {"CODEX_HOME": str(cfg.codex.home)} if cfg.codex.home else None)
    os.chdir(wt)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise CodexError(f"codex.bin: cannot run {argv[0]}: {e.strerror}") from None


@cli.command("init")
@click.option("--force", is_flag=True, help="Overwrite an existing config.")
@click.pass_obj
def init_cmd(app: App, force: bool) -> None:
    """Write a commented config to the default location."""
    path = find_config_path(app.config_path)
    if path.exists() and not force:
        raise UsageError(f"{path}: already exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(example_config())
    click.echo(f"wrote {path}\n\nNext steps:\n"
               f"  1. edit {path}: set projects[0].repo_path, github_repo and issue_key_prefixes\n"
               "  2. export LINEAR_API_KEY=...   (a personal API key), or app mode: `patchrelay linear connect`\n"
               "  3. patchrelay doctor\n"
               "  4. patchrelay tick   (then run it from cron / a systemd timer, or `patchrelay watch`)")


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {removed, kept, errors}.")
@click.pass_obj
def gc_cmd(app: App, dry_run: bool, as_json: bool) -> None:
    """Remove the worktrees of issues closed longer than runner.worktree_retention_hours (what each tick does)."""
    with tick_lock(app.cfg):
        store = app.store()
        ctx = TickContext(app.cfg, store, dry_run)
        result = collect_worktrees(ctx)
    if as_json:
        _dump(result)
        return
    for a in ctx.actions:
        click.echo(a)
    for k in result["kept"]:
        click.echo(f"kept {k['worktree']} ({k['issue']}): it holds {k['holds']}")
    for e in result["errors"]:
        click.echo(f"failed: {e}", err=True)
    if not ctx.actions and not result["kept"] and not result["errors"]:
        click.echo("nothing to remove")
    if result["errors"]:
        raise click.exceptions.Exit(1)


# ---- operator commands: pause, resume, release, why, stop, retry

def _who() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())


@cli.command("pause")
@click.argument("key", metavar="ISSUE", required=False)
@click.option("--reason", default="", help="Why; shown by status, show and why.")
@click.pass_obj
def pause_cmd(app: App, key: str | None, reason: str) -> None:
    """Launch nothing (or nothing for ISSUE) until `resume`; tracking and Linear answers go on."""
    store = app.store(verify=True)
    record = json.dumps({"by": _who(), "at": iso(), "reason": reason})
    with store.tx():
        if key is None:
            store.meta_set("runner.paused", record)
            store.add_event(None, "pause", f"runner paused by {_who()}" + (f": {reason}" if reason else ""))
        else:
            row = _issue_or_fail(store, key)
            store.update_issue(row["id"], {"paused": record})
            store.add_event(row["id"], "pause", f"paused by {_who()}" + (f": {reason}" if reason else ""))
    click.echo(("all runs" if key is None else f"{issue_ref(key)}") + " paused; `patchrelay resume` to go on")


@cli.command("resume")
@click.argument("key", metavar="ISSUE", required=False)
@click.pass_obj
def resume_cmd(app: App, key: str | None) -> None:
    """Undo `pause` (global, or for ISSUE)."""
    store = app.store(verify=True)
    with store.tx():
        if key is None:
            store.meta_set("runner.paused", json.dumps(None))   # also overrides runner.paused in the config
            store.add_event(None, "pause", f"runner resumed by {_who()}")
        else:
            row = _issue_or_fail(store, key)
            store.update_issue(row["id"], {"paused": None})
            store.add_event(row["id"], "pause", f"resumed by {_who()}")
    click.echo(("runs resume" if key is None else f"{issue_ref(key)} resumed") + " at the next tick")


@cli.command("release")
@click.argument("key", metavar="ISSUE")
@click.option("--reason", required=True, help="Why; told to the Linear session.")
@click.pass_obj
def release_cmd(app: App, key: str, reason: str) -> None:
    """Stop tracking ISSUE: its pending run is dropped and the Linear session is told why."""
    store = app.store(verify=True)
    with store.tx():
        row = _issue_or_fail(store, key)
        apply_decision(store, row, decide_release(row, reason, _who()))
    click.echo(f"{row['key']}: released; the Linear session is told at the next tick")


def _why_data(cfg: Config, store: Store, row: dict) -> dict:
    """`why` as data (its --json): every gate between the issue and its next step, and that step."""
    gates: list[dict] = []

    def gate(name: str, ok: bool, value: Any) -> None:
        gates.append({"gate": name, "ok": bool(ok), "value": value})
    routed = any(p.id == row["project_id"] for p in cfg.projects)
    gate("routed", routed, row["project_id"] + ("" if routed else " (no such project in the config)"))
    gate("delegated", bool(row["delegated"]), bool(row["delegated"]))
    sess = store.session(row["agent_session_id"]) if row["agent_session_id"] else None
    gate("trusted", not sess or bool(sess["trusted"]), (sess or {}).get("creator") or "no agent session")
    paused_global, paused_issue = runner_paused(cfg, store), json.loads(row["paused"] or "null")
    gate("runner not paused", not paused_global, paused_global or "running")
    gate("issue not paused", not paused_issue, paused_issue or "no")
    active = _active_run(store, row)
    alive = active is not None and process_alive(active["worker_pid"], active["worker_started"])
    said = (json.loads(active.get("live") or "null") or {}).get("message") if active else None
    gate("active run", not active, {"id": active["id"], "type": active["run_type"], "status": active["status"],
                                   "worker_alive": alive, "agent": said and one_line(said, 300)} if active else None)
    gate("pending run", bool(row["pending_run_type"]), {"type": row["pending_run_type"],
                                                        "not_before": row["not_before"]} if row["pending_run_type"]
         else None)
    holders = [store.issue(r["issue_id"])["key"] for r in store.active_runs()]
    gate("concurrency", len(holders) < cfg.runner.max_concurrent_runs,
         f"{len(holders)} of {cfg.runner.max_concurrent_runs} in use" + (f" by {', '.join(holders)}" if holders else ""))
    gate("repair budgets", row["factory_state"] != "escalated", json.loads(row["repair_counts"] or "{}"))
    if row["pr_number"]:
        waiting = row.get("pr_waiting_review")
        gate("approval of the head", not waiting, f"waiting for a review of {waiting}" if waiting else
             (row["pr_review"] or "none").lower())
    cx = cfg.codex
    spent_issue, spent_day = store.tokens_spent(row["id"]), store.tokens_spent(since=utc_day_start())
    hold = token_hold(cx, spent_issue, spent_day)
    gate("token caps", not hold, hold or {"issue": spent_issue, "issue_cap": cx.max_tokens_per_issue,
                                          "today": spent_day, "day_cap": cx.max_tokens_per_day,
                                          "run_cap": cx.max_tokens_per_run})
    waits = {b["api"]: b["limited_until"] for b in store.budgets() if rate_limited_until(b, utcnow())}
    gate("rate limits", not waits, waits or "none")
    held = codex_hold(store)
    held_text = f"{held['reason']}; launches wait until {held['until']}" + \
        (f" (fix: {held['fix']})" if held.get("fix") else " (lifts by itself)") if held else None
    gate("Codex capacity", not held, held_text or "ok")
    queued = store.outbox_queued(row["id"])
    lag = max((age_seconds(o["created_at"]) or 0 for o in queued), default=0)
    gate("Linear outbox", not queued, f"{len(queued)} queued, oldest {_age(lag)}" if queued else "empty")
    nxt = next_action(row, Gates(active, alive, bool(paused_global), bool(paused_issue), tuple(holders),
                                 cfg.runner.max_concurrent_runs, hold, held_text), utcnow())
    return {"issue": row["key"], "tracked": True, "factory_state": row["factory_state"], "gates": gates,
            "next": nxt}


def _render_why(data: dict) -> None:
    if not data["tracked"]:
        click.echo(f"{data['issue']}: not tracked\n" + "".join(f"  {e}\n" for e in data["events"])
                   + f"next: {data['next']}")
        return
    click.echo(f"{data['issue']}  {data['factory_state']}")
    for g in data["gates"]:
        value = json.dumps(g["value"]) if isinstance(g["value"], dict) else g["value"]
        click.echo(f"  {'ok ' if g['ok'] else '-- '} {g['gate']}: {value}")
    click.echo(f"next: {data['next']}")


@cli.command("why")
@click.argument("key", metavar="ISSUE")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: every gate and the next action.")
@click.pass_obj
def why_cmd(app: App, key: str, as_json: bool) -> None:
    """Every gate between ISSUE and its next step, with its value, and the one next action."""
    key = issue_ref(key)
    cfg = app.cfg
    store = app.store(readonly=True) if app.has_database() else None
    row = store.issue_by_key(key) if store else None
    if store is not None and row is not None:
        data = _why_data(cfg, store, row)
    else:
        evs = [e["message"] for e in store.events_for_key(key)] if store else []
        data = {"issue": key, "tracked": False, "gates": [], "events": evs,
                "next": "nothing: PatchRelay does not track this issue; delegate it to PatchRelay in Linear"
                        + (" (see the events: it was seen and not taken)" if evs else "")}
    _dump(data) if as_json else _render_why(data)


@cli.command("stop")
@click.argument("key", metavar="ISSUE")
@click.pass_obj
def stop_cmd(app: App, key: str) -> None:
    """Interrupt ISSUE's active run (or drop its pending run)."""
    store = app.store(verify=True)
    with store.tx():       # read and decide in one transaction: a tick claiming meanwhile cannot slip between
        row = _issue_or_fail(store, key)
        if not row["active_run_id"] and not row["pending_run_type"]:
            raise UsageError(f"issue {row['key']}: nothing is running or pending")
        apply_decision(store, row, stop_issue(row, "stopped with `patchrelay stop`"))
    click.echo(f"{row['key']}: stop requested" + (f" (run {row['active_run_id']} will be interrupted)"
                                                  if row["active_run_id"] else "; pending run dropped"))


@cli.command("retry")
@click.argument("key", metavar="ISSUE")
@click.option("--type", "run_type", type=click.Choice(RUN_TYPES), default="implementation", show_default=True)
@click.option("--reason", default="", help="Why; stored with the run.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def retry_cmd(app: App, key: str, run_type: str, reason: str, as_json: bool) -> None:
    """Queue a new run for ISSUE; the next tick launches it."""
    store = app.store(verify=True)
    with store.tx():       # read and decide in one transaction (see `stop`)
        out = _queue_retry(store, key, run_type, reason)
    if as_json:
        _dump(out)
    else:
        click.echo(f"{out['issue']}: {run_label(run_type)} run queued; the next tick launches it")


def _queue_retry(store: Store, key: str, run_type: str, reason: str) -> dict:
    row = _issue_or_fail(store, key)
    d = decide_retry(row, run_type, reason, iso())
    apply_decision(store, row, d)
    return {"issue": row["key"], "queued": run_type, "reason": reason, "factory_state": d.fields["factory_state"]}


# ---- doctor: one check per area; every FAIL names its fix

def probe_codex(cfg: Config, workdir: Path) -> list[tuple[str, str]]:
    """Prove that a run can work: start `codex app-server` as a run would (same environment, tokens
    stripped), complete the handshake, read the account and the model provider's key variable, and run a
    command in the configured sandbox (in `workdir`). [(level, message)]; every FAIL names its fix."""
    out: list[tuple[str, str]] = []
    path = shutil.which(cfg.codex.bin)
    if not path and cfg.codex.shell:        # on the PATH of the user's login shell only
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            found = subprocess.run([cfg.codex.shell, "-lc", "command -v " + shlex.quote(cfg.codex.bin)],
                                   capture_output=True, text=True, timeout=30)
            path = found.stdout.strip().splitlines()[-1] if found.returncode == 0 and found.stdout.strip() else None
    if not path:
        return [("FAIL", f"codex.bin: {cfg.codex.bin} not found on PATH; install it with "
                         f"`npm install -g @openai/codex@{SUPPORTED_CODEX}` or set codex.bin to its path")]
    env = stripped_child_env(cfg, {"CODEX_HOME": str(cfg.codex.home)} if cfg.codex.home else {})
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, env=env)
        words = (ver.stdout.strip() or ver.stderr.strip()).split()
        version = words[-1] if words else "?"
    except (OSError, subprocess.TimeoutExpired) as e:
        return [("FAIL", f"{path} --version failed: {e}; reinstall Codex")]
    out.append(("PASS" if version == SUPPORTED_CODEX else "WARN",
                f"{path}: codex {version}" + ("" if version == SUPPORTED_CODEX else
                                              f" (PatchRelay speaks the protocol of {SUPPORTED_CODEX}; "
                                              f"`npm install -g @openai/codex@{SUPPORTED_CODEX}`)")))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "app-server.log"
    try:
        server = AppServer(cfg, workdir, log_path)
    except CodexError as e:
        return out + [("FAIL", str(e))]
    try:
        server.initialize()
        acct = server.request("account/read", {"refreshToken": False})
        conf = (server.request("config/read", {}).get("config") or {})
    except CodexError as e:
        said = one_line(server.stderr_tail(3), 200)
        return out + [("FAIL", f"codex app-server handshake failed: {e}" + (f" (it said: {said})" if said else ""))]
    finally:
        server.close()
    provider, key = provider_key(cfg, conf)
    provider = provider or "openai"
    account = acct.get("account") or {}
    if acct.get("requiresOpenaiAuth") and not account:
        out.append(("FAIL", f"codex app-server: not logged in (model provider {provider}); run `codex login` (or "
                            "`codex login --with-api-key`) as this user" +
                            (f" with CODEX_HOME={cfg.codex.home}" if cfg.codex.home else "")))
    else:
        how = f"{account.get('type')} account" if account else f"model provider {provider}, no OpenAI login needed"
        out.append(("PASS", f"codex app-server handshake ok ({how})"))
    if key and not env.get(key):
        out.append(("FAIL", f"model provider {provider} reads its key from ${key}, which is not set in "
                            "PatchRelay's environment: add it to the environment file of the service "
                            "(`patchrelay service install` creates one) or export it"))
    if cfg.codex.sandbox != "danger-full-access" and sys.platform.startswith("linux"):
        if not shutil.which("bwrap", path=env.get("PATH")):
            out.append(("WARN", "bubblewrap (bwrap) is not on PATH; Codex falls back to its bundled copy: "
                                "install it (`apt install bubblewrap`)"))
        probe = "echo ok > sandbox-probe.txt" if cfg.codex.sandbox == "workspace-write" else "true"
        try:
            p = subprocess.run([path, "sandbox", "-c", f'sandbox_mode="{cfg.codex.sandbox}"', "--", "sh", "-c", probe],
                               capture_output=True, text=True, timeout=60, env=env, cwd=str(workdir))
            lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING")]
            ok = p.returncode == 0 and (cfg.codex.sandbox != "workspace-write"
                                        or (workdir / "sandbox-probe.txt").exists())
            out.append(("PASS", f"sandbox {cfg.codex.sandbox} runs commands") if ok else
                       ("FAIL", f"sandbox {cfg.codex.sandbox} cannot run a command: "
                                f"{one_line(' '.join(lines[-2:]), 200) or f'exit {p.returncode}'}; Codex's Linux "
                                "sandbox needs bubblewrap and unprivileged user namespaces "
                                "(`apt install bubblewrap`; `sysctl kernel.unprivileged_userns_clone=1`)"))
        except (OSError, subprocess.TimeoutExpired) as e:
            out.append(("FAIL", f"sandbox {cfg.codex.sandbox}: {e}"))
    return out


def probe_push(cfg: Config, project: ProjectConfig) -> tuple[str, str]:
    """Whether PatchRelay can push a branch: `git push --dry-run` of the base branch to a throwaway ref name,
    with the credentials a run's push uses. Nothing is created on the remote."""
    repo = project.repo_path
    url = run_git(["remote", "get-url", "origin"], repo).stdout.strip()
    ref = f"refs/heads/{project.branch_prefix}/patchrelay-doctor-probe"
    src = f"refs/remotes/origin/{project.base_branch}"
    if run_git(["rev-parse", "--verify", "--quiet", src], repo, check=False).returncode != 0:
        src = f"refs/heads/{project.base_branch}"
    p = run_git(["push", "--dry-run", "--quiet", "origin", f"{src}:{ref}"], repo, env=git_push_env(cfg, url),
                timeout=60, check=False)
    if p.returncode == 0:
        return "PASS", f"can push branches to origin ({redact(url)})"
    return "FAIL", (f"cannot push to origin ({redact(url)}): {one_line(redact(p.stderr or p.stdout), 200)}; give the "
                    "GitHub token (or this user's git credentials) write access to the repository")


class Check(NamedTuple):
    """One line of `doctor`: PASS, WARN or FAIL, where (a config key path or an area), and what (a FAIL names
    its fix)."""
    level: str
    scope: str
    message: str


def _check_database(cfg: Config) -> list[Check]:
    """The database opens, is sound (quick_check) and writable (a read-only file is checked, not written)."""
    if cfg.database_url:
        return _check_postgres(cfg)
    try:
        read_only = read_only_file(cfg.database_path)
        store = Store(cfg.database_path, readonly=read_only)
        try:
            check = store.quick_check()
            if read_only:
                return [Check("FAIL", "database", f"{cfg.database_path} is read-only (quick_check "
                              f"{one_line(check, 120)}); PatchRelay will not write to it: `chmod u+w` it if that was "
                              "not meant")]
            if check != "ok":
                return [Check("FAIL", "database", f"{cfg.database_path}: damaged ({one_line(check, 200)}); move it "
                              "away and let PatchRelay start a new one, or restore a backup")]
            with store.tx():
                store.meta_set("doctor.checked_at", iso())
            out = [Check("PASS", "database", f"{cfg.database_path} writable (schema v{store.schema_version()}, "
                                             "quick_check ok)")]
            return out + _hold_checks(store)
        finally:
            store.close()
    except (StoreError, ConfigError) as e:
        return [Check("FAIL", "database", str(e))]
    except sqlite3.Error as e:
        return [Check("FAIL", "database", f"{cfg.database_path}: {type(e).__name__}: {e}")]


def _hold_checks(store: Store) -> list[Check]:
    """A hold of every launch after Codex's provider refused: FAIL for an account refusal (a person must fix
    it), WARN for capacity (it lifts by itself)."""
    held = codex_hold(store)
    if not held:
        return []
    return [Check("FAIL" if held["kind"] == "account" else "WARN", "codex",
                  f"runs are held until {held['until']}: {held['reason']}"
                  + (f"; fix: {held['fix']}" if held.get("fix") else " (lifts by itself)"))]


def _check_postgres(cfg: Config) -> list[Check]:
    """PostgreSQL: the connection, the server's version, the privileges PatchRelay needs (it writes, and creates
    its tables on upgrades) and the difference between this host's clock and the database's."""
    try:
        store = Store(cfg.database_path, url=cfg.database_url)
    except (StoreError, ConfigError) as e:
        return [Check("FAIL", "database", str(e))]
    try:
        info = store.server_info()
        skew = time.time() - store.clock()
        out = [Check("PASS", "database", f"{store.label}: PostgreSQL {info['version']} (schema v{store.schema_version()}"
                                         f", user {info['user']})")]
        out.append(Check("PASS" if info["version_num"] >= 120000 else "FAIL", "database",
                         "server version 12 or newer" if info["version_num"] >= 120000 else
                         f"PostgreSQL {info['version']} is too old: PatchRelay needs 12 or newer"))
        out.append(Check("PASS" if info["can_create"] else "FAIL", "database",
                         "may create tables (schema upgrades)" if info["can_create"] else
                         f"user {info['user']} may not create tables in schema public: GRANT CREATE ON SCHEMA public "
                         f"TO {info['user']}"))
        with store.tx():
            store.meta_set("doctor.checked_at", iso())
        out.append(Check("PASS" if abs(skew) < 5 else "WARN", "database",
                         f"this host's clock is {skew:+.1f} s from the database's" + (
                             "" if abs(skew) < 5 else ": leases and heartbeats use the database's clock, but logs "
                             "and timestamps this host writes will disagree; run NTP")))
        return out + _hold_checks(store)
    except StoreError as e:
        return [Check("FAIL", "database", str(e))]
    finally:
        store.close()


def _check_linear(cfg: Config) -> list[Check]:
    """The token is set (or an app connected) and accepted, and how many open issues the delegation rule takes
    right now."""
    store = None
    if cfg.database_url or cfg.database_path.exists():
        try:            # the stored app connection, if the database can be read (its own check says why not)
            store = Store(cfg.database_path, url=cfg.database_url,
                          readonly=not cfg.database_url and read_only_file(cfg.database_path))
        except (StoreError, sqlite3.Error):
            store = None
    try:
        return _check_linear_with(cfg, store)
    finally:
        if store is not None:
            store.close()


def _check_linear_with(cfg: Config, store: Store | None) -> list[Check]:
    info = linear_token_status(cfg, store)
    if info["source"] is None:
        return [Check("FAIL", "linear", f"${cfg.linear.token_env} is not set and no Linear app is connected: run "
                                        "`patchrelay linear connect` (app mode), or export a personal API key (see "
                                        "README, Linear setup)")]
    out: list[Check] = []
    if info["source"] == "connected":
        expiry = f"token expires {info['expires_at']}" if info["expires_at"] else "token without expiry"
        out.append(Check("FAIL" if info["refresh_error"] else "PASS", "linear",
                         f"Linear refused the token refresh ({info['refresh_error']}): run `patchrelay linear connect`"
                         if info["refresh_error"] else f"connected app {info['app_user']} ({expiry}; refreshes "
                         f"itself, {info['refreshes']} refresh(es) so far)"))
    try:
        lc = linear_client(cfg, store, record=False)
        v = lc.viewer()
        mode = ("app" if v.app else "user") if cfg.linear.mode == "auto" else cfg.linear.mode
        out.append(Check("PASS", "linear", f"token accepted: viewer {v.name or v.id} ({mode} mode)"))
        n, more = lc.delegated_count(delegated_filter(cfg, Identity(
            v.id, mode == "app", cfg.linear.delegation, cfg.linear.delegation_label)))
        out.append(Check("PASS", "linear", f"the delegation rule ({delegation_rule(cfg, mode == 'app')}) takes "
                                           f"{n}{'+' if more else ''} open issue(s) right now"))
    except (LinearError, ConfigError) as e:
        out.append(Check("FAIL", "linear", str(e)))
    return out


def _check_github(cfg: Config) -> list[Check]:
    """The token is accepted and can write to every project's repository."""
    token = github_token(cfg)
    if not token:
        return [Check("FAIL", "github", f"no GitHub token: set ${cfg.github.token_env} (contents and pull requests "
                                        "read/write, checks and actions read) or log in with `gh auth login`")]
    ghc = GitHubClient(cfg.github, token)
    out: list[Check] = []
    try:
        out.append(Check("PASS", "github", f"token accepted: {ghc.viewer_login()}"))
        for i, p in enumerate(cfg.projects):
            scope = f"projects[{i}].github_repo"
            repo = ghc.repository(p.github_repo)
            if repo is None:
                out.append(Check("FAIL", scope, f"{p.github_repo}: not found, or the token cannot see it (grant the "
                                                "token access to this repository)"))
            elif repo.get("viewerPermission") not in ("WRITE", "MAINTAIN", "ADMIN"):
                out.append(Check("FAIL", scope, f"{p.github_repo}: the token can only "
                                                f"{str(repo.get('viewerPermission') or 'read').lower()}; PatchRelay "
                                                "needs write access to push and open PRs"))
            else:
                out.append(Check("PASS", scope, f"{p.github_repo}: writable"
                                                + (", merge queue" if repo.get("mergeQueue") else "")))
    except GitHubError as e:
        out.append(Check("FAIL", "github", str(e)))
    return out


def _check_codex(cfg: Config) -> list[Check]:
    """git is there, and a run can work: Codex starts, shakes hands, is logged in, its sandbox runs."""
    git = shutil.which("git")
    out = [Check("PASS" if git else "FAIL", "git", git or "git not found on PATH")]
    with tempfile.TemporaryDirectory(prefix="patchrelay-doctor-") as tmp:
        out += [Check(level, "codex", msg) for level, msg in probe_codex(cfg, Path(tmp) / "workspace")]
    if shutil.which(cfg.codex.bin):
        try:
            problems = contract_problems(codex_protocol(cfg))
            out += [Check("WARN", "codex", f"protocol drift: {p}") for p in problems] or \
                [Check("PASS", "codex", "the app-server protocol has every method and field PatchRelay uses")]
        except CodexError as e:
            out.append(Check("WARN", "codex", str(e)))
    if cfg.codex.sandbox == "danger-full-access":
        out.append(Check("WARN", "codex", "sandbox danger-full-access: the agent can reach anything this user can"))
    return out


def _check_project(cfg: Config, i: int, p: ProjectConfig) -> list[Check]:
    """The clone: a git repository with the base branch, `origin` the github_repo, branches pushable."""
    scope = f"projects[{i}]"
    out: list[Check] = []
    try:
        if not p.repo_path.is_dir():
            raise GitError(f"repo_path {p.repo_path} does not exist: clone the repository there "
                           f"(`git clone https://github.com/{p.github_repo}.git {p.repo_path}`) or fix "
                           f"projects[{i}].repo_path")
        run_git(["rev-parse", "--git-dir"], p.repo_path)
        has_base = any(run_git(["rev-parse", "--verify", "--quiet", ref], p.repo_path, check=False).returncode == 0
                       for ref in (f"refs/remotes/origin/{p.base_branch}", f"refs/heads/{p.base_branch}"))
        out.append(Check("PASS", scope, f"{p.repo_path} is a git repo with {p.base_branch}") if has_base else
                   Check("FAIL", scope, f"{p.repo_path} has no branch {p.base_branch} (base_branch): fetch it, or "
                                        "set base_branch"))
        url = run_git(["remote", "get-url", "origin"], p.repo_path, check=False).stdout.strip()
        named = github_repo_of(url)
        if not url:
            out.append(Check("FAIL", f"{scope}.repo_path", f"{p.repo_path} has no remote `origin`: "
                                                           f"`git remote add origin https://github.com/{p.github_repo}.git`"))
        elif named is None:
            out.append(Check("WARN", f"{scope}.repo_path", f"origin {redact(url)} is not a github.com URL; pull "
                                                           f"requests go to {p.github_repo}"))
        elif named.lower() != p.github_repo.lower():
            out.append(Check("FAIL", f"{scope}.repo_path", f"origin is {named}, not github_repo {p.github_repo}: fix "
                                                           "github_repo or the remote (`git remote set-url origin ...`)"))
        if url and (named is None or named.lower() == p.github_repo.lower()):
            level, msg = probe_push(cfg, p)
            out.append(Check(level, f"{scope}.push", msg))
    except GitError as e:
        out.append(Check("FAIL", scope, str(e)))
    if not p.has_routing and len(cfg.projects) == 1:
        out.append(Check("WARN", scope, "no routing keys: every delegated issue goes to this project"))
    if cfg.codex.sandbox == "workspace-write" and str(p.repo_path.resolve()).startswith(("/tmp/", "/var/tmp/")):
        out.append(Check("WARN", f"{scope}.sandbox", f"repo_path {p.repo_path} lies under /tmp, which the "
                                                     "workspace-write sandbox lets the agent write: its .git (and "
                                                     "other worktrees) are not protected; move the clone elsewhere"))
    return out


def doctor_checks(app: App) -> list[Check]:
    """Every check, one area at a time; with a config that does not load, only that."""
    try:
        cfg = app.cfg
    except ConfigError as e:
        return [Check("FAIL", "config", str(e))]
    checks = [Check("PASS", "config", f"{cfg.path} is valid ({len(cfg.projects)} project(s))")]
    checks += _check_database(cfg) + _check_linear(cfg) + _check_github(cfg) + _check_codex(cfg)
    for i, p in enumerate(cfg.projects):
        checks += _check_project(cfg, i, p)
    return checks


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (key names in the README).")
@click.pass_obj
def doctor_cmd(app: App, as_json: bool) -> None:
    """Check config, database, tokens, repos, git and codex."""
    checks = doctor_checks(app)
    failed = any(ch.level == "FAIL" for ch in checks)
    if as_json:
        _dump({"ok": not failed, "checks": [{"level": ch.level, "scope": ch.scope, "message": ch.message}
                                            for ch in checks]})
    else:
        for ch in checks:
            click.echo(f"{ch.level:4} [{ch.scope}] {ch.message}")
        click.echo("\nready" if not failed else "\nnot ready")
    if failed:
        raise click.exceptions.Exit(1)


# ---- db: moving from SQLite to PostgreSQL

@cli.group("db", cls=CLI)
def db_group() -> None:
    """The database: copy a SQLite database into PostgreSQL (a fleet's)."""


@db_group.command("copy")
@click.option("--to", "url", metavar="URL", required=True,
              help="postgresql://user@host[:port]/dbname (an empty database; the password from PGPASSWORD or "
                   "~/.pgpass).")
@click.pass_obj
def db_copy_cmd(app: App, url: str) -> None:
    """Copy this host's SQLite database (database.path) into an empty PostgreSQL database, history included, so
    one host becomes the first member of a fleet. Refuses a target that holds anything."""
    cfg = app.cfg
    if not re.match(r"^postgres(ql)?://", url):
        raise UsageError(f"--to: expected postgresql://user@host[:port]/dbname, got {redact_url(url)!r}")
    if not cfg.database_path.exists():
        raise UsageError(f"database.path: {cfg.database_path} does not exist: nothing to copy")
    with tick_lock(cfg):            # no tick of this host writes meanwhile (stop the service's ticks first)
        source = Store(cfg.database_path, verify=True)
        target = Store(cfg.database_path, url=url)
        try:
            if not target.is_empty():
                raise UsageError(f"{redact_url(url)}: the database is not empty; PatchRelay copies only into an "
                                 "empty one (nothing was written)")
            counts = source.copy_to(target)
        finally:
            target.close()
    total = sum(counts.values())
    click.echo(f"copied {total:,} rows into {redact_url(url)}: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()
                                                                            if n))
    click.echo("next: set database.url (or PATCHRELAY_DATABASE_URL) in every host's config, each with its own "
               "runner.host, and start them")


# ---- linear: app mode's OAuth connection

@cli.group("linear", cls=CLI)
def linear_group() -> None:
    """Linear app mode: connect PatchRelay's OAuth application (tokens stored encrypted, refreshed by
    themselves), or disconnect it."""


_CONNECTED_PAGE = ("<!doctype html><meta charset=utf-8><title>PatchRelay</title><p>PatchRelay received Linear's "
                   "answer. You can close this tab and return to the terminal.")


def _redirected_code(url: str, state: str | None) -> str:
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url.strip()).query)
    if q.get("error"):
        raise UsageError(f"Linear did not authorize the app: {shown(q['error'][0])}"
                         + (f" ({shown(q['error_description'][0], 200)})" if q.get("error_description") else ""))
    if not q.get("code"):
        raise UsageError("the address has no `code` parameter: paste the whole address the browser was sent to")
    if state is not None and q.get("state", [None])[0] != state:
        raise UsageError("the address's `state` does not match this connect's: start `patchrelay linear connect` "
                         "again and use the link it prints")
    return q["code"][0]


@linear_group.command("connect")
@click.option("--code", help="The code from the redirect: exchange it without waiting or asking.")
@click.option("--redirect-uri", metavar="URI", help="The application's redirect URI (default: "
              "linear.oauth.redirect_uri).")
@click.option("--paste", is_flag=True, help="Do not listen for the redirect; ask for the redirected address.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the redirect.")
@click.pass_obj
def linear_connect_cmd(app: App, code: str | None, redirect_uri: str | None, paste: bool, timeout: float) -> None:
    """Authorize PatchRelay's Linear OAuth application as its own app user (actor=app) and store its tokens,
    encrypted, in the database; they refresh themselves from then on."""
    cfg = app.cfg
    oauth = oauth_client(cfg)
    try:
        cipher = token_cipher(cfg)
    except ConfigError:
        if (os.environ.get(cfg.linear.token_key_env) or "").strip():
            raise
        click.echo(f"A new key for {cfg.linear.token_key_env} (put it in the environment and in the service's "
                   f"environment file, keep a copy safe):\n  {cfg.linear.token_key_env}={new_token_key()}")
        raise ConfigError(f"linear.token_key_env: {cfg.linear.token_key_env} is not set: set it (above: a new key) "
                          "and run `patchrelay linear connect` again") from None
    store = app.store(verify=True)
    redirect = redirect_uri or cfg.linear.redirect_uri
    if code is None:
        state = secrets.token_urlsafe(18)
        click.echo("Open this address as a Linear workspace admin and authorize the app:\n\n  "
                   + oauth.authorize_url(redirect, state) + "\n")
        got = None
        if not paste and urllib.parse.urlsplit(redirect).hostname in ("localhost", "127.0.0.1"):
            try:
                got = receive_redirect(redirect, timeout, _CONNECTED_PAGE, lambda: click.echo(
                    f"Waiting for the redirect to {redirect} (up to {timeout:.0f} s; Ctrl-C to stop) ..."))
            except TimeoutError as e:
                raise UsageError(f"{e}: run `patchrelay linear connect --paste` and paste the address") from None
            if got is None:
                click.echo(f"(cannot listen on {redirect}: paste the address instead)")
        if got is None:
            got = click.prompt("Paste the address your browser was sent to (it starts with the redirect URI)")
        code = _redirected_code(got, state)
    grant = oauth.exchange(code, redirect)
    viewer = LinearClient(cfg.linear, grant.access_token).viewer()
    with store.tx():
        store.oauth_connect({**LinearTokens._encrypted(cipher, grant), "client_id": oauth.client_id,
                             "app_user": viewer.name or viewer.id, "app_user_id": viewer.id})
        store.add_event(None, "linear", f"connected the Linear app {viewer.name or viewer.id}"
                        + ("" if viewer.app else " (not an app user)"))
    life = f"expires in {_age(grant.expires_in)} and refreshes itself" if grant.expires_in else "does not expire"
    click.echo(f"Connected: Linear {'app user' if viewer.app else 'user'} {viewer.name or viewer.id}; the token {life}."
               f" Both tokens are stored encrypted in {cfg.database_label}.")
    if not viewer.app:
        click.echo("warning: the token's viewer is not an app user: authorize with actor=app (the link above has it) "
                   "for app mode")
    if token_from_env(cfg.linear.token_env):
        click.echo(f"warning: {cfg.linear.token_env} is set and wins over this connection: remove it from the "
                   "environment (and the service's environment file)")


@linear_group.command("disconnect")
@click.pass_obj
def linear_disconnect_cmd(app: App) -> None:
    """Revoke the connected app's tokens at Linear and remove them from the database."""
    cfg = app.cfg
    store = app.store(verify=True) if app.has_database() else None
    conn = store.oauth_get() if store is not None else None
    if store is None or conn is None:
        click.echo("No Linear app is connected.")
        return
    tokens = LinearTokens(cfg, store)
    try:
        cipher = token_cipher(cfg)
        oauth = oauth_client(cfg)
        for col, hint in (("refresh_token", "refresh_token"), ("access_token", "access_token")):
            if conn[col]:
                oauth.revoke(tokens._decrypt(cipher, conn[col], hint.replace("_", " ")), hint)
        said = "revoked at Linear and removed from the database"
    except (ConfigError, LinearError) as e:
        said = f"removed from the database, NOT revoked at Linear ({e}): revoke the app in Linear's settings"
    with store.tx():
        store.oauth_forget()
        store.add_event(None, "linear", f"disconnected the Linear app {conn['app_user']}")
    click.echo(f"Disconnected {conn['app_user']}: tokens {said}.")


# ---- service: a systemd user unit (and timer) or a crontab line, written with absolute paths
SERVICE = "patchrelay"
CRON_TAG = "# patchrelay (service install)"


@dataclass(frozen=True)
class ServicePlan:
    """What `service install` writes: pure text from the paths found at install time."""
    mode: str                           # "watch" | "timer" | "cron"
    interval: float
    argv: tuple[str, ...]               # how to start patchrelay, absolute
    config: Path
    env_file: Path
    path_dirs: tuple[str, ...]
    log: Path

    def exec_line(self, *args: str) -> str:
        return shlex.join([*self.argv, "--config", str(self.config), *args])

    def path_value(self) -> str:
        return ":".join(dict.fromkeys([*self.path_dirs, "/usr/local/bin", "/usr/bin", "/bin"]))

    def units(self) -> dict[str, str]:
        """File name -> text of the systemd user units."""
        cmd = self.exec_line("watch", "--interval", f"{self.interval:g}") if self.mode == "watch" \
            else self.exec_line("tick")
        service = (
            "[Unit]\n"
            f"Description=PatchRelay: delegated Linear issues to pull requests ({'watch' if self.mode == 'watch' else 'tick'})\n"
            "After=network-online.target\nWants=network-online.target\n\n"
            "[Service]\n"
            f"Type={'simple' if self.mode == 'watch' else 'oneshot'}\n"
            f"ExecStart={cmd}\n"
            f"Environment=\"PATH={self.path_value()}\"\n"
            f"EnvironmentFile={self.env_file}\n"
            "# workers outlive the tick that launched them (and a restart of the service)\n"
            "KillMode=process\n"
            + ("Restart=on-failure\nRestartSec=10\n\n[Install]\nWantedBy=default.target\n" if self.mode == "watch"
               else ""))                            # a timer's service is started by the timer only
        units = {f"{SERVICE}.service": service}
        if self.mode == "timer":
            units[f"{SERVICE}.timer"] = (
                "[Unit]\n"
                f"Description=Run PatchRelay's tick every {self.interval:g} s\n\n"
                "[Timer]\nOnBootSec=30\n"
                f"OnUnitActiveSec={self.interval:g}s\nAccuracySec=1s\n"
                f"Unit={SERVICE}.service\n\n"
                "[Install]\nWantedBy=timers.target\n")
        return units

    def cron_line(self) -> str:
        line = (f"set -a; . {shlex.quote(str(self.env_file))}; set +a; PATH={shlex.quote(self.path_value())} "
                f"{self.exec_line('tick')} >> {shlex.quote(str(self.log))} 2>&1")
        return "* * * * * " + line.replace("%", "\\%") + f" {CRON_TAG}"     # % ends a crontab command


def systemd_user_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "systemd" / "user"


def service_env_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "patchrelay" / "env"


def self_argv() -> tuple[str, ...]:
    """How to start this patchrelay again, with absolute paths: the installed script, or this Python and
    this file."""
    me = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if me and me.name == "patchrelay" and me.is_file():
        return (str(me.resolve()),)
    return (sys.executable, str(Path(__file__).resolve()))


def model_key_env(cfg: Config) -> str | None:
    """The environment variable the configured Codex model provider reads its key from (config.toml)."""
    import tomllib
    home = cfg.codex.home or Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex")
    try:
        conf = tomllib.loads((Path(home) / "config.toml").read_text())
    except (OSError, ValueError):
        return None
    return provider_key(cfg, conf)[1]


def write_env_file(path: Path, names: Sequence[str]) -> bool:
    """Create the service's environment file, owner-only, with the variable names and no values. An
    existing file is kept (it holds the person's secrets). True when it was created."""
    if path.exists():
        return False
    _secure_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# PatchRelay's secrets for the service (KEY=value, one per line). Owner-only: keep it so.\n"
                + "".join(f"{n}=\n" for n in names))
    return True


def _systemctl(*args: str) -> subprocess.CompletedProcess | None:
    """`systemctl --user ...`; None when there is no systemctl or no user manager to talk to."""
    if not shutil.which("systemctl"):
        return None
    try:
        p = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0 and re.search(r"Failed to connect|No medium|not been booted|DBUS_SESSION_BUS_ADDRESS|"
                                       r"XDG_RUNTIME_DIR", p.stderr):
        return None
    return p


def _crontab() -> list[str] | None:
    """The user's crontab lines; None when there is no crontab command."""
    if not shutil.which("crontab"):
        return None
    p = subprocess.run(["crontab", "-l"], capture_output=True, text=True, timeout=30)
    return p.stdout.splitlines() if p.returncode == 0 else []


def _ours(line: str) -> bool:
    return line.endswith(CRON_TAG)


def _set_crontab(lines: list[str]) -> None:
    p = subprocess.run(["crontab", "-"], input="".join(f"{ln}\n" for ln in lines), capture_output=True, text=True,
                       timeout=30)
    if p.returncode != 0:
        raise UsageError(f"crontab: {one_line(p.stderr, 200)}")


@cli.group("service", cls=CLI)
def service_group() -> None:
    """Run PatchRelay as a systemd user service (or from cron): install, status, uninstall."""


@service_group.command("install")
@click.option("--timer", "timer", type=click.FloatRange(min=1), metavar="SECONDS",
              help="A oneshot `tick` started by a systemd timer every SECONDS.")
@click.option("--watch", "watch_mode", is_flag=True, help="A long-running `patchrelay watch` (the default).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=5.0, show_default=True,
              help="Seconds between ticks for --watch.")
@click.option("--cron", is_flag=True, help="A crontab line (every minute) instead of systemd.")
@click.option("--no-start", is_flag=True, help="Write the files only; do not enable or start anything.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: what was written and started.")
@click.pass_obj
def service_install(app: App, timer: float | None, watch_mode: bool, interval: float, cron: bool, no_start: bool,
                    as_json: bool) -> None:
    """Write a systemd user unit (and timer), or a crontab line, with the absolute paths of patchrelay, codex,
    node and git found now, KillMode=process, and an owner-only environment file for the tokens."""
    if sum(bool(x) for x in (timer, watch_mode, cron)) > 1:
        raise UsageError("service install: choose one of --timer SECONDS, --watch, --cron")
    cfg = app.cfg
    if cfg.path is None:
        raise UsageError("service install: no config file (run `patchrelay init` first)")
    mode = "cron" if cron else "timer" if timer else "watch"
    found = {name: shutil.which(name) for name in (cfg.codex.bin, "node", "git",
                                                   *(("gh",) if cfg.github.use_gh_cli else ()))}
    plan = ServicePlan(mode=mode, interval=timer or interval, argv=self_argv(), config=Path(cfg.path).resolve(),
                       env_file=service_env_file(),
                       path_dirs=tuple(dict.fromkeys(str(Path(p).parent) for p in
                                                     [sys.executable, *found.values()] if p)),
                       log=cfg.state_dir / "logs" / "cron.log")
    names = [n for n in dict.fromkeys([cfg.linear.token_env, cfg.github.token_env, model_key_env(cfg)]) if n]
    created = write_env_file(plan.env_file, names)
    out: dict[str, Any] = {"mode": mode, "env_file": str(plan.env_file), "env_file_created": created,
                           "env_names": names, "missing": [n for n, p in found.items() if not p and n != "gh"],
                           "files": [], "started": False, "next": []}
    if mode == "cron":
        _install_cron(plan, no_start, out)
    else:
        _install_units(plan, no_start, out)
    env_text = plan.env_file.read_text()
    if any(not re.search(rf"^{re.escape(n)}=\S", env_text, re.M) for n in names):
        out["next"].insert(0, f"fill in {plan.env_file}: " + ", ".join(f"{n}=..." for n in names))
    if as_json:
        _dump(out)
        return
    for f in out["files"]:
        click.echo(f"wrote {f}")
    if mode == "cron":
        click.echo(("installed" if out["started"] else "crontab line") + f":\n  {out['cron_line']}")
    click.echo(f"environment file: {plan.env_file} ({'created, ' if created else ''}owner-only)")
    for name in out["missing"]:
        click.echo(f"warning: {name} is not on PATH now; the service will not find it either", err=True)
    if out["started"] and mode != "cron":
        click.echo(f"enabled and started {SERVICE}.{'timer' if mode == 'timer' else 'service'}")
    if out["next"]:
        click.echo("next:")
        for n in out["next"]:
            click.echo(f"  {n}")


def _install_cron(plan: ServicePlan, no_start: bool, out: dict[str, Any]) -> None:
    """The crontab line: ours replaced (never another line), or said when there is no crontab."""
    line = plan.cron_line()
    _secure_dir(plan.log.parent)
    tab = _crontab()
    out["cron_line"] = line
    if tab is None:
        out["next"].append("no `crontab` here: add this line to the user's crontab by hand")
    elif not no_start:
        _set_crontab([ln for ln in tab if not _ours(ln)] + [line])
        out["started"] = True


def _install_units(plan: ServicePlan, no_start: bool, out: dict[str, Any]) -> None:
    """The systemd user units written, then reloaded, enabled and (re)started through systemctl --user when
    it is reachable; otherwise the commands to run are said."""
    mode = plan.mode
    d = systemd_user_dir()
    d.mkdir(parents=True, exist_ok=True)
    old = (d / f"{SERVICE}.service").read_text() if (d / f"{SERVICE}.service").exists() else ""
    was_watch = bool(re.search(r"^ExecStart=.* watch( |$)", old, re.M))
    if mode == "watch" and (d / f"{SERVICE}.timer").exists():      # switching from --timer to --watch
        if not no_start:
            _systemctl("disable", "--now", f"{SERVICE}.timer")
        (d / f"{SERVICE}.timer").unlink()
    for name, text in plan.units().items():
        (d / name).write_text(text)
        out["files"].append(str(d / name))
    # a new unit takes effect: the watch service is restarted (workers outlive it: KillMode=process);
    # a watch service replaced by a timer is stopped and disabled first
    steps = [("daemon-reload",)] + (
        [("enable", f"{SERVICE}.service"), ("restart", f"{SERVICE}.service")] if mode == "watch" else
        ([("disable", "--now", f"{SERVICE}.service")] if was_watch else []) +
        [("enable", "--now", f"{SERVICE}.timer")])
    if not no_start:
        r = None
        for step in steps:
            r = _systemctl(*step)
            if r is None or r.returncode != 0:
                break
        if r is not None and r.returncode == 0:
            out["started"] = True
        else:
            out["next"].append(" && ".join(f"systemctl --user {' '.join(st)}" for st in steps)
                               + (f" (systemctl said: {one_line(r.stderr, 160)})" if r is not None else
                                  " (no user systemd reachable from here)"))
    out["next"].append(f"loginctl enable-linger {os.environ.get('USER') or '$USER'}   "
                       "(so it runs while you are logged out)")


@service_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: unit files, systemd's view, crontab, "
              "environment file.")
@click.pass_obj
def service_status(app: App, as_json: bool) -> None:
    """Whether the service is installed, enabled and running, and what it runs."""
    d = systemd_user_dir()
    units = {}
    for name in (f"{SERVICE}.service", f"{SERVICE}.timer"):
        if (d / name).exists():
            act, en = _systemctl("is-active", name), _systemctl("is-enabled", name)
            units[name] = {"file": str(d / name), "active": act.stdout.strip() if act else None,
                           "enabled": en.stdout.strip() if en else None}
    tab = _crontab()
    cron = [ln for ln in (tab or []) if _ours(ln)]
    env = service_env_file()
    env_info = {"path": str(env), "exists": env.exists(),
                "mode": oct(stat.S_IMODE(env.stat().st_mode)) if env.exists() else None}
    out = {"installed": bool(units or cron), "units": units, "cron": cron, "env_file": env_info}
    if as_json:
        _dump(out)
        return
    if not out["installed"]:
        click.echo("not installed (`patchrelay service install`)")
    for name, u in units.items():
        state = "systemd not reachable" if u["active"] is None else f"{u['active']}, {u['enabled']}"
        click.echo(f"{name}: {state} ({u['file']})")
        for ln in (d / name).read_text().splitlines():
            if ln.startswith(("ExecStart=", "OnUnitActiveSec=")):
                click.echo(f"  {ln}")
    for ln in cron:
        click.echo(f"crontab: {ln}")
    if env.exists():
        click.echo(f"environment file: {env} ({env_info['mode']})"
                   + ("  WARNING: readable by others; chmod 600 it" if stat.S_IMODE(env.stat().st_mode) & 0o077
                      else ""))


@service_group.command("uninstall")
@click.pass_obj
def service_uninstall(app: App) -> None:
    """Stop and remove the unit files and the crontab line. The environment file (your secrets), the
    database and the worktrees stay."""
    d = systemd_user_dir()
    removed = []
    for name in (f"{SERVICE}.timer", f"{SERVICE}.service"):
        if (d / name).exists():
            _systemctl("disable", "--now", name)
            (d / name).unlink()
            removed.append(str(d / name))
    if removed:
        _systemctl("daemon-reload")
    tab = _crontab()
    if tab and any(map(_ours, tab)):
        _set_crontab([ln for ln in tab if not _ours(ln)])
        removed.append("the crontab line")
    if not removed:
        click.echo("not installed; nothing to remove")
        return
    for r in removed:
        click.echo(f"removed {r}")
    click.echo(f"kept {service_env_file()} (your tokens), the database and the worktrees; running workers finish "
               "on their own")


def main() -> None:
    cli(prog_name="patchrelay")


if __name__ == "__main__":
    main()
