"""Training throughput on CPU: lm.train against pytorch/examples' word LM, same model, same run.

The model is pytorch/examples' default (2-layer LSTM, 200 units, dropout 0.2, untied, full
softmax over WikiText-2's 33,278 classes, SGD lr 20, clip 0.25). Their training step is
timed by ``../shared/anchors/ptex_like.py`` (contiguous-stream batches of 20 x 35 tokens);
ours is the real trainer, ``python -m lm.train``, on length-bucketed packed batches, read
from its ``metrics.jsonl`` (predicted tokens per second, warm-up window excluded).

Every run is a fresh process, and the runs are interleaved (A B C D, A B C D, ...) so that
load from other jobs on a shared machine falls on all of them alike; the load average is
printed with each run. Each row also gives the process's user and kernel (sys) CPU time:
for ``lm.train`` over its training window only (sampled with psutil; the process is
stopped once training ends, before its final validation), for the anchor likewise
over the window its tokens/s is timed on (its ``time.perf_counter`` is wrapped).
Tokens per CPU-second (user + sys) is the figure that holds when other jobs share the
cores: the wall-clock rate is only the share of the machine a run happened to get.

Rows: each tool as users run it, and with glibc told by environment variables not to
return large blocks to the kernel (``MALLOC_ENV``; issue 13); ``lm.train`` with its own
start-up tuning (:func:`lm.runtime.tune_allocator`) switched off is the trainer before it.

The achieved GFLOP/s is tokens/s times the step's FLOPs per token counted from the
model's shapes (:func:`step_flops`), against the fp32 GEMM rate ``torch.mm`` reaches on
this machine, measured in the same run (a 4,096-square product, default threads), both
per CPU-second.

``--bf16`` adds ``lm.train`` with ``train.amp=bf16`` (its fused output layer's GEMMs on bf16
operands; the FLOPs are still counted at fp32's count, so its "% of GEMM" is against the fp32
peak and can exceed 100%).

Usage:
    python bench/train_speed.py [--data ../shared/data/wikitext-2] [--seconds 40] [--rounds 2]
        [--max-tokens 4096] [--threads N] [--bf16] [--extra key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from common import prepared_dir  # noqa: E402  (bench/common.py: run as python bench/NAME.py)
ANCHOR = ROOT.parent / "shared" / "anchors" / "ptex_like.py"
EMB, HID, LAYERS, VOCAB = 200, 200, 2, 33_280  # our vocabulary: 33,278 words + <bos> + <pad>
SAME_MODEL = [
    "model.cell=lstm", f"model.embed_dim={EMB}", f"model.hidden_size={HID}", f"model.num_layers={LAYERS}",
    "model.dropout_emb=0.2", "model.dropout_rnn=0.2", "model.dropout_out=0.2", "model.locked_dropout=false",
    "model.tie_weights=false", "model.adaptive_cutoffs=null",
    "train.optimizer=sgd", "train.lr=20", "train.clip=0.25", "train.schedule=plateau", "train.warmup_steps=0",
    "train.weight_decay=0", "train.device=cpu", "train.epochs=null", "train.plot=false", "train.prompts=[]",
    "train.eval_every=null", "train.log_every=1", "train.mode=sequence", "train.batch_size=null",
]
# what the issue measured by hand: large blocks never mmapped, freed memory never trimmed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}
_PEAK = """
import time, torch
a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
torch.mm(a, b)
n, t, c = 0, time.perf_counter(), time.process_time()
while time.perf_counter() - t < {seconds}:
    torch.mm(a, b); n += 1
