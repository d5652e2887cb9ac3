"""The malloc settings: applied on glibc, skipped when the user opts out."""

from __future__ import annotations

import sys

import pytest

from ip2p_jax import memory


def test_opting_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("IP2P_JAX_MALLOC", "default")
    assert memory._libc() is None
    memory.release_large_blocks()  # no-ops, no errors
    memory.keep_blocks_for_reuse()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_glibc_is_found_and_accepts_the_settings(monkeypatch):
    monkeypatch.delenv("IP2P_JAX_MALLOC", raising=False)
    libc = memory._libc()
    assert libc is not None
    assert libc.mallopt(-3, 1 << 20) == 1  # mallopt returns 1 on success
    memory.keep_blocks_for_reuse()
