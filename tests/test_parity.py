"""Parity with the reference implementation's golden tensors, through `qavatar check-parity`."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import fixture_dirs
from qavatar.cli import app
from qavatar.parity import TOLERANCES, run_fixture

runner = CliRunner()


@pytest.mark.parametrize("fixture", fixture_dirs(), ids=lambda p: p.name)
def test_every_case_within_tolerance(fixture):
    checks = run_fixture(fixture, print_fn=lambda s: None)
    cases = {c["name"] for c in json.loads((fixture / "cases.json").read_text())["cases"]}
    assert {c.case for c in checks} == cases
    bad = [(c.key, c.max_abs, c.tol) for c in checks if not c.ok]
    assert not bad
    # The README's bars: 1e-5 for blocks and audio, 5e-5 for full forwards and streaming; RoPE tables exact.
    assert all(c.tol <= 5e-5 for c in checks)
    assert all(c.max_abs == 0 for c in checks if "rope_freqs" in c.key)


@pytest.mark.parametrize("fixture", fixture_dirs(), ids=lambda p: p.name)
def test_check_parity_cli_passes(fixture):
    result = runner.invoke(app, ["check-parity", str(fixture)])
    assert result.exit_code == 0, result.output
    assert "within tolerance" in result.output


@pytest.fixture(scope="module")
def fixture_copy(tmp_path_factory):
    src = fixture_dirs()[0]
    dst = tmp_path_factory.mktemp("fixture") / src.name
    shutil.copytree(src, dst)
    return dst


def test_check_parity_fails_on_a_perturbed_weight(fixture_copy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fixture_copy, bad)
    state = load_file(bad / "model.safetensors")
    state["blocks.1.ffn.2.weight"] = state["blocks.1.ffn.2.weight"] * (1 + 1e-3)
    save_file(state, bad / "model.safetensors")
    result = runner.invoke(app, ["check-parity", str(bad)])
    assert result.exit_code == 1
    assert "FAIL causal_block" in result.output


def test_check_parity_rejects_unknown_cases_and_bad_dirs(fixture_copy, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(fixture_copy, odd)
    cases = json.loads((odd / "cases.json").read_text())
    cases["cases"].append({"name": "teleport", "inputs": [], "outputs": []})
    (odd / "cases.json").write_text(json.dumps(cases))
    result = runner.invoke(app, ["check-parity", str(odd)])
    assert result.exit_code == 2 and "unknown case kinds ['teleport']" in result.output
    result = runner.invoke(app, ["check-parity", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a parity fixture" in result.output
    assert "Traceback" not in result.output


def test_tolerances_cover_every_runner():
    from qavatar.parity import RUNNERS

    assert set(TOLERANCES) == set(RUNNERS)
