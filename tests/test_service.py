"""`patchrelay service install | status | uninstall`: the systemd user units (or the crontab line) it writes,
the owner-only environment file, and what it asks systemd and cron to do.

The CLI runs as a subprocess (`world.cli`) with XDG_CONFIG_HOME in the test's directory, so the units land
in `<tmp>/xdg-config/systemd/user`. `systemctl` and `crontab` are replaced by small recording scripts put
first on PATH (no user systemd runs here); the generated units are checked with the real
`systemd-analyze verify` where it is installed (.ci/run installs it).
"""
import json
import os
import shutil
import stat
import subprocess

import pytest


@pytest.fixture
def svc(world):
    world.use_codex([])                  # a model provider with a key variable (FAKE_API_KEY)
    fakes = world.tmp / "fake-bin"
    fakes.mkdir()
    calls = world.tmp / "calls.txt"
    crontab = world.tmp / "crontab.txt"
    (fakes / "systemctl").write_text(f"#!/bin/sh\necho \"systemctl $*\" >> '{calls}'\n"
                                     "case \"$2\" in is-active) echo active;; is-enabled) echo enabled;; esac\n")
    (fakes / "crontab").write_text(f"#!/bin/sh\nif [ \"$1\" = -l ]; then cat '{crontab}' 2>/dev/null; "
                                   f"else cat > '{crontab}'; fi\n")
    for f in fakes.iterdir():
        f.chmod(0o755)
    path = f"{fakes}:{os.environ['PATH']}"

    def run(*args, check=0):
        return world.cli("service", *args, env={"PATH": path}, check=check)
    run.units = world.tmp / "xdg-config" / "systemd" / "user"
    run.env_file = world.tmp / "xdg-config" / "patchrelay" / "env"
    run.calls = lambda: calls.read_text().splitlines() if calls.exists() else []
    run.crontab = crontab
    return run


def unit(svc, name):
    return (svc.units / name).read_text()


def test_timer_install_writes_units_with_absolute_paths_killmode_process_and_an_env_file(world, svc):
    p = svc("install", "--timer", "30")
    service, timer = unit(svc, "patchrelay.service"), unit(svc, "patchrelay.timer")
    exec_start = next(ln for ln in service.splitlines() if ln.startswith("ExecStart="))
    argv = exec_start[len("ExecStart="):].split()
    assert all(os.path.isabs(a) for a in argv[:2]) and os.access(argv[0], os.X_OK), exec_start
    assert argv[-3:] == ["--config", str(world.config_path.resolve()), "tick"], exec_start
    assert "Type=oneshot" in service and "KillMode=process" in service
    assert f"EnvironmentFile={svc.env_file}" in service
    path_line = next(ln for ln in service.splitlines() if ln.startswith("Environment="))
    codex_dir = os.path.dirname(world.config["codex"]["bin"])
    assert codex_dir in path_line and os.path.dirname(shutil.which("git")) in path_line, path_line
    if shutil.which("node"):
        assert os.path.dirname(shutil.which("node")) in path_line
    assert "OnUnitActiveSec=30s" in timer and "Unit=patchrelay.service" in timer
    # the environment file: owner-only, the names the config needs, no values
    assert stat.S_IMODE(svc.env_file.stat().st_mode) == 0o600
    names = [ln.split("=", 1) for ln in svc.env_file.read_text().splitlines() if ln and not ln.startswith("#")]
    assert names == [["LINEAR_API_KEY", ""], ["GITHUB_TOKEN", ""], ["FAKE_API_KEY", ""]], names
    # systemd was asked to load and start the timer; the person is told about the env file and lingering
    assert svc.calls() == ["systemctl --user daemon-reload", "systemctl --user enable --now patchrelay.timer"]
    assert "enabled and started patchrelay.timer" in p.stdout
    assert f"fill in {svc.env_file}" in p.stdout and "loginctl enable-linger" in p.stdout


