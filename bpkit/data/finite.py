"""Non-finite input values are refused once, at load, rather than met as NaN gradients."""
from __future__ import annotations

import numpy as np

from bpkit.data.batching import DataError, Dataset

_ARRAYS = (("x_train", "x"), ("y_train", "y"), ("x_test", "x_test"), ("y_test", "y_test"))


def check_finite(ds: Dataset, source: str | None = None) -> Dataset:
    """``ds`` unchanged, or ``DataError`` naming the first floating array (by its ``.npz``
    name: ``x``, ``y``, ``x_test``, ``y_test``) that holds NaN or Inf, how many values and the
    index of the first."""
    for attr, name in _ARRAYS:
        a = getattr(ds, attr)
        if a is None or not np.issubdtype(np.asarray(a).dtype, np.floating):
            continue
        bad = ~np.isfinite(a)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            where = f" in {source}" if source else ""
            raise DataError(
                f"data: {name}{where} holds {count} non-finite value{'s' * (count > 1)} (NaN or "
                f"Inf), the first at {name}[{', '.join(map(str, first))}]; remove or repair "
                "those examples")
    return ds
