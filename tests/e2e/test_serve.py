"""serve.py as a user runs it: a real server process on a free local port, real HTTP requests (urllib), the
answers compared with what the same model gives in this process (``util.deploy.load_predictor``) and with the
CSV ``predict.py`` writes for the same images."""
from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, make_checkpoint, same_prediction_rows

SERVE = os.path.join(ROOT, "serve.py")
ENV = {**os.environ, "GLOG_minloglevel": "2", "OMP_NUM_THREADS": "1"}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1
BOUNDARY = "----test-boundary-7MA4YWxkTrZu0gW"


class Served:
    """A running ``serve.py``: its process, base URL and stderr log file."""

    def __init__(self, ckpt, log_path, *extra):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, SERVE, "--model", str(ckpt), "--port", "0", "--threads", "1",
                                      *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = None

    def wait_ready(self):
        line = self.proc.stdout.readline()  # the ready line, or '' when the process died
        match = re.fullmatch(r"serving (\S+) on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, f"no ready line: {line!r}; stderr: {open(self.log_path).read()[-3000:]}"
        self.model, self.url = match.groups()
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def request(url, data=None, content_type=None, method=None):
    """(status, JSON answer, headers) of one request."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with OPENER.open(req, timeout=120) as res:
            return res.status, json.loads(res.read()), res.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def multipart(fields):
    """A multipart/form-data body (bytes, content type) of ``{name: (filename, bytes)}``, built by hand."""
    out = io.BytesIO()
    for name, (filename, data) in fields.items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def post_image(url, data, content_type="image/png"):
    return request(url + "/predict", data, content_type)


def save_jpeg(path, array, quality=95):
    Image.fromarray(array).save(path, format="JPEG", quality=quality)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoints, images, the three servers (started together, so their start-ups overlap) and the
    in-process predictors."""
    base = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(3)
    images = base / "images"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(images / "a.png")
    save_jpeg(images / "b.jpg", rng.integers(0, 256, (48, 52, 3), dtype=np.uint8))
    pairs = base / "pairs"
    pairs.mkdir()
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(pairs / "L.png")
    save_jpeg(pairs / "R.jpg", rng.integers(0, 256, (44, 40, 3), dtype=np.uint8))
    # a fundus-like image: a bright disc region on a wide black frame, so the FOV crop changes the input
    fundus = np.zeros((60, 90, 3), np.uint8)
    fundus[8:52, 30:74] = rng.integers(60, 256, (44, 44, 3), dtype=np.uint8)
    Image.fromarray(fundus).save(images / "fundus.png")

    # the single-view model was trained with --fundus_crop fov: an upload must be cropped as a file is
    ckpt = {"single": make_checkpoint(base / "single.pdparams", model="resnet_test", class_names=("x", "y", "z"),
                                      fundus_crop="fov"),
            "dual": make_checkpoint(base / "dual.pdparams", model="dual_resnet_test", seed=1)}
    servers = {"single": Served(ckpt["single"], base / "single.log", "--max_body_mb", "1"),
               "dual": Served(ckpt["dual"], base / "dual.log")}
    predict_csv = base / "predict.csv"
    predict = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--resume", ckpt["single"],
                              "--input", str(images), "--output", str(predict_csv)], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    try:
        for s in servers.values():
            s.wait_ready()
        assert predict.returncode == 0, predict.stderr[-3000:]
        with open(predict_csv, newline="", encoding="utf8") as f:
            predict_rows = {row["file"]: row for row in csv.DictReader(f)}

        from util.deploy import load_predictor

        predictors = {k: load_predictor(v) for k, v in ckpt.items()}
        predictors["no_crop"] = load_predictor(make_checkpoint(base / "no_crop.pdparams", model="resnet_test",
                                                               class_names=("x", "y", "z")))
        yield {"base": base, "images": images, "pairs": pairs, "ckpt": ckpt, "servers": servers,
               "predictors": predictors, "predict_rows": predict_rows}
    finally:
        for s in servers.values():
            s.stop()


def in_process(predictor, item):
    """(the result row, the raw outputs) this process computes for one image path (or a pair of paths)."""
    outputs = predictor.outputs(np.stack([predictor.load(item)]))
    return predictor.results(outputs)[0], outputs[0]


def check_row(answer, expected_row, expected_outputs, names, file):
    assert answer == {"file": file, **expected_row}
    probs = np.array([float(answer[f"prob_{c}"]) for c in names])
    np.testing.assert_allclose(probs, expected_outputs, atol=1e-6, rtol=0)


def test_health(setup):
    single, dual = setup["servers"]["single"], setup["servers"]["dual"]
    assert (single.model, dual.model) == ("resnet_test", "dual_resnet_test")
    status, body, _ = request(single.url + "/health")
    assert status == 200 and body == {"status": "ok", "model": "resnet_test", "task": "single_label",
                                      "class_names": ["x", "y", "z"], "input_size": 32, "num_views": 1,
                                      "backend": "dygraph", "precision": "fp32"}
    status, body, _ = request(dual.url + "/health")
    assert status == 200 and body["model"] == "dual_resnet_test" and body["num_views"] == 2
    assert body["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("name, content_type", [("a.png", "image/png"), ("b.jpg", "application/octet-stream"),
                                                ("fundus.png", "image/x-anything")])
