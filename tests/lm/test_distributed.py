"""DDP on CPU: ``torchrun --nproc_per_node 2 -m lm.train`` on a split whose batch count is
odd finishes without hanging, counts the tokens of both ranks, keeps the replicas
identical (the trainer's end-of-run check, tested here too), and logs the validation
perplexity a single process computes for the same checkpoint."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm.generate
import lm.train
from lm.batches import batch_source
from lm.config import ModelConfig, TrainConfig
from lm.distributed import Dist, check_replicas
from lm.evaluate import evaluate
from lm.model import build_model
from pipeline.data import TokenDataset
from pipeline.sampling import BucketBatchSampler

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS, SEED = 256, 1234


def ppl_of(model, ds: TokenDataset, *, world: int) -> float:
    """Validation perplexity in this process, over the batches each of ``world`` ranks would get."""
    nll, tokens = 0.0, 0
    for rank in range(world):
        source = batch_source(ds, TrainConfig(max_tokens=MAX_TOKENS, seed=SEED), Dist(rank, world), train=False, pin=False)
        n, t = evaluate(model, source, torch.device("cpu"), Dist())  # summed here, not over ranks
        nll, tokens = nll + n, tokens + t
    return math.exp(nll / tokens)


def test_torchrun_two_ranks_uneven_batches(toy_recipe, toy_prepared, lm_env):
    train_lengths = TokenDataset(toy_prepared, "train").lengths
    one = BucketBatchSampler(train_lengths, max_tokens=MAX_TOKENS, seed=SEED)
    assert len(one) % 2 == 1  # 13 batches: the sampler must split one so both ranks get 7
    two = [BucketBatchSampler(train_lengths, max_tokens=MAX_TOKENS, seed=SEED, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(two[0]) == len(two[1]) == 7

    steps = 5  # mid-epoch: the trainer validates at the max_steps stop
    path = toy_recipe("ddp", train={"epochs": None, "max_steps": steps, "checkpoint_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lm.train", str(path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=lm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| world 2" in proc.stderr and "replicas diverged" not in proc.stderr

    out = path.parent / "ddp"
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == steps and result["stopped_by"] == "max_steps" and result["test_ppl"] > 1
    # tokens count both ranks' batches: the first 5 of each rank's plan for epoch 0
    want = sum(int(sum(train_lengths[i] - 1 for i in b)) for s in two for b in s.plan(0)[:steps])
    assert result["tokens"] == want
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, steps + 1))
    assert [r["tokens"] for r in recs if r["split"] == "train"][-1] == want
    (val,) = [r for r in recs if r["split"] == "validation"]
    assert val["step"] == steps

    # the final step checkpoint (what was validated) evaluated here, in one process
    model, _ = lm.generate.load_model(str(out / "checkpoints" / f"step-{steps:08d}.pt"))
    val_ds = TokenDataset(toy_prepared, "validation")
    assert val["tokens"] == val_ds.num_tokens
    assert val["ppl"] == pytest.approx(ppl_of(model, val_ds, world=2), rel=1e-9)  # the same batches: exact
    assert val["ppl"] == pytest.approx(ppl_of(model, val_ds, world=1), rel=1e-6)  # other batching: float32 sums


# --------------------------------------------------------------------------- the replica check itself


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(cell="gru", embed_dim=8, hidden_size=8, num_layers=1), 11)


def two_ranks(other) -> Dist:
    """Rank 0 of 2, whose peer reports ``other(its own digest)``."""
    d = Dist(rank=0, world=2)
    d.all_gather = lambda obj: [obj, other(obj)]
    return d


def test_replica_check_passes_on_equal_weights_and_fails_on_any_difference():
    model = tiny_model()
    seen = []
    check_replicas(model, two_ranks(lambda x: (seen.append(x), x)[1]))  # the same digest: no error
    twin = tiny_model()
    check_replicas(twin, two_ranks(lambda x: x))
    with torch.no_grad():  # one weight one ulp away
        w = twin.rnn.weight_hh_l0
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(math.inf))
    other = []
    check_replicas(twin, two_ranks(lambda x: (other.append(x), x)[1]))
    assert other[0] != seen[0]
    with pytest.raises(RuntimeError, match="DDP replicas diverged"):
        check_replicas(model, two_ranks(lambda x: other[0]))


def test_replica_check_is_free_in_one_process():
    d = Dist()
    d.all_gather = lambda obj: pytest.fail("one process gathers nothing")
    check_replicas(tiny_model(), d)


# --------------------------------------------------------------------------- adaptive softmax under DDP


def test_torchrun_two_ranks_adaptive_softmax_with_tiny_batches(toy_recipe, toy_prepared, lm_env):
    """One sentence per batch: a rank whose batch has no target in a tail cluster leaves
    that cluster's weights without a gradient. DDP must be told (``find_unused_parameters``),
    else the next step fails with "Expected to have finished reduction in the prior iteration"."""
    manifest = json.loads((toy_prepared / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    cutoffs = [8, vocab - 6]  # the last cluster: the 6 rarest words
    train = TokenDataset(toy_prepared, "train")
    steps = 6
    plans = [BucketBatchSampler(train.lengths, max_tokens=16, seed=SEED, num_replicas=2, rank=r).plan(0) for r in (0, 1)]
    tail_hit = [any(int(t) >= cutoffs[-1] for i in batch for t in train[i][1:]) for p in plans for batch in p[:steps]]
    assert not all(tail_hit)  # the condition that crashed: a rank's batch without a target in the last cluster
    path = toy_recipe("ddp_adaptive", model={"adaptive_cutoffs": cutoffs},
                      train={"epochs": None, "max_steps": steps, "max_tokens": 16, "eval_every": None})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lm.train", str(path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=lm_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Expected to have finished reduction" not in proc.stderr and "replicas diverged" not in proc.stderr
    result = json.loads((path.parent / "ddp_adaptive" / "result.json").read_text())
    assert result["steps"] == steps and math.isfinite(result["best_val_ppl"])


# --------------------------------------------------------------------------- no best checkpoint


NAN_VALIDATION = """
import math, os, sys
import lm.train

