"""Real S3 and GCS APIs on loopback for the storage tests: moto's server and gcp-storage-emulator,
started once per session on free ports, plus a small fault-injecting proxy (503s, then a stop).

gcp-storage-emulator leaves out the ``x-goog-generation`` header of a media download, which real GCS
sends and TensorStore (Orbax's checkpoint I/O) reads to know an object's version; the fixture adds it.

The servers run in threads of the test process; subprocesses (a training run killed with SIGKILL)
reach them through the environment variables set here: ``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``
and dummy AWS credentials, so nothing ever leaves the machine.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import logging
import os
import socket
import socketserver
import sys
import threading
import time
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ObjectStores:
    s3_endpoint: str
    gcs_endpoint: str
    env: dict

    def bucket(self, scheme: str, prefix: str = "b") -> str:
        """A new empty bucket: ``s3://name`` or ``gs://name``."""
        from cascade_jax.storage.backends import filesystem

        url = f"{scheme}://{prefix}-{uuid.uuid4().hex[:10]}"
        fs, name = filesystem(url)
        fs.mkdir(name)
        return url


def upload_folder(folder, url: str) -> list[str]:
    """Every file under the local ``folder`` to ``url/relative path``; returns the URLs, sorted."""
    from pathlib import Path

    from cascade_jax import storage

    urls = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        target = storage.join(url, path.relative_to(folder).as_posix())
        storage.upload(path, target)
        urls.append(target)
    return urls


def _emulator_sends_generation_headers() -> None:
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "sends_generation", False):
        return
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - a missing object: the original answered 404 already
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    download.sends_generation = True
    objects.download = download  # objects.get (the JSON API's ?alt=media) calls it by this name


def start_object_stores():
    """(ObjectStores, stop function); sets the environment for this process and its children."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    from gcp_storage_emulator.server import create_server
    from moto.server import ThreadedMotoServer

    s3_port, gcs_port = free_port(), free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    _emulator_sends_generation_headers()
    gcs = create_server("127.0.0.1", gcs_port, in_memory=True)
    gcs.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}", "CASCADE_JAX_STORAGE_RETRY_SECONDS": "20"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def stop():
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3.stop()
        gcs.stop()

    return ObjectStores(env["AWS_ENDPOINT_URL"], env["STORAGE_EMULATOR_HOST"], env), stop


class FaultProxy:
    """A loopback HTTP proxy in front of ``target``: ``fail_next(n)`` answers the next n requests with
    503 SlowDown; ``write_delay_s`` holds every upload that long (a slow save, to kill a process during
    one); ``stop()`` closes it (connections are then refused, as by a stopped server)."""

    def __init__(self, target: str):
        self.host, self.port = target.removeprefix("http://").split(":")
        self.failures, self.failed, self.lock = 0, 0, threading.Lock()
        self.write_delay_s = 0.0
        self.connections: list[socket.socket] = []  # kept-alive client connections, closed by stop()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy.connections.append(self.connection)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fail = proxy.failures > 0
                    if fail:
                        proxy.failures -= 1
                        proxy.failed += 1
                if self.command in ("POST", "PUT") and proxy.write_delay_s:
                    time.sleep(proxy.write_delay_s)
                if fail:
                    message = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                conn = http.client.HTTPConnection(proxy.host, int(proxy.port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_next(self, n: int) -> None:
        with self.lock:
            self.failures = n

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the client
                connection.close()


def toy_training(checkpoint_url: str, updates: int, log_file: str) -> None:
    """The toy task of training_testing.py with its checkpoints in ``checkpoint_url`` (a bucket); one
    line per update in ``log_file``. Run as ``python storage_testing.py CKPT_URL UPDATES LOG``."""
    import json

    from training_testing import ToyData, toy_config

    from cascade_jax.training import train

    cfg = toy_config(__import__("pathlib").Path("/unused"), checkpoint_path=checkpoint_url, output_path=checkpoint_url,
                     updates=updates, save_every=2, async_checkpointing=True, keep_checkpoints=2)
    data = ToyData(cfg.batch_size)

    def record(info):
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": info.step, "position": data.position,
                                "loss": float(info.metrics["loss"])}) + "\n")

    train(cfg, data=data, hooks=[record], progress=False)


if __name__ == "__main__":
    toy_training(sys.argv[1], int(sys.argv[2]), sys.argv[3])
