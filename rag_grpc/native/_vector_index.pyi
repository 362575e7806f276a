# Type stub for the Cython extension built from native/vector_index.pyx.
from os import PathLike

import numpy as np
import numpy.typing as npt

SPACES: tuple[str, ...]
MISSING_LABEL: np.uint64
DEFAULT_EXACT_THRESHOLD: int

class VectorIndex:
    dim: int
    space: str
    exact_threshold: int
    def __init__(
        self,
        dim: int,
        space: str = "ip",
        max_elements: int = 1024,
        M: int = 16,
        ef_construction: int = 200,
        exact_threshold: int = ...,
        random_seed: int = 100,
        quantized: bool = True,
    ) -> None: ...
    @property
    def quantized(self) -> bool: ...
    def __len__(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def max_elements(self) -> int: ...
    @property
    def M(self) -> int: ...
    @property
    def ef_construction(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    def labels(self) -> npt.NDArray[np.uint64]: ...
    def add(self, vectors: npt.ArrayLike, labels: npt.ArrayLike, num_threads: int = 0) -> None: ...
    def delete(self, labels: npt.ArrayLike) -> int: ...
    def resize(self, max_elements: int) -> None: ...
    def search(
        self,
        queries: npt.ArrayLike,
        k: int = 10,
        ef: int = 100,
        allowed: npt.ArrayLike | None = None,
        num_threads: int = 0,
        exact_threshold: int | None = None,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]: ...
    def save(self, path: str | PathLike[str], remap: bool = True) -> None: ...
    @staticmethod
    def load(
        path: str | PathLike[str], exact_threshold: int = ..., quantized: bool = True
    ) -> VectorIndex: ...
