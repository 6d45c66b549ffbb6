"""The local web app (kd_fracture.app): an offline page, the info/predict/runs endpoints on a tiny trained run,
per-file errors, the upload and pixel limits, path safety of the report route, and models loaded once."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from kd_fracture.app import server  # noqa: E402
from kd_fracture.data.inputs import UNKNOWN_LABEL, InputImage  # noqa: E402
from kd_fracture.extras import optional  # noqa: E402
from kd_fracture.pipelines.predict import predict_images  # noqa: E402
from kd_fracture.runs.models import load_run_models  # noqa: E402

UPLOAD_LIMIT = 200_000  # bytes; the tiny phantom's 32 px PNGs are ~1 kB


@pytest.fixture(scope="module")
def tiny_run(tiny_phantom, tmp_path_factory, app_run_builder) -> Path:
    """The app's tiny run (conftest.served_tiny_run) under <tmp>/runs/, and a secret file outside the runs root."""
    tmp = tmp_path_factory.mktemp("app")
    run = app_run_builder(tiny_phantom, tmp)
    (tmp / "secret.txt").write_text("outside the runs root")
    return run


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(server.create_app(tiny_run, UPLOAD_LIMIT, device="cpu")) as c:
        yield c


@pytest.fixture(scope="module")
def phantom_pngs(tiny_phantom) -> list[Path]:
    return sorted(Path(tiny_phantom).rglob("*.png"))[:3]


def upload(*files: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in files]