flops = 2 * 4096**3 * n / 1e9
print(flops / (time.perf_counter() - t), flops / (time.process_time() - c))
"""


def step_flops(emb: int = EMB, hid: int = HID, layers: int = LAYERS, vocab: int = VOCAB) -> float:
    """FLOPs of one training step per predicted token (forward + backward), from the shapes.

    LSTM layer with input size I: the gates are one ``(4H, I + H)`` matrix-vector product
    per token, 2 FLOPs per multiply-add: 8H(I + H) forward, twice that backward (gradient
    of the input and of the weights) -> 24H(I + H). Output layer: 2HV forward, 4HV
    backward (gradients of h and of W) -> 6HV. The embedding is a gather (no FLOPs);
    biases, gate nonlinearities, softmax, dropout and the optimizer are O(H + V) per token
    and left out, so this is a lower bound on the work done.
    """
    rnn = sum(24 * hid * ((emb if layer == 0 else hid) + hid) for layer in range(layers))
    return rnn + 6 * hid * vocab


def gemm_peak(seconds: float = 4.0) -> tuple[float, float]:
    """GFLOP per wall second and per CPU second of a 4,096-square fp32 ``torch.mm`` (default threads).

    On a machine shared with other jobs the wall rate is this process's share; the rate
    per CPU second (user + sys of all its threads) is what one core does while it runs.
    """
    out = subprocess.run([sys.executable, "-c", _PEAK.format(seconds=seconds)], capture_output=True, text=True, check=True,
                         env=_env({}))
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


_THREADS: dict[str, str] = {}  # OMP_NUM_THREADS for every run, from --threads


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "RNNLM_MALLOC"))}
    return {**env, **_THREADS, **extra}


# Runs the anchor unchanged, with time.perf_counter wrapped to note the process's CPU time
# at its first call (the timer's start, after warm-up) and its last (the end of training):
# user and sys over exactly the window its tokens/s is measured on.
_ANCHOR_WRAP = """
import json, resource, runpy, sys, time
marks, wall = [], time.perf_counter
def perf_counter():
    ru, t = resource.getrusage(resource.RUSAGE_SELF), wall()
    marks[1:] = [(t, ru.ru_utime, ru.ru_stime)]
    if len(marks) == 1:
        marks.insert(0, marks[0])
    return t
time.perf_counter = perf_counter
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("window", json.dumps([b - a for a, b in zip(*marks[:2])] if len(marks) > 1 else None))
"""


def anchor(data: Path, seconds: float, env: dict[str, str]) -> dict:
    """The anchor's tokens/s; user and sys CPU seconds over its timed window."""
    out = subprocess.run([sys.executable, "-c", _ANCHOR_WRAP, str(ANCHOR), str(data), str(seconds)],
                         capture_output=True, text=True, env=_env(env), check=True).stdout
    rate = float(re.search(r"anchor tokens/s (\d+)", out).group(1))
    wall, user, system = json.loads(re.search(r"window (.*)", out).group(1))
    return {"rate": rate, "tokens": rate * wall, "user": user, "sys": system}


