"""`openrlhf-passk eval`: score maze responses and plot unbiased pass@k curves.

Three ways in (exactly one per call):

  --samples FILE.jsonl   responses you already sampled. One JSON object a line, either
                           {"label": <grid>, "responses": ["...", ...], "size": 9}      (one row per maze)
                         or
                           {"label": <grid>, "response": "...", "id": "maze-17"}        (one row per response)
                         `label` is the maze grid as in the training JSONL; `size` is optional (read off the
                         grid); rows of the second form are grouped by `id`, or by `label` when there is none.
  --model PATH --data test.jsonl
                         generate --n responses per maze with vLLM (when it and a GPU are present) or HF
                         transformers, then score them. `data` rows are the `maze generate` rows: the
                         `prompt` field (a string, or a list of chat messages) and the `label` grid.
  --compare A.json B.json ...
                         overlay the overall curves of earlier eval runs on one plot.

Outputs in --out: passk.json (settings, per-maze counts, pass@k overall and per maze size), passk.csv
(scope,k,pass_at_k,num_mazes), passk.png, all three or none; with --model also samples.jsonl (written
first, re-scorable with --samples). Exit status: 2 for a wrong flag, 1 for bad data or a failed run.
pass@k is the unbiased estimator 1 - C(n-c,k)/C(n,k) per maze (ALGORITHMS.md section 4), averaged over mazes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PassAtK = dict[int, float]


class UsageError(ValueError):
    """A wrong flag or flag combination (exit 2); other errors are about the data or the run (exit 1)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "--samples rows, either one per maze or one per response (grouped by id, else by label):\n"
        '  {"label": "<grid>", "size": 9, "responses": ["...", "..."]}\n'
        '  {"id": "maze-17", "label": "<grid>", "response": "..."}'
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", type=Path, help="JSONL of sampled responses (row formats below)")
    src.add_argument("--model", help="HF model path (or hub name already in the local cache) to sample from")
    src.add_argument("--compare", type=Path, nargs="+", metavar="JSON", help="passk.json files to overlay")
    parser.add_argument("--data", type=Path, help="with --model: maze JSONL (prompt, label) to evaluate on")
    parser.add_argument("--n", type=int, default=16, help="with --model: responses per maze (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="HF backend: sequences per generate call")
    parser.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto",
                        help="auto: vLLM when importable and CUDA is available, else HF transformers")
    parser.add_argument("--device", default=None, help="HF backend device (default: cuda if available)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="wrap string prompts as one user message and apply the tokenizer's chat template")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["strict", "reference"], default="strict",
                        help="verifier mode: strict (ours) or reference (reproduces the public verifier)")
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="k values (default 1, 2, 4, ... up to n, and n itself)")
    parser.add_argument("--labels", nargs="+", default=None, help="with --compare: one legend label per file")
    parser.add_argument("--name", default=None, help="run name stored in passk.json and used as legend label")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--out", type=Path, default=Path("eval_out"), help="output directory")


# --------------------------------------------------------------------------------------------- input
def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply to read (expected a flat object)") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: empty file (expected one JSON object per line)")
    return rows


def _check_label(path: Path, lineno: int, row: dict) -> str:
    from openrlhf_passk.tasks import maze

    label = row.get("label")
    if not isinstance(label, str):
        raise ValueError(f"{path}:{lineno}: field 'label' (the maze grid, a string) is missing or not a string")
    try:
        maze.validate_grid(label)
    except ValueError as e:
        raise ValueError(f"{path}:{lineno}: field 'label' is not a valid maze grid: {e}") from None
    return label


def _grid_size(grid: str) -> int:
    return len(grid.strip().splitlines())


def load_samples(path: Path) -> list[dict]:
    """Read a samples JSONL into one record per maze: {"label", "size", "responses"} (order of first sight)."""
    groups: dict[str, dict] = {}
    for lineno, row in _read_jsonl(path):
        label = _check_label(path, lineno, row)
        if "responses" in row:
            responses = row["responses"]
            if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"{path}:{lineno}: field 'responses' must be a list of strings")
            if not responses:
                raise ValueError(f"{path}:{lineno}: field 'responses' is empty (need at least one response)")
            key = str(row.get("id", f"line {lineno}"))
        elif "response" in row:
            if not isinstance(row["response"], str):
                raise ValueError(f"{path}:{lineno}: field 'response' must be a string")
            responses = [row["response"]]
            key = str(row.get("id", label))
        else:
            raise ValueError(f"{path}:{lineno}: row has neither 'responses' (a list) nor 'response' (a string)")
        size = row.get("size", _grid_size(label))
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"{path}:{lineno}: field 'size' must be an integer, got {size!r}")
        group = groups.setdefault(key, {"label": label, "size": size, "responses": []})
        if group["label"] != label:
            raise ValueError(f"{path}:{lineno}: id {key!r} was used earlier with a different 'label' grid")
        group["responses"].extend(responses)
    return list(groups.values())