def test_watch_install_replaces_the_timer_and_keeps_the_persons_env_file(svc):
    svc("install", "--timer", "30", "--no-start")
    assert svc.calls() == []                                         # --no-start touches nothing
    svc.env_file.write_text("LINEAR_API_KEY=lin_api_mine\nGITHUB_TOKEN=ghp_mine\nFAKE_API_KEY=k\n")
    p = svc("install", "--watch", "--interval", "7")
    assert not (svc.units / "patchrelay.timer").exists()
    service = unit(svc, "patchrelay.service")
    assert "Type=simple" in service and "Restart=on-failure" in service and "KillMode=process" in service
    assert next(ln for ln in service.splitlines() if ln.startswith("ExecStart=")).endswith("watch --interval 7")
    assert svc.env_file.read_text().startswith("LINEAR_API_KEY=lin_api_mine")      # never overwritten
    assert "fill in" not in p.stdout                                  # every name has a value
    assert svc.calls() == ["systemctl --user disable --now patchrelay.timer", "systemctl --user daemon-reload",
                           "systemctl --user enable patchrelay.service",
                           "systemctl --user restart patchrelay.service"]      # the new unit takes effect


def test_a_timer_replacing_the_watch_service_stops_and_disables_it(svc):
    svc("install", "--watch")
    svc("install", "--timer", "20")
    calls = svc.calls()
    assert calls[-3:] == ["systemctl --user daemon-reload", "systemctl --user disable --now patchrelay.service",
                          "systemctl --user enable --now patchrelay.timer"], calls
    service = unit(svc, "patchrelay.service")
    assert "[Install]" not in service and service.count("ExecStart=") == 1    # started by the timer only
    assert next(ln for ln in service.splitlines() if ln.startswith("ExecStart=")).endswith(" tick")


def test_status_and_uninstall(svc):
    assert json.loads(svc("status", "--json").stdout)["installed"] is False
    svc("install", "--timer", "60")
    st = json.loads(svc("status", "--json").stdout)
    assert st["installed"] is True and set(st["units"]) == {"patchrelay.service", "patchrelay.timer"}
    assert st["units"]["patchrelay.timer"]["active"] == "active" and st["env_file"]["mode"] == "0o600"
    p = svc("uninstall")
    assert "removed" in p.stdout and not (svc.units / "patchrelay.service").exists()
    assert not (svc.units / "patchrelay.timer").exists() and svc.env_file.exists()   # the secrets stay
    assert "systemctl --user disable --now patchrelay.timer" in svc.calls()
    assert json.loads(svc("status", "--json").stdout)["installed"] is False


def test_cron_install_adds_one_line_and_uninstall_removes_only_it(world, svc):
    svc.crontab.write_text("0 3 * * * /usr/bin/backup\n")
    svc("install", "--cron")
    svc("install", "--cron")                                          # again: still one line
    lines = svc.crontab.read_text().splitlines()
    ours = [ln for ln in lines if "patchrelay" in ln]
    assert lines[0] == "0 3 * * * /usr/bin/backup" and len(ours) == 1, lines
    assert ours[0].startswith("* * * * * set -a; . ") and str(svc.env_file) in ours[0]
    assert f"--config {world.config_path.resolve()} tick" in ours[0] and "cron.log" in ours[0]
    # the line works in a shell: with the environment file sourced, it runs a tick
    svc.env_file.write_text("LINEAR_API_KEY=lin_oauth_apptoken123\n")
    cmd = ours[0].split(" ", 5)[5].rsplit(" # ", 1)[0].replace("tick >>", "status --json >>")
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    svc("uninstall")
    assert svc.crontab.read_text().splitlines() == ["0 3 * * * /usr/bin/backup"]


def test_install_refuses_two_modes_at_once(svc):
    p = svc("install", "--cron", "--timer", "5", check=2)
    assert "choose one of" in p.stderr and not svc.units.exists()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed (.ci/run "
                                                                "installs the systemd package)")
@pytest.mark.parametrize("mode", [["--timer", "15"], ["--watch"]])
def test_generated_units_pass_systemd_analyze_verify(svc, mode):
    svc("install", *mode, "--no-start")
    files = sorted(str(f) for f in svc.units.iterdir())
    r = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in r.stderr.splitlines() if "patchrelay" in ln]
    assert r.returncode == 0 and not problems, r.stderr
