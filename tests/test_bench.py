"""bench.py's --small mode runs end to end on the CPU, so the benchmark script cannot rot."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_small_runs_and_matches_the_reference_loss():
    r = subprocess.run([sys.executable, "bench.py", "--small", "--steps", "2", "--new_tokens", "16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "| train, 256 tokens | ours (eager) |" in out and "| train, 256 tokens | transformers + peft |" in out
    assert "| decode, batch 1 | ours, adapter merged (eager) |" in out
    assert out.count(": OK") == 2 and "MISMATCH" not in out  # first-step loss equals transformers + peft's
    # float32 greedy decoding gives transformers' tokens, merged or not
    assert "adapter merged (eager) vs ours unmerged eager: 16/16 identical" in out
    assert "transformers + peft, adapter unmerged vs ours unmerged eager: 16/16 identical" in out
