"""Decode speed of a 7B-shaped QLoRA run: the plain Hugging Face way and afinar's, one process.

Plain rows: `model.generate` (greedy, left padding) on the NF4 base with the adapter kept apart
(what a QLoRA run loads by default elsewhere), and on bf16 weights with the adapter merged.
afinar rows: `TorchAnswerer.attach` (dequantize + merge on a GPU with room) and `TorchAnswerer.generate`,
which goes through the serving engine: on CUDA its static-KV CUDA-graph runner (afinar/engine/torch_runner.py
over afinar/backends/fast_decode.py). Beside them transformers' own fastest plain path on the same
merged weights: static KV cache + `torch.compile(model.forward, mode="reduce-overhead")`, as its
"Optimizing inference" guide sets it up (CUDA only; `--no-static` skips it). Same random model,
adapter and prompts everywhere; greedy tokens of afinar's rows are compared with the plain rows.
Every row: one warm-up call, then the median of 3 timed calls.

    python benchmarks/generate_throughput.py --tokenizer .bench/tok --out benchmarks/results/2026-11-29-h200.json
    python benchmarks/generate_throughput.py --shape tiny --new-tokens 8     # CPU smoke run

tokens/s = generated tokens / wall time of the whole generate call (prefill included).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import random_7b as R  # noqa: E402

REPEATS = 3


def prompts_for(tok, n: int, seed: int = 1) -> list[list[int]]:
    from afinar import data

    rng = random.Random(seed)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("▁") and w[1:].isalpha() and len(w) > 3)
    return [data.prompt_ids(tok, " ".join(rng.choices(words, k=rng.randint(8, 40))) + "?") for _ in range(n)]


@torch.inference_mode()
def hf_generate(model, tok, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' generate exactly as TorchAnswerer's plain path calls it (greedy, left padding)."""
    eos = tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=model.device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=eos, eos_token_id=eos)
    return [row[: row.index(eos)] if eos in row else row for row in out[:, width:].tolist()]


def timed(fn, prompts, repeat: int = REPEATS) -> tuple[dict, list[list[int]]]:
    """Every row alike: the median wall time of `repeat` generate calls (after the row's own warm-up call)."""
    R.sync()
    times, outputs = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        outputs = fn(prompts)
        R.sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = sum(len(o) for o in outputs)
    return {"batch": len(prompts), "generated_tokens": tokens, "seconds": round(dt, 3), "repeats": repeat,
            "tokens_per_s": round(tokens / dt, 1), "per_stream_tokens_per_s": round(tokens / len(prompts) / dt, 1),
            "peak_gib": R.peak_gib()}, outputs


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    prefix = []
    for a, b in zip(ours, ref):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k)
    return {"rows_equal": sum(a == b for a, b in zip(ours, ref)), "rows": len(ref),
            "mean_common_prefix": round(sum(prefix) / len(prefix), 1), "min_common_prefix": min(prefix),
            "mean_length": round(sum(len(r) for r in ref) / len(ref), 1)}


