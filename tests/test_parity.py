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


def _with_case(kind: str) -> list:
    return [p for p in fixture_dirs() if kind in {c["name"] for c in json.loads((p / "cases.json").read_text())["cases"]}]


def test_the_pipeline_fixture_is_found():
    # tests/fixtures holds a copy of each, so a clone anywhere checks the pipeline cases too
    assert _with_case("clip_boundary") and _with_case("causal_block")


@pytest.mark.parametrize("fixture", _with_case("causal_block"), ids=lambda p: p.name)
def test_check_parity_cli_passes(fixture):
    result = runner.invoke(app, ["check-parity", str(fixture)])
    assert result.exit_code == 0, result.output
    assert "within tolerance" in result.output


@pytest.fixture(scope="module")
def fixture_copy(tmp_path_factory):
    src = _with_case("causal_block")[0]
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


def _bump(t: torch.Tensor, tol: float) -> torch.Tensor:
    """One element changed by the smallest step that must fail: one ulp (or one uint8 level) where the check
    is exact, just over twice the tolerance where it has one."""
    t = t.clone()
    flat = t.view(-1)
    if t.dtype == torch.uint8:
        flat[0] = flat[0] + 1 if flat[0] < 255 else flat[0] - 1
    elif tol == 0:
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=t.dtype))
    else:
        flat[0] = flat[0] + 2 * tol
    return t


@pytest.mark.parametrize("fixture", _with_case("clip_boundary"), ids=lambda p: p.name)
def test_pipeline_cases_fail_on_a_one_step_change_of_any_stored_output(fixture, tmp_path):
    """Strictness: per case kind, one stored output moved by one ulp / one level (exact checks) or just beyond the
    tolerance must fail that output, and nothing unrelated; a changed count in the bookkeeping fails too."""
    bad = tmp_path / fixture.name
    shutil.copytree(fixture, bad)
    meta = json.loads((bad / "cases.json").read_text())
    cases = {c["name"]: c for c in meta["cases"]}
    tensors = load_file(bad / "cases.safetensors")
    prep = cases["image_prep"]
    crop_combo = next(c for c in prep["per_combo"] if not c["crop_equals_input_image"])
    pv_key = next(o["key"] for o in prep["outputs"] if o["key"].startswith("image_prep.ref_pixel_values"))
    call = cases["clip_boundary"]["per_call"][-1]
    targets = {  # key -> case
        crop_combo["crop_key"]: "image_prep", pv_key: "image_prep",
        "vae_stream.frames": "vae_stream", "vae_stream.ref_latents": "vae_stream",
        call["out_key"]: "clip_boundary", "clip_boundary.new_ref_latents": "clip_boundary",
        "output_frames.frames_uint8": "output_frames",
    }
    for key, case in targets.items():
        tensors[key] = _bump(tensors[key], TOLERANCES[case])
    save_file(tensors, bad / "cases.safetensors")
    row = cases["output_frames"]["bookkeeping"][-1]
    row["frames_kept"] += 1
    call["current_start"] += 1
    (bad / "cases.json").write_text(json.dumps(meta))

    checks = run_fixture(bad, print_fn=lambda s: None)
    failed = {c.key for c in checks if not c.ok}
    crop_tags = {f"image_prep.{c['image']}@{c['area_name']}.ref_pixel_values(crop)" for c in prep["per_combo"]
                 if c.get("crop_key") == crop_combo["crop_key"]}
    expected = (crop_tags | (set(targets) - {crop_combo["crop_key"]})
                | {f"output_frames.bookkeeping[{row['audio_samples_16k']}].frames_kept",
                   f"clip_boundary.call_c{call['clip']}_b{call['block']}_s{call['step']}.current_start"})
    assert failed == expected
    assert {c.case for c in checks if not c.ok} == set(cases)


@pytest.mark.parametrize("fixture", _with_case("clip_boundary"), ids=lambda p: p.name)
def test_fp32_sampler_state_is_one_bf16_rounding_from_the_references(fixture):
    """The reference keeps the sampler state in bf16 (diffusers' Euler step adds in fp32 and casts back); qavatar
    keeps fp32. On the clip-boundary inputs, the reference's state arithmetic (state rounded to bf16 before every
    call, fp32 update, result rounded) ends one bf16 rounding away from qavatar's: no growth over steps and blocks."""
    from qavatar.model.streaming import StreamingSession, stream_sequential
    from qavatar.parity import Fixture
    from qavatar.pipeline.clips import clip_inputs

    fx = Fixture(fixture)
    case = next(c for c in fx.cases if c["name"] == "clip_boundary")
    inp = {i["key"].rsplit(".", 1)[-1]: fx[i["key"]] for i in case["inputs"]}
    model, s, frames = fx.model(), case["scalars"], case["scalars"]["infer_frames"]
    blocks = sum(s["blocks_run"].values())

    def run(bf16_state: bool) -> torch.Tensor:
        session = StreamingSession(model, [inp["context"]], inp["ref_latents"], inp["motion_latents"],
                                   inp["timesteps"], inp["sigmas"], seed=s["python_random_seed"])
        forward = model.forward_stream
        if bf16_state:
            def rounded(x, *a, **k):
                x.copy_(x.bfloat16().float())  # the state itself is bf16 between steps
                return forward(x, *a, **k)
            model.forward_stream = rounded
        try:
            inputs = clip_inputs(model.cfg, lambda r: inp[f"clip{r}_noise"][None].bfloat16().float(),
                                 lambda r: inp["audio_emb"][..., r * frames:(r + 1) * frames],
                                 inp["ref_latents"], inp["motion_latents"])
            got: list = []
            stream_sequential(session, blocks, inputs, lambda b, x: got.append(x))
            out = torch.stack(got)
        finally:
            model.forward_stream = forward
        return out.bfloat16().float() if bf16_state else out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ours, ref = run(False), run(True)
    finally:
        torch.set_num_threads(threads)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2.0 ** -8  # below one bf16 rounding step, relative
