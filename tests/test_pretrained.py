"""Fetching weight files: a local HTTP server on 127.0.0.1 stands in for download.pytorch.org."""

import hashlib
import http.server
import os
import socket
import threading

import pytest
import torch
import torch_detr

from detr_jax import pretrained, torch_io


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.payload` under any path; `/cut/...` closes the connection mid-body."""

  def do_GET(self):  # noqa: N802 (the name http.server calls)
    self.server.requests.append(self.path)
    if self.path.startswith("/missing/"):
      self.send_error(404)
      return
    body = self.server.payload
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.path.startswith("/cut/"):
      self.wfile.write(body[: len(body) // 2])
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_RDWR)
      return
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
  """A generated ResNet-18 checkpoint: (bytes, torchvision-style file name with its hash)."""
  state_dict, _ = torch_detr.torchvision_resnet18(seed=7)
  path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
  torch.save(state_dict, path)
  payload = path.read_bytes()
  return payload, f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"


@pytest.fixture(scope="module")
def server(backbone_file):
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.payload, httpd.requests = backbone_file[0], []
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()


def test_torchvision_urls():
  assert pretrained.torchvision_resnet_url("resnet50") == (
    "https://download.pytorch.org/models/resnet50-0676ba61.pth"
  )
  assert pretrained.expected_hash_prefix("resnet101-63fe2227.pth") == "63fe2227"
  assert pretrained.expected_hash_prefix("model.safetensors") is None
  with pytest.raises(ValueError, match="resnet152"):
    pretrained.torchvision_resnet_url("resnet152")


def test_download_is_verified_cached_and_reused(server, backbone_file, tmp_path):
  httpd, base = server
  payload, name = backbone_file
  url = f"{base}/models/{name}"
  before = len(httpd.requests)
  path = pretrained.fetch(url, cache_dir=str(tmp_path))
  assert path == str(tmp_path / name) and open(path, "rb").read() == payload
  assert os.listdir(tmp_path) == [name]  # no temporary file left behind
  assert pretrained.fetch(url, cache_dir=str(tmp_path)) == path
  assert httpd.requests[before:] == [f"/models/{name}"]  # the second fetch sent no request
  state_dict = torch_io.load(path)
  assert len(state_dict) == 122 and state_dict["layer4.1.bn2.num_batches_tracked"] == 0


def test_cache_dir_from_the_environment_and_resolve(server, backbone_file, tmp_path, monkeypatch):
  _, base = server
  _, name = backbone_file
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "env_cache"))
  path = pretrained.resolve_backbone_weights(f"{base}/models/{name}", "resnet18")
  assert path == str(tmp_path / "env_cache" / name)
  assert pretrained.resolve_backbone_weights("", "resnet18") is None
  assert pretrained.resolve_backbone_weights(path, "resnet18") == path  # a local file as is
  with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
    pretrained.fetch(str(tmp_path / "nowhere.pth"))


def _assert_clear_error(excinfo, url, dest):
  msg = str(excinfo.value)
  assert url in msg and dest in msg and "model.backbone_weights" in msg, msg


def test_bad_checksum_leaves_nothing(server, tmp_path):
  _, base = server
  url = f"{base}/models/resnet18-00000000.pth"
  with pytest.raises(pretrained.FetchError, match="checksum") as e:
    pretrained.fetch(url, cache_dir=str(tmp_path))
  _assert_clear_error(e, url, str(tmp_path / "resnet18-00000000.pth"))
  assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, tmp_path):
  _, base = server
  url = f"{base}/cut/resnet18.pth"  # no hash in the name: only the length can tell
  with pytest.raises(pretrained.FetchError) as e:
    pretrained.fetch(url, cache_dir=str(tmp_path))
  _assert_clear_error(e, url, str(tmp_path / "resnet18.pth"))
  assert os.listdir(tmp_path) == []


def test_http_error_and_offline(server, tmp_path):
  _, base = server
  url = f"{base}/missing/resnet18.pth"
  with pytest.raises(pretrained.FetchError, match="404") as e:
    pretrained.fetch(url, cache_dir=str(tmp_path))
  _assert_clear_error(e, url, str(tmp_path / "resnet18.pth"))
  with socket.socket() as s:  # a port nobody listens on: connection refused
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/models/resnet18-f37072fd.pth"
  with pytest.raises(pretrained.FetchError, match="refused") as e:
    pretrained.fetch(url, cache_dir=str(tmp_path))
  _assert_clear_error(e, url, str(tmp_path / "resnet18-f37072fd.pth"))
  assert os.listdir(tmp_path) == []
