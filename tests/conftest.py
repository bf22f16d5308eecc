import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for comparing two float computations of the same math."""
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {
        "rtol": 1e-5, "atol": 1e-6}
