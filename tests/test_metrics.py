"""What PatchRelay reports about itself: `patchrelay metrics` (Prometheus text), the textfile and status page
every tick writes (metrics.textfile, metrics.html), `status --html`, and with metrics.public_url a page per
issue under a name nobody can guess, linked once from the issue's Linear agent session.

A scripted day drives three issues with the real Codex CLI (fake model): APP-1 gets a pull request, APP-2's run
fails (the provider says the model does not exist), APP-3 is paused by the operator before it launches, and the
fake Linear refuses every activity from the middle of the day on, so Linear writes stay queued in the outbox.
The metrics are parsed with prometheus_client's own parser and checked against `status --json`; the page is
opened in headless Chromium.
"""
import collections
import html
import json
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from helpers import cli_inproc, logs, pause, runs, say, sqlite_only, tick_inproc, tool, wait_done

REPO = "acme/app"
HOSTILE_TITLE = "Escape <b>bold</b> & friends"
NO_SUCH_MODEL = {"kind": "http_error", "status": 404, "headers": {},
                 "body": {"error": {"type": "invalid_request_error", "code": "model_not_found",
                                    "message": "The model `gpt-x` does not exist"}}}
ISSUE_KEY = re.compile(r"\b[A-Z][A-Z0-9]*-\d+\b")


# ----------------------------------------------------------------------------- helpers
def ok(world, *args):
    r = cli_inproc(world, *args)
    assert r.exit_code == 0, f"patchrelay {' '.join(args)} exited {r.exit_code}\n{r.output}"
    return r.stdout


def scripted_day(world):
    """APP-1 opens a PR, APP-2's run fails, APP-3 waits paused; Linear refuses activities from APP-2's run on.
    Returns the sessions by key."""
    world.github.set_check_policy(REPO, lambda sha, f: [{"name": "test", "conclusion": "SUCCESS"}])
    world.use_codex([tool("echo hello > hello.txt"), say("Added hello.txt."),     # APP-1: implementation
                     NO_SUCH_MODEL])                                                 # APP-2: a failed run
    pause(world)                                    # runner.paused in the config: track, launch nothing
    sessions = {"APP-1": world.delegate()[1],
                "APP-2": world.delegate(title="Break the build", description="Please break it")[1],
                "APP-3": world.delegate(title=HOSTILE_TITLE, description="Please escape it")[1]}
    tick_inproc(world)
    ok(world, "pause", "APP-2", "--reason", "one at a time")
    ok(world, "pause", "APP-3", "--reason", "waiting for design")
    ok(world, "resume")                             # overrides the config's pause

    for _ in range(10):                             # implementation, then the PR (ticks in this process: cheap)
        tick_inproc(world, check=None)
        if wait_done(world, "APP-1")["issue"]["factory_state"] == "pr_open":
            break
    else:
        raise AssertionError(f"APP-1 never got its PR: {world.show('APP-1')['issue']}\n{logs(world)}")

    # Linear refuses every activity from now on: what APP-2's run says stays queued in the outbox
    world.linear.fail_next(10 ** 6, operation="agentActivityCreate")
    ok(world, "resume", "APP-2")
    tick_inproc(world, check=None)
    s = wait_done(world, "APP-2")
    assert s["issue"]["factory_state"] == "failed", f"{s['issue']}\n{logs(world)}"
    world.tick_subprocess(check=None)               # the last tick of the day, as cron runs it
    return sessions


def parse_metrics(text):
    """{(sample name, ((label, value), ...)): value} and the families, by prometheus_client's parser."""
    families = list(text_string_to_metric_families(text))
    samples = {}
    for fam in families:
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} twice"
            samples[key] = s.value
    return families, samples


def by_label(samples, name, label):
    """{label value: sample value} of one metric."""
    return {dict(lab)[label]: v for (n, lab), v in samples.items() if n == name}


