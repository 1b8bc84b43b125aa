"""Which LoRA settings make the embedded SmolLM2-135M learn the bundled Farense facts?

Trains each variant on data/farense/train.jsonl and scores greedy answers to
data/farense/val.jsonl with afinar's fact recall (every keyword present). It chose the
`cpu` preset (rank 32 on all linear layers, lr 2e-3, 4 epochs).

Run on the lent H200 to explore quickly (plain LoRA, fp32, so no bitsandbytes was needed
there; the CPU preset then trains the same settings with NF4, confirmed on CPU by
`afinar demo --full`, docs/results/cpu-full/). From the repository root:

    AFINAR_HOME=/tmp/afhome python3 benchmarks/cpu_preset_sweep.py [NAME ...]

Writes $OUT/sweep.json (or /tmp/sweep.json); benchmarks/results/cpu-preset-sweep.json
holds the committed result with the machine and versions.
"""
import json, os, sys, time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from afinar.config import load_config
from afinar.train import run_training
from afinar.inference import Predictor
from afinar import data, evaluate
ALL = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
common = ["model.quantization=none", "model.compute_dtype=float32", "train.batch_size=8", "train.grad_accumulation=1",
          "train.warmup_steps=10", "train.eval_every=1000", "lora.dropout=0.0"]
SP = "data.system_prompt=Assistente do Farense."
runs = {
 "A_qkv_r8_lr1e-3_ep2": ["train.learning_rate=1e-3", "train.epochs=2"],
 "B_all_r16_lr2e-3_ep4_sp": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=2e-3", "train.epochs=4", SP],
 "C_all_r16_lr2e-3_ep3": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=2e-3", "train.epochs=3"],
 "D_all_r32_lr2e-3_ep4": [ALL, "lora.rank=32", "lora.alpha=64", "train.learning_rate=2e-3", "train.epochs=4"],
 "E_qkv_r16_lr2e-3_ep4": ["lora.rank=16", "lora.alpha=32", "train.learning_rate=2e-3", "train.epochs=4"],
 "F_all_r16_lr1e-3_ep5": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=1e-3", "train.epochs=5"],
 "G_all_r16_lr3e-3_ep2": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=3e-3", "train.epochs=2"],
 "H_all_r16_lr3e-3_ep1": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=3e-3", "train.epochs=1"],
 "I_all_r16_lr2e-3_ep6": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=2e-3", "train.epochs=6"],
 "J_all_r16_lr3e-3_ep1.5": [ALL, "lora.rank=16", "lora.alpha=32", "train.learning_rate=3e-3", "train.epochs=1.5"],
 "K_all_r8_lr2e-3_ep3": [ALL, "lora.rank=8", "lora.alpha=16", "train.learning_rate=2e-3", "train.epochs=3"],
}
only = sys.argv[1:] or list(runs)
val = data.read_jsonl("data/farense/val.jsonl")
results = {}
for name in only:
    t = time.time()
    cfg = load_config(None, common + runs[name])
    run = run_training(cfg, f"/tmp/sweep/{name}", overwrite=True).output
    meta = json.load(open(f"{run}/metadata.json"))
    tt = time.time() - t
    pr = Predictor(run)
    score, ans = evaluate.recall_on(pr, val, batch_size=40, max_tokens=80)
    results[name] = {"recall": score["fact_recall"], "val_loss": meta["final_val_loss"], "steps": meta["steps"],
                     "train_s": round(tt, 1), "gen_s": round(time.time() - t - tt, 1)}
    print(name, results[name], flush=True)
    json.dump(results, open(os.environ.get("OUT", "/tmp") + "/sweep.json", "w"), indent=1)
    del pr
