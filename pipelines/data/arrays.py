"""Two conversions between Arrow fixed-size-list columns and 2-D numpy arrays, which the data
pipeline uses for token windows, MinHash signatures and per-source counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def as_fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(N, width) array -> a column of N fixed-size lists."""
    return pa.FixedSizeListArray.from_arrays(np.ascontiguousarray(matrix).ravel(), matrix.shape[1])


def as_matrix(column) -> np.ndarray:
    """A fixed-size list column (also chunked, or inside Ray's tensor extension) -> (N, width)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    column = getattr(column, "storage", column)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
