"""The huggingface_hub internals hf-ema relies on: bounding every HTTP request of a push with a timeout.

huggingface_hub (>= 1.0) sends every request through one shared httpx client, built by a factory the user may replace
(`set_client_factory`), and that client has no timeout. [`bounded_requests`] adds a request hook to the shared client,
and to any client built while it is active (a failed connection makes huggingface_hub close and rebuild it), that
caps the request's timeouts. The public `set_client_factory` would close the shared client, breaking another thread's
upload in flight, so the factory is swapped through the private `huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY`
and the current client read from `_GLOBAL_CLIENT`. Before 1.0 (requests sessions, one per thread) the public
`configure_http_backend` is used, with `_GLOBAL_BACKEND_FACTORY` read to restore the user's factory.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
from collections.abc import Iterator
from typing import Any

from ._guard import missing_api

__all__ = ["DEFAULT_TIMEOUT", "bounded_requests", "network_error_types"]

#: Seconds any one Hub request of a push may go without progress (to connect, between two reads or two writes). Here,
#: in a module that imports nothing heavy, so that the CLI's parser can show it without importing torch.
DEFAULT_TIMEOUT = 30.0

_FEATURE = "hf-ema push's network timeouts"

# The bounds of the active `bounded_requests` blocks (innermost last); the hook does nothing when it is empty.
_ACTIVE: list[float] = []
_LOCK = threading.Lock()


def _bound(timeouts: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """Each of httpx's `connect`/`read`/`write`/`pool` timeouts, at most `seconds` (None means no limit)."""
    out = dict(timeouts or {})
    for key in ("connect", "read", "write", "pool"):
        value = out.get(key)
        if value is None or value > seconds:
            out[key] = seconds
    return out


def _hook(request: Any) -> None:
    # The transport reads the request's own timeouts, so this bounds calls that pass `timeout=None` too.
    if _ACTIVE:
        request.extensions["timeout"] = _bound(request.extensions.get("timeout"), min(_ACTIVE))


def _add_hook(client: Any) -> Any:
    hooks = dict(client.event_hooks)
    if _hook not in hooks.get("request", []):
        hooks["request"] = [*hooks.get("request", []), _hook]
        client.event_hooks = hooks
    return client


class _HookedFactory:
    """Builds the client with the wrapped factory, then adds the timeout hook (idle outside `bounded_requests`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self) -> Any:
        return _add_hook(self.inner())


@contextlib.contextmanager
def _bounded_httpx(http: Any, seconds: float) -> Iterator[None]:
    for name in ("_GLOBAL_CLIENT_FACTORY", "_GLOBAL_CLIENT", "_CLIENT_LOCK"):
        if not hasattr(http, name):
            raise missing_api("huggingface_hub", f"utils._http.{name}", _FEATURE)
    # Lock order: ours, then huggingface_hub's (which `get_session` takes alone).
    with _LOCK, http._CLIENT_LOCK:
        _ACTIVE.append(seconds)
        if not isinstance(http._GLOBAL_CLIENT_FACTORY, _HookedFactory):
            http._GLOBAL_CLIENT_FACTORY = _HookedFactory(http._GLOBAL_CLIENT_FACTORY)
        if http._GLOBAL_CLIENT is not None:
            _add_hook(http._GLOBAL_CLIENT)
    try:
        yield
    finally:
        with _LOCK, http._CLIENT_LOCK:
            _ACTIVE.remove(seconds)
            # The last block out restores the user's factory. Hooked clients stay hooked: the hook is idle now.
            if not _ACTIVE and isinstance(http._GLOBAL_CLIENT_FACTORY, _HookedFactory):
                http._GLOBAL_CLIENT_FACTORY = http._GLOBAL_CLIENT_FACTORY.inner


def _requests_factory(previous: Any, seconds: float) -> Any:
    def factory() -> Any:
        session = previous()
        send = session.request

        def request(method: str, url: str, **kwargs: Any) -> Any:
            timeout = kwargs.get("timeout")
            if timeout is None or (isinstance(timeout, (int, float)) and timeout > seconds):
                kwargs["timeout"] = seconds
            return send(method, url, **kwargs)

        session.request = request
        return session

    return factory


@contextlib.contextmanager
def bounded_requests(seconds: float) -> Iterator[None]:
    """Inside the block, every request huggingface_hub makes gives up after `seconds` without progress (to connect,
    between two reads, between two writes), even a request that asks for no timeout.

    Args:
        seconds (`float`): The bound, > 0.
    """
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"`seconds` must be a finite number > 0, got {seconds!r}")
    import huggingface_hub
    from huggingface_hub.utils import _http

    if hasattr(huggingface_hub, "set_client_factory"):  # httpx-based (>= 1.0)
        with _bounded_httpx(_http, float(seconds)):
            yield
        return
    if not hasattr(huggingface_hub, "configure_http_backend"):
        raise missing_api("huggingface_hub", "set_client_factory", _FEATURE)
    # requests-based (< 1.0): sessions are cached per thread and are not closed when the factory changes.
    previous = getattr(_http, "_GLOBAL_BACKEND_FACTORY", None)
    if previous is None:
        raise missing_api("huggingface_hub", "utils._http._GLOBAL_BACKEND_FACTORY", _FEATURE)
    huggingface_hub.configure_http_backend(backend_factory=_requests_factory(previous, float(seconds)))
    try:
        yield
    finally:
        huggingface_hub.configure_http_backend(backend_factory=previous)


def network_error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, other transport failures) of the HTTP libraries huggingface_hub may be using."""
    timeouts: list[type[BaseException]] = []
    transport: list[type[BaseException]] = []
    for module_name, timeout_name, transport_name in (
        ("httpx2", "TimeoutException", "TransportError"),
        ("httpx", "TimeoutException", "TransportError"),
        ("requests", "Timeout", "ConnectionError"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for names, found in ((timeout_name, timeouts), (transport_name, transport)):
            error = getattr(module, names, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                found.append(error)
    return tuple(timeouts), tuple(transport)
