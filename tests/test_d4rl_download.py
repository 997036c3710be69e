"""D4RL names download their raw HDF5 file when it is not on disk: from a real HTTP server on 127.0.0.1 that serves
files the tests make, with the faults a real download meets (a dropped connection, a 404, a short body, bytes that
are not HDF5). A file is only ever in the dataset folder once it is complete and checked."""
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from common.data import load_offline_data
from conftest import REPO_ROOT
from test_adroit import write_adroit_file
from test_data import write_d4rl_file

FILE = "gym_mujoco_v2/hopper_medium-v2.hdf5"
ADROIT_FILE = "hand_dapg_v1/pen-human-v1.hdf5"


class FileServer(BaseHTTPRequestHandler):
    """GET /<behaviour>/<file>: `good` serves the file (Range requests too), `missing` answers 404, `drop` closes
    the connection half-way through its first answer, `short` always announces the whole file and sends 60% of it,
    `junk` serves bytes that are not HDF5. The server keeps (path, Range header) of every request."""
    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    dropped: set[str] = set()

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        behaviour, _, name = self.path.lstrip("/").partition("/")
        body = self.files.get(name)
        if behaviour == "missing" or body is None:
            self.send_error(404)
            return
        if behaviour == "junk":
            body = np.random.default_rng(0).bytes(len(body))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        sent = body[start:]
        if behaviour == "short":
            sent = body[start:int(0.6 * len(body))]
        if behaviour == "drop" and name not in self.dropped:
            self.dropped.add(name)
            sent = body[start:len(body) // 2]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(sent)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    made = tmp_path_factory.mktemp("served") / "hopper.hdf5"
    write_d4rl_file(made)
    FileServer.files[FILE] = made.read_bytes()
    write_adroit_file(made.with_name("pen.hdf5"), "pen")
    FileServer.files[ADROIT_FILE] = made.with_name("pen.hdf5").read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    FileServer.requests.clear()
    FileServer.dropped.clear()
    return tmp_path / "d4rl"


def test_a_missing_file_is_downloaded_once_then_found_on_disk(server, dataset_dir, monkeypatch):
    monkeypatch.setenv("D4RL_MIRROR", f"{server}/good/")
    data = load_offline_data("hopper-medium-v2")
    assert len(data) == 300 and data.source.endswith("hopper_medium-v2.hdf5")
    assert sorted(os.listdir(dataset_dir)) == ["hopper_medium-v2.hdf5"]  # no partial or lock file left
    assert (dataset_dir / "hopper_medium-v2.hdf5").read_bytes() == FileServer.files[FILE]
    assert FileServer.requests == [(f"/good/{FILE}", None)]
    load_offline_data("hopper-medium-v2")
    assert len(FileServer.requests) == 1  # the second load never asked the server


def test_an_adroit_file_comes_from_d4rls_hand_dapg_v1_folder(server, dataset_dir, monkeypatch):
    monkeypatch.setenv("D4RL_MIRROR", f"{server}/good/")
    data = load_offline_data("pen-human-v1")
    assert data.family == "adroit" and FileServer.requests == [(f"/good/{ADROIT_FILE}", None)]
    assert sorted(os.listdir(dataset_dir)) == ["pen-human-v1.hdf5"]


def test_a_dropped_connection_is_resumed_with_a_range_request(server, dataset_dir, monkeypatch):
    monkeypatch.setenv("D4RL_MIRROR", f"{server}/drop/")
    load_offline_data("hopper-medium-v2")
    half = len(FileServer.files[FILE]) // 2
    assert FileServer.requests == [(f"/drop/{FILE}", None), (f"/drop/{FILE}", f"bytes={half}-")]
    assert (dataset_dir / "hopper_medium-v2.hdf5").read_bytes() == FileServer.files[FILE]


def test_a_404_on_the_first_source_falls_back_to_the_next(server, dataset_dir, monkeypatch):
    monkeypatch.setenv("D4RL_MIRROR", f"{server}/missing/ {server}/good/")
    load_offline_data("hopper-medium-v2")
    assert [path for path, _ in FileServer.requests] == [f"/missing/{FILE}", f"/good/{FILE}"]
    assert sorted(os.listdir(dataset_dir)) == ["hopper_medium-v2.hdf5"]


@pytest.mark.parametrize("behaviour, reason", [("short", "the connection closed after"),
                                               ("junk", "not a readable HDF5 file")])
def test_a_bad_download_is_a_one_line_error_and_leaves_nothing(server, tmp_path, behaviour, reason):
    dataset_dir = tmp_path / "d4rl"
    environment = dict(os.environ, D4RL_DATASET_DIR=str(dataset_dir), D4RL_MIRROR=f"{server}/{behaviour}/")
    result = subprocess.run([sys.executable, "eda_d4rl.py", "--env", "hopper-medium-v2", "--run-dir",
                             str(tmp_path / "run")], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert reason in errors[0] and f"{server}/{behaviour}/{FILE}" in errors[0]
    assert os.listdir(dataset_dir) == []
    assert not (tmp_path / "run").exists()
