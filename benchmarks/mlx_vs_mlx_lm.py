"""afinar's MLX training against plain mlx-lm LoRA training: same model, data, settings, one process.

    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py                 # Linux CPU: the tiny random Mistral
    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py --model smollm2-135m-instruct   # a Mac

"Plain mlx-lm" is what `mlx_lm.lora --train` runs: `mlx_lm.tuner.trainer.train` (a compiled
step, full-vocabulary logits, batches padded to multiples of 32) on a `CompletionsDataset` with
the prompt masked. afinar runs its own loop (`afinar.train.run_training`, backend=mlx). Both get
the same base weights, the same quantization (afinar's: affine 4-bit, group 64, Linear layers of
the transformer blocks), LoRA rank/scale/keys, batch size, learning rate, steps and data.

Throughput counts real (unpadded) tokens per second of training-step time, for both: the tokens
of every example in every batch, divided by the time spent in steps (no evaluation, no saving).
Writes benchmarks/results/mlx-vs-mlx-lm-<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_mlx_lm(model_path: Path, rows: list[dict], args, quantize: bool, tmp: Path) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.datasets import CacheDataset, CompletionsDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from afinar.backends.mlx_model import quantize_base

    model, _ = load_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if quantize:
        quantize_base(model)  # afinar's choice of layers, so both sides train the same quantized model
    model.freeze()
    keys = sorted({n for n, _ in model.layers[0].named_modules() if n.rsplit(".", 1)[-1] in args.targets})
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": args.rank, "scale": args.alpha / args.rank,
                                                    "dropout": 0.0, "keys": keys})
    data = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    dataset = CacheDataset(CompletionsDataset(data, tokenizer, "prompt", "completion", mask_prompt=True))
    counted = {"tokens": 0}

    def iterate_batches(*a, **kw):  # count the real tokens of each batch mlx-lm trains on
        for batch, lengths in trainer.iterate_batches(*a, **kw):
            counted["tokens"] += int(lengths[:, 1].sum())
            yield batch, lengths

    reports = []

    class Callback(trainer.TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    mx.reset_peak_memory()
    targs = trainer.TrainingArgs(batch_size=args.batch_size, iters=args.steps, steps_per_report=args.steps,
                                 steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=512,
                                 adapter_file=str(tmp / "plain-adapters.safetensors"))
    trainer.train(model, optim.AdamW(learning_rate=args.lr), dataset, None, args=targs,
                  iterate_batches=iterate_batches, training_callback=Callback())
    train_time = args.steps / reports[-1]["iterations_per_second"]  # mlx-lm's own step timer
    # mlx-lm's loop is zip(range(iters), batches): range ends first, so every counted batch was trained on.
    return {"tokens": counted["tokens"], "train_time_s": round(train_time, 3),
            "tokens_per_s": round(counted["tokens"] / train_time, 1),
            "final_loss": round(float(reports[-1]["train_loss"]), 4),
            "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1)}


def afinar_mlx(model: str, train_file: Path, args, quantize: bool, tmp: Path) -> dict:
    import mlx.core as mx

    from afinar.config import load_config
    from afinar.train import run_training

    cfg = load_config(None, [
        f"model.base={model}", "backend=mlx", f"model.quantization={'int4' if quantize else 'none'}",
        "model.compute_dtype=float32", f"lora.rank={args.rank}", f"lora.alpha={args.alpha}", "lora.dropout=0",
        f"lora.target_modules=[{','.join(args.targets)}]", f"train.batch_size={args.batch_size}",
        "train.grad_accumulation=1", f"train.max_steps={args.steps}", f"train.learning_rate={args.lr}",
        "train.warmup_steps=0", "train.min_lr_ratio=1", "train.max_seq_length=512", "train.save_every=0",
        "train.divergence_factor=0", f"data.train={train_file}", "data.val=null",
    ])
    mx.reset_peak_memory()
    run = run_training(cfg, tmp / f"afinar-{'q' if quantize else 'l'}").output
    meta = json.loads((run / "metadata.json").read_text())
    return {"tokens": meta["tokens_seen"], "train_time_s": meta["train_time_s"], "tokens_per_s": meta["tokens_per_s"],
            "final_loss": meta["final_train_loss"], "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1)}


def matmul_gflops() -> dict:
    """float32 1024^3 matmul speed of MLX and numpy on this machine: context for the figures above."""
    import mlx.core as mx
    import numpy as np

    flop = 2 * 1024**3
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    t = time.perf_counter()
    for _ in range(5):
        mx.eval(a @ a)
    mlx_rate = 5 * flop / (time.perf_counter() - t) / 1e9
    b = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    t = time.perf_counter()
    for _ in range(5):
        b @ b
    return {"mlx": round(mlx_rate, 1), "numpy": round(5 * flop / (time.perf_counter() - t) / 1e9, 1)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


def main() -> None:
    on_mac = platform.system() == "Darwin"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct" if on_mac else "tiny",
                   help="'tiny' (random 2-layer Mistral, real tokenizer), 'smollm2-135m-instruct', or an HF folder.")
    p.add_argument("--data", type=Path, default=REPO / "data" / "farense" / "train.jsonl")
    p.add_argument("--examples", type=int, default=256, help="Use the first N training examples.")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj"])
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--repeats", type=int, default=2,
                   help="Alternate plain/afinar this many times per setting; the median tokens/s counts (load noise).")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()

    import mlx.core as mx
    import mlx_lm

    from afinar import models
    from afinar.synthetic import make_random_model

    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.examples]
    results = []
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = str(make_random_model(tmp / "tiny", "tiny")) if args.model == "tiny" else args.model
        model_path = Path(models.resolve(model).path)
        train_file = tmp / "train.jsonl"
        train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        for quantize in (False, True):
            setting = "qlora (4-bit base)" if quantize else "lora (fp32 base)"
            plains, ours_all = [], []
            for i in range(args.repeats):
                print(f"== {setting}: plain mlx-lm ({i + 1}/{args.repeats})", flush=True)
                plains.append(plain_mlx_lm(model_path, rows, args, quantize, tmp))
                print(f"== {setting}: afinar ({i + 1}/{args.repeats})", flush=True)
                shutil.rmtree(tmp / f"afinar-{'q' if quantize else 'l'}", ignore_errors=True)
                ours_all.append(afinar_mlx(model, train_file, args, quantize, tmp))
            plain, ours = median_run(plains), median_run(ours_all)
            results.append({"setting": setting, "plain_mlx_lm": plain, "afinar": ours,
                            "ratio_tokens_per_s": round(ours["tokens_per_s"] / plain["tokens_per_s"], 2),
                            "all_tokens_per_s": {"plain_mlx_lm": [r["tokens_per_s"] for r in plains],
                                                 "afinar": [r["tokens_per_s"] for r in ours_all]}})

    print(f"\n{'setting':<22}{'mlx-lm tok/s':>14}{'afinar tok/s':>14}{'ratio':>8}{'mlx-lm MB':>11}{'afinar MB':>11}")
    for r in results:
        print(f"{r['setting']:<22}{r['plain_mlx_lm']['tokens_per_s']:>14,.1f}{r['afinar']['tokens_per_s']:>14,.1f}"
              f"{r['ratio_tokens_per_s']:>7.2f}x{r['plain_mlx_lm']['peak_memory_mb']:>11,.0f}{r['afinar']['peak_memory_mb']:>11,.0f}")
    out = args.output or REPO / "benchmarks" / "results" / f"mlx-vs-mlx-lm-{'mac' if on_mac else 'linux-cpu'}.json"
    from afinar import atomic

    atomic.write_json(out, {
        "benchmark": "afinar MLX training vs plain mlx-lm LoRA training (same model, data, settings, one process)",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "examples": len(rows), "steps": args.steps, "batch_size": args.batch_size,
        "repeats": args.repeats,
        "lora": {"rank": args.rank, "alpha": args.alpha, "targets": args.targets}, "learning_rate": args.lr,
        "measure": "real (unpadded) tokens per second of training-step time",
        "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "device": str(mx.default_device()), "load_average": os.getloadavg(),
                 "fp32_matmul_1024_gflops": gflops},
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "python": platform.python_version()},
        "results": results,
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