def value(samples, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def page_problems(page):
    """What makes a page not self-contained: scripts, stylesheets or any other outside resource."""
    problems = []
    if re.search(r"<script", page, re.I):
        problems.append("a <script> element")
    if re.search(r"<link\b", page, re.I):
        problems.append("a <link> element")
    if re.search(r"@import|url\(", page, re.I):
        problems.append("a stylesheet import or url()")
    for tag, attr, url in re.findall(r"<(\w+)\b[^>]*?\s(src|href|srcset|data)\s*=\s*[\"']?\s*((?:https?:)?//[^\s\"'>]*)",
                                     page, re.I):
        if not (tag.lower() == "a" and attr.lower() == "href"):
            problems.append(f"<{tag} {attr}={url}>")
    return problems


def find_chromium():
    for c in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and Path(c).exists():
            return c
    raise AssertionError("chromium not found: .ci/run installs Debian's chromium package "
                         "(apt-get install --no-install-recommends chromium)")


def chromium(browser, profile, *args):
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *map(str, args)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}\n{p.stderr[-3000:]}"
    return p.stdout


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- 1. `patchrelay metrics`
def check_metrics(world, st):
    """`patchrelay metrics` parses, follows Prometheus' naming conventions and says what `status --json` says."""
    p = world.cli("metrics", check=0)
    text = p.stdout
    print(text)
    assert text.endswith("\n") and p.stderr == ""
    families, samples = parse_metrics(text)
    assert families, text

    # conventions: one prefix, counters end in _total, no label that grows with the issues
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name.startswith("patchrelay_"), line
            assert kind in ("counter", "gauge"), line
            assert (kind == "counter") == name.endswith("_total"), line
    for fam in families:
        assert fam.name.startswith("patchrelay_"), fam.name
        for s in fam.samples:
            assert s.name.startswith("patchrelay_"), s.name
            if fam.type == "counter":
                assert s.name.endswith("_total"), s.name
            for k, v in s.labels.items():
                assert not ISSUE_KEY.search(v), f"{s.name}: label {k}={v!r} names an issue"
                assert k in ("version", "run_type", "outcome", "reason", "state", "status", "api", "scope"), \
                    f"{s.name}: unexpected label {k}"
    for key in ("APP-1", "APP-2", "APP-3", "Break the build", "hello"):
        assert key not in text

    # the same numbers as `status --json`
    assert st["others"] == 0 and {i["key"] for i in st["issues"]} == {"APP-1", "APP-2", "APP-3"}
    states = collections.Counter(i["factory_state"] for i in st["issues"])
    assert states == collections.Counter({"pr_open": 1, "failed": 1, "delegated": 1}), states
    issues = by_label(samples, "patchrelay_issues", "state")
    assert set(states) <= set(issues), (states, issues)
    assert {k: v for k, v in issues.items() if v} == dict(states)

    queued = [o for o in st["outbox"] if o["status"] == "queued"]
    assert queued, f"Linear refused every activity, yet nothing is queued: {st['outbox']}"
    assert value(samples, "patchrelay_outbox_rows", status="queued") == len(queued)
    assert value(samples, "patchrelay_outbox_rows", status="failed") == \
        len([o for o in st["outbox"] if o["status"] == "failed"])
    assert value(samples, "patchrelay_outbox_oldest_queued_age_seconds") > 0

    active = [i for i in st["issues"] if i["active_run"]]
    assert sum(by_label(samples, "patchrelay_runs_active", "run_type").values()) == len(active)
    all_runs = runs(world)
    assert sum(by_label(samples, "patchrelay_runs_started_total", "run_type").values()) == len(all_runs)
    finished = collections.Counter()
    for (n, lab), v in samples.items():
        if n == "patchrelay_runs_finished_total":
            finished[dict(lab)["outcome"]] += v
    assert finished["failed"] >= 1 and finished["completed"] >= 1, finished
    assert finished == collections.Counter(r["status"] for r in all_runs if r["status"] not in ("claimed", "running"))

    held = by_label(samples, "patchrelay_runs_held", "reason")
    assert held["issue_paused"] == 1 and held["paused"] == 0, held      # APP-3, paused before it launched
    assert sum(by_label(samples, "patchrelay_runs_pending", "run_type").values()) == \
        len([i for i in st["issues"] if i["pending_run"]]) >= 1

    assert 0 <= value(samples, "patchrelay_last_tick_age_seconds") < 60
    assert value(samples, "patchrelay_last_tick_success") == (1 if st["last_tick"]["result"] == "ok" else 0)
    assert value(samples, "patchrelay_ticks_last_hour") >= 4
    assert value(samples, "patchrelay_tokens_spent_today") == st["tokens"]["today"] > 0
    info = [(dict(lab), v) for (n, lab), v in samples.items() if n == "patchrelay_info"]
    assert len(info) == 1 and info[0][1] == 1 and info[0][0]["version"], info


