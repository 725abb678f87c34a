"""`dreambooth ui`: a local web page to train, watch, compare, sample and export runs."""

from __future__ import annotations


def ui(host: str = "127.0.0.1", port: int = 7860, runs: str = "runs", models: str | None = None) -> int:
    """Serve a web page over the same library functions as these commands (docs/ui.md).

    Drop photos, pick the class noun, identifier, base model and preset, see the memory plan,
    start training; watch progress, loss and validation grids; stop, resume, compare runs,
    sample, sweep and export with a download link. Jobs run in background processes that outlive
    the page. It listens on this machine only unless --host says otherwise (there is no login).
    Needs the ui extra: pip install -e ".[ui]"

    Example: dreambooth ui --runs runs --models ~/models

    Args:
        host: address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)
        port: port to listen on (default 7860)
        runs: folder of run directories the page lists and creates (default: runs)
        models: folder of base models (diffusers folders and .safetensors files) offered in the model list
    """
    from dreambooth.errors import DreamboothError

    if not 0 < port < 65536:
        raise DreamboothError(f"--port must be 1-65535, got {port}")
    try:
        from dreambooth.ui.server import serve
    except ImportError as e:
        raise DreamboothError(f"the web UI needs its optional extra ({e.name} is not installed): "
                              'pip install -e ".[ui]"') from None
    serve(host, port, runs, models)
    return 0