def huge_png_header(width: int = 10_000, height: int = 10_000) -> bytes:
    """A PNG whose IHDR claims width × height, with one tiny IDAT: refused from its header, never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_page_loads_nothing_from_the_network(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>" in r.text and "Predict" in r.text and "Runs" in r.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", r.text, flags=re.IGNORECASE)
    assert refs and not [u for u in refs if u.lower().startswith(("http://", "https://", "//"))], refs
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in re.findall(r"""src=["'](/static/[^"']+)""", r.text):
        js = client.get(asset)
        assert js.status_code == 200 and not re.search(r"https?://", js.text), asset
    assert client.get("/docs").status_code == 404  # swagger UI would load from a CDN


def test_info(client, tiny_run):
    info = client.get("/api/info").json()
    assert "not a diagnostic device" in info["disclaimer"]
    assert set(info["models"]) == {"teacher"}
    teacher = info["models"]["teacher"]
    assert teacher["members"] == ["0", "1"] and teacher["architecture"] == "resnet10t"
    assert teacher["threshold"] == pytest.approx(load_run_models(tiny_run, "teacher").cfg.eval.threshold)
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT


def test_predict_equals_the_library_path(client, tiny_run, phantom_pngs):
    path = phantom_pngs[0]
    res = client.post("/api/predict", files=upload(("xray.png", path.read_bytes())))
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["n_predicted"] == 1 and body["files"][0]["ok"]
    got = body["files"][0]["teacher"]
    assert 0.0 <= got["prob"] <= 1.0

    models = load_run_models(tiny_run, "teacher")
    image = InputImage(path=path, shown=str(path), study="", body_part="unknown", label=UNKNOWN_LABEL)
    expected = predict_images(models, [image], torch.device("cpu")).iloc[0]
    assert got["prob"] == pytest.approx(float(expected["prob"]), abs=1e-6)
    for k in ("0", "1"):
        assert got["fold_probs"][k] == pytest.approx(float(expected[f"prob_fold{k}"]), abs=1e-6)
    assert got["spread"]["min"] <= got["prob"] <= got["spread"]["max"]
    assert got["decision"] == expected["prediction"]

    summary = body["models"]["teacher"]
    assert summary["study"]["n_images"] == 1 and summary["study"]["prob"] == pytest.approx(got["prob"])
    assert summary["latency_ms"]["predict"] > 0
    if optional("pytorch_grad_cam", "gradcam", "test", log=False) is not None:
        assert got["overlay"].startswith("data:image/png;base64,")
        assert summary["latency_ms"]["gradcam"] > 0
    else:
        assert got["overlay"] is None and any("Grad-CAM" in n for n in body["notes"])


def test_bad_files_get_their_own_error_and_the_others_predict(client, phantom_pngs):
    good = phantom_pngs[1].read_bytes()
    res = client.post("/api/predict", files=upload(
        ("notes.png", b"this is a text file, not a radiograph\n"),
        ("cut.png", good[: len(good) // 2]),
        ("../../etc/evil name.png", huge_png_header()),
        ("ok.png", good),
        ("empty.png", b""),
    ))
    assert res.status_code == 200, res.text
    files = res.json()["files"]
    assert [f["ok"] for f in files] == [False, False, False, True, False]
    assert "not an image" in files[0]["error"]
    assert "truncated" in files[1]["error"] and "upload_" not in files[1]["error"]  # no temp path leaks
    assert files[2]["name"] == "evil name.png" and "too large" in files[2]["error"] and "10000" in files[2]["error"]
    assert "empty" in files[4]["error"]
    assert 0.0 <= files[3]["teacher"]["prob"] <= 1.0
    assert res.json()["models"]["teacher"]["study"]["n_images"] == 1
    # a request with nothing readable is answered, not a server error, and the server keeps serving
    res = client.post("/api/predict", files=upload(("a.png", b"nope")))
    assert res.status_code == 200 and res.json()["n_predicted"] == 0
    assert client.get("/api/info").status_code == 200


def test_upload_over_the_limit_is_413(client):
    res = client.post("/api/predict", files=upload(("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * UPLOAD_LIMIT)))
    assert res.status_code == 413
    assert "too large" in res.json()["detail"] and "--max-upload-mb" in res.json()["detail"]
    assert client.get("/api/info").status_code == 200


def test_report_route_is_path_safe(client, tiny_run):
    rel = tiny_run.relative_to(tiny_run.parents[1]).as_posix()  # phantom/resnet10t
    ok = client.get(f"/runs/{rel}/report.html")
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/html")
    assert "sandbox" in ok.headers["content-security-policy"]
    for bad in ("/runs/../../etc/passwd", "/runs/%2E%2E/%2E%2E/etc/passwd", "/runs/..%2F..%2Fsecret.txt",
                "/runs/%2E%2E/secret.txt", f"/runs/{rel}/config.yaml", "/runs//etc/passwd",
                f"/runs/{rel}/../../../secret.txt"):
        r = client.get(bad)
        assert r.status_code in (400, 404), bad
        assert "outside the runs root" not in r.text and "root:" not in r.text
    link = tiny_run.parent / "link"
    link.mkdir()
    (link / "report.html").symlink_to(tiny_run.parents[2] / "secret.txt")  # a symlink out of the root
    assert client.get("/runs/phantom/link/report.html").status_code == 404


def test_runs_lists_headline_numbers_and_reports(client, tiny_run):
    res = client.get("/api/runs").json()
    assert Path(res["root"]) == tiny_run.parents[1].resolve()
    run = next(r for r in res["runs"] if r["path"] == "phantom/resnet10t")
    assert run["model"] == "resnet10t" and run["cv"]["n_folds"] == 2 and run["cv"]["kappa"] is not None
    assert run["holdout"]["auroc"] is not None and run["holdout"]["threshold"] is not None
    assert run["report"] == "/runs/phantom/resnet10t/report.html"
    if run["has_distill"]:  # linked to the dashboard of its studies, with the command that starts it
        assert run["dashboard"]["url"].startswith("http://127.0.0.1:8080/")
        assert run["dashboard"]["command"] == f"python -m kd_fracture.dashboard --run {tiny_run}"
    assert client.get("/api/runs", params={"root": "phantom"}).status_code == 200
    assert client.get("/api/runs", params={"root": "/etc"}).status_code == 400
    assert client.get("/api/runs", params={"root": "../.."}).status_code == 400


def test_models_load_once_across_requests(tiny_run, phantom_pngs, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return load_run_models(*args, **kwargs)

    monkeypatch.setattr(server, "load_run_models", counting)
    loads = []
    original = server.RunModels.load
    monkeypatch.setattr(server.RunModels, "load", lambda self, k: loads.append(k) or original(self, k))
    with TestClient(server.create_app(tiny_run, device="cpu")) as c:
        for path in phantom_pngs[:2]:
            assert c.post("/api/predict", files=upload((path.name, path.read_bytes()))).json()["n_predicted"] == 1
    assert len(calls) == 1  # the teacher; the run has no distill/ study
    assert sorted(loads) == [0, 1]  # each fold's weights read from disk once, not per request


def test_student_is_served_next_to_the_teacher(tiny_run, phantom_pngs, tmp_path, monkeypatch, student_copy):
    run = student_copy(tiny_run, tmp_path / "runs" / "phantom" / "with_student")
    calls = []
    monkeypatch.setattr(server, "load_run_models", lambda *a, **k: calls.append(a) or load_run_models(*a, **k))
    with TestClient(server.create_app(run, device="cpu")) as c:
        info = c.get("/api/info").json()
        assert set(info["models"]) == {"teacher", "student"}
        assert "distill/s1/final/resnet10t_kd" in info["models"]["student"]["description"]
        body = c.post("/api/predict", files=upload(("a.png", phantom_pngs[0].read_bytes()))).json()
    assert [a[1] for a in calls] == ["teacher", "student"]
    got = body["files"][0]
    assert got["student"]["prob"] == pytest.approx(got["teacher"]["prob"], abs=1e-6)  # the same weights
    assert body["models"]["student"]["latency_ms"]["predict"] > 0
    assert body["models"]["student"]["study"]["decision"] in ("normal", "abnormal")
    with TestClient(server.create_app(run, device="cpu")) as c:  # the Runs tab links its study to the dashboard
        row = next(r for r in c.get("/api/runs").json()["runs"] if r["path"].endswith("with_student"))
    assert row["has_distill"] and row["dashboard"]["url"] == "http://127.0.0.1:8080/dashboard/"
    assert row["dashboard"]["command"] == f"python -m kd_fracture.dashboard --run {run}"


def test_cli_help_and_exposure_warning(capsys):
    from kd_fracture.cli import app as cli_app

    with pytest.raises(SystemExit) as exc:
        cli_app.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-upload-mb MB" in text and "default: 7860" in text and "default: 127.0.0.1" in text
    assert cli_app.main(["--run", "/no/such/run"]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_a_16_bit_tiff_upload_is_predicted_like_the_file(client, tiny_run, phantom_pngs, tmp_path):
    """TIFF is read by the library (16-bit windowed by percentiles); the app must accept it by its content too
    (it answered "not an image" before), and give the probability the library gives for the same file."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(phantom_pngs[2]).convert("L"), dtype=np.uint16) * 257  # 8 → 16 bit
    path = tmp_path / "xray.tif"
    Image.fromarray(pixels).save(path)
    res = client.post("/api/predict", files=upload(("scan.bin", path.read_bytes())))  # the name says nothing
    assert res.status_code == 200, res.text
    got = res.json()["files"][0]
    assert got["ok"], got
    models = load_run_models(tiny_run, "teacher")
    image = InputImage(path=path, shown=str(path), study="", body_part="unknown", label=UNKNOWN_LABEL)
    expected = predict_images(models, [image], torch.device("cpu")).iloc[0]
    assert got["teacher"]["prob"] == pytest.approx(float(expected["prob"]), abs=1e-6)
