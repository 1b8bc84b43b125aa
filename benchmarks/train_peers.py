"""QLoRA training speed beside the peers: plain PEFT + bitsandbytes, Unsloth and afinar, each row in its own process.

Same random Mistral-7B-shaped model everywhere (benchmarks/random_7b.py, same seed: NF4 double
quant built in GPU memory; for Unsloth the same weights saved unquantized and quantized at load),
the same chat examples, LoRA setups and LoRA init seed, bf16. Rows:

  plain16, plain32     PEFT LoRA on the NF4 base at its best practice: bf16 autocast, dropout 0, no
                       checkpointing, batches grouped by length as HF Trainer's `group_by_length`
                       builds them (its LengthGroupedSampler: transformers' get_length_grouped_indices),
                       attention mask, the model's own loss, fused AdamW, gradient clipping at 1.0
  unsloth16, unsloth32 Unsloth's FastLanguageModel (imported before transformers, in its own process),
                       the same batches, the same step
  afinar16             afinar's own step (the training backend's forward_backward + optimizer_step) on the same batches
  afinar_auto          afinar's `--preset auto` on this GPU (cuda-80gb: 8,192-token micro-batches)
  afinar16_nofuse, afinar_auto_nofuse   the same without the fused LoRA layers (that lever alone)

LoRA setups: qkv (r 8, alpha 16, q/k/v) and all (r 16, alpha 32, every linear layer).
Every row: the same warm-up steps, then the median tokens/s of --windows windows of --steps steps,
CUDA-synchronised; tokens/s counts real (unpadded) tokens; peak = torch.cuda.max_memory_allocated,
reset after the model build and the warm-up; the untrained loss of one fixed batch (mean over
answer tokens; every stack must agree, the table prints the spread).

    python benchmarks/train_peers.py --tokenizer .bench/tok --out benchmarks/results/peers.json
    python benchmarks/train_peers.py --shape tiny --steps 2          # CPU smoke run (no Unsloth)

One process per system runs its rows one after the other (each row builds its own model and resets the
peak after its warm-up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETUPS = {
    "qkv": {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj"]},
    "all": {"rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
ROWS = ["plain16", "plain32", "unsloth16", "unsloth32", "afinar16", "afinar_auto"]
OPTIONAL_ROWS = ["afinar16_nofuse", "afinar_auto_nofuse"]
LR = 2e-4
FLOP_PER_TOKEN = 4 * 7.24e9  # LoRA on frozen weights: forward + input gradients (benchmarks/train_throughput.py)
PEAK_FLOPS = 790e12  # bf16 matmul rate measured on the lent H200


def parse_row(row: str) -> tuple[str, int | None, bool]:
    """'afinar16_nofuse' -> ('afinar', 16, False); 'afinar_auto' -> ('afinar', None, True)."""
    name, fuse = row.removesuffix("_nofuse"), not row.endswith("_nofuse")
    if name.endswith("_auto"):
        return name.removesuffix("_auto"), None, fuse
    system = name.rstrip("0123456789")
    return system, int(name[len(system):]), fuse


# ------------------------------------------------------------ inside a row's process


def grouped_batches(examples, batch: int, needed: int) -> list[list]:
    """Batches of `batch` as HF Trainer's group_by_length orders them (epoch e seeded with e), full ones only."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [len(e.input_ids) for e in examples]
    out, epoch = [], 0
    while len(out) < needed:
        order = get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(epoch))
        out += [[examples[i] for i in order[j:j + batch]] for j in range(0, len(order) - batch + 1, batch)]
        epoch += 1
    return out[:needed]


