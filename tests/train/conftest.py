"""Training tests run as users run training (see tests/numerics.py)."""
import pytest

from tests.numerics import user_numerics


@pytest.fixture(autouse=True)
def training_numerics():
    with user_numerics():
        yield
