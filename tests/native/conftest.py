"""The data the native tests share: one seeded labelled set and its queries."""

from __future__ import annotations

import numpy as np
import pytest

from tests.native.brute_force import N, make_data


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = make_data(11)
    labels = np.random.default_rng(12).choice(10**12, N, replace=False).astype(np.uint64)
    queries = make_data(13, n=200)
    return data, labels, queries