# --------------------------------------------------------------------------------------------- metric
def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else [*ks, n]


def summarize(counts: list[dict], ks: list[int] | None = None) -> dict:
    """pass@k overall and per maze size from per-maze counts [{"size", "n", "c"}, ...].

    Every maze needs n >= max(ks): the unbiased estimator is undefined for k > n.
    """
    import torch

    from openrlhf_passk.metrics import pass_at_k

    if not counts:
        raise ValueError("no mazes to evaluate")
    min_n = min(m["n"] for m in counts)
    ks = sorted(set(ks)) if ks else default_ks(min_n)
    if ks[0] < 1:
        raise UsageError(f"k must be >= 1, got {ks[0]}")
    if ks[-1] > min_n:
        raise UsageError(f"k={ks[-1]} is larger than n={min_n} (the fewest responses any maze has); "
                         f"pass k values <= {min_n} with --k, or sample more responses")

    def curve(rows: list[dict]) -> PassAtK:
        n = torch.tensor([m["n"] for m in rows])
        c = torch.tensor([m["c"] for m in rows])
        return {k: float(torch.as_tensor(pass_at_k(n, c, k), dtype=torch.float64).mean()) for k in ks}

    sizes = sorted({m["size"] for m in counts})
    return {
        "ks": ks,
        "num_mazes": len(counts),
        "overall": curve(counts),
        "by_size": {str(s): curve([m for m in counts if m["size"] == s]) for s in sizes},
        "num_mazes_by_size": {str(s): sum(m["size"] == s for m in counts) for s in sizes},
    }


def score_records(records: list[dict], mode: str) -> list[dict]:
    """Score every response with the maze verifier; returns per-maze counts {"size", "n", "c"}."""
    from openrlhf_passk.tasks import maze

    return [
        {"size": r["size"], "n": len(r["responses"]),
         "c": sum(maze.score(resp, r["label"], mode=mode) >= 1.0 for resp in r["responses"])}
        for r in records
    ]


