import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from splitnn.data import download as download_mod
from splitnn.data import download_file, load_dataset, resolve_split_files
from splitnn.errors import ChecksumError, DataError, DownloadError


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Server:
    """Serves ``files[path] = bytes``; 404 otherwise. ``lie_length`` sends a too-large Content-Length."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lie_length = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if outer.lie_length else 0)))
                self.end_headers()
                self.wfile.write(body)
                if outer.lie_length:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _listing(d):
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


def test_download_lands_in_cache_and_loads(server, fake_mnist, isolated_env, monkeypatch):
    fake = fake_mnist()
    for f, b in fake["blobs"].items():
        server.files[f"/m/{f}"] = b
    monkeypatch.setenv("SPLITNN_MIRRORS", server.url + "/m/")
    ds = load_dataset("mnist", "test", progress=False)
    cache = isolated_env / ".cache" / "splitnn" / "mnist"
    assert _listing(cache) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert ds.labels.tolist() == fake["arrays"]["test"][1].tolist()
    assert len(server.requests) == 2
    # second call: found in the cache, no new request
    load_dataset("mnist", "test", progress=False)
    assert len(server.requests) == 2


def test_wrong_bytes_checksum_error_and_nothing_left(server, fake_mnist, isolated_env):
    fake = fake_mnist()
    for f, b in fake["blobs"].items():
        server.files[f"/m/{f}"] = b[:-1] + bytes([b[-1] ^ 1])
    with pytest.raises(ChecksumError) as info:
        resolve_split_files("mnist", "test", progress=False, mirrors=[server.url + "/m/"])
    assert server.url + "/m/t10k-images-idx3-ubyte.gz" in str(info.value)
    assert _listing(isolated_env / ".cache" / "splitnn") == ["mnist"]  # no file, no temp file


def test_404_falls_through_to_second_mirror(server, fake_mnist, isolated_env):
    fake = fake_mnist()
    for f, b in fake["blobs"].items():
        server.files[f"/good/{f}"] = b
    images, labels = resolve_split_files(
        "mnist", "train", progress=False, mirrors=[server.url + "/missing", server.url + "/good/"]
    )
    assert images.read_bytes() == fake["blobs"][images.name]
    assert server.requests == [
        "/missing/train-images-idx3-ubyte.gz",
        "/good/train-images-idx3-ubyte.gz",
        "/missing/train-labels-idx1-ubyte.gz",
        "/good/train-labels-idx1-ubyte.gz",
    ]


def test_only_missing_file_is_downloaded(server, fake_mnist, isolated_env):
    fake = fake_mnist()
    cache = isolated_env / ".cache" / "splitnn" / "mnist"
    cache.mkdir(parents=True)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(fake["blobs"]["t10k-images-idx3-ubyte.gz"])
    server.files["/t10k-labels-idx1-ubyte.gz"] = fake["blobs"]["t10k-labels-idx1-ubyte.gz"]
    resolve_split_files("mnist", "test", progress=False, mirrors=[server.url])
    assert server.requests == ["/t10k-labels-idx1-ubyte.gz"]


def test_download_into_explicit_data_dir(server, fake_mnist, tmp_path, isolated_env):
    fake = fake_mnist()
    for f, b in fake["blobs"].items():
        server.files[f"/{f}"] = b
    target = tmp_path / "mydata"
    target.mkdir()
    resolve_split_files("mnist", "test", data_dir=target, progress=False, mirrors=[server.url])
    assert _listing(target) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert not (isolated_env / ".cache").exists()


def test_connection_refused_names_urls(fake_mnist, isolated_env):
    fake_mnist()
    urls = [f"http://127.0.0.1:{_closed_port()}/a/", f"http://127.0.0.1:{_closed_port()}/b/"]
    with pytest.raises(DownloadError) as info:
        resolve_split_files("mnist", "test", progress=False, mirrors=urls)
    msg = str(info.value)
    for u in urls:
        assert u + "t10k-images-idx3-ubyte.gz" in msg
    assert "looked in" in msg and str(isolated_env / ".cache" / "splitnn" / "mnist") in msg
    # the fix in each caller's words: Python's argument, the command line's flag, the variable for both
    for fix in ("load_dataset(..., data_dir=DIR)", "--data-dir DIR", "export SPLITNN_DATA=DIR"):
        assert fix in msg, fix
    assert _listing(isolated_env / ".cache" / "splitnn") == ["mnist"]


def test_download_file_direct(server, tmp_path):
    server.files["/x"] = b"hello world"
    dest = tmp_path / "sub" / "x.bin"
    assert download_file(server.url + "/x", dest, sha(_write(tmp_path / "ref", b"hello world")), progress=False) == dest
    assert dest.read_bytes() == b"hello world"
    assert download_file(server.url + "/x", tmp_path / "y", None, progress=False).read_bytes() == b"hello world"


def _write(p, b):
    p.write_bytes(b)
    return p


def test_existing_dest_untouched_on_failure(server, tmp_path):
    server.files["/x"] = b"new"
    dest = _write(tmp_path / "x", b"old")
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download_file(server.url + "/x", dest, "0" * 64, progress=False)
    assert dest.read_bytes() == b"old" and _listing(tmp_path) == ["x"]


def test_http_404(server, tmp_path):
    with pytest.raises(DownloadError, match="404") as info:
        download_file(server.url + "/nope", tmp_path / "n", None, progress=False)
    assert server.url + "/nope" in str(info.value)
    assert _listing(tmp_path) == []


def test_short_read(server, tmp_path):
    server.files["/x"] = b"abc" * 1000
    server.lie_length = True
    with pytest.raises(DownloadError):
        download_file(server.url + "/x", tmp_path / "x", None, progress=False, timeout=5)
    assert _listing(tmp_path) == []


def test_interrupt_removes_temp(server, tmp_path, monkeypatch):
    server.files["/x"] = b"z" * 200_000

    class Boom:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(download_mod, "tqdm", Boom)
    with pytest.raises(KeyboardInterrupt):
        download_file(server.url + "/x", tmp_path / "x", None)
    assert _listing(tmp_path) == []


def test_rejects_non_http(tmp_path):
    with pytest.raises(DownloadError, match="http"):
        download_file("file:///etc/passwd", tmp_path / "p", None)
    assert issubclass(DownloadError, DataError)
