"""Shared test set-up: offline, CPU, deterministic."""

import os

# Nothing in the tests may download; set before `datasets`/`transformers` are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def _platform_available(name: str) -> bool:
    try:
        return len(jax.devices(name)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    # Hardware-only tests are skipped, not failed, where the hardware is absent.
    for marker, platform in (("gpu", "gpu"), ("tpu", "tpu")):
        if not _platform_available(platform):
            skip = pytest.mark.skip(reason=f"needs a {platform.upper()} (marker '{marker}')")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)
