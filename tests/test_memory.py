"""The memory estimate printed before training, against the peak a real training step reaches (CPU).

Each case trains one step of a random model big enough that its activations outweigh the framework
(`synthetic.SHAPES["small"]`: hidden 512, 8 layers), in a fresh process, so the peak resident memory
is this training's own. The estimate's growth over what was in use before the first step (optimizer
plus activations) must be within 30% of the measured growth. Measured when the formula was set
(2-core CPU, batch 12 x 256 tokens): -9% to -17% with checkpointing and dropout (allocator noise: five
runs), about +5% without either. The estimate leans low with checkpointing; it is a warning, not a limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TOLERANCE = 0.30


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from afinar.synthetic import make_random_model

    return make_random_model(tmp_path_factory.mktemp("models") / "small", "small")


@pytest.mark.parametrize("case", [
    ("train.gradient_checkpointing=true", "lora.dropout=0.05"),
    ("train.gradient_checkpointing=false", "lora.dropout=0.0"),
], ids=["checkpointing+dropout", "plain"])
def test_estimate_is_within_tolerance_of_the_measured_peak(small_model, tmp_path, case):
    settings = [f"model.base={small_model}", "model.quantization=none", "model.compute_dtype=float32",
                "data.train=bundled:farense/train.jsonl", "data.val=null", "train.batch_size=12",
                "train.grad_accumulation=1", "train.max_seq_length=256", "train.max_steps=1", "train.save_every=0",
                "train.group_by_length=false", "lora.rank=16",
                "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", *case]
    result = subprocess.run([sys.executable, "-m", "afinar.cli", "train", "--output", str(tmp_path / "run"),
                             *(a for s in settings for a in ("--set", s))],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    plan = meta["memory_estimate_mb"]
    before = plan["weights"] + plan["lora"] + plan["framework"]  # in use when the estimate was made
    estimated, measured = plan["optimizer"] + plan["activations"], meta["peak_memory_mb"] - before
    assert measured > before / 2, "the step's own memory must be large enough for the check to mean something"
    assert abs(estimated - measured) <= TOLERANCE * measured, (
        f"estimated growth {estimated:.0f} MiB vs measured {measured:.0f} MiB ({case})")
