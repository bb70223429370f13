"""Pytest fixtures that point the real huggingface_hub client at a `FakeHub`.

huggingface_hub 2.4.0 reads its environment variables once, when
``huggingface_hub.constants`` is imported: ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_TELEMETRY``,
``HF_HUB_DISABLE_XET`` and the token file path all become module constants that
later calls read. Setting the variables in a test therefore changes nothing in
an already imported client, so `install_fake_hub` patches the constants as well.
A few values were also copied out of ``constants`` at import and get patched
where they live:

- ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi`` behind
  ``huggingface_hub.list_repo_files``, ``model_info`` and the other top-level
  functions keeps the endpoint it was built with.
- ``huggingface_hub.utils._cache_manager.HF_HUB_CACHE`` (``scan_cache_dir``) and
  ``huggingface_hub.utils._cache_assets.HF_ASSETS_CACHE``.

``HF_TOKEN`` and ``HUGGING_FACE_HUB_TOKEN`` are read on every call, so a test
can set ``HF_TOKEN`` with monkeypatch alone. Telemetry is disabled because with
it on, building the User-Agent header fetches ``{ENDPOINT}/api/agent-harnesses``
once per process and caches the result.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import pytest
from huggingface_hub import constants

from tests.support.fakehub import FakeHub

# Variables that would leak the developer's setup into tests, or switch the
# client off the fake hub.
_UNSET_VARIABLES = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HF_OIDC_RESOURCE",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "XDG_CACHE_HOME",
)


def install_fake_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point huggingface_hub at ``endpoint`` and keep its cache, token and state files under ``home``.

    Sets the environment variables for subprocesses and code that reads them
    directly, and patches the constants that the already imported client uses.
    Also disables telemetry and Xet downloads, turns offline mode off, unsets
    tokens and adds 127.0.0.1 to ``NO_PROXY``. monkeypatch restores
    everything at teardown.
    """
    home = Path(home)
    hub_cache = home / "hub"
    assets_cache = home / "assets"

    for name in _UNSET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # httpx2 and urllib honor HTTP(S)_PROXY from the environment, and a proxy
    # cannot reach this machine's loopback server.
    for name in ("NO_PROXY", "no_proxy"):
        existing = os.environ.get(name)
        monkeypatch.setenv(name, f"{existing},127.0.0.1,localhost" if existing else "127.0.0.1,localhost")

    # `raising=True` (the default) makes a renamed constant fail loudly after
    # a huggingface_hub upgrade, instead of silently leaving the real value.
    patched_constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HUGGINGFACE_ASSETS_CACHE": str(assets_cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in patched_constants.items():
        monkeypatch.setattr(constants, name, value)

    from huggingface_hub import hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets_cache))


def set_offline_mode(monkeypatch: pytest.MonkeyPatch, enabled: bool = True) -> None:
    """Turn huggingface_hub's offline mode on or off, as ``HF_HUB_OFFLINE`` would at import.

    In offline mode the client raises `huggingface_hub.errors.OfflineModeIsEnabled`
    before sending any request, and `hf_hub_download` falls back to the cache.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if enabled else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", enabled)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Yield a started `FakeHub` that huggingface_hub uses, with a cache under ``tmp_path / "hf-home"``."""
    with FakeHub() as hub:
        install_fake_hub(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        # The client keeps one pooled httpx2 client per process. Closing it drops
        # keep-alive connections to a previous test's server.
        huggingface_hub.close_session()
        try:
            yield hub
        finally:
            huggingface_hub.close_session()
