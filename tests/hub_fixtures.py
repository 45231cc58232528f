"""Point the real huggingface_hub client at a local [`benchmarks.hub_server.HubServer`] from a test.

huggingface_hub reads its environment once, at import (``constants.ENDPOINT``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ... and the module-level ``HfApi`` behind ``huggingface_hub.model_info`` & co. keeps the
endpoint it saw then), and another test may have imported it first with another environment (tests/test_hub.py
sets ``HF_HUB_OFFLINE=1``). Setting ``HF_ENDPOINT`` is therefore not enough in-process: [`hub_env`] sets the
environment (which subprocesses inherit) and patches those constants, and undoes both on exit.

    from hub_fixtures import hub_env
    from benchmarks.hub_server import HubServer

    def test_x(tmp_path):
        with HubServer({"org/m": {"main": folder}}) as server, hub_env(server, tmp_path / "hf") as env:
            huggingface_hub.hf_hub_download("org/m", "config.json")       # in-process
            subprocess.run([...streammerge...], env={**os.environ})          # or env: the variables alone

or with the fixture: ``from hub_fixtures import hub_server  # noqa: F401`` and a ``hub_server`` argument (an
empty, started server, environment applied; ``hub_server.add_repo(...)``).

Nothing here imports huggingface_hub at import time (that would freeze its constants at collection).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from benchmarks.hub_server import HubServer
except ImportError:  # pytest started from elsewhere than the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.hub_server import HubServer


@contextlib.contextmanager
def hub_env(
    server: HubServer, hf_home: Path | str, *, download_chunk_size: int | None = None
) -> Iterator[dict[str, str]]:
    """Within: this process's huggingface_hub and any subprocess use ``server``, caching under ``hf_home``.

    Yields the environment variables set (``server.env(hf_home)``). Restores everything on exit.
    ``download_chunk_size`` (in-process only) replaces ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB): ``http_get``
    reads the body in chunks of that size and a dropped transfer resumes from the last whole chunk received, so with
    the default a file must be over 10 MiB for a resume to send a ``Range`` (a smaller one restarts from byte 0).
    """
    import huggingface_hub
    from huggingface_hub import constants, hf_api

    env = server.env(hf_home)
    home = Path(env["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    patched = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
        "HF_HUB_DISABLE_XET": True,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
            mp.delenv(var, raising=False)
        for name, value in patched.items():
            if hasattr(constants, name):
                mp.setattr(constants, name, value)
        if download_chunk_size is not None:
            mp.setattr(constants, "DOWNLOAD_CHUNK_SIZE", download_chunk_size)
        mp.setattr(hf_api.api, "endpoint", server.endpoint)  # behind huggingface_hub.model_info & co.
        # utils/tqdm.py copied the flag at import (``huggingface_hub.utils.tqdm`` names the class, not the module)
        mp.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
        assert huggingface_hub.constants.ENDPOINT == server.endpoint
        yield dict(env)


@contextlib.contextmanager
def sampled_disk(folder: Path, every_s: float = 0.005) -> Iterator[list[int]]:
    """Within: a thread samples the apparent bytes of the shards and partial downloads (``*.safetensors``,
    ``*.incomplete``) under ``folder``; the yielded list's one item is the peak seen (final once the block ends)."""
    import os
    import threading

    stop, peak = threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for dirpath, _, files in os.walk(folder):
                for name in files:
                    if name.endswith((".safetensors", ".incomplete")):
                        try:
                            total += os.stat(os.path.join(dirpath, name)).st_size
                        except OSError:
                            pass
            peak[0] = max(peak[0], total)
            stop.wait(every_s)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


@pytest.fixture
def hub_server(tmp_path) -> Iterator[HubServer]:
    """A started, empty HubServer with this process's huggingface_hub pointed at it (HF_HOME under tmp_path)."""
    with HubServer() as server, hub_env(server, tmp_path / "hf"):
        yield server


__all__ = ["HubServer", "hub_env", "hub_server", "sampled_disk"]