# ----------------------------------------------------------------------------- 3. the status page
def check_status_page(world, st, site):
    """`status --html` and the tick's metrics.html: self-contained, titles escaped; Chromium renders it."""
    out = world.tmp / "status.html"
    assert world.cli("status", "--html", out, check=0).stdout.strip() == f"wrote {out}"
    pages = {"status --html": out.read_text(), "metrics.html": (site / "metrics.html").read_text()}
    for name, page in pages.items():
        assert page.lstrip().lower().startswith("<!doctype html>"), name
        assert page_problems(page) == [], f"{name} is not self-contained: {page_problems(page)}"
        assert "<b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; friends" in page, name
        assert "Needs attention" in page
        for i in st["issues"]:
            assert i["key"] in page and i["factory_state"] in page, (name, i["key"])
    assert [p.name for p in site.iterdir()] == ["metrics.html"]        # no issue pages without public_url

    browser = find_chromium()
    shot = world.tmp / "shot.png"
    chromium(browser, world.tmp / "chromium-profile", "--screenshot=" + str(shot), "--window-size=412,1200",
             out.as_uri())
    assert shot.exists() and shot.stat().st_size > 8000, shot.stat().st_size if shot.exists() else "no file"
    assert png_size(shot) == (412, 1200)
    dom = chromium(browser, world.tmp / "chromium-profile", "--dump-dom", "--window-size=412,1200", out.as_uri())
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))
    assert "Needs attention" in text, text[:2000]
    assert HOSTILE_TITLE in text                                # shown as the text it is
    assert not re.search(r"<b\b", dom, re.I), "the title's <b> became an element"
    for i in st["issues"]:
        row = re.search(re.escape(i["key"]) + r"\s.{0,120}?\s" + re.escape(i["factory_state"]) + r"\s", text)
        assert row, f"{i['key']} and its state {i['factory_state']} not in the rendered page: {text[:3000]}"
    assert "APP-2 failed" in text, text[:2000]                  # and it needs attention


# ----------------------------------------------------------------------------- 1 and 3: the scripted day
def test_a_scripted_day_metrics_agree_with_status_and_the_status_page_renders(world):
    # one day (real Codex runs are the expensive part) for both the metrics and the page
    site = world.tmp / "site"
    world.write_config(metrics={"html": str(site / "metrics.html")})
    scripted_day(world)
    st = world.status()
    check_metrics(world, st)
    check_status_page(world, st, site)