# --------------------------------------------------------------------------------------------- outputs
def write_csv(summary: dict, path: Path) -> None:
    lines = ["scope,k,pass_at_k,num_mazes"]
    lines += [f"overall,{k},{v:.6f},{summary['num_mazes']}" for k, v in summary["overall"].items()]
    for size, curve in summary["by_size"].items():
        lines += [f"size={size},{k},{v:.6f},{summary['num_mazes_by_size'][size]}" for k, v in curve.items()]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(curves: dict[str, PassAtK], path: Path, title: str) -> None:
    """One line per label: pass@k against k on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    # A curve with every k from 1 to n (the sandbox's) would bury the axis in labels and markers: past a dozen
    # ks, both go on the powers of 2 only.
    for label, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        marked = [i for i, k in enumerate(ks) if len(ks) <= 12 or k & (k - 1) == 0]
        ax.plot(ks, [curve[k] for k in ks], marker="o", markevery=marked, label=label)
    ax.set_xscale("log", base=2)
    all_ks = sorted({int(k) for c in curves.values() for k in c})
    ticks = all_ks if len(all_ks) <= 12 else [k for k in all_ks if k & (k - 1) == 0]
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(counts: list[dict], ks: list[int] | None, settings: dict, out: Path, title: str) -> dict:
    """Summarise counts and write passk.json / passk.csv / passk.png into `out`; returns the JSON object.

    All or nothing: the three files are written under temporary names and renamed only once all three
    exist, so a failing plot never leaves a new passk.json beside an old passk.png.
    """
    import tempfile

    summary = summarize(counts, ks)
    out.mkdir(parents=True, exist_ok=True)
    result = {**settings, **summary, "per_maze": counts}
    curves = {"all sizes": summary["overall"]}
    if len(summary["by_size"]) > 1:
        curves.update({f"{s}x{s}": c for s, c in summary["by_size"].items()})
    with tempfile.TemporaryDirectory(dir=out, prefix=".passk-") as tmp:
        staged = Path(tmp)
        (staged / "passk.json").write_text(json.dumps(result, indent=1) + "\n")
        write_csv(summary, staged / "passk.csv")
        plot_curves(curves, staged / "passk.png", title)
        for name in ("passk.json", "passk.csv", "passk.png"):
            (staged / name).replace(out / name)
    return result


# --------------------------------------------------------------------------------------------- generation
def load_prompts(path: Path) -> list[dict]:
    """Read the maze data JSONL (prompt + label) used with --model."""
    records = []
    for lineno, row in _read_jsonl(path):
        label = _check_label(path, lineno, row)
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
            raise ValueError(f"{path}:{lineno}: field 'prompt' must be a string or a list of chat messages")
        records.append({"label": label, "size": row.get("size", _grid_size(label)), "prompt": prompt})
    return records


def generate(args: argparse.Namespace, prompts: list[str | list[dict]]) -> list[list[str]]:
    """n responses for every prompt, with vLLM or HF transformers (see --backend)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = []
    for p in prompts:
        if isinstance(p, str) and args.apply_chat_template:
            p = [{"role": "user", "content": p}]
        if isinstance(p, list):
            p = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        texts.append(p)
    # A chat template already holds the special tokens (BOS etc.); plain prompts get the tokenizer's own.
    templated = args.apply_chat_template or any(isinstance(p, list) for p in prompts)

    backend = args.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, seed=args.seed)
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_new_tokens, seed=args.seed)
        return [[o.text for o in out.outputs] for out in llm.generate(texts, params)]

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
    # Decoder-only models continue from the last token: pad on the left so every prompt ends at the edge.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    flat = [t for t in texts for _ in range(args.n)]
    decoded: list[str] = []
    for i in tqdm(range(0, len(flat), args.batch_size), desc="generate (HF)", unit="batch"):
        batch = tokenizer(flat[i : i + args.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=not templated).to(device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                 top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        decoded += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [decoded[i * args.n : (i + 1) * args.n] for i in range(len(texts))]


# --------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    """Exit 0; 2 for a wrong flag (UsageError); 1 for bad data, a missing file or a failed run."""
    try:
        return _run(args)
    except UsageError as e:
        print(f"openrlhf-passk eval: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # OSError: transformers cannot find or read the --model path
        print(f"openrlhf-passk eval: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.k is not None and min(args.k) < 1:
        raise UsageError(f"--k values must be >= 1, got {min(args.k)}")
    if args.compare:
        return _compare(args)
    if args.model:
        if args.data is None:
            raise UsageError("--model needs --data (the maze JSONL to evaluate on, e.g. from `maze generate`)")
        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        if args.k and max(args.k) > args.n:
            raise UsageError(f"--k {max(args.k)} is larger than --n {args.n}: pass@k needs n >= k")
        records = load_prompts(args.data)
        responses = generate(args, [r["prompt"] for r in records])
        args.out.mkdir(parents=True, exist_ok=True)
        # Written first and on its own (atomically): the samples cost a generation run, and they can be
        # re-scored with --samples if a later step fails.
        lines = []
        for r, resp in zip(records, responses, strict=True):
            r["responses"] = resp
            lines.append(json.dumps({"label": r["label"], "size": r["size"], "responses": resp}) + "\n")
        staged = args.out / ".samples.jsonl.tmp"
        staged.write_text("".join(lines))
        staged.replace(args.out / "samples.jsonl")
        source = {"model": args.model, "data": str(args.data), "n": args.n, "temperature": args.temperature,
                  "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    else:
        records = load_samples(args.samples)
        source = {"samples": str(args.samples)}
    counts = score_records(records, args.mode)
    ns = sorted({m["n"] for m in counts})
    if len(ns) > 1:
        # The unbiased estimator needs k <= n for every maze, so the fewest responses cap k.
        capped = f"k is capped at {ns[0]}" if args.k is None else f"--k must stay <= {ns[0]}"
        print(f"note: responses per maze are uneven, {ns[0]} to {ns[-1]} ({sum(m['n'] == ns[0] for m in counts)} "
              f"maze(s) have {ns[0]}); {capped}, the fewest any maze has")
    name = args.name or (Path(args.model).name if args.model else args.samples.stem)
    result = write_outputs(counts, args.k, {"name": name, "mode": args.mode, **source}, args.out,
                           args.title or f"pass@k: {name}")
    overall = ", ".join(f"pass@{k}={v:.3f}" for k, v in result["overall"].items())
    print(f"{result['num_mazes']} mazes, {overall}")
    print(f"wrote {args.out / 'passk.json'}, passk.csv, passk.png")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.compare):
        raise UsageError(f"--labels has {len(args.labels)} names for {len(args.compare)} --compare files")
    curves: dict[str, PassAtK] = {}
    for i, path in enumerate(args.compare):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: cannot read an eval result ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("overall"), dict) or not data["overall"]:
            raise ValueError(f"{path}: field 'overall' (pass@k by k) is missing; expected a passk.json "
                             "written by `openrlhf-passk eval`")
        label = args.labels[i] if args.labels else data.get("name") or path.stem
        curves[label] = {int(k): float(v) for k, v in data["overall"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    staged = args.out / ".compare.png.tmp.png"  # written aside, then renamed into place
    try:
        plot_curves(curves, staged, args.title or "pass@k")
        staged.replace(args.out / "compare.png")
    finally:
        staged.unlink(missing_ok=True)
    for label, curve in curves.items():
        print(label + ": " + ", ".join(f"pass@{k}={v:.3f}" for k, v in sorted(curve.items())))
    print(f"wrote {args.out / 'compare.png'}")
    return 0