def ours(data: Path, prepared: Path, seconds: float, max_tokens: int, extra: list[str], env: dict[str, str]) -> dict:
    """lm.train's tokens/s and its user/sys CPU seconds, both over the same training window."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, ckpts = Path(tmp) / "metrics.jsonl", Path(tmp) / "checkpoints"
        cmd = [sys.executable, "-m", "lm.train", str(ROOT / "recipes" / "wikitext.yaml"), f"data.source.dir={data}",
               f"data.output={prepared}", f"train.output_dir={tmp}", f"train.max_time={seconds}",
               f"train.max_tokens={max_tokens}", *SAME_MODEL, *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(env))
        import psutil  # the bench extra (pip install -e .[bench]); only this side needs it

        ps = psutil.Process(proc.pid)
        seen, first, last = 0, None, None  # (CPU times, records written) at the first / latest new record
        # the step checkpoint is written the moment training stops; validation would follow
        while proc.poll() is None and not (ckpts.is_dir() and any(ckpts.iterdir())):
            cpu = ps.cpu_times()
            n = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if n > seen:  # a train record was just written: CPU time now matches its timestamp
                first = first or (cpu, n)
                last, seen = (cpu, n), n
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        if proc.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"lm.train failed ({proc.returncode}): {err[-2000:]}")
        if first is last:
            raise SystemExit(f"lm.train logged fewer than 2 windows in {seconds} s: raise --seconds")
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in recs if r["split"] == "train"]
        a, b = train[0], train[-1]  # the first window holds the warm-up steps: excluded
        rate = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
        # CPU time between the polls that saw records i and j: the tokens trained between those records
        (cpu0, i), (cpu1, j) = first, last
        return {"rate": rate, "tokens": recs[j - 1]["tokens"] - recs[i - 1]["tokens"], "user": cpu1.user - cpu0.user,
                "sys": cpu1.system - cpu0.system,
                "loss": b["loss"], "step": b["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for our runs, e.g. model.cell=gru")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (torch's intra-op threads)")
    ap.add_argument("--bf16", action="store_true",
                    help="also run lm.train with train.amp=bf16 (the output layer's GEMMs on bf16 operands), "
                         "as shipped and with MALLOC_ env")
    args = ap.parse_args()
    if args.threads:
        _THREADS["OMP_NUM_THREADS"] = str(args.threads)
    if not (args.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {args.data} (expected train.txt): pass --data")
    if not ANCHOR.is_file():
        sys.exit(f"anchor script not found: {ANCHOR}")
    prepared = prepared_dir(args.data)
    subprocess.run([sys.executable, "-m", "pipeline.prepare", str(ROOT / "recipes" / "wikitext.yaml"),
                    f"data.source.dir={args.data}", f"data.output={prepared}", "--quiet"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    runs = {
        "pytorch/examples, as shipped": lambda: anchor(args.data, args.seconds, {}),
        "lm.train, as shipped": lambda: ours(args.data, prepared, args.seconds, args.max_tokens, args.extra, {}),
        "pytorch/examples + MALLOC_ env": lambda: anchor(args.data, args.seconds, MALLOC_ENV),
        "lm.train + MALLOC_ env": lambda: ours(args.data, prepared, args.seconds, args.max_tokens, args.extra, MALLOC_ENV),
        "lm.train, tuning off (before)": lambda: ours(args.data, prepared, args.seconds, args.max_tokens, args.extra,
                                                     {"RNNLM_MALLOC_TUNING": "0"}),
    }
    if args.bf16:
        bf16 = [*args.extra, "train.amp=bf16"]
        runs["lm.train, train.amp=bf16"] = lambda: ours(args.data, prepared, args.seconds, args.max_tokens, bf16, {})
        runs["lm.train + MALLOC_ env, amp=bf16"] = lambda: ours(args.data, prepared, args.seconds, args.max_tokens, bf16,
                                                                MALLOC_ENV)
    flops = step_flops()
    print(f"cpu threads: {os.cpu_count()}, OMP_NUM_THREADS={args.threads or 'unset'}, {args.seconds:.0f} s per run, {args.rounds} interleaved rounds, "
          f"max_tokens={args.max_tokens}, {flops / 1e6:.2f} MFLOP per token", flush=True)
    peaks = [gemm_peak()]
    print(f"fp32 GEMM (torch.mm 4096^3): {peaks[0][0]:.0f} GFLOP/s wall, {peaks[0][1]:.0f} GFLOP per CPU-s  "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in runs}
    print(f"{'round':>5s} {'run':34s} {'load':>5s} {'tokens/s':>9s} {'user s':>7s} {'sys s':>6s} {'sys %':>6s} "
          f"{'tok/CPU-s':>9s} {'GFLOP/s':>8s}")
    for rnd in range(args.rounds):
        for name, fn in runs.items():
            load = os.getloadavg()[0]
            r = fn()
            results[name].append(r)
            cpu = max(r["user"] + r["sys"], 1e-9)  # a run of a few seconds may not tick the CPU clock
            print(f"{rnd:5d} {name:34s} {load:5.1f} {r['rate']:9,.0f} {r['user']:7.1f} {r['sys']:6.1f} "
                  f"{100 * r['sys'] / cpu:6.1f} {r['tokens'] / cpu:9,.0f} {r['rate'] * flops / 1e9:8.1f}", flush=True)
    peaks.append(gemm_peak())
    print(f"fp32 GEMM again: {peaks[1][0]:.0f} GFLOP/s wall, {peaks[1][1]:.0f} GFLOP per CPU-s  "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    peak_cpu = statistics.mean(p[1] for p in peaks)
    rate = {k: statistics.median(r["rate"] for r in rs) for k, rs in results.items()}
    cpu_s = {k: max(sum(r["user"] + r["sys"] for r in rs), 1e-9) for k, rs in results.items()}
    per_cpu = {k: sum(r["tokens"] for r in rs) / cpu_s[k] for k, rs in results.items()}
    print("\ntokens/s: median over rounds; tokens per CPU-s: over all rounds; ratios against pytorch/examples run the "
          "same way (as shipped, or both with MALLOC_ env); % of the GEMM's GFLOP per CPU-s")
    for name, rs in results.items():
        ref = "pytorch/examples + MALLOC_ env" if "MALLOC_" in name else "pytorch/examples, as shipped"
        sys_share = 100 * sum(r["sys"] for r in rs) / cpu_s[name]
        print(f"{name:34s} {rate[name]:7,.0f} tok/s {rate[name] / rate[ref]:5.2f}x | {per_cpu[name]:6,.0f} tok/CPU-s "
              f"{per_cpu[name] / per_cpu[ref]:5.2f}x | sys {sys_share:4.1f}% | "
              f"{100 * per_cpu[name] * flops / 1e9 / peak_cpu:4.1f}% of GEMM", flush=True)
    ours_ = "lm.train, as shipped"
    for other in ("pytorch/examples + MALLOC_ env", "lm.train, tuning off (before)", "lm.train + MALLOC_ env"):
        print(f"{ours_} / {other}: {rate[ours_] / rate[other]:.2f}x tokens/s, {per_cpu[ours_] / per_cpu[other]:.2f}x "
              f"tokens per CPU-s")

if __name__ == "__main__":
    main()