@sqlite_only("no SQLite file yet; a PostgreSQL database always exists")
def test_metrics_without_a_database_is_a_usage_error(world):
    p = world.cli("metrics")
    assert p.returncode == 2 and p.stdout == "" and "patchrelay tick" in p.stderr, (p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- 2. metrics.textfile
def test_the_textfile_is_never_seen_half_written_or_missing_while_ticks_run(world):
    prom = world.tmp / "textfile" / "m.prom"
    pause(world)
    world.write_config(metrics={"textfile": str(prom)})
    world.delegate()
    world.delegate(title="Second")
    watch = subprocess.Popen(world.cli_argv("watch", "--interval", "0.2"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=world.env())
    reads, versions, bad = 0, set(), []
    stop = threading.Event()

    def reader():
        nonlocal reads
        seen = False
        while not stop.is_set():
            try:
                text = prom.read_text()
            except FileNotFoundError:
                if seen:
                    bad.append("the file disappeared after it was written")
                time.sleep(0.002)
                continue
            seen = True
            reads += 1
            if not text.endswith("\n"):
                bad.append(f"read {reads} does not end with a newline: {text[-80:]!r}")
            try:
                names = {f.name for f in text_string_to_metric_families(text)}
                if "patchrelay_last_tick_age_seconds" not in names:
                    bad.append(f"read {reads} misses metrics: {sorted(names)}")
            except Exception as e:    # noqa: BLE001 - any parse error is the finding
                bad.append(f"read {reads} does not parse: {e!r}: {text[-200:]!r}")
            versions.add(text)
            time.sleep(0.001)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (reads < 300 or len(versions) < 8) and watch.poll() is None:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(10)
        watch.send_signal(signal.SIGTERM)
        try:
            out, err = watch.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            watch.kill()
            out, err = watch.communicate()
    assert bad == [], bad[:5]
    assert reads >= 300 and len(versions) >= 8, (reads, len(versions), out, err)
    assert "failed:" not in err, err
    assert not [p for p in prom.parent.iterdir() if p != prom], "temporary files left behind"
    _, samples = parse_metrics(prom.read_text())
    assert by_label(samples, "patchrelay_issues", "state")["delegated"] == 2
    assert value(samples, "patchrelay_runs_held", reason="paused") == 2


# ----------------------------------------------------------------------------- 4. metrics.public_url
def test_public_url_writes_an_unguessable_page_per_issue_linked_once_from_its_session(world):
    site = world.tmp / "site"
    base = "https://status.example.test/pr/"
    pause(world)
    world.write_config(metrics={"html": str(site / "index.html"), "public_url": base})
    _, session = world.delegate(title=HOSTILE_TITLE)
    tick_inproc(world)
    pages = sorted(site.glob("issue-*.html"))
    assert len(pages) == 1, sorted(p.name for p in site.iterdir())
    slug = re.fullmatch(r"issue-(.+)\.html", pages[0].name).group(1)
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", slug), slug
    url = f"{base}issue-{slug}.html"

    def links_sent():
        """How many times PatchRelay told Linear the page's URL (answered requests only)."""
        return sum(json.dumps(r["variables"] or {}).count(url) for r in world.linear.requests
                   if r["status"] == 200 and not r["fault"])

    for _ in range(3):
        tick_inproc(world)
    assert session["externalLink"] == url
    assert links_sent() == 1
    assert sorted(site.glob("issue-*.html")) == pages           # the same name, tick after tick
    index = (site / "index.html").read_text()
    assert "APP-1" in index and slug not in index and not re.search(r"href=\"[^\"]*issue-", index)
    page = pages[0].read_text()
    assert "APP-1" in page and "&lt;b&gt;bold&lt;/b&gt; &amp; friends" in page and "<b>" not in page
    assert page_problems(page) == []

    # Linear's session link moves on; PatchRelay does not set it again
    world.linear.update_session(session, externalLink="https://elsewhere.test/")
    tick_inproc(world)
    assert session["externalLink"] == "https://elsewhere.test/" and links_sent() == 1
    assert sorted(site.glob("issue-*.html")) == pages


def test_public_url_without_html_is_a_config_error(world):
    world.write_config(metrics={"public_url": "https://status.example.test/pr/"})
    p = world.cli("tick")
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "metrics.public_url" in lines[0], p.stderr
    assert not world.state.exists() or not (world.state / "patchrelay.sqlite").exists()
