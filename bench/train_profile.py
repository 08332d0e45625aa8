"""Where a CPU training step of pytorch/examples' model goes, and what would change it.

The model and batches of ``bench/train_speed.py`` (2 x 200 LSTM, full softmax over 33,280
ids, SGD, clip 0.25; WikiText-2 train, ``max_tokens=4096``), the step of ``lm.train``
taken apart and timed phase by phase on the same batches:

    data    next batch from the loader (sampler + packed collator, in process)
    rnn     embedding, dropout and the 2-layer LSTM forward (padded fused kernel)
    out     the fused output layer + loss: logits, softmax and all its gradients, in
            chunks of 2,048 tokens (its backward is a multiply)
    bwd     ``loss.backward()``: LSTM and embedding backward
    opt     gradient clipping, SGD step, zero_grad

Each variant is a fresh process (allocator settings and thread pools are per process),
variants interleaved round by round; tokens/s are over the timed steps only:

    tuned / untuned     :func:`lm.runtime.tune_allocator` on or off
    prealloc            a prototype of the output layer that reuses one (2048, V) buffer
                        across chunks and steps (softmax in place) instead of allocating
    threads=1, interop=1  torch.set_num_threads(1) / set_num_interop_threads(1)
    bf16                CPU autocast to bfloat16 over the whole step, output layer
                        unfused (logits + cross_entropy); its accuracy cost is measured
                        on the same batches: mean |NLL_bf16 - NLL_fp32| per token of the
                        forward pass, and the gap in training loss after the timed steps
    eval                validation batches scored as ``lm.evaluate.evaluate`` does (forward
                        only, chunked full softmax), tuned or not; its time is in ``out``

``--profile`` prints torch.profiler's top operators for the tuned fp32 step.

Usage: python bench/train_profile.py [--data ../shared/data/wikitext-2] [--steps 6] [--rounds 2] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from common import prepared_dir  # noqa: E402  (bench/common.py: run as python bench/NAME.py)
VARIANTS = {
    "fp32, tuned": {"tune": True},
    "fp32, untuned (before)": {"tune": False},
    "prealloc out, untuned": {"tune": False, "prealloc": True},
    "prealloc out, tuned": {"tune": True, "prealloc": True},
    "fp32, tuned, threads=1": {"tune": True, "threads": 1},
    "fp32, tuned, interop=1": {"tune": True, "interop": 1},
    "bf16 autocast, tuned": {"tune": True, "bf16": True},
    "eval, tuned": {"tune": True, "eval": True},
    "eval, untuned (before)": {"tune": False, "eval": True},
}
PHASES = ("data", "rnn", "out", "bwd", "opt")


def _prealloc_linear_ce():
    """A prototype of ``lm.losses.linear_cross_entropy_sum`` with one reused (chunk, V) buffer."""
    import torch

    buffers: dict = {}

    class PreallocLinearCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, bias, targets, chunk):
            grad_h, grad_w, grad_b = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
            buf = buffers.get("logits")
            if buf is None or buf.size(0) < chunk:
                buf = buffers["logits"] = h.new_empty(chunk, weight.size(0))  # (c, V), kept for every step
            nll = h.new_zeros(())
            for s in range(0, h.size(0), chunk):
                hc, tc = h[s : s + chunk], targets[s : s + chunk]  # (c, H), (c,)
                g = buf[: hc.size(0)]  # (c, V)
                torch.addmm(bias, hc, weight.t(), out=g)
                m = g.amax(1, keepdim=True)  # (c, 1)
                nll -= g.gather(1, tc[:, None]).sum() - m.sum()
                g.sub_(m).exp_()
                z = g.sum(1, keepdim=True)  # (c, 1)
                nll += z.log().sum()
                g.div_(z)  # softmax
                g[torch.arange(tc.numel()), tc] -= 1.0
                torch.mm(g, weight, out=grad_h[s : s + chunk])
                grad_w.addmm_(g.t(), hc)
                grad_b += g.sum(0)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            return nll

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w, grad_b = ctx.saved_tensors
            return grad_h * grad_out, grad_w * grad_out, grad_b * grad_out, None, None

    return PreallocLinearCE


def worker(cfg: dict) -> dict:
    """Time ``cfg["steps"]`` training steps after 2 warm-up steps; per-phase seconds per step."""
    if cfg["tune"]:
        from lm.runtime import tune_allocator

        tune_allocator(True)
    import torch

    if "interop" in cfg:
        torch.set_num_interop_threads(cfg["interop"])
    if "threads" in cfg:
        torch.set_num_threads(cfg["threads"])
    from lm.losses import linear_cross_entropy_sum
    from lm.model import RNNLM
    from pipeline.data import TokenDataset, make_loader

    torch.manual_seed(0)
    if cfg.get("eval"):
        return _eval(cfg, model_cls=RNNLM)
    ds = TokenDataset(Path(cfg["prepared"]), "train")
    loader = make_loader(ds, max_tokens=4096, shuffle=True, seed=0)
    model = RNNLM(33_280, cell="lstm", embed_dim=200, hidden_size=200, num_layers=2, dropout_emb=0.2,
                  dropout_rnn=0.2, dropout_out=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=20)
    linear_ce = _prealloc_linear_ce().apply if cfg.get("prealloc") else linear_cross_entropy_sum
    bf16 = cfg.get("bf16", False)
    times = dict.fromkeys(PHASES, 0.0)
    tokens, losses, it = 0, [], iter(loader)
    for step in range(cfg["steps"] + 2):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        targets = batch.targets.data  # (N,)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            draw = model._draw(len(batch.lengths))  # this step's dropout masks
            _, h, _ = model._forward_fused(batch.inputs, None, draw, need_state=False)  # (N, H) after output dropout
            t2 = time.perf_counter()
            if bf16:
                nll = torch.nn.functional.cross_entropy(model.head(h).float(), targets, reduction="sum")
            else:
                nll = linear_ce(h, model.head.weight, model.head.bias, targets, 2048)
        t3 = time.perf_counter()
        (nll / targets.numel()).backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if step >= 2:
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[k] += dt
            tokens += targets.numel()
            losses.append(nll.item() / targets.numel())
    total = sum(times.values())
    return {"tokens_per_s": tokens / total, **{k: v / cfg["steps"] for k, v in times.items()}, "losses": losses}


def _eval(cfg: dict, model_cls) -> dict:
    """Validation the way ``lm.evaluate.evaluate`` scores it (chunked full softmax, no grad)."""
    import torch

    from pipeline.data import TokenDataset, make_loader

    model = model_cls(33_280, cell="lstm", embed_dim=200, hidden_size=200, num_layers=2).eval()
    it = iter(make_loader(TokenDataset(Path(cfg["prepared"]), "validation"), max_tokens=4096, shuffle=False))
    tokens, total = 0, 0.0
    with torch.no_grad():
        for step in range(cfg["steps"] + 2):
            t0 = time.perf_counter()
            out = model(next(it), need_state=False, need_logits=False)
            out.nll_sum.item()
            if step >= 2:
                total += time.perf_counter() - t0
                tokens += out.num_tokens
    return {"tokens_per_s": tokens / total, **dict.fromkeys(PHASES, 0.0), "out": total / cfg["steps"], "losses": []}


def accuracy(prepared: str, batches: int = 4) -> dict:
    """bf16 autocast against fp32, same weights, same batches (eval mode, no dropout)."""
    import torch

    from lm.model import RNNLM
    from pipeline.data import TokenDataset, make_loader

    torch.manual_seed(0)
    model = RNNLM(33_280, cell="lstm", embed_dim=200, hidden_size=200, num_layers=2).eval()
    loader = make_loader(TokenDataset(Path(prepared), "validation"), max_tokens=4096, shuffle=False)
    diffs, n = [], 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == batches:
                break
            ref = model(batch, need_state=False).logits.float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(batch, need_state=False).logits.float()
            t = batch.targets.data
            a = torch.nn.functional.cross_entropy(ref, t, reduction="none")
            b = torch.nn.functional.cross_entropy(low, t, reduction="none")
            diffs.append((a - b).abs().sum().item())
            n += t.numel()
    return {"mean_abs_nll_diff": sum(diffs) / n}


def profile(prepared: str, steps: int) -> None:
    """torch.profiler's operator table for the tuned fp32 step."""
    from lm.runtime import tune_allocator

    tune_allocator(True)
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from lm.model import RNNLM
    from pipeline.data import TokenDataset, make_loader

    torch.manual_seed(0)
    loader = make_loader(TokenDataset(Path(prepared), "train"), max_tokens=4096, shuffle=True, seed=0)
    model = RNNLM(33_280, cell="lstm", embed_dim=200, hidden_size=200, num_layers=2, dropout_emb=0.2,
                  dropout_rnn=0.2, dropout_out=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=20)
    it = iter(loader)

    def step():
        out = model(next(it), need_state=False, need_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(steps):
            step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="a subset of the variant names")
    ap.add_argument("--profile", action="store_true", help="only print torch.profiler's operator table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        print(json.dumps(accuracy(cfg["prepared"]) if cfg.get("accuracy") else worker(cfg)))
        return
    prepared = str(prepared_dir(args.data))
    subprocess.run([sys.executable, "-m", "pipeline.prepare", str(ROOT / "recipes" / "wikitext.yaml"),
                    f"data.source.dir={args.data}", f"data.output={prepared}", "--quiet"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    if args.profile:
        profile(prepared, args.steps)
        return

    def run(cfg: dict) -> dict:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**cfg, "prepared": prepared})],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        return json.loads(out.stdout)

    print(f"{args.steps} timed steps per run, {args.rounds} interleaved rounds; seconds per step by phase")
    print(f"{'round':>5s} {'variant':26s} {'load':>5s} {'tokens/s':>9s} " + " ".join(f"{k:>6s}" for k in PHASES))
    res: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rnd in range(args.rounds):
        for name in args.variants:
            load = os.getloadavg()[0]
            r = run({**VARIANTS[name], "steps": args.steps})
            res[name].append(r)
            print(f"{rnd:5d} {name:26s} {load:5.1f} {r['tokens_per_s']:9,.0f} "
                  + " ".join(f"{r[k]:6.3f}" for k in PHASES), flush=True)
    ref = statistics.median(r["tokens_per_s"] for r in res[args.variants[0]])
    print(f"\nmedian tokens/s over rounds, ratio to {args.variants[0]!r}")
    for name, rs in res.items():
        rate = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"{name:26s} {rate:9,.0f}  {rate / ref:5.2f}x  " + " ".join(
            f"{k} {statistics.median(r[k] for r in rs):.3f}" for k in PHASES), flush=True)
    if "bf16 autocast, tuned" in res:
        fp32 = res[args.variants[0]][0]["losses"]
        low = res["bf16 autocast, tuned"][0]["losses"]
        acc = run({"accuracy": True, "tune": False})
        print(f"\nbf16 accuracy: mean |NLL_bf16 - NLL_fp32| per token (forward, same weights) "
              f"{acc['mean_abs_nll_diff']:.4f} nats; training loss after {len(fp32)} + 2 steps "
              f"fp32 {fp32[-1]:.4f} vs bf16 {low[-1]:.4f}")


if __name__ == "__main__":
    main()
