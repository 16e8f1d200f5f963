"""Starting the app: used by `hf-ema serve`, `python -m serve` and `hf-ema demo`.

Loading happens before the server starts, so a bad path fails with one `CheckpointError` and no server.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from hf_ema.errors import ConfigError, ConfigTypeError

from .loading import CheckpointCatalog
from .variants import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_VARIANTS, VariantStore

__all__ = ["DEFAULT_HOST", "smoke_request", "start_app"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


def start_app(
    path: str | os.PathLike,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    trust_remote_code: bool = False,
    base_model: str | None = None,
    device: str | None = None,
    open_browser: bool = False,
    quiet: bool = True,
    cache_dir: str | os.PathLike | None = None,
    max_cached_variants: int = DEFAULT_CACHE_VARIANTS,
    max_cache_size: int | str = DEFAULT_CACHE_SIZE,
    **demo_kwargs: Any,
):
    """Load the checkpoints at `path`, build the page and start serving it in a background thread.

    Args:
        path (`str` or `os.PathLike`): A checkpoint folder, a training output folder or a Hub repo id.
        host (`str`, *optional*, defaults to `"127.0.0.1"`): Address to bind; `"0.0.0.0"` exposes it to the network.
        port (`int`, *optional*): Port; the first free one from 7860 when not given.
        share (`bool`, *optional*, defaults to `False`): Ask Gradio for a public share link.
        trust_remote_code (`bool`, *optional*, defaults to `False`): Allow custom modelling code from the checkpoint.
        base_model (`str`, *optional*): Base model of a PEFT checkpoint (defaults to the adapter's).
        device (`str`, *optional*): Where to run the models.
        open_browser (`bool`, *optional*, defaults to `False`): Open the page in the default browser.
        quiet (`bool`, *optional*, defaults to `True`): Silence Gradio's own start-up banner.
        cache_dir (`str` or `os.PathLike`, *optional*): Where post-hoc reconstructions and merges are written and
            kept after the app stops; a temporary folder, removed when the process exits (also on SIGTERM and Ctrl+C
            through [`serve_until_interrupted`]), when not given.
        max_cached_variants (`int`, *optional*, defaults to 8): Built folders kept in the cache (least recently used
            removed first).
        max_cache_size (`int` or `str`, *optional*, defaults to `"20GB"`): The most the cache may hold, in bytes or
            as a size such as `"5GB"`.
        **demo_kwargs: Passed to [`serve.app.build_demo`].

    Returns:
        `tuple[gr.Blocks, str]`: the running app (call `.block_thread()` to serve until interrupted, `.close()` to
        stop) and its local URL.
    """
    if not isinstance(host, str) or not host:
        raise ConfigTypeError(f"`host` must be a non-empty string, got {host!r}")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(f"`port` must be an int in [1, 65535], got {port!r}")
    catalog = CheckpointCatalog(path, base_model=base_model, trust_remote_code=trust_remote_code, device=device)
    store = VariantStore(catalog, cache_dir, max_cached_variants=max_cached_variants, max_cache_size=max_cache_size)
    from .app import build_demo
    from .page import page_style

    demo = build_demo(catalog, store=store, **demo_kwargs)
    try:
        demo.launch(
            **page_style(),
            server_name=host,
            server_port=port,
            share=share,
            inbrowser=open_browser,
            prevent_thread_lock=True,
            quiet=quiet,
            show_error=True,
        )
    except OSError as err:
        raise ConfigError(f"`port` {port!r} on {host!r} is not available: {err}") from None
    return demo, demo.local_url


def smoke_request(url: str, prompt: str = "The for statement", max_new_tokens: int = 24) -> tuple[str, str]:
    """Ask a running app for one greedy generation through the Gradio client API, as a user's script would.

    Args:
        url (`str`): The app's URL.
        prompt (`str`, *optional*, defaults to `"The for statement"`): The prompt.
        max_new_tokens (`int`, *optional*, defaults to 24): Tokens to generate.

    Returns:
        `tuple[str, str]`: the raw and the EMA continuation.
    """
    from gradio_client import Client

    client = Client(url, verbose=False)
    result = client.predict(prompt=prompt, max_new_tokens=max_new_tokens, greedy=True, api_name="/generate")
    raw, ema = result["texts"]
    return raw, ema


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # handled like Ctrl+C: the server closes and the exit handlers remove the temporary cache


def serve_until_interrupted(demo: Any) -> None:
    """Block until Ctrl+C or SIGTERM, then close the server (what the `serve` and `demo` commands end with). The
    process then exits normally, so the temporary variant cache is removed (a `cache_dir` the user named is kept).

    Args:
        demo (`gr.Blocks`): A launched app, as returned by `start_app`.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
