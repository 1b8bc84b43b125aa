"""QLoRA training speed on a random Mistral-7B-shaped model: the plain Hugging Face loop and afinar's, one process.

The plain loop is the usual recipe: PEFT LoRA on a bitsandbytes NF4 (double quant) base, bf16
compute, SDPA, random batches padded to the longest, the model's own loss on full logits.
afinar's rows go through TorchTrainer (the same forward_backward / optimizer_step as `afinar
train`) with the micro-batches `afinar.train` builds from the preset's settings. Every row uses
the same random model (same seed), the same examples and the same LoRA initialisation.

    python benchmarks/train_throughput.py --tokenizer .bench/tok --out benchmarks/results/2026-11-29-h200.json
    python benchmarks/train_throughput.py --shape tiny --steps 2 --warmup 1    # CPU smoke run

tokens/s counts real (unpadded) tokens; MFU = tokens/s x 4 x 7.24e9 FLOP / 790 TFLOP/s (the
bf16 rate measured on the lent H200), 4 x params per token for LoRA: forward plus input gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import random_7b as R  # noqa: E402

FLOP_PER_TOKEN = 4 * 7.24e9
PEAK_FLOPS = 790e12


def plain_hf(base, tok, examples, batch: int, checkpointing: bool, steps: int, warmup: int, check) -> dict:
    """The plain HF loop: random order, pad to longest, model(labels=...) loss, AdamW."""
    import random

    from peft import LoraConfig, get_peft_model

    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = tok.eos_token_id
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    batches = [[examples[i] for i in order[j:j + batch]] for j in range(0, len(order) - batch + 1, batch)]
    checked = check(lambda b: _plain_loss(model, b, pad), model)

    def step(mb):
        ids, attn, labels = _padded(mb, pad)
        model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    row = _time(step, batches, steps, warmup)
    row.update(batch=batch, gradient_checkpointing=checkpointing, lora_dropout=0.05, check=checked)
    return row


def _padded(mb, pad):
    width = max(len(e.input_ids) for e in mb)
    ids = torch.full((len(mb), width), pad)
    attn = torch.zeros((len(mb), width), dtype=torch.long)
    labels = torch.full((len(mb), width), -100)
    for r, e in enumerate(mb):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        attn[r, :n] = 1
        labels[r, :n] = torch.where(torch.tensor(e.loss_mask), torch.tensor(e.input_ids), -100)
    dev = R.device()
    return ids.to(dev), attn.to(dev), labels.to(dev)


def _plain_loss(model, mb, pad):
    ids, attn, labels = _padded(mb, pad)
    n = int((labels[:, 1:] != -100).sum())
    return model(input_ids=ids, attention_mask=attn, labels=labels).loss * n, n


def unfuse_all(model) -> None:
    """Plain PEFT + transformers modules again: no fused LoRA layers, RMSNorm or SwiGLU."""
    from afinar.backends import torch_fast, torch_lora_fused

    torch_lora_fused.unfuse_lora(model)
    torch_fast.unfuse(model)


def fuse_all(model) -> None:
    """What the trainer applies on CUDA with train.fast_paths=auto, in its order (torch_train.TorchTrainer.attach)."""
    from afinar.backends import torch_fast, torch_lora_fused

    torch_fast.fuse_pointwise(model)
    torch_lora_fused.fuse_lora(model)


def afinar_way(base, tok, examples, overrides: list[str], preset: str, steps: int, warmup: int, check,
               levers: str = "auto", profile: str | None = None) -> dict:
    """afinar's step (the training backend's forward_backward + optimizer_step) with `train.fast_paths=levers`."""
    from afinar.backends.torch_train import TorchTrainer
    from afinar.config import load_config, preset_path
    from afinar.schedule import Prepared, micro_batches

    cfg = load_config(preset_path(preset), [*overrides, *R.dtype_overrides(), f"train.fast_paths={levers}"])
    backend = TorchTrainer(cfg)
    backend.attach(base, tok)
    checked = check(backend.loss_sum, backend.model)
    if {"fused_norms", "fused_lora"} & backend.levers:  # fused against eager on this model; eager twice: the noise floor
        unfuse_all(backend.model)
        eager = [check(backend.loss_sum, backend.model) for _ in range(2)]
        fuse_all(backend.model)
        if "fused_lora" not in backend.levers:
            from afinar.backends.torch_lora_fused import unfuse_lora

            unfuse_lora(backend.model)
        checked["fused_vs_eager"] = compare_checks(eager[0], checked)
        checked["eager_vs_eager"] = compare_checks(eager[0], eager[1])
    stream = micro_batches(Prepared(examples, [], 0, 0), cfg)
    windows = [[mb for _, mb in (next(stream) for _ in range(cfg.train.grad_accumulation))] for _ in range(steps + warmup + 1)]

    def step(window):
        n = sum(e.n_targets for mb in window for e in mb)
        for mb in window:
            backend.forward_backward(mb, 1.0 / n)
        backend.optimizer_step(cfg.train.learning_rate)

    backend.model.train()
    row = _time(step, windows, steps, warmup, nested=True)
    if profile:
        _profile(step, windows[-1], profile)
    t = cfg.train
    row.update(preset=preset, overrides=overrides, batch=t.batch_size, batch_tokens=t.batch_tokens,
               grad_accumulation=t.grad_accumulation, gradient_checkpointing=t.gradient_checkpointing,
               max_seq_length=t.max_seq_length, lora_dropout=cfg.lora.dropout, fast_paths=sorted(backend.levers),
               check=checked)
    return row


def _profile(step, window, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(window)
        R.sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=80))


def _time(step, batches, steps: int, warmup: int, nested: bool = False) -> dict:
    for b in batches[:warmup]:
        step(b)
    R.sync()
    timed = batches[warmup:warmup + steps]
    flat = [e for b in timed for e in ([x for mb in b for x in mb] if nested else b)]
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    R.sync()
    dt = time.perf_counter() - t0
    tokens = sum(len(e.input_ids) for e in flat)
    padded = sum(len(mb) * max(len(e.input_ids) for e in mb) for b in timed for mb in (b if nested else [b]))
    rate = tokens / dt
    return {"steps": len(timed), "examples_per_step": round(len(flat) / len(timed), 1),
            "tokens_per_step": round(tokens / len(timed)), "padding_fraction": round(1 - tokens / padded, 3),
            "seconds": round(dt, 2), "tokens_per_s": round(rate), "mfu": round(rate * FLOP_PER_TOKEN / PEAK_FLOPS, 3),
            "peak_gib": R.peak_gib()}


def make_check(batch):
    """Loss sum and LoRA-B gradients of one fixed batch in eval mode (no dropout): the paths must agree."""
    def check(loss_fn, model):
        model.eval()
        loss, n = loss_fn(batch)
        (loss / n).backward()
        grads = {name: p.grad.float().flatten().cpu() for name, p in model.named_parameters()
                 if p.grad is not None and "lora_B" in name and (".layers.0." in name or ".layers.31." in name)}
        for p in model.parameters():
            p.grad = None
        R.reset_peak()
        return {"loss_sum": float(loss), "targets": n, "grads": grads}
    return check


def compare_checks(ref: dict, other: dict) -> dict:
    rel = {}
    for name, g in ref["grads"].items():
        key = name.split("base_model.model.")[-1]
        match = next((v for k, v in other["grads"].items() if k.endswith(key)), None)
        if match is not None:
            rel[key] = float((match - g).norm() / g.norm().clamp_min(1e-30))
    return {"loss_rel_diff": abs(other["loss_sum"] - ref["loss_sum"]) / abs(ref["loss_sum"]),
            "grad_rel_diff_max": max(rel.values()) if rel else None, "grads_compared": len(rel),
            "grad_rel_diff": {k: round(v, 5) for k, v in rel.items()}}


def check_fused(tok, examples, shape: str, bf16: bool = True) -> dict:
    """Fused (compiled RMSNorm/SwiGLU/rotary, fused LoRA layers) against eager PEFT on the GPU: loss and LoRA-B gradients.

    fp32 on 2 layers of the 7B shape (no quantization): the kernels must compute the same
    function. bf16 on the full NF4 model, with Inductor told to round intermediates to bf16
    where eager does (`emulate_precision_casts`): isolates rounding from arithmetic.
    """
    from transformers import MistralConfig, MistralForCausalLM

    from afinar.backends.torch_train import TorchTrainer
    from afinar.config import load_config, preset_path
    from afinar.synthetic import SHAPES

    check = make_check(examples[:8])

    def compare(backend):
        fused = check(backend.loss_sum, backend.model)
        unfuse_all(backend.model)
        eager = [check(backend.loss_sum, backend.model) for _ in range(2)]
        return {"fused_vs_eager": compare_checks(eager[0], fused), "eager_vs_eager": compare_checks(eager[0], eager[1])}

    out = {}
    config = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           tie_word_embeddings=False, **{**SHAPES[shape], "num_hidden_layers": 2})
    fp32 = ["model.quantization=none", "model.compute_dtype=float32"]
    all_linear = ["lora.rank=16", "lora.alpha=32",
                  "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    # q/k/v as the presets train; then every linear layer (the fused MLP too) with non-zero B, so
    # every term of the fused gradients counts.
    for name, overrides in (("fp32_2_layers", fp32), ("fp32_2_layers_all_linear", fp32 + all_linear)):
        torch.manual_seed(0)
        with torch.device(R.device()):
            small = MistralForCausalLM._from_config(config, dtype=torch.float32)
        backend = TorchTrainer(load_config(preset_path("cuda-80gb"), overrides))
        backend.attach(small, tok)
        if "all_linear" in name:
            with torch.no_grad():
                for param_name, p in backend.model.named_parameters():
                    if "lora_B" in param_name:
                        p.normal_(0, 0.01)
        out[name] = compare(backend)
        del backend, small
        R.free_gpu()
    if not bf16:
        return out
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True
    torch._dynamo.reset()
    backend = TorchTrainer(load_config(preset_path("cuda-80gb")))
    backend.attach(R.build_base(shape, tok), tok)
    out["bf16_emulate_precision_casts"] = compare(backend)
    for row in out.values():
        for c in row.values():
            c.pop("grad_rel_diff", None)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokenizer", default=None, help="saved Mistral tokenizer folder (default: built with mistral-common)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated row names to run")
    p.add_argument("--profile", default=None, help="write the top CUDA kernels of one afinar step here")
    p.add_argument("--check-fused", action="store_true", help="only compare fused and eager ops (fp32 and bf16)")
    p.add_argument("--fp32-only", action="store_true", help="with --check-fused: skip the bf16 full-model check")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = R.environment(sys.argv)
    tok = R.tokenizer(args.tokenizer)
    examples = R.chat_examples(tok, args.examples)
    lengths = sorted(len(e.input_ids) for e in examples)
    if args.check_fused:
        result = check_fused(tok, examples, args.shape, bf16=not args.fp32_only)
        print(result)
        if args.out:
            R.merge_results(Path(args.out), "fused_ops_check", {"shape": args.shape, **result}, env)
        return
    check_batch = examples[:8]
    check = make_check(check_batch)
    auto = "cuda-80gb"
    st, wu = args.steps, args.warmup
    rows = {
        "plain_hf_batch16": lambda b: plain_hf(b, tok, examples, 16, False, st, wu, check),
        "plain_hf_batch2_ckpt": lambda b: plain_hf(b, tok, examples, 2, True, st, wu, check),
        "afinar_auto": lambda b: afinar_way(b, tok, examples, [], auto, st, wu, check, profile=args.profile),
        "afinar_auto_dropout0.05": lambda b: afinar_way(b, tok, examples, ["lora.dropout=0.05"], auto, st, wu, check),
        "afinar_auto_unfused": lambda b: afinar_way(b, tok, examples, [], auto, st, wu, check, levers="[autocast]"),
        "afinar_auto_no_fused_lora": lambda b: afinar_way(b, tok, examples, [], auto, st, wu, check, levers="[autocast,fused_norms]"),
        "afinar_auto_no_autocast": lambda b: afinar_way(b, tok, examples, [], auto, st, wu, check, levers="[fused_norms,fused_lora]"),
        "afinar_budget6144": lambda b: afinar_way(b, tok, examples, ["train.batch_tokens=6144"], auto, st, wu, check),
        "afinar_budget12288": lambda b: afinar_way(b, tok, examples, ["train.batch_tokens=12288"], auto, st, wu, check),
        "afinar_batch16": lambda b: afinar_way(b, tok, examples, ["train.batch_tokens=0", "train.batch_size=16"], auto,
                                               st, wu, check),
        "afinar_small_recipe": lambda b: afinar_way(b, tok, examples, [], "mac-16gb", st, wu, check),
    }
    wanted = [r for r in args.only.split(",") if r] or list(rows)
    results = {}
    for name in wanted:
        R.free_gpu()
        base = R.build_base(args.shape, tok)
        R.reset_peak()
        t0 = time.perf_counter()
        results[name] = rows[name](base)
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {results[name]['tokens_per_s']} tok/s, peak {results[name]['peak_gib']} GiB", flush=True)
        del base
    ref = results.get("plain_hf_batch16", {}).get("check")
    for name, row in results.items():
        extra = {k: row["check"].pop(k) for k in ("fused_vs_eager", "eager_vs_eager") if k in row["check"]}
        row["check"] = compare_checks(ref, row["check"]) if ref and name != "plain_hf_batch16" else \
            {"loss_sum": row["check"]["loss_sum"], "targets": row["check"]["targets"]}
        row["check"].update(extra)
    best_plain = max((r["tokens_per_s"] for n, r in results.items() if n.startswith("plain")), default=None)
    print(f"\n{'row':24} {'tok/s':>8} {'x best plain':>12} {'peak GiB':>9} {'MFU':>6} {'pad':>6} {'tok/step':>9}")
    for name, r in results.items():
        ratio = r["tokens_per_s"] / best_plain if best_plain else float("nan")
        r["vs_best_plain"] = round(ratio, 2)
        print(f"{name:24} {r['tokens_per_s']:>8} {ratio:>12.2f} {str(r['peak_gib']):>9} {r['mfu']:>6} "
              f"{r['padding_fraction']:>6} {r['tokens_per_step']:>9}")
    section = {"shape": args.shape, "data": {"examples": len(examples), "min_tokens": lengths[0],
               "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1]},
               "flop_per_token": FLOP_PER_TOKEN, "peak_flops": PEAK_FLOPS, "rows": results}
    if args.out:
        R.merge_results(Path(args.out), "train", section, env)


if __name__ == "__main__":
    main()
