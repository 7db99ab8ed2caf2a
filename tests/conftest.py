import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixture_dirs() -> list[Path]:
    """Every reference fixture: $QAVATAR_FIXTURES, else ../shared/fixtures beside the checkout."""
    root = Path(os.environ.get("QAVATAR_FIXTURES", REPO.parent / "shared" / "fixtures"))
    dirs = sorted(p for p in root.glob("*") if (p / "cases.json").is_file())
    if not dirs:
        raise RuntimeError(f"no parity fixtures under {root}; set QAVATAR_FIXTURES")
    return dirs


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory) -> Path:
    from qavatar.checkpoint.toy import make_toy_checkpoint

    return make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", config="tiny", seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield
