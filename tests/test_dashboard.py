"""`python -m kd_fracture.dashboard`: serves optuna-dashboard on loopback, warns before exposing a study."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest

from kd_fracture.cli import dashboard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def study_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    study = optuna.create_study(study_name="distill_hybrid", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("kd.alpha", 0, 1), n_trials=2)
    return url


def test_serves_http_200_on_loopback_then_stops(study_db):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "kd_fracture.dashboard", "--storage", study_db, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        status, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    status = r.status
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1]
        assert status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
            assert b"distill_hybrid" in r.read()  # it serves this storage's study
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/dashboard/" in out
    assert "warning" not in err  # loopback: nothing is exposed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_no_warning_on_loopback(host):
    assert dashboard.exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_warns_for_network_hosts(host):
    assert "reachable from the network" in dashboard.exposure_warning(host)


def test_host_all_interfaces_prints_warning_and_url(study_db, monkeypatch, capsys):
    import optuna_dashboard

    served = {}
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port: served.update(host=host, port=port))
    assert dashboard.main(["--storage", study_db, "--host", "0.0.0.0", "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert served == {"host": "0.0.0.0", "port": 8123}
    assert "--host 0.0.0.0" in err and "reachable from the network" in err
    assert "http://127.0.0.1:8123/dashboard/" in out


def test_missing_study_database_is_an_error_not_a_new_file(tmp_path, capsys):
    db = tmp_path / "nothing.db"
    assert dashboard.main(["--storage", f"sqlite:///{db}"]) == 2
    assert "run python -m kd_fracture.distill first" in capsys.readouterr().err
    assert not db.exists()


def test_default_storage_is_the_default_distill_study(tmp_path, monkeypatch, capsys):
    """No --storage: the study database distill writes by default for the quick start's teacher run."""
    monkeypatch.chdir(tmp_path)
    args = dashboard.build_parser().parse_args([])
    assert (args.run, args.storage, args.host, args.port) == ("runs/phantom/resnet50", None, "127.0.0.1", 8080)
    assert dashboard.main([]) == 2  # no study yet: says so, names the database distill would write
    assert "runs/phantom/resnet50/distill/phantom-resnet50-hybrid_s.db" in capsys.readouterr().err
