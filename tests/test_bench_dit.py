"""scripts/bench_dit.py on the CPU: the width-reduced layer, every precision eager and compiled, as JSON."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("bf16", "int8", "fp8", "int8-wo", "fp8-wo")


def test_bench_dit_cpu_smoke():
    # aot_eager traces the same graphs as inductor without its code generation (minutes on 2 cores);
    # tests/test_compile.py runs inductor itself
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_dit.py"), "--device", "cpu", "--json",
                           "--iters", "1", "--backend", "aot_eager"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows = {(r["precision"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in PRECISIONS for m in ("eager", "compiled")}
    for r in rows.values():
        assert r["ms"] > 0 and r["tflops"] > 0 and r["weight_bytes"] > 0 and r["speedup_vs_bf16_eager"] > 0
        assert r["pct_of_peak"] > 0  # against the measured CPU matmul rate
    assert rows[("bf16", "eager")]["speedup_vs_bf16_eager"] == 1.0 and rows[("bf16", "eager")]["sqnr_vs_bf16_db"] is None
    assert all(rows[(p, "eager")]["sqnr_vs_bf16_db"] > 10 for p in PRECISIONS[1:])  # 8-bit: close to bf16, not equal
    # 8-bit weights: about half the bytes of bf16 (scales and bf16 biases on top)
    assert 0.45 < rows[("int8", "eager")]["weight_bytes"] / rows[("bf16", "eager")]["weight_bytes"] < 0.6
    assert all(rows[(p, "compiled")]["graphs"] == 2 for p in PRECISIONS)  # the block and the injector
    assert result["flops_per_call"] > 0 and result["call"]["keys"] == 12 * 66 + 165
    att = result["attention"]
    assert att["picked"] in ("flash", "math")  # what the CPU build offers
    assert att["backends"]["math"]["ms"] > 0 and att["backends"]["flash_attention"]["ms"] > 0
    assert "| bf16 | eager |" in proc.stderr  # the table
