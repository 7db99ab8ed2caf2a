"""scripts/gpu_check.py: the memory-cap arithmetic, and a --dry-run on the CPU that walks every stage's plumbing
(ranks spawned on one device over gloo, the plan compared, the reports written)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402
from qavatar.errors import ConfigError  # noqa: E402

GiB = 1 << 30


def test_memory_fraction_leaves_the_context_outside_the_cap():
    total = 141 * 10 ** 9  # an H200
    assert gpu_check.memory_fraction(24 * GiB, total) == pytest.approx(24 * GiB / total)
    # the allocator gets the card minus the context the card would hold too
    f = gpu_check.memory_fraction(24 * GiB, total, context_bytes=GiB // 2)
    assert f * total == pytest.approx(23.5 * GiB)
    with pytest.raises(ConfigError, match="cannot emulate"):
        gpu_check.memory_fraction(96 * GiB, 80 * GiB)
    with pytest.raises(ConfigError, match="leaves nothing"):
        gpu_check.memory_fraction(GiB, total, context_bytes=2 * GiB)


def test_parse_emulate():
    assert gpu_check.parse_emulate("4x24GiB") == (4, 24 * GiB)
    assert gpu_check.parse_emulate("2x16GB") == (2, 16 * 10 ** 9)
    for bad in ("4x", "x24GiB", "0x24GiB", "4x24TB"):
        with pytest.raises(ConfigError, match="--emulate"):
            gpu_check.parse_emulate(bad)


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--stages", "bench,warp"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --stages")


def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=3000)
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, {k: v.get("error") for k, v in report["stages"].items()}
    assert list(report["stages"]) == list(gpu_check.STAGES)
    assert all(s["status"] == "ok" for s in report["stages"].values())
    st = report["stages"]
    bench = st["bench"]["result"]
    assert {r["precision"] for r in bench["rows"]} == {"bf16", "int8", "fp8", "int8-wo", "fp8-wo"}
    for name, (tp, pp) in {"emulate-tp4": (4, 1), "emulate-pp4": (1, 4), "emulate-tp2-kvfp8": (2, 1)}.items():
        res = st[name]["result"]
        assert (res["spec"]["tp"], res["spec"]["pp"]) == (tp, pp)
        ranks = res["ranks"]
        assert [r["rank"] for r in ranks] == list(range(tp * pp))  # every rank spawned and reported
        for r in ranks:
            assert r["cap_fraction"] == pytest.approx(24 * GiB / (141 * 10 ** 9))
            assert r["plan_total"] > r["plan_without_reserve"] > 0 and r["cache_bytes"] > 0
    assert st["emulate-tp2-kvfp8"]["result"]["spec"]["kv_dtype"] == "fp8"
    assert st["infer"]["result"]["rows"][0]["frames"] > 0
    att = {r["dtype"]: r for r in st["attention"]["result"]["rows"]}
    assert set(att) == {"bfloat16", "float16", "float32"} and att["float32"]["max_abs_vs_concat"] < 1e-5
    assert att["float32"]["sqnr_vs_fp32_db"] > 100 and att["bfloat16"]["sqnr_vs_fp32_db"] > 30
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in md for name in gpu_check.STAGES)
    assert not list(out.glob("stage-*.json"))  # the per-stage parts are folded into gpu_check.json
