"""Multi-GPU scaling of QLoRA training on a random Mistral-7B-shaped model: tokens/s on 1 and N GPUs.

    python benchmarks/multi_gpu_scaling.py --tokenizer .bench/tok         # 1 GPU, then every GPU of the machine
    python benchmarks/multi_gpu_scaling.py --tokenizer .bench/tok --nproc 2 --mode strong
    python benchmarks/multi_gpu_scaling.py --nproc 2 --shape tiny --steps 3 --warmup 1 --examples 64 \\
        --set model.compute_dtype=float32 --out /tmp/scaling.json        # CPU smoke run (gloo)

The script launches itself under `torchrun --standalone --nproc-per-node P` for P = 1 and P = N
and writes benchmarks/results/multi-gpu-scaling-<date>.json. Each process builds the model
of `afinar.synthetic.SHAPES[shape]` (the shape `make_random_model(..., "mistral-7b")` saves)
directly on its own GPU and quantizes it to NF4 there, as the other GPU benchmarks do
(no 14 GB checkpoint to write and read), puts LoRA on it with the training backend's `attach`, and
runs afinar's own optimizer step (`Trainer.on_examples(...).step()`: the step's micro-batches shared
out by rank, LoRA gradients summed across processes, the loss over the step's global target count).

Scaling is weak by default: on P processes a step holds P times the preset's micro-batches
(`train.grad_accumulation` x P), so every GPU does the 1-GPU run's work per step;
`--mode strong` keeps the preset's global batch and splits it. Efficiency = tokens/s on N GPUs /
(N x tokens/s on 1 GPU); the target is >= 0.9 on 2 GPUs. tokens/s counts real (unpadded)
tokens of the whole step, timed after `--warmup` steps, between two barriers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    """One process of a torchrun job: build, attach LoRA, time afinar's training steps."""
    from afinar import distributed, events
    from afinar.backends import training_backend
    from afinar.config import load_config, preset_path
    from afinar.synthetic import SHAPES
    from afinar.train import Trainer
    from benchmarks import random_7b as R

    world = distributed.from_env()
    overrides = [*args.set, "train.save_every=0", "train.eval_every=1000000", "data.val=null",
                 f"train.max_steps={args.warmup + args.steps}"]
    if args.mode == "weak":  # P times the preset's micro-batches per step: each GPU does the 1-GPU step
        accumulation = load_config(preset_path(args.preset), args.set).train.grad_accumulation
        overrides.append(f"train.grad_accumulation={accumulation * world.size}")
    cfg = load_config(preset_path(args.preset), overrides)
    backend = training_backend(cfg, world)  # joins the process group and takes GPU LOCAL_RANK
    tok = R.tokenizer(args.tokenizer)
    base = build_base(args.shape, tok, backend.device, backend.dtype, SHAPES)
    backend.attach(base, tok)
    records: list = []
    trainer = Trainer.on_examples(cfg, backend, R.chat_examples(tok, args.examples), on_event=records.append)
    state = trainer.state

    def steps(n: int) -> None:
        for _ in range(n):
            stopped = trainer.step()
            if stopped:
                raise SystemExit(f"training stopped: {stopped.message}")

    steps(args.warmup)
    barrier(backend, world)
    R.reset_peak()
    tokens0, t0 = state.tokens_seen, time.perf_counter()
    steps(args.steps)
    barrier(backend, world)
    seconds = time.perf_counter() - t0
    tokens = state.tokens_seen - tokens0
    losses = [r.loss for r in records if isinstance(r, events.Step)]
    peaks = [0.0] * world.size  # each rank's peak GPU memory, gathered by a sum of one-hot vectors
    peaks[world.rank] = R.peak_gib() or 0.0
    if world.size > 1:
        peaks = backend.collective.all_sum(peaks)
    if world.main:
        t = cfg.train
        result = {"processes": world.size, "steps_timed": args.steps, "warmup_steps": args.warmup,
                  "micro_batches_per_step": t.grad_accumulation, "batch_tokens": t.batch_tokens, "batch_size": t.batch_size,
                  "tokens_per_step": round(tokens / args.steps), "seconds": round(seconds, 3), "tokens": tokens,
                  "tokens_per_s": round(tokens / seconds, 1), "tokens_per_s_per_gpu": round(tokens / seconds / world.size, 1),
                  "first_loss": losses[0], "last_loss": losses[-1], "peak_gib_per_rank": [round(x, 2) for x in peaks],
                  "device": backend.describe()}
        Path(args.part).write_text(json.dumps(result))


