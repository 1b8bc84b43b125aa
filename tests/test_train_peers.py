"""The peers benchmark's CPU smoke run (`benchmarks/train_peers.py --shape tiny --steps 2`) end to end.

It starts one process per system (plain PEFT, afinar) with both LoRA setups: about a minute of
CPU on a 2-core machine, over the 30 s a suite test may take, so it runs only when asked:
AFINAR_BENCH_SMOKE=1 python -m pytest tests/test_train_peers.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("AFINAR_BENCH_SMOKE") != "1",
                                                   reason="about a minute of CPU: set AFINAR_BENCH_SMOKE=1")]


def test_smoke_run_writes_every_row(tmp_path, tiny_model):
    out = tmp_path / "peers.json"
    subprocess.run([sys.executable, "benchmarks/train_peers.py", "--shape", "tiny", "--steps", "2",
                    "--tokenizer", str(tiny_model), "--out", str(out)], cwd=REPO, check=True, timeout=600)
    result = json.loads(out.read_text())["train_peers"]
    assert set(result["setups"]) == {"qkv", "all"}
    for setup in result["setups"].values():
        rows = setup["rows"]
        for name in ("plain16", "plain32", "afinar16", "afinar_auto"):
            row = rows[name]
            assert row["tokens_per_s"] > 0 and len(row["window_tokens_per_s"]) == 3, (name, row)
            assert row["timed_steps"] == 6 and 0 <= row["padding_fraction"] < 1
        assert "not importable" in rows["unsloth16"]["skipped"]
        assert rows["plain16"]["examples_per_step"] == rows["afinar16"]["examples_per_step"] == 16
        assert rows["afinar_auto"]["examples_per_step"] > 32  # token-budget micro-batches
        # The same weights, batch and loss definition: plain HF and afinar agree (fp32 on the CPU).
        assert setup["untrained_loss_spread"] < 1e-5
        assert setup["best"]["afinar"]["tokens_per_s"] > 0
