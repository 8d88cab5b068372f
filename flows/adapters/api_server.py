"""A prediction API on 127.0.0.1 for a model in this process (SecureMark's own ``json``
protocol, see :mod:`flows.adapters.endpoint`): what the ``blackbox`` stage traces
copies through, and what a customer who deploys a copy would run.

    with serve_predictions(answer, output="labels") as url:  # answer: images -> logits
        PredictionAPI(url).predict(images)

``POST /predict`` (any path) with ``{"images": [[[28 floats] x 28], ...]}`` answers ``{"labels": [...]}``
(``output="labels"``: a label-only API) or ``{"scores": [[10 floats], ...]}``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

MAX_REQUEST_BYTES = 8 * 1024 * 1024


def _handler(answer: Callable[[torch.Tensor], torch.Tensor], output: str, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the trace logs what matters
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_REQUEST_BYTES:
                self._send(413, {"error": "request too large or empty"})
                return
            try:
                images = torch.tensor(json.loads(self.rfile.read(length))["images"], dtype=torch.float32).reshape(-1, 1, 28, 28)
            except (ValueError, KeyError, TypeError, RuntimeError):
                self._send(400, {"error": "expected {\"images\": [[[28 floats] x 28], ...]}"})
                return
            with lock, torch.no_grad():  # one model, one request at a time
                logits = answer(images)
            if output == "labels":
                self._send(200, {"labels": logits.argmax(1).tolist()})
            else:
                self._send(200, {"scores": logits.softmax(1).tolist()})

        def _send(self, status: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def serve_predictions(answer: Callable[[torch.Tensor], torch.Tensor], output: str = "labels") -> Iterator[str]:
    """Serve ``answer`` (images float [n, 1, 28, 28] -> logits [n, 10]) on a free
    127.0.0.1 port for the duration of the block; yields the URL."""
    if output not in ("labels", "scores"):
        raise ValueError(f"output must be 'labels' or 'scores', got {output!r}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(answer, output, threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, name="securemark-api", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict"  # any path answers; this one reads as the json protocol
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