def build_base(shape: str, tok, device, dtype, shapes: dict):
    """benchmarks/random_7b.py's model, built on this process's device (random_7b builds on GPU 0)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from benchmarks import random_7b as R

    config = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False, **shapes[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(config, dtype=dtype)
    R.quantize_nf4(model, dtype)
    return model


def barrier(backend, world) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if world.size > 1:
        backend.collective.all_sum([0.0])


def launch(nproc: int, args, part: Path) -> dict:
    """This script under torchrun with `nproc` processes; the result rank 0 wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--part", str(part), "--tokenizer", args.tokenizer,
           "--shape", args.shape, "--preset", args.preset, "--mode", args.mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--examples", str(args.examples)]
    for s in args.set:
        cmd += ["--set", s]
    print(f"$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads(part.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=0, help="processes of the N-GPU run (default: every GPU)")
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--preset", default="cuda-80gb")
    p.add_argument("--mode", choices=["weak", "strong"], default="weak")
    p.add_argument("--set", action="append", default=[], help="config override, as `afinar train --set`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--tokenizer", default=None, help="saved Mistral tokenizer folder (default: built once, here)")
    p.add_argument("--baseline-only", action="store_true",
                   help="with --nproc 1: measure the 1-GPU leg alone (a one-GPU machine)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    from benchmarks import random_7b as R

    nproc = args.nproc or torch.cuda.device_count()
    if nproc < 1 or (nproc == 1 and not args.baseline_only):
        raise SystemExit(f"Scaling needs 2 or more processes; this machine has {torch.cuda.device_count()} GPU(s). "
                         "Pass --nproc N (on CPU: gloo processes, a smoke run), or --baseline-only on one GPU.")
    if args.tokenizer is None:  # build it once, before the processes would race to write it
        args.tokenizer = str(REPO / ".bench" / "tok")
        if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
            R.tokenizer(None)
    env = R.environment(sys.argv)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted({1, nproc}):
            runs[str(n)] = launch(n, args, Path(tmp) / f"part-{n}.json")
            print(f"{n} process(es): {runs[str(n)]['tokens_per_s']} tokens/s", flush=True)
    efficiency = None
    if nproc > 1:
        efficiency = runs[str(nproc)]["tokens_per_s"] / (nproc * runs["1"]["tokens_per_s"])
        print(f"scaling efficiency on {nproc}: {efficiency:.3f} (target >= 0.9)")
    else:  # a one-GPU machine: the 1-process leg under torchrun, for the N-GPU run to be compared with later
        print("--baseline-only: the 1-GPU leg alone; no scaling efficiency without a second GPU")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = f"multi-gpu-scaling-{date}" + ("-1gpu-baseline" if efficiency is None else "")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{name}.json"
    from afinar.atomic import write_json

    env["gpu_count"] = torch.cuda.device_count()
    write_json(out, {"environment": env, "shape": args.shape, "preset": args.preset, "overrides": args.set,
                     "mode": args.mode, "processes": nproc, "runs": runs,
                     "scaling_efficiency": None if efficiency is None else round(efficiency, 3),
                     "target_efficiency": 0.9, "meets_target": None if efficiency is None else efficiency >= 0.9,
                     "definition": "tokens/s on N processes / (N x tokens/s on 1); real tokens of whole steps"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
