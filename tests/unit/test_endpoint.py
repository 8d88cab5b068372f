"""The prediction-API client against real local HTTP servers, honest and hostile."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flows.adapters.api_server import serve_predictions
from flows.adapters.endpoint import InvalidEndpoint, PredictionAPI

IMAGES = torch.rand(5, 1, 28, 28)


@contextmanager
def scripted_server(reply):
    """A server whose every POST is answered by ``reply(handler, body, calls)``."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body))
            reply(self, body, calls)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def send(handler, status: int, payload: bytes, headers: dict | None = None) -> None:
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def answer_json(doc) -> callable:
    return lambda h, body, calls: send(h, 200, json.dumps(doc).encode())


def test_the_local_server_answers_labels_in_the_json_protocol():
    with serve_predictions(lambda x: torch.nn.functional.one_hot(torch.arange(len(x)) % 10, 10).float()) as url:
        api = PredictionAPI(url, batch=2)  # "auto" reads the local server's path as the json protocol
        labels = api.predict(IMAGES)
    assert api.protocol == "json" and labels.tolist() == [0, 1, 0, 1, 0] and api.queries == 5


def test_scores_are_returned_as_probabilities():
    with serve_predictions(lambda x: torch.zeros(len(x), 10), output="scores") as url:
        scores = PredictionAPI(url).predict(IMAGES)
    assert scores.shape == (5, 10) and torch.allclose(scores.sum(1), torch.ones(5, dtype=torch.float64))


def test_mlflow_protocol_posts_flat_inputs_to_invocations():
    with scripted_server(lambda h, body, calls: send(h, 200, json.dumps({"predictions": [3] * len(body["inputs"])}).encode())) as (url, calls):
        labels = PredictionAPI(url).predict(IMAGES)  # a bare host reads as an MLflow server
    path, body = calls[0]
    assert path == "/invocations" and len(body["inputs"][0]) == 784 and labels.tolist() == [3] * 5


@pytest.mark.parametrize("reply, message", [
    (lambda h, b, c: send(h, 200, b"<html>not json"), "not JSON"),
    (answer_json([1, 2, 3]), "not an object"),
    (answer_json({"labels": [1, 2]}), "answered 2 predictions for 5 images"),
    (answer_json({"labels": [1, 2, 3, 4, 11]}), "labels are 0..9"),
    (answer_json({"labels": [1, 2, 3, 4, "x"]}), "labels are 0..9"),
    (answer_json({"scores": [[float("nan")] * 10] * 5}), "NaN"),
    (answer_json({"something": []}), "has none of"),
    (lambda h, b, c: send(h, 200, b"[" * 100_000), "not JSON"),
    (lambda h, b, c: send(h, 200, b" " * 2_000_000), "bytes"),
    (lambda h, b, c: send(h, 302, b"", {"Location": "http://example.com/"}), "redirect"),
    (lambda h, b, c: send(h, 400, b"bad"), "HTTP 400"),
])
def test_hostile_answers_are_invalid_endpoints(reply, message):
    with scripted_server(reply) as (url, _):
        with pytest.raises(InvalidEndpoint, match=message):
            PredictionAPI(url + "/predict", timeout=2, retries=0).predict(IMAGES)


def test_a_server_that_drips_is_cut_off_by_the_deadline():
    def drip(h, body, calls):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)

    with scripted_server(drip) as (url, _):
        start = time.monotonic()
        with pytest.raises(InvalidEndpoint, match="did not answer"):
            PredictionAPI(url + "/predict", timeout=0.5, retries=1).predict(IMAGES)
    assert time.monotonic() - start < 8


def test_429_waits_for_retry_after_then_succeeds():
    def limited(h, body, calls):
        if len(calls) == 1:
            send(h, 429, b"slow down", {"Retry-After": "0"})
        else:
            send(h, 200, json.dumps({"labels": [4] * len(body["images"])}).encode())

    with scripted_server(limited) as (url, calls):
        labels = PredictionAPI(url + "/predict", retries=2).predict(IMAGES)
    assert labels.tolist() == [4] * 5 and len(calls) == 2


def test_server_errors_are_retried_then_reported():
    with scripted_server(lambda h, b, c: send(h, 503, b"down")) as (url, calls):
        with pytest.raises(InvalidEndpoint, match="did not answer after 3 tries"):
            PredictionAPI(url + "/predict", retries=2).predict(IMAGES[:1])
    assert len(calls) == 3


def test_the_query_budget_is_never_exceeded():
    with serve_predictions(lambda x: torch.zeros(len(x), 10)) as url:
        api = PredictionAPI(url, budget=7)
        api.predict(IMAGES)
        with pytest.raises(InvalidEndpoint, match="budget"):
            api.predict(IMAGES)
    assert api.queries == 5


@pytest.mark.parametrize("url", ["ftp://host/x", "not a url", "file:///etc/passwd"])
def test_only_http_urls(url):
    with pytest.raises(InvalidEndpoint, match="http"):
        PredictionAPI(url)
