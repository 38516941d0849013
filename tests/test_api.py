"""The lazy public API of the `t2jax` package."""

import importlib
import subprocess
import sys

import pytest

import t2jax


@pytest.mark.parametrize("name", t2jax.__all__)
def test_every_public_name_is_the_real_object_of_its_module(name):
    module, attribute = t2jax._API[name]
    value = getattr(t2jax, name)

    assert value is getattr(importlib.import_module(module), attribute)
    assert value.__doc__


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        t2jax.no_such_name  # noqa: B018


def test_import_t2jax_does_not_import_jax():
    code = "import sys, t2jax; print('jax' in sys.modules, t2jax.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False"


def test_dir_lists_the_public_api():
    assert set(t2jax.__all__) <= set(dir(t2jax))
    assert "__version__" in dir(t2jax)
