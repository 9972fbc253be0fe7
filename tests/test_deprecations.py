"""jaxpar calls no API that its dependencies deprecate (issue #35): the suite's configuration
(pyproject.toml, ``filterwarnings``) turns a DeprecationWarning or FutureWarning raised from a
jaxpar module into an error in every test, so each test that reaches a deprecated call fails."""

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_warned_from_jaxpar_fails_the_test(category):
    with pytest.raises(category, match="old API"):
        warnings.warn_explicit("old API", category, "jaxpar/run/loop.py", 1,
                               module="jaxpar.run.loop")  # fmt: skip
    # from another package it stays a warning
    with pytest.warns(category):
        warnings.warn_explicit("old API", category, "elsewhere.py", 1, module="elsewhere")