def test_raw_body_and_multipart_give_predicts_row(setup, name, content_type):
    """fundus.png sits in a wide black frame: the model's --fundus_crop fov must crop the upload as it crops the
    file (util.deploy reading an opened image through the run's fundus preprocessing)."""
    url, path = setup["servers"]["single"].url, setup["images"] / name
    expected, outputs = in_process(setup["predictors"]["single"], str(path))
    data = path.read_bytes()

    status, raw, _ = post_image(url, data, content_type)
    assert status == 200, raw
    check_row(raw, expected, outputs, "xyz", "")

    status, form = request(url + "/predict", *multipart({"image": (f"uploads/today/{name}", data)}))[:2]
    assert status == 200, form
    check_row(form, expected, outputs, "xyz", name)  # the client's folders dropped, as predict names files

    # the row predict.py writes for the same file: the same columns in the same order, the same strings
    # (its CSV has an ``error`` column for files it could not read, an ``explanation`` one with --explain)
    row = setup["predict_rows"][name]
    assert list(form) == ["file", "prediction", "confidence", "prob_x", "prob_y", "prob_z"]
    assert [k for k in row if k not in ("error", "explanation")] == list(form)
    # the same strings up to the last decimal: predict.py ran the images as one batch, the server one by one
    assert same_prediction_rows([{k: row[k] for k in form}], [form]) and not row.get("error")
    assert raw["prediction"] in ("x", "y", "z") and abs(sum(float(raw[f"prob_{c}"]) for c in "xyz") - 1) < 1e-5


