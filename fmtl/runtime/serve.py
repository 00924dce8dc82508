"""`fmtl serve`: an exported model behind HTTP, torch-free (onnxruntime, Starlette, uvicorn).

    fmtl serve export/NAME.onnx --port 8000
    curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/v1/classify

Endpoints: ``POST|PUT /v1/classify?k=5`` (one raw image, or several as multipart/form-data),
the Open Inference Protocol (KServe v2) basics under ``/v2``, ``GET /metrics`` (Prometheus)
and ``GET /`` (a page to try an image). Decoding runs in a thread pool with fmtl's own
rules (fmtl.runtime.images), inference in dynamic batches on one worker thread
(fmtl.runtime.serve_batching). Every queue and body is bounded; what does not fit gets a
clear status code (413, 503 + Retry-After) instead of growing memory or latency. Requests
still arriving hold a connection, not queue room: each has --request-timeout to arrive
(fmtl.runtime.serve_http), and connections are capped by --limit-concurrency. Host headers
other than --allowed-hosts get 400. The request handling that does not depend on the HTTP
engine (parameters, multipart, the answer) is in fmtl.runtime.serve_requests.

Lifecycle: the server listens at once (liveness 200), loads the model and runs a warm-up
batch in the background, and only then reports ready. A model that fails to load ends the
process with one error line. On SIGTERM or Ctrl-C it drains: readiness and new requests
get 503, every accepted request is answered (within --drain-timeout), then it exits 0.

This module is the public entry; the work is split by responsibility:

- fmtl.runtime.serve_config: ServeConfig (the options and their defaults) and ServeError
- fmtl.runtime.serve_model: ModelServer (load, warm-up, admission, decoding, inference)
- fmtl.runtime.serve_app: the Starlette app and its endpoints (create_app)
- fmtl.runtime.serve_process: uvicorn, readiness, the drain (serve)
"""

from fmtl.runtime.serve_app import DISCARD_BYTES, QueueFullShedder, create_app, parse_v2, read_body
from fmtl.runtime.serve_config import LOOPBACK_NAMES, ServeConfig, ServeError, usable_cpus
from fmtl.runtime.serve_model import Admission, ModelServer
from fmtl.runtime.serve_process import DRAIN_GRACE_S, serve

__all__ = [
    "DISCARD_BYTES",
    "DRAIN_GRACE_S",
    "LOOPBACK_NAMES",
    "Admission",
    "ModelServer",
    "QueueFullShedder",
    "ServeConfig",
    "ServeError",
    "create_app",
    "parse_v2",
    "read_body",
    "serve",
    "usable_cpus",
]