def padded(batch, pad: int, device):
    """Right-padded input ids, attention mask and labels (-100 outside the answers), as a collator builds them."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for r, e in enumerate(batch):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        attn[r, :n] = 1
        labels[r, :n] = torch.where(torch.tensor(e.loss_mask), torch.tensor(e.input_ids), -100)
    return ids.to(device), attn.to(device), labels.to(device)


def timed(step, batches, warmup: int, windows: int, steps: int) -> dict:
    """Warm-up steps, then the median tokens/s of `windows` windows of `steps` steps (one batch a step)."""
    from benchmarks import random_7b as R

    for b in batches[:warmup]:
        step(b)
    R.reset_peak()
    rates, tokens, padded_tokens = [], 0, 0
    for w in range(windows):
        window = batches[warmup + w * steps: warmup + (w + 1) * steps]
        R.sync()
        t0 = time.perf_counter()
        for b in window:
            step(b)
        R.sync()
        real = sum(len(e.input_ids) for b in window for e in b)
        rates.append(real / (time.perf_counter() - t0))
        tokens += real
        padded_tokens += sum(len(b) * max(len(e.input_ids) for e in b) for b in window)
    rate = statistics.median(rates)
    return {"tokens_per_s": round(rate), "window_tokens_per_s": [round(r) for r in rates],
            "mfu": round(rate * FLOP_PER_TOKEN / PEAK_FLOPS, 3), "peak_gib": R.peak_gib(),
            "padding_fraction": round(1 - tokens / padded_tokens, 3), "timed_steps": windows * steps,
            "warmup_steps": warmup, "examples_per_step": round(sum(len(b) for b in batches[warmup:]) / (windows * steps), 1),
            "tokens_per_step": round(tokens / (windows * steps))}


def hf_style_row(model, tok, batches, fixed, timing) -> dict:
    """The HF Trainer step on a PEFT model (plain or Unsloth's): bf16 autocast, model(labels) loss, clip, fused AdamW."""
    import torch

    from benchmarks import random_7b as R

    device, cuda = R.device(), torch.cuda.is_available()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=cuda)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()  # dropout is 0: the same function as eval mode, and Unsloth's training forward
    with torch.no_grad(), autocast:
        ids, attn, labels = padded(fixed, pad, device)
        loss = float(model(input_ids=ids, attention_mask=attn, labels=labels).loss)

    def step(batch):
        ids, attn, labels = padded(batch, pad, device)
        with autocast:
            out = model(input_ids=ids, attention_mask=attn, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"untrained_loss": loss, **timed(step, batches, *timing)}


def plain_row(shape, tok, examples, setup, batch, timing) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from benchmarks import random_7b as R

    base = R.build_base(shape, tok)
    torch.manual_seed(0)  # LoRA init
    model = get_peft_model(base, LoraConfig(r=setup["rank"], lora_alpha=setup["alpha"], lora_dropout=0.0,
                                            target_modules=setup["targets"], task_type="CAUSAL_LM"))
    return hf_style_row(model, tok, grouped_batches(examples, batch, timing[0] + timing[1] * timing[2]),
                        examples[:8], timing)


def unsloth_row(folder, tok, examples, setup, batch, timing) -> dict:
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=512, dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=setup["rank"], lora_alpha=setup["alpha"], lora_dropout=0.0,
                                             target_modules=setup["targets"], bias="none",
                                             use_gradient_checkpointing=False, random_state=0)
    FastLanguageModel.for_training(model)
    return hf_style_row(model, tok, grouped_batches(examples, batch, timing[0] + timing[1] * timing[2]),
                        examples[:8], timing)