def test_bad_requests_are_refused_with_a_reason(setup):
    url = setup["servers"]["single"].url
    jpeg = (setup["images"] / "b.jpg").read_bytes()

    status, body, _ = post_image(url, b"this is not an image\n" * 20)
    assert status == 400 and "request body: not a complete image" in body["error"]

    status, body, _ = post_image(url, jpeg[:len(jpeg) // 2], "image/jpeg")  # truncated JPEG
    assert status == 400 and "not a complete image" in body["error"], body

    png = (setup["images"] / "a.png").read_bytes()
    status, body, _ = post_image(url, png[:-30])  # truncated PNG (image data and end chunk cut)
    assert status == 400 and "not a complete image" in body["error"], body

    status, body, _ = post_image(url, b"")
    assert status == 400 and "empty request body" in body["error"]

    status, body, _ = request(url + "/predict", *multipart({"file": ("a.png", png)}))
    assert status == 400 and "field 'image' missing" in body["error"] and "'file'" in body["error"]

    status, body, _ = request(url + "/predict", *multipart({"image": ("a.png", b"")}))
    assert status == 400 and "field 'image': empty" in body["error"]

    data, ctype = multipart({"image": ("a.png", png)})
    status, body, _ = request(url + "/predict", data[:len(data) // 2], ctype)  # cut inside the part
    assert status == 400 and "truncated" in body["error"]

    status, body, _ = request(url + "/predict", png, "application/x-www-form-urlencoded")
    assert status == 415 and "--data-binary" in body["error"]  # what curl sends without -H; says how to fix

    status, body, _ = request(url + "/nothing-here")
    assert status == 404 and "/nothing-here" in body["error"]
    status, body, headers = request(url + "/predict")
    assert status == 405 and headers["Allow"] == "POST"
    status, body, headers = request(url + "/health", b"x", "image/png")
    assert status == 405 and headers["Allow"] == "GET"
    status, body, _ = request(url + "/predict", png, "image/png", method="PUT")
    assert status == 405

    # over --max_body_mb 1: a body really sent, and one only announced (refused before it is read)
    status, body, _ = post_image(url, b"\0" * (1024 * 1024 + 1))
    assert status == 413 and "over the limit of 1048576 bytes" in body["error"]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(10 ** 9))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    res = conn.getresponse()
    assert res.status == 413 and "over the limit" in json.loads(res.read())["error"]
    conn.close()

    # the server is still fine after all that
    assert post_image(url, png)[0] == 200


def test_concurrent_requests_get_the_same_answers(setup):
    url = setup["servers"]["single"].url
    names = ["a.png", "b.jpg"] * 4
    data = {n: (setup["images"] / n).read_bytes() for n in set(names)}
    answers = [None] * len(names)
    go = threading.Barrier(len(names))

    def send(i):
        go.wait()
        answers[i] = request(url + "/predict", *multipart({"image": (names[i], data[names[i]])}))[:2]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers] == [200] * 8, answers
    for name in data:
        expected, _ = in_process(setup["predictors"]["single"], str(setup["images"] / name))
        got = [body for (_, body), n in zip(answers, names) if n == name]
        assert got == [{"file": name, **expected}] * 4


def test_dual_eye_takes_left_and_right(setup):
    url, pairs = setup["servers"]["dual"].url, setup["pairs"]
    left, right = (pairs / "L.png").read_bytes(), (pairs / "R.jpg").read_bytes()
    expected, outputs = in_process(setup["predictors"]["dual"], (str(pairs / "L.png"), str(pairs / "R.jpg")))
    status, body, _ = request(url + "/predict", *multipart({"left": ("L.png", left), "right": ("R.jpg", right)}))
    assert status == 200, body
    check_row(body, expected, outputs, "abc", "L.png|R.jpg")
    # swapped eyes are a different input (the model sees which eye is which)
    swapped = request(url + "/predict", *multipart({"left": ("R.jpg", right), "right": ("L.png", left)}))[1]
    assert swapped["file"] == "R.jpg|L.png" and swapped != body

    status, body, _ = post_image(url, left)
    assert status == 400 and "dual-eye" in body["error"] and "'left' and 'right'" in body["error"]
    status, body, _ = request(url + "/predict", *multipart({"left": ("L.png", left)}))
    assert status == 400 and "field 'right' missing" in body["error"]
    status, body, _ = request(url + "/predict", *multipart({"image": ("L.png", left)}))
    assert status == 400 and "'left' and 'right' missing" in body["error"]


def test_fundus_crop_matters_for_the_fundus_image(setup):
    """The row for fundus.png above is only a check of the crop if the crop changes the answer: the same
    weights without it answer otherwise."""
    path = str(setup["images"] / "fundus.png")
    _, cropped = in_process(setup["predictors"]["single"], path)
    _, uncropped = in_process(setup["predictors"]["no_crop"], path)
    assert np.abs(uncropped - cropped).max() > 1e-3, (uncropped, cropped)


def test_multipart_parts_are_cut_at_the_delimiters_only():
    """File data holding CRLFs and look-alike boundaries comes back byte for byte (no server needed)."""
    from serve import BadRequest, parse_multipart

    rng = np.random.default_rng(0)
    tricky = (b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n\r\n" + rng.bytes(3000) + b"\r\n--" + BOUNDARY.encode()
              + b"X\r\n" + rng.bytes(100) + b"\r\n")
    body, ctype = multipart({"image": ("a.png", tricky), "left": ("", b"")})
    body = b"a preamble to ignore\r\n" + body
    assert parse_multipart(body, ctype.replace(BOUNDARY, f'"{BOUNDARY}"')) == {"image": ("a.png", tricky),
                                                                              "left": ("", b"")}
    name = "Fundus \u00e4 1.png"  # raw UTF-8 in the header, as browsers send it
    raw = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\nxy\r\n'
           f"--{BOUNDARY}--\r\n").encode("utf-8")
    assert parse_multipart(raw, ctype) == {"image": (name, b"xy")}
    no_blank_line = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"\r\n--{BOUNDARY}--\r\n'.encode()
    for broken, reason in ((body[:-len(BOUNDARY) - 8], "truncated"), (no_blank_line, "no blank line"),
                           (b"no delimiter at all", "no part starts")):
        with pytest.raises(BadRequest, match=reason):
            parse_multipart(broken, ctype)
    with pytest.raises(BadRequest, match="boundary"):
        parse_multipart(body, "multipart/form-data")


def test_port_taken_is_a_clear_error(setup):
    port = setup["servers"]["single"].url.rsplit(":", 1)[1]
    res = subprocess.run([sys.executable, SERVE, "--model", setup["ckpt"]["single"], "--port", port], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert f"error: --port {port}: 127.0.0.1:{port} is already in use" in res.stderr


def test_sigterm_stops_the_server_cleanly(setup):
    for key, s in setup["servers"].items():
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0, key
        s.log.flush()
        log = open(s.log_path).read().splitlines()
        assert log[-1] == "stopped", log[-5:]
        assert any(re.fullmatch(r"POST /predict 200 \d+\.\d ms", line) for line in log), log
    log = open(setup["servers"]["single"].log_path).read().splitlines()
    for line in ("GET /health 200", "POST /predict 400", "POST /predict 413", "GET /nothing-here 404",
                 "GET /predict 405", "POST /predict 415"):
        assert any(entry.startswith(line + " ") for entry in log), line


def test_an_exported_model_serves_the_checkpoints_answers(setup, tmp_path):
    """``--model DIR`` (an export.py folder) runs through Paddle Inference and answers as the checkpoint does:
    the same decision and probabilities within 1e-5, for a model with the fundus crop."""
    import export

    out = tmp_path / "exported"
    export.export_checkpoint(setup["ckpt"]["single"], str(out), say=lambda line: None)
    server = Served(out, tmp_path / "exported.log")
    try:
        server.wait_ready()
        status, body, _ = request(server.url + "/health")
        assert status == 200 and body["backend"] == "paddle" and body["model"] == "resnet_test"
        for name in ("a.png", "fundus.png"):
            path = setup["images"] / name
            status, answer, _ = post_image(server.url, path.read_bytes())
            assert status == 200, answer
            row, outputs = in_process(setup["predictors"]["single"], str(path))
            assert answer["prediction"] == row["prediction"]
            probs = np.array([float(answer[f"prob_{c}"]) for c in ("x", "y", "z")])
            np.testing.assert_allclose(probs, outputs, atol=1e-5, rtol=0)
    finally:
        server.stop()