_evaluate = lm.train.evaluate


def nan_evaluate(*args, **kwargs):  # every validation non-finite: rank 0 never writes best.pt
    nll, tokens = _evaluate(*args, **kwargs)  # the collective still runs
    return math.nan, tokens


lm.train.evaluate = nan_evaluate
code = lm.train.main(sys.argv[1:])
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)  # as lm.train's __main__ under torchrun
"""


def run_killable(cmd, timeout: float, **kw) -> subprocess.CompletedProcess | None:
    """``subprocess.run`` in its own process group, killed whole on timeout (``None``):
    torchrun's workers must not outlive a hung test."""
    import os
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_finishes_when_no_validation_was_finite(toy_recipe, lm_env, tmp_path):
    script = tmp_path / "nan_validation.py"
    script.write_text(NAN_VALIDATION)
    path = toy_recipe("ddp_nan", train={"epochs": None, "max_steps": 3, "eval_every": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(path)]
    proc = run_killable(cmd, timeout=60, cwd=REPO_ROOT, env=lm_env)  # a normal run takes ~10 s
    assert proc is not None, "the ranks hung (rank 0 had no best.pt, rank 1 waited in barrier)"  # NCCL's way
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = path.parent / "ddp_nan"
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["best_val_ppl"] is None and "test_ppl" not in result
    assert not (out / "checkpoints" / "best.pt").exists()


# --------------------------------------------------------------------------- resume on another number of ranks


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_trains_every_sequence_once(toy_recipe, toy_prepared, lm_env, before, after):
    """Stop after 3 steps on ``before`` ranks, finish the epoch on ``after``: the epoch's
    predicted tokens are exactly the training split's (each sequence once)."""
    path = toy_recipe(f"elastic{before}{after}", train={"epochs": 1, "max_steps": 3, "checkpoint_every": 3, "eval_every": None})

    def launch(world: int, *overrides: str) -> subprocess.CompletedProcess:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] if world > 1 \
            else [sys.executable]
        proc = subprocess.run([*head, "-m", "lm.train", str(path), *overrides], cwd=REPO_ROOT, env=lm_env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    launch(before)
    out = path.parent / f"elastic{before}{after}"
    first = json.loads((out / "result.json").read_text())
    assert first["steps"] == 3 and first["stopped_by"] == "max_steps"
    launch(after, "train.resume=auto", "train.max_steps=null")
    result = json.loads((out / "result.json").read_text())
    train = TokenDataset(toy_prepared, "train")
    assert result["stopped_by"] == "epochs" and result["tokens"] == train.num_tokens
    lengths = train.lengths
    saved = BucketBatchSampler(lengths, max_tokens=MAX_TOKENS, seed=SEED, num_replicas=before)
    rest = len(saved._global_plan(0, before)[1]) - 3 * before  # batches left after 3 steps
    assert result["steps"] == 3 + -(-rest // after)  # the rest, split if needed, dealt to `after` ranks