def afinar_row(shape, tok, examples, setup, batch, fuse: bool, timing) -> dict:
    """afinar's training step: the training backend's attach + forward_backward + optimizer_step, what
    `afinar train` runs (the public names of afinar.backends.torch_train and afinar.schedule).

    `batch`: HF Trainer's grouped batches of that size (as the peers get them); None: `--preset auto`
    on this GPU (cuda-80gb) with afinar's own token-budget micro-batches. `fuse=False` turns the
    fused LoRA layers off (`train.fast_paths=[autocast,fused_norms]`) to measure that lever alone.
    """
    from afinar.backends.torch_train import TorchTrainer
    from afinar.config import load_config, preset_path
    from afinar.schedule import Prepared, micro_batches
    from benchmarks import random_7b as R

    overrides = [f"lora.rank={setup['rank']}", f"lora.alpha={setup['alpha']}", "lora.dropout=0",
                 f"lora.target_modules=[{','.join(setup['targets'])}]", f"train.learning_rate={LR}",
                 "train.fast_paths=" + ("auto" if fuse else "[autocast,fused_norms]")]
    if batch:
        overrides += ["train.batch_tokens=0", f"train.batch_size={batch}"]
    cfg = load_config(preset_path("cuda-80gb"), overrides + R.dtype_overrides())
    backend = TorchTrainer(cfg)
    backend.attach(R.build_base(shape, tok), tok)
    fused = sum(getattr(m.__dict__.get("forward"), "__module__", None) == "afinar.backends.torch_lora_fused"
                for m in backend.model.modules())
    needed = timing[0] + timing[1] * timing[2]
    if batch:
        batches = grouped_batches(examples, batch, needed)
    else:
        stream = micro_batches(Prepared(examples, [], 0, 0), cfg)
        batches = [next(stream)[1] for _ in range(needed)]
    loss, n = backend.eval_loss(examples[:8])

    def step(mb):
        backend.forward_backward(mb, 1.0 / sum(e.n_targets for e in mb))
        backend.optimizer_step(cfg.train.learning_rate)

    backend.model.train()
    return {"untrained_loss": loss / n, "fused_lora_modules": fused, "batch_tokens": cfg.train.batch_tokens,
            **timed(step, batches, *timing)}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "unsloth", "unsloth_zoo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def child(args) -> None:
    """Run `args.child` (comma-separated rows, or 'save') for each of `args.setup`; results to `args.result`."""
    rows = args.child.split(",")
    if any(r.startswith("unsloth") for r in rows):
        import unsloth  # noqa: F401  (Unsloth patches transformers: it must come first)
    import logging

    import torch

    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("afinar").setLevel(logging.DEBUG)  # fuse_lora says what it leaves alone, and why

    from benchmarks import random_7b as R

    tok = R.tokenizer(args.tokenizer)
    if rows == ["save"]:
        R.save_bf16(args.shape, tok, Path(args.folder))
        return
    tiny = args.shape == "tiny"
    examples = R.chat_examples(tok, args.examples or (400 if tiny else 1200), longest=40 if tiny else 330)
    timing = (args.warmup, args.windows, args.steps)
    out = {}
    for name, row in ((name, row) for name in args.setup.split(",") for row in rows):
        system, batch, fuse = parse_row(row)
        setup = SETUPS[name]
        R.free_gpu()
        t0 = time.perf_counter()
        try:
            if system == "plain":
                result = plain_row(args.shape, tok, examples, setup, batch, timing)
            elif system == "unsloth":
                result = unsloth_row(args.folder, tok, examples, setup, batch, timing)
            else:
                result = afinar_row(args.shape, tok, examples, setup, batch, fuse, timing)
        except Exception as e:  # one failing stack must not cost the others their rows
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        result.update(system=system, batch=batch or "auto", wall_s=round(time.perf_counter() - t0, 1),
                      versions=versions(), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        out.setdefault(name, {})[row] = result
        print(f"[{name}] {row}: {result.get('tokens_per_s', result.get('error'))} tok/s, "
              f"peak {result.get('peak_gib')} GiB", flush=True)
    Path(args.result).write_text(json.dumps(out))


# ------------------------------------------------------------ the driver


def _spawn(args, setups: list[str], rows: list[str], extra_env: dict | None = None) -> dict:
    """{setup: {row: result}} from one child process running `rows` for each of `setups`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(rows), "--setup", ",".join(setups),
               "--result", str(result), "--shape", args.shape, "--tokenizer", args.tokenizer, "--folder", args.folder,
               "--warmup", str(args.warmup), "--windows", str(args.windows), "--steps", str(args.steps)]
        if args.examples:
            cmd += ["--examples", str(args.examples)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        code = subprocess.run(cmd, env=env, cwd=REPO).returncode
        if result.is_file():
            return json.loads(result.read_text())
        return {s: {r: {"error": f"process exited with code {code} before writing results"} for r in rows} for s in setups}


UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_cache"}


def summarise(rows: dict) -> dict:
    """Ratios the issue asks for: afinar / Unsloth at batch 16, best against best, every row against the plain best."""
    best = {}
    for name, r in rows.items():
        if "tokens_per_s" in r:
            system = parse_row(name)[0]
            if r["tokens_per_s"] > best.get(system, ("", 0))[1]:
                best[system] = (name, r["tokens_per_s"])
    rate = lambda n: rows.get(n, {}).get("tokens_per_s")  # noqa: E731
    ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
    plain_best = best.get("plain", (None, None))[1]
    for r in rows.values():
        r["vs_plain_best"] = ratio(r.get("tokens_per_s"), plain_best)
    losses = [r["untrained_loss"] for r in rows.values() if "untrained_loss" in r]
    return {
        "best": {s: {"row": n, "tokens_per_s": t} for s, (n, t) in best.items()},
        "afinar16_vs_unsloth16": ratio(rate("afinar16"), rate("unsloth16")),
        "afinar_best_vs_unsloth_best": ratio(best.get("afinar", (0, 0))[1], best.get("unsloth", (0, 0))[1]),
        "afinar_best_vs_plain_best": ratio(best.get("afinar", (0, 0))[1], plain_best),
        "untrained_loss_spread": round((max(losses) - min(losses)) / statistics.mean(losses), 5) if losses else None,
    }


def print_table(setup: str, rows: dict, summary: dict) -> None:
    print(f"\nLoRA setup {setup}: {SETUPS[setup]}")
    print(f"{'row':20} {'tok/s':>8} {'x plain best':>12} {'peak GiB':>9} {'pad':>6} {'ex/step':>8} {'loss':>9}")
    for name, r in rows.items():
        if "tokens_per_s" not in r:
            print(f"{name:20} {r.get('error') or r.get('skipped')}")
            continue
        print(f"{name:20} {r['tokens_per_s']:>8} {str(r['vs_plain_best']):>12} {str(r['peak_gib']):>9} "
              f"{r['padding_fraction']:>6} {r['examples_per_step']:>8} {r['untrained_loss']:>9.5f}")
    print(f"afinar16 / unsloth16: {summary['afinar16_vs_unsloth16']}   afinar best / unsloth best: "
          f"{summary['afinar_best_vs_unsloth_best']}   afinar best / plain best: {summary['afinar_best_vs_plain_best']}   "
          f"untrained loss spread: {summary['untrained_loss_spread']}")


def merge(old: dict | None, new: dict) -> dict:
    """`new`'s rows over `old`'s (rows of earlier calls kept), the ratios recomputed over all of them."""
    if old and any(old.get(k) != new.get(k) for k in ("shape", "examples", "timing")):
        raise SystemExit("results measured with another shape, example count or timing cannot be merged: "
                         f"{ {k: old.get(k) for k in ('shape', 'examples', 'timing')} } vs "
                         f"{ {k: new.get(k) for k in ('shape', 'examples', 'timing')} }")
    order = {r: i for i, r in enumerate(ROWS + OPTIONAL_ROWS)}
    setups = {}
    for name in SETUPS:
        rows = {**((old or {}).get("setups", {}).get(name, {}).get("rows", {})),
                **new["setups"].get(name, {}).get("rows", {})}
        if rows:
            rows = dict(sorted(rows.items(), key=lambda kv: order[kv[0]]))
            setups[name] = {"lora": SETUPS[name], "rows": rows, **summarise(rows)}
    gpus = {r.get("gpu") for setup in setups.values() for r in setup["rows"].values() if r.get("gpu")}
    commands = list(dict.fromkeys((old or {}).get("commands", []) + new.get("commands", [])))
    return {**new, "gpu": ", ".join(sorted(gpus)) or None, "commands": commands, "setups": setups}


def save(path: str | None, section: dict, argv: list[str]) -> dict:
    """Merge `section` into the train_peers section of the results file at `path` (after every row: a
    call stopped at its time limit keeps what it measured); returns the merged section."""
    from benchmarks import random_7b as R

    if not path:
        return merge(None, section)
    old = json.loads(Path(path).read_text()).get("train_peers") if Path(path).is_file() else None
    merged = merge(old, section)
    R.merge_results(Path(path), "train_peers", merged, R.environment(argv, gpu=False))
    return merged


def drive(args) -> dict:
    import torch

    from benchmarks import random_7b as R

    wanted = [r for r in args.rows.split(",") if r]
    names = [n for n in args.setup.split(",") if n]
    unknown = (set(wanted) - set(ROWS + OPTIONAL_ROWS)) | (set(names) - set(SETUPS))
    if unknown or not wanted:
        raise SystemExit(f"unknown rows or setups {sorted(unknown)}; rows: {ROWS + OPTIONAL_ROWS}; setups: {list(SETUPS)}")
    cuda = torch.cuda.is_available()
    args.tokenizer = args.tokenizer or str(Path(R.tokenizer(None).name_or_path))  # built once here, read by every row
    unsloth = None
    if any(r.startswith("unsloth") for r in wanted):
        if not cuda or importlib.util.find_spec("unsloth") is None:
            unsloth = "skipped: Unsloth is not importable here (it needs an NVIDIA GPU and `pip install unsloth`)"
        else:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "save", "--shape", args.shape,
                            "--tokenizer", args.tokenizer, "--folder", args.folder, "--result", "-"], cwd=REPO, check=True)
    # One process per system (Unsloth patches transformers, so it never shares a process): its rows run one
    # after the other, each building its own model, with the peak reset after that row's warm-up, so each
    # row's peak is its own; a process per row would add ~20 s of start-up and imports to every row.
    jobs = [(names, [r for r in wanted if parse_row(r)[0] == s]) for s in ("plain", "unsloth", "afinar")]
    section = {"shape": args.shape, "examples": args.examples or (400 if args.shape == "tiny" else 1200),
               "timing": {"warmup_steps": args.warmup, "windows": args.windows, "steps_per_window": args.steps},
               "flop_per_token": FLOP_PER_TOKEN, "peak_flops": PEAK_FLOPS,
               "commands": [" ".join(["python"] + sys.argv)], "setups": {n: {"rows": {}} for n in names}}
    merged = merge(None, section)
    for job_setups, job_rows in (j for j in jobs if j[1]):
        if unsloth and job_rows[0].startswith("unsloth"):
            got = {n: {r: {"skipped": unsloth} for r in job_rows} for n in job_setups}
        else:
            got = _spawn(args, job_setups, job_rows, UNSLOTH_ENV if job_rows[0].startswith("unsloth") else None)
        for n in job_setups:
            section["setups"][n]["rows"].update(got[n])
        merged = save(args.out, section, sys.argv)
    for name, setup in merged["setups"].items():
        print_table(name, setup["rows"], setup)
    return merged


def merge_files(files: list[str], out: str | None) -> dict:
    """One results section from several calls' files (rows split over calls to stay within a time limit)."""
    merged = None
    for f in files:
        merged = merge(merged, json.loads(Path(f).read_text())["train_peers"])
    if out:
        merged = save(out, merged, sys.argv)
    for name, setup in merged["setups"].items():
        print_table(name, setup["rows"], setup)
    return merged


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokenizer", default=None, help="saved Mistral tokenizer folder (default: built with mistral-common)")
    p.add_argument("--examples", type=int, default=None, help="default 1,200 (400 for --shape tiny)")
    p.add_argument("--setup", default="qkv,all", help="LoRA setups: " + ", ".join(SETUPS))
    p.add_argument("--rows", default=",".join(ROWS), help=f"also: {', '.join(OPTIONAL_ROWS)}")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 for --shape tiny)")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--folder", default="/dev/shm/afinar-peers-model", help="the bf16 copy of the model Unsloth loads")
    p.add_argument("--out", default=None, help="results file; rows already in it (earlier calls) are kept")
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE", help="only merge these calls' results into --out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.shape == "tiny" else 3
    if args.child:
        child(args)
    elif args.merge:
        merge_files(args.merge, args.out)
    else:
        drive(args)


if __name__ == "__main__":
    main()