@torch.inference_mode()
def near_ties(model, prompts, ref: list[list[int]], ours: list[list[int]]) -> dict:
    """Where greedy paths part, was it a near-tie? Top-1 minus top-2 logit of `ref`'s own next-token
    distribution (teacher-forced, one forward per row) at the first differing token, against all its tokens."""
    at_split, everywhere = [], []
    for p, r, o in zip(prompts, ref, ours):
        ids = torch.tensor([p + r], device=model.device)
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].float()
        top = logits.topk(2, dim=-1).values
        gap = (top[:, 0] - top[:, 1]).tolist()
        everywhere += gap
        k = next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), None)
        if k is not None:
            at_split.append(round(gap[k], 4))
    everywhere.sort()
    return {"median_top2_gap": round(everywhere[len(everywhere) // 2], 4),
            "top2_gap_at_first_difference": sorted(at_split)}


def random_adapter(base, folder: Path, scale: float) -> None:
    """A LoRA adapter (r=8 on q/k/v, as the presets train) with random, non-zero B: it changes the answers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.save_pretrained(str(folder))
    model.unload()


def plain_rows(label: str, model, tok, prompts, new_tokens: int, rows: dict) -> list[list[int]]:
    """transformers' generate at batch 1 and len(prompts), each after a short warm-up call (kernels, cuBLAS)."""
    for batch in (1, len(prompts)):
        hf_generate(model, tok, prompts[:batch], 8)
        R.reset_peak()
        rows[f"{label}_batch{batch}"], out = timed(lambda ps: hf_generate(model, tok, ps, new_tokens), prompts[:batch])
    return out


def static_compiled_rows(model, tok, prompts, new_tokens: int, rows: dict) -> list[list[int]] | None:
    """transformers' own fastest plain decode (its "Optimizing inference" guide): a static KV cache
    (`cache_implementation="static"`) and `torch.compile(model.forward, mode="reduce-overhead",
    fullgraph=True)`, on the same merged bf16 weights. Rows at batch 1 and at len(prompts); the
    first calls compile (reported as first_call_s). The model gets its plain forward back after."""
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    out = None
    try:
        gen = lambda ps: hf_generate(model, tok, ps, new_tokens)  # noqa: E731
        for batch in (1, len(prompts)):
            t0 = time.perf_counter()
            gen(prompts[:batch])  # compiles: prefill and decode shapes, CUDA graphs
            first = round(time.perf_counter() - t0, 2)
            R.reset_peak()
            row, out = timed(gen, prompts[:batch])
            rows[f"plain_bf16_static_compiled_batch{batch}"] = {**row, "first_call_s": first}
    except Exception as e:  # a compile failure costs this row only
        rows["plain_bf16_static_compiled"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        out = None
    finally:
        del model.forward
        model.generation_config.cache_implementation = None
        R.free_gpu()
    return out


def main(argv=None) -> None:
    from peft import PeftModel

    from afinar.backends.torch_answer import TorchAnswerer
    from afinar.config import load_config, preset_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--adapter-scale", type=float, default=0.02)
    p.add_argument("--no-static", dest="static", action="store_false",
                   help="skip transformers' static-cache + torch.compile rows (CUDA only; minutes of compiling)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = R.environment(sys.argv)
    tok = R.tokenizer(args.tokenizer)
    n = args.new_tokens
    many = prompts_for(tok, args.concurrent)
    rows, outputs = {}, {}
    base = R.build_base(args.shape, tok)
    folder = Path(tempfile.mkdtemp(prefix="afinar-adapter-"))
    random_adapter(base, folder, args.adapter_scale)

    # Plain: NF4 base + adapter kept apart, transformers' generate.
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    outputs["plain_4bit"] = plain_rows("plain_4bit_adapter", model, tok, many, n, rows)
    base = model.unload()
    del model
    R.free_gpu()

    # afinar: what `afinar serve` / `afinar ask` load: dequantize + merge when the GPU has room.
    cfg = load_config(preset_path("cuda-80gb"), [f"model.base={args.shape}", *R.dtype_overrides()])
    backend = TorchAnswerer(cfg)
    t0 = time.perf_counter()
    backend.attach(base, tok, folder)
    R.sync()
    load_s = round(time.perf_counter() - t0, 2)
    del base
    R.free_gpu()
    merged = backend.model
    merged_name = type(merged.model.layers[0].self_attn.q_proj).__name__

    # Plain: the same merged bf16 weights through transformers' generate.
    outputs["plain_bf16"] = plain_rows("plain_bf16_merged", merged, tok, many, n, rows)

    # afinar's generate (the CUDA-graph decoder on CUDA).
    fast = lambda ps: backend.generate(ps, n)  # noqa: E731
    for batch in sorted({1, min(8, len(many)), len(many)}):
        t0 = time.perf_counter()
        fast(many[:batch])  # first call of a shape captures its graph
        first = round(time.perf_counter() - t0, 2)
        R.reset_peak()
        row, out = timed(fast, many[:batch])
        row["first_call_s"] = first
        rows[f"afinar_batch{batch}"] = row
        outputs[f"afinar_batch{batch}"] = out
    ours = outputs[f"afinar_batch{len(many)}"]
    checks = {"vs_plain_4bit_adapter": agreement(ours, outputs["plain_4bit"]),
              "vs_plain_bf16_merged": agreement(ours, outputs["plain_bf16"]),
              "batch1_vs_batch32_row0": ours[0] == outputs["afinar_batch1"][0],
              "near_ties_vs_plain_bf16_merged": near_ties(merged, many, outputs["plain_bf16"], ours)}
    if args.static and torch.cuda.is_available():
        outputs["plain_bf16_static"] = static_compiled_rows(merged, tok, many, n, rows)
        if outputs["plain_bf16_static"] is not None:
            checks["plain_static_compiled_vs_plain_bf16_merged"] = agreement(outputs["plain_bf16_static"], outputs["plain_bf16"])
    # The same comparison in fp32, where bf16 rounding cannot flip near-ties: exact equality expected.
    from afinar.backends import fast_decode

    R.free_gpu()
    merged.float()
    short = max(8, n // 4)
    plain32 = hf_generate(merged, tok, many, short)
    ours32 = fast_decode.StaticDecoder(merged).generate(many, short, tok.eos_token_id)
    checks["fp32_vs_plain_merged"] = agreement(ours32, plain32)
    print(f"\n{'row':30} {'tok/s':>9} {'per stream':>10} {'peak GiB':>9}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:30} {r['error']}")
            continue
        print(f"{name:30} {r['tokens_per_s']:>9} {r['per_stream_tokens_per_s']:>10} {str(r['peak_gib']):>9}")
    print("greedy agreement:", checks)
    section = {"shape": args.shape, "new_tokens": n, "prompts": len(many),
               "prompt_tokens": [min(map(len, many)), max(map(len, many))], "adapter_scale": args.adapter_scale,
               "afinar_load_s": load_s, "afinar_layers": merged_name, "engine_runner": type(backend._engine.runner).__name__,
               "rows": rows, "greedy_agreement": checks}
    if args.out:
        R.merge_results(Path(args.out), "generate", section, env)


if __name__ == "__main__":
    main()
