"""The package's public API: ``from ip2p_jax import ...`` names, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ip2p_jax


def test_importing_the_package_loads_no_framework():
    code = "import sys, ip2p_jax; print(sorted({'jax', 'torch', 'flax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ip2p_jax.__all__)
def test_every_public_name_resolves_to_its_defining_module(name):
    value = getattr(ip2p_jax, name)
    assert value.__name__ == name
    assert value.__module__.startswith("ip2p_jax.")
    assert name in dir(ip2p_jax)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'EditPipline'"):
        ip2p_jax.EditPipline  # noqa: B018


def test_all_lists_exactly_the_lazily_imported_names():
    assert sorted(ip2p_jax.__all__) == sorted(ip2p_jax._PUBLIC)
