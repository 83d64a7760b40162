"""``medvlp serve``: a run behind an HTTP API and a web page (FastAPI on uvicorn; ``pip install medvlp[serve]``).

``create_app(engine)`` (``medvlp.serve.app``) builds the app; ``Engine`` (``medvlp.serve.engine``) holds the
model; ``MicroBatcher`` (``medvlp.serve.batching``) lets concurrent requests share forward passes. ``serve``
runs it all on uvicorn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medvlp.errors import MedvlpError

ENV = "MEDVLP_SERVE"  # how worker processes (--workers > 1) learn what to load


def require() -> None:
    """A one-line error when the optional serving packages are missing."""
    from importlib.util import find_spec

    missing = [name for name, modules in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                          ("python-multipart", ["python_multipart", "multipart"]))
               if not any(find_spec(module) for module in modules)]
    if missing:
        raise MedvlpError(f"medvlp serve needs the serving extra ({', '.join(missing)} missing): "
                          "pip install 'medvlp[serve]'")


def build(run: str | Path, overrides: list[str] | tuple[str, ...] = (), gallery: str | Path | None = None):
    """The app for ``run`` with ``key=value`` overrides of ``ServeConfig`` and an optional gallery folder."""
    from medvlp.config import load_config
    from medvlp.predict import images_in
    from medvlp.serve.app import create_app
    from medvlp.serve.engine import Engine, ServeConfig

    config = load_config(ServeConfig, None, list(overrides))
    files = images_in(Path(gallery)) if gallery else None
    return create_app(Engine.from_run(run, config, gallery=files))


def app_from_env():
    """The app factory uvicorn's worker processes call (``--workers N``): settings come from ``$MEDVLP_SERVE``."""
    settings = json.loads(os.environ[ENV])
    return build(settings["run"], settings["overrides"], settings["gallery"])


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          overrides: list[str] | tuple[str, ...] = (), gallery: str | Path | None = None) -> None:
    """Load ``run`` and serve it until interrupted. Each of ``workers`` processes loads its own copy."""
    require()
    import uvicorn

    if workers < 1:
        raise MedvlpError(f"--workers {workers}: must be 1 or more")
    if workers == 1:
        app = build(run, overrides, gallery)  # load errors surface here, as one line
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    build(run, overrides, gallery)  # check once in this process before starting the workers
    os.environ[ENV] = json.dumps({"run": str(run), "overrides": list(overrides),
                                  "gallery": str(gallery) if gallery else None})
    uvicorn.run("medvlp.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info")
