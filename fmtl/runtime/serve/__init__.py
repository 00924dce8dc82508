"""`fmtl serve`: an exported model behind HTTP, torch-free (onnxruntime, Starlette, uvicorn).

    fmtl serve export/NAME.onnx --port 8000
    curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/v1/classify

Endpoints: ``POST|PUT /v1/classify?k=5`` (one raw image, or several as multipart/form-data),
the Open Inference Protocol (KServe v2) basics under ``/v2``, ``GET /metrics`` (Prometheus)
and ``GET /`` (a page to try an image). Decoding runs in a thread pool with fmtl's own
rules (fmtl.runtime.images), inference in dynamic batches (``batching``); each image's result is
a ``fmtl.runtime.results.Row``, the rows ``fmtl infer`` and Ray give, in the same JSON. Every
queue and body is bounded; what does not fit gets a clear status code (413, 503 + Retry-After)
instead of growing memory or latency. Requests still arriving hold a connection, not queue room:
each has --request-timeout to arrive (``protocol``). Connections are capped by
--limit-concurrency; at the cap the connection idle the longest (no request on it, no byte of one
pending) is closed to make room, so idle connections never lock out a client with a request.
Host headers other than --allowed-hosts get 400.

Lifecycle: the server listens at once (liveness 200), loads the model and runs a warm-up
batch in the background, and only then reports ready. A model that fails to load ends the
process with one error line. On SIGTERM or Ctrl-C it drains: readiness and new requests
get 503, every accepted request is answered (within --drain-timeout), then it exits 0.

This package's names are what the command line and the Ray engine use; the modules, by responsibility:

- ``config``: ServeConfig (the options and their defaults) and ServeError
- ``api``: request handling that does not depend on the HTTP engine (parameters, multipart, ApiError)
- ``model_server``: ModelServer (load, warm-up, admission, decoding, inference)
- ``batching``: the dynamic batcher; ``metrics``: Prometheus metrics and their middleware
- ``kserve_v2``: the Open Inference Protocol's infer request and response
- ``app``: the Starlette app and its endpoints (create_app)
- ``protocol``: the connection layer (uvicorn's httptools protocol with deadlines, a head limit, idle shedding)
- ``process``: uvicorn, readiness, the drain (serve)
- ``ray_engine``: `fmtl serve --engine ray` (the ``ray`` extra; imported only for it)
"""

from fmtl.runtime.serve.app import create_app
from fmtl.runtime.serve.config import ServeConfig, ServeError
from fmtl.runtime.serve.process import serve

__all__ = ["ServeConfig", "ServeError", "create_app", "serve"]
