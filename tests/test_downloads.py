"""Downloads against a local HTTP server: Quick, Draw! files, MNIST via torchvision, failures."""
import functools
import gzip
import hashlib
import http.server
import struct
import threading

import numpy as np
import pytest
import torch
import torchvision.datasets

import utils
from configuration import UserError


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 100,000 bytes and sends 1,000: a connection dropped mid-download."""
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.close_connection = True

    def log_message(self, *args):
        pass


def start_server(request, handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()
    request.addfinalizer(stop)
    return f"http://127.0.0.1:{server.server_port}/"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # a proxy from the environment must not intercept requests to the local server
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def served(tmp_path, request):
    """(folder, url): a folder served over HTTP on a free local port."""
    folder = tmp_path / "served"
    folder.mkdir()
    return folder, start_server(request, functools.partial(QuietHandler, directory=str(folder)))


def test_quickdraw_download(served, tmp_path):
    folder, url = served
    for i, cls in enumerate(utils.QUICKDRAW_CLASSES):
        np.save(folder / f"{cls}.npy", np.full((3, 784), i, np.uint8))
    data_dir = tmp_path / "data"
    utils.download_dataset("quickdraw", data_dir, quickdraw_url=url)
    assert "baseball bat" in utils.QUICKDRAW_CLASSES  # the name with a space the URL must quote
    for cls in utils.QUICKDRAW_CLASSES:
        got = data_dir / "quickdraw" / f"full_numpy_bitmap_{cls}.npy"
        assert got.read_bytes() == (folder / f"{cls}.npy").read_bytes()
    assert not [p for p in (data_dir / "quickdraw").iterdir() if p.name.endswith(".tmp")]


def idx_gz(array, magic):
    """An IDX file as MNIST ships it: big-endian magic and sizes, then the bytes; gzip'ed."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return gzip.compress(header + array.tobytes(), mtime=0)


def test_mnist_download_via_torchvision(served, tmp_path, monkeypatch):
    folder, url = served
    gen = torch.Generator().manual_seed(0)
    parts = {"train": (torch.randint(0, 256, (30, 28, 28), generator=gen, dtype=torch.uint8),
                       torch.randint(0, 10, (30,), generator=gen, dtype=torch.uint8)),
             "t10k": (torch.randint(0, 256, (12, 28, 28), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 10, (12,), generator=gen, dtype=torch.uint8))}
    resources = []
    for prefix, (images, labels) in parts.items():
        for name, array, magic in ((f"{prefix}-images-idx3-ubyte.gz", images, 2051),
                                   (f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)):
            data = idx_gz(array.numpy(), magic)
            (folder / name).write_bytes(data)
            resources.append((name, hashlib.md5(data).hexdigest()))
    assert [r[0] for r in resources] == [r[0] for r in torchvision.datasets.MNIST.resources]
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)

    data_dir = tmp_path / "data"
    utils.download_dataset("mnist", data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["mnist_test.csv.gz", "mnist_train.csv.gz"]
    for file, (images, labels) in zip(("mnist_train.csv.gz", "mnist_test.csv.gz"), parts.values()):
        x, y = utils.read_kaggle_csv(data_dir / file, 10)
        assert torch.equal(x, images) and torch.equal(y, labels.long())
    raw = utils.load_dataset("mnist", data_dir)  # what the scripts then read
    assert torch.equal(raw.test_x, parts["t10k"][0])


def test_http_404_names_the_url(served, tmp_path, monkeypatch):
    _, url = served  # an empty folder: every file is 404
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as err:
        utils.download_dataset("quickdraw", data_dir, quickdraw_url=url)
    assert f"{url}apple.npy" in str(err.value) and "404" in str(err.value)
    assert not (data_dir / "quickdraw" / "full_numpy_bitmap_apple.npy").exists()

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    with pytest.raises(UserError, match="download of mnist failed") as err:
        utils.download_dataset("mnist", data_dir)
    assert url in str(err.value)


def test_dropped_connection_is_an_error(tmp_path, request):
    url = start_server(request, TruncatingHandler)
    data_dir = tmp_path / "data"
    with pytest.raises(UserError, match="1000 of 100000 bytes") as err:
        utils.download_dataset("quickdraw", data_dir, quickdraw_url=url)
    assert f"{url}apple.npy" in str(err.value)
    assert not list((data_dir / "quickdraw").iterdir())  # nothing half-written is left
