import hashlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fixture_dirs() -> list[Path]:
    """Every reference fixture: ../shared/fixtures beside the checkout (or shared/ inside it), $QAVATAR_FIXTURES,
    and the copy vendored in tests/fixtures (so a clone anywhere still checks parity). Same fixture counted once."""
    roots = [Path(p) for p in os.environ.get("QAVATAR_FIXTURES", "").split(os.pathsep) if p]
    roots += [REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures", REPO / "tests" / "fixtures"]
    found: dict[bytes, Path] = {}
    for root in roots:
        for p in sorted(root.glob("*")):
            if (p / "cases.json").is_file():
                found.setdefault(hashlib.sha256((p / "cases.json").read_bytes()).digest(), p)
    if not found:
        raise RuntimeError(f"no parity fixtures under {roots}; set QAVATAR_FIXTURES")
    return list(found.values())


def fixture_with_case(kind: str) -> Path:
    """The first fixture that holds a case of this kind (the model fixture's `streaming`, the pipeline's ...)."""
    import json

    for p in fixture_dirs():
        if kind in {c["name"] for c in json.loads((p / "cases.json").read_text())["cases"]}:
            return p
    raise RuntimeError(f"no parity fixture has a {kind!r} case")


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory) -> Path:
    from qavatar.checkpoint.toy import make_toy_checkpoint

    return make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", config="tiny", seed=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield
