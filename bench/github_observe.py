"""What one GitHub observation costs: requests, GraphQL points, time and bytes, against the fake GitHub.

    python bench/github_observe.py [--quick]

For N tracked pull requests (10, 100, 1000; --quick: 10 and 100) spread evenly over R repositories
(1, 5), builds bare git repositories (one commit on main, one branch with its own commit per PR, made
with a single `git fast-import` stream), opens the PRs on the fake GitHub with two check runs each
(a check policy), and calls `GitHubClient.observe(repo, "main", items)` once per repository:

1. first observation: PR numbers unknown, items (branch, None), each PR found by its branch;
2. steady state: PR numbers known, items (branch, number). The first such pass runs the check
   policies and fills the fake's caches (parsed documents, merge results); its time is shown as
   "first pass" after the row. The second pass is the one measured.

Each world gets a fresh fake GitHub; its build time is shown as "build" after the row.

Columns:
  N, R           tracked PRs, repositories (N spread evenly)
  req            HTTP requests of one observation of every repository (all of them)
  req/repo       the largest count for one repository
  goal/repo      ceil(N/R/50): one batched GraphQL request per repository and 50 PRs; "ok" when met
  points         GraphQL points charged (the `rateLimit.cost` of every response, summed)
  wall ms        wall time of the observation of every repository (sequential, as `patchrelay tick` does);
                 most of it is the fake executing the GraphQL document, so it says little about github.com
  KiB            response bytes (bodies), all repositories
  budget/h       points per hour when every repository is observed every github.poll_interval seconds,
                 as a share of the GraphQL budget (x-ratelimit-limit, 5,000 points/hour)

The fake charges GitHub's published formula (each connection costs one request per parent item,
cost = max(1, round(requests / 100))) and rejects documents above 500,000 possible nodes, as GitHub does.
A repository whose observation fails makes its row "NO" / "failed"; the messages are printed below.

Prints figures; asserts nothing. Needs what the tests need (run .ci/run once).
"""
import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import patchrelay  # noqa: E402
from fakes.github import FakeGitHub  # noqa: E402

TOKEN = "ghp_benchtoken000000000000000000000000"
LOGIN = "patchrelay-bot"
BATCH = 50
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@acme.test",
           "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@acme.test"}


def make_bare(path, branches):
    """A bare repository: one commit on main, then one branch per name, each with its own commit on top
    of main (one `git fast-import` stream, so 1,000 branches take well under a second)."""
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True, env=GIT_ENV)
    stamp = "1700000000 +0000"
    out = []

    def blob(text):
        data = text.encode()
        out.append(b"data %d\n" % len(data) + data + b"\n")

    out.append(b"commit refs/heads/main\nmark :1\n")
    out.append(f"committer Bench <bench@acme.test> {stamp}\n".encode())
    blob("Initial commit")
    out.append(b"M 644 inline README.md\n")
    blob("# bench\n")
    for i, branch in enumerate(branches):
        out.append(f"commit refs/heads/{branch}\n".encode())
        out.append(f"committer Bench <bench@acme.test> {stamp}\n".encode())
        blob(f"Work on {branch}")
        out.append(b"from :1\n")
        out.append(f"M 644 inline work/{i}.txt\n".encode())
        blob(f"change {i}\n")
    out.append(b"done\n")
    subprocess.run(["git", f"--git-dir={path}", "fast-import", "--quiet", "--done"], input=b"".join(out),
                   check=True, env=GIT_ENV)
    subprocess.run(["git", f"--git-dir={path}", "pack-refs", "--all"], check=True, env=GIT_ENV)


def two_checks(sha, fake):
    """Every commit gets a passing build and a passing test run (Actions jobs with a short log)."""
    return [{"name": "build", "conclusion": "SUCCESS", "log": "ok\n", "summary": "Build passed"},
            {"name": "test", "conclusion": "SUCCESS", "log": "42 passed\n", "summary": "All tests passed"}]


class BenchGitHub(FakeGitHub):
    """The fake GitHub, with the bare repositories' ref list read once while the PRs are opened (`add_pr`
    otherwise runs `git for-each-ref` twice per PR: ~20 s for 1,000 PRs). Requests are served unchanged."""
    refs_cache = None

    def branch_oid(self, repo, branch, ctx=None):
        return super().branch_oid(repo, branch, ctx if ctx is not None else self.refs_cache)


def build_world(fake, tmp, n, r):
    """R repositories with N PRs spread evenly -> {repo: [(branch, number)]}."""
    per, extra = divmod(n, r)
    world = {}
    fake.refs_cache = {}        # keyed by (repository, git generation): any ref change reads the refs again
    try:
        for k in range(r):
            name = f"acme/app{k}"
            branches = [f"patchrelay/app-{k}-{i}" for i in range(per + (1 if k < extra else 0))]
            bare = Path(tmp) / f"app{k}-n{n}-r{r}.git"
            make_bare(bare, branches)
            fake.add_repo(name, bare, required_checks=("test",))
            fake.set_check_policy(name, two_checks)
            world[name] = [(b, fake.add_pr(name, b, author=LOGIN, title=f"Bench PR {b}")["number"])
                           for b in branches]
    finally:
        fake.refs_cache = None
    return world


class Meter:
    """Counts what the client's session receives (a requests response hook)."""

    def __init__(self, client):
        self.reset()
        client.transport.http.hooks["response"].append(self.hook)

    def reset(self):
        self.requests, self.points, self.bytes, self.limit = 0, 0, 0, None

    def hook(self, resp, *args, **kwargs):
        self.requests += 1
        self.bytes += len(resp.content)
        if resp.headers.get("x-ratelimit-limit"):
            self.limit = int(resp.headers["x-ratelimit-limit"])
        try:
            self.points += int((((resp.json() or {}).get("data") or {}).get("rateLimit") or {}).get("cost") or 0)
        except (ValueError, AttributeError):
            pass


def observe_all(client, meter, fake, world, known):
    """One observation of every repository -> figures (dict)."""
    meter.reset()
    per_repo, errors, found = [], [], 0
    t0 = time.perf_counter()
    for repo, prs in world.items():
        before = len(fake.requests)
        items = [(b, num if known else None) for b, num in prs]
        try:
            obs, _ = client.observe(repo, "main", items)
            found += sum(1 for b, num in prs if obs.get(b) is not None and obs[b].number == num)
        except patchrelay.GitHubError as e:
            errors.append(f"{repo}: {e}")
        per_repo.append(len(fake.requests) - before)
    wall = (time.perf_counter() - t0) * 1000
    return {"req": meter.requests, "req_repo": max(per_repo), "points": meter.points, "wall": wall,
            "bytes": meter.bytes, "errors": errors, "found": found, "limit": meter.limit or 5000}


def row(n, r, f, interval):
    goal = math.ceil(n / r / BATCH)
    share = f["points"] * (3600 / interval) / f["limit"] * 100
    met = "ok" if f["req_repo"] <= goal and not f["errors"] else "NO"
    shown = f"{share:>9.0f} %" if not f["errors"] else f"{'failed':>11}"
    line = (f"{n:>5} {r:>2} {f['req']:>5} {f['req_repo']:>8} {goal:>9} {met:>3} {f['points']:>7} "
            f"{f['wall']:>8.0f} {f['bytes'] / 1024:>8.0f} {shown}")
    if f["found"] != n:
        line += f"   ({f['found']}/{n} PRs observed, {len(f['errors'])} repositor"
        line += "y failed)" if len(f["errors"]) == 1 else "ies failed)"
    return line, share


HEAD = (f"{'N':>5} {'R':>2} {'req':>5} {'req/repo':>8} {'goal/repo':>9} {'met':>3} {'points':>7} "
        f"{'wall ms':>8} {'KiB':>8} {'budget/h':>11}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only N=10 and N=100")
    a = ap.parse_args()
    sizes = (10, 100) if a.quick else (10, 100, 1000)
    interval = patchrelay.GitHubConfig().poll_interval
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}, "
          f"{subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"GitHubClient.observe against tests/fakes/github.py (GraphQL executed by graphql-core over HTTP on "
          f"localhost); poll interval {interval:.0f} s")
    print(__doc__[__doc__.index("Columns:"):__doc__.index("The fake charges")].rstrip())
    print()
    first, steady, errors, problems, budget100, per_pr = [], [], [], [], {}, {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for r in (1, 5):
                with BenchGitHub(tokens={TOKEN: LOGIN}) as fake:    # a fresh GitHub per world
                    client = patchrelay.GitHubClient(patchrelay.GitHubConfig(api_url=fake.api_url,
                                                                             graphql_url=fake.graphql_url), TOKEN)
                    meter = Meter(client)
                    t0 = time.perf_counter()
                    world = build_world(fake, tmp, n, r)
                    build_s = time.perf_counter() - t0
                    f1 = observe_all(client, meter, fake, world, known=False)
                    warm = observe_all(client, meter, fake, world, known=True)  # runs the check policies
                    f2 = observe_all(client, meter, fake, world, known=True)
                    problems += fake.validation_errors
                line, _ = row(n, r, f1, interval)
                first.append(line)
                line, share = row(n, r, f2, interval)
                steady.append(line + f"   (build {build_s:.1f} s, first pass {warm['wall'] / 1000:.1f} s)")
                if n == 100:
                    budget100[r] = (share, f2)
                for mode, f in (("by number", f2), ("by branch", f1)):
                    if not f["errors"] and f["found"] and f["points"] > per_pr.get(mode, (0, 0))[0]:
                        per_pr[mode] = (f["points"], f["points"] / f["found"])
                errors += [f"first observation, N={n} R={r}: {e}" for e in f1["errors"]]
                errors += [f"steady state, N={n} R={r}: {e}" for e in f2["errors"]]
    for title, rows in (("steady state: PR numbers known, items (branch, number)", steady),
                        ("first observation: PR numbers unknown, items (branch, None), PR found by branch", first)):
        print(title)
        print(HEAD)
        for line in rows:
            print(line)
        print()
    for r, (share, f) in sorted(budget100.items()):
        print(f"budget at 100 open PRs over {r} repositor{'y' if r == 1 else 'ies'}, observed every {interval:.0f} s: "
              f"{f['points']} points per observation = {share:.0f} % of {f['limit']:,} points/h "
              f"(goal: under 20 %) -> {'met' if share < 20 else 'NOT met'}")
    if per_pr:
        rounds = 3600 / interval
        print("points per tracked PR and observation (from the row with the most points, no error): " + ", ".join(
            f"{mode} {v:.2f}" for mode, (_, v) in per_pr.items()))
        if "by number" in per_pr:
            print(f"steady-state PRs that fit in 20 % of 5,000 points/h at one observation every {interval:.0f} s: "
                  f"~{0.2 * 5000 / rounds / per_pr['by number'][1]:.0f}")
    if errors:
        print("\nerrors:")
        for e in errors:
            print(f"  {patchrelay.one_line(e, 300)}")
    if problems:
        print(f"\nfake GitHub recorded {len(problems)} rejection(s); first: "
              f"{patchrelay.one_line(json.dumps(problems[0]), 300)}")
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"\ntotal run time {time.perf_counter() - t_start:.0f} s (CPU {cpu:.0f} s, git included), "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
