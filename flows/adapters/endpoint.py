"""A suspicious prediction API, queried over HTTP as hostile input.

Two protocols:

- ``mlflow``: the MLflow scoring protocol, as ``mlflow models serve`` answers it:
  ``POST <url>/invocations`` with ``{"inputs": [[784 floats], ...]}`` (images in [0, 1],
  row-major 28 x 28), answered with ``{"predictions": [label, ...]}`` (or a list of 10
  scores per image).
- ``json`` (SecureMark's own, documented in the README): ``POST <url>`` with
  ``{"images": [[[28 floats] x 28], ...]}``, answered with ``{"labels": [...]}`` or
  ``{"scores": [[10 floats], ...]}``.

``auto`` picks ``mlflow`` when the URL has no path or ends with ``/invocations``.

Every request is bounded: at most ``batch`` images, a timeout per request *and* a
deadline for the whole answer (a server that drips bytes is cut off), at most
``max_response_bytes`` read, no redirects followed, and a query budget for the whole
trace. Retries (with exponential back-off) only for failures a retry can fix: a
refused connection, a timeout, HTTP 5xx, and HTTP 429 (waiting for ``Retry-After``,
capped). Anything else -- a 4xx, garbage or oversized JSON, answers of the wrong
length, labels outside 0..9, non-finite scores, a redirect -- is an
:class:`InvalidEndpoint`: the trace ends with exit code 2 and one line saying why.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch

from securemark.errors import SecureMarkError
from securemark.model import NUM_CLASSES

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "mlflow", "json")
MAX_RETRY_AFTER_S = 30.0


class InvalidEndpoint(SecureMarkError):
    """The prediction API answered something that cannot be used, or not at all."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise InvalidEndpoint(f"the API redirected ({code}) to {newurl[:200]}; redirects are not followed (the answers must come from the endpoint traced)")


class _Retry(Exception):
    """A failure a retry may fix; ``wait`` seconds before the next try (None: back off)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


@dataclass
class PredictionAPI:
    """Answers of a prediction API for batches of images; counts every image sent."""

    url: str
    protocol: str = "auto"
    batch: int = 64
    timeout: float = 10.0
    retries: int = 3
    max_response_bytes: int = 1_000_000
    budget: int | None = None
    queries: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidEndpoint(f"not an http(s) URL: {self.url!r}")
        if self.protocol not in PROTOCOLS:
            raise InvalidEndpoint(f"unknown protocol {self.protocol!r}; choose one of {list(PROTOCOLS)}")
        if self.protocol == "auto":
            self.protocol = "mlflow" if parsed.path in ("", "/") or parsed.path.endswith("/invocations") else "json"
        if self.protocol == "mlflow" and not parsed.path.endswith("/invocations"):
            self.url = self.url.rstrip("/") + "/invocations"
        self._opener = urllib.request.build_opener(_NoRedirects())

    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Labels (int64 [n]) or scores (float [n, 10]) for images float [n, 1, 28, 28]."""
        if self.budget is not None and self.queries + len(images) > self.budget:
            raise InvalidEndpoint(f"the query budget ({self.budget}) would be exceeded")
        parts = [self._batch(images[i : i + self.batch]) for i in range(0, len(images), self.batch)]
        if not parts:
            return torch.zeros(0, dtype=torch.int64)
        if any(p.is_floating_point() != parts[0].is_floating_point() for p in parts):
            raise InvalidEndpoint("the API mixed labels and scores between requests")
        return torch.cat(parts)

    # ------------------------------------------------------------------ one request
    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        body = self._request_body(images)
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                answer = self._parse(self._post(body), len(images))
                self.queries += len(images)
                return answer
            except _Retry as retry:
                if attempt == self.retries:
                    raise InvalidEndpoint(f"the API did not answer after {self.retries + 1} tries ({retry})") from None
                wait = retry.wait if retry.wait is not None else delay
                log.warning("prediction API: %s; retrying in %.1f s", retry, wait)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    def _request_body(self, images: torch.Tensor) -> bytes:
        x = images.detach().to(torch.float32).reshape(len(images), 28, 28).clamp(0, 1)
        rounded = np.round(x.numpy().astype(np.float64), 5)
        if self.protocol == "mlflow":
            return json.dumps({"inputs": rounded.reshape(len(images), -1).tolist()}).encode()
        return json.dumps({"images": rounded.tolist()}).encode()

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return self._read(response, deadline)
        except InvalidEndpoint:
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 429:
                raise _Retry("HTTP 429 (too many requests)", _retry_after(exc.headers.get("Retry-After"))) from None
            if exc.code >= 500:
                raise _Retry(f"HTTP {exc.code}") from None
            raise InvalidEndpoint(f"the API refused the request: HTTP {exc.code} {str(exc.reason)[:120]}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {str(getattr(exc, 'reason', exc))[:120]}") from None
        except OSError as exc:
            raise _Retry(f"{type(exc).__name__}: {str(exc)[:120]}") from None

    def _read(self, response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise InvalidEndpoint(f"the API's answer is {declared} bytes, more than {self.max_response_bytes}")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise _Retry(f"the answer took longer than {self.timeout:.0f} s")
            chunk = response.read1(min(65536, self.max_response_bytes + 1 - size))  # what has arrived: a drip meets the deadline
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_response_bytes:
                raise InvalidEndpoint(f"the API's answer exceeds {self.max_response_bytes} bytes")
        return b"".join(chunks)

    def _parse(self, raw: bytes, n: int) -> torch.Tensor:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidEndpoint(f"the API's answer is not JSON ({raw[:60]!r}...)") from None
        if not isinstance(doc, dict):
            raise InvalidEndpoint(f"the API's answer is a JSON {type(doc).__name__}, not an object")
        keys = ("predictions",) if self.protocol == "mlflow" else ("labels", "scores")
        found = [k for k in keys if k in doc]
        if not found:
            raise InvalidEndpoint(f"the API's answer has none of {list(keys)} (it has {sorted(doc)[:8]})")
        values = doc[found[0]]
        if isinstance(values, dict):  # MLflow wraps some outputs: {"predictions": {"0": [...]}}
            values = next(iter(values.values()), None)
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise InvalidEndpoint(f"the API answered {got} predictions for {n} images")
        if found[0] == "scores" or (values and isinstance(values[0], list)):
            return _scores(values, n)
        return _labels(values)


def _labels(values: list) -> torch.Tensor:
    out = []
    for v in values:
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or not 0 <= v < NUM_CLASSES:
            raise InvalidEndpoint(f"the API answered the label {str(v)[:40]!r}; labels are 0..{NUM_CLASSES - 1}")
        out.append(int(v))
    return torch.tensor(out, dtype=torch.int64)


def _scores(values: list, n: int) -> torch.Tensor:
    if not all(isinstance(row, list) and len(row) == NUM_CLASSES for row in values):
        raise InvalidEndpoint(f"scores must be {n} lists of {NUM_CLASSES} numbers")
    try:
        scores = torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError):
        raise InvalidEndpoint("scores must be numbers") from None
    if not torch.isfinite(scores).all():
        raise InvalidEndpoint("the API answered NaN or infinite scores")
    if bool((scores < 0).any()) or not torch.allclose(scores.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-3):
        scores = scores.softmax(1)  # logits, not probabilities
    return scores


def _retry_after(header: str | None) -> float:
    """Seconds to wait from a Retry-After header (a number of seconds), capped."""
    try:
        value = float(header) if header is not None else 1.0
    except ValueError:
        value = 1.0
    return min(MAX_RETRY_AFTER_S, max(0.0, value)) if math.isfinite(value) else 1.0
