"""lm.train end to end on CPU with a tiny model and the toy corpus: the loss falls, the log
and checkpoints hold what they promise, the test perplexity is what an independent
evaluation of best.pt gives, resume (in-process, and after SIGKILL / SIGTERM of a real
process) is bit-identical to an uninterrupted run, scheduled sampling follows its
schedule, and the CLIs (lm.train, lm.generate) work as a user runs them."""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lm.distributed
import lm.generate
import lm.train
from lm import checkpoint
from lm.config import load
from lm.distributed import StopSignal
from lm.report import resume_command
from pipeline.collate import PackedCollator
from pipeline.data import TokenDataset, read_manifest
from pipeline.sampling import BucketBatchSampler

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_KEYS = {"step", "epoch", "split", "loss", "ppl", "lr", "tokens", "elapsed_s", "tokens_per_s", "grad_norm",
              "teacher_forcing", "skipped_steps"}


def records(out_dir: Path, split: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if split is None or r["split"] == split]


def assert_same(a, b, path: str = "") -> None:
    """Bit-identical nested checkpoint content (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two step checkpoints agree on everything that determines the rest of training."""
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    for key in ("model", "optimizer", "schedule", "data", "carry", "rng", "tf_ratio"):
        assert_same(ca[key], cb[key], key)
    progress = lambda c: {k: v for k, v in c["progress"].items() if k != "elapsed"}  # noqa: E731
    assert progress(ca) == progress(cb)


# --------------------------------------------------------------------------- one full run, inspected


@pytest.fixture(scope="module")
def trained(tmp_path_factory, recipe_writer, toy_prepared):
    """Two whole epochs (13 batches each, see ``batches_per_epoch``) of a 1-layer GRU, plot on;
    (out_dir, result, recipe)."""
    folder = tmp_path_factory.mktemp("trained")
    path = recipe_writer(folder, "run", train={"plot": True})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = lm.train.run(load(path))
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "run() must restore the signal handlers"
    return folder / "run", result, path


def batches_per_epoch(prepared: Path, max_tokens: int = 256) -> int:
    return len(BucketBatchSampler(TokenDataset(prepared, "train").lengths, max_tokens=max_tokens))


def train_plan(prepared: Path, epochs: int, seed: int = 1234, max_tokens: int = 256) -> list[int]:
    """Predicted tokens of every training batch, in order, computed from the sampler's plan."""
    lengths = TokenDataset(prepared, "train").lengths
    sampler = BucketBatchSampler(lengths, max_tokens=max_tokens, shuffle=True, seed=seed)
    return [int(sum(lengths[i] - 1 for i in batch)) for e in range(epochs) for batch in sampler.plan(e)]


def test_training_lowers_the_loss_and_logs_every_step(trained, toy_prepared):
    out, result, _ = trained
    train, n = records(out, "train"), batches_per_epoch(toy_prepared)
    assert n == 13
    assert [r["step"] for r in train] == list(range(1, 2 * n + 1))  # log_every=1
    assert all(set(r) == TRAIN_KEYS for r in train)
    assert train[0]["loss"] > train[-1]["loss"] + 0.2
    assert np.mean([r["loss"] for r in train[:5]]) > np.mean([r["loss"] for r in train[-5:]])
    assert [r["epoch"] for r in train] == [0] * n + [1] * n
    for r in train:
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-8)  # both logged to 10 digits
        assert r["lr"] == 0.01 and r["teacher_forcing"] == 1.0 and r["skipped_steps"] == 0
        assert r["elapsed_s"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(train, train[1:]))


def test_tokens_are_the_cumulative_predicted_tokens_trained_on(trained, toy_prepared):
    out, result, _ = trained
    per_batch = train_plan(toy_prepared, epochs=2)
    assert [r["tokens"] for r in records(out, "train")] == np.cumsum(per_batch).tolist()
    train_tokens = read_manifest(toy_prepared)["splits"]["train"]["tokens"]
    assert result["tokens"] == 2 * train_tokens == sum(per_batch)


def test_validation_at_each_epoch_end_with_ppl_exp_loss(trained, toy_prepared):
    out, result, _ = trained
    val = records(out, "validation")
    manifest = read_manifest(toy_prepared)
    n = batches_per_epoch(toy_prepared)
    assert [(r["step"], r["epoch"]) for r in val] == [(n, 0), (2 * n, 1)]
    for r in val:
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-8)
        assert r["tokens"] == manifest["splits"]["validation"]["tokens"]
    assert val[0]["best"] and val[1]["best"] == (val[1]["loss"] < val[0]["loss"])
    best_loss = min(r["loss"] for r in val)
    assert result["best_val_ppl"] == pytest.approx(math.exp(best_loss), rel=1e-9)
    assert checkpoint.load(out / "checkpoints" / "best.pt")["val_loss"] == pytest.approx(best_loss, rel=1e-9)


def test_checkpoints_result_and_saved_recipe(trained, toy_prepared):
    out, result, recipe = trained
    ck, n = out / "checkpoints", batches_per_epoch(toy_prepared)
    assert sorted(p.name for p in ck.iterdir()) == [
        "best.pt", "best.pt.sha256", f"step-{n:08d}.pt", f"step-{n:08d}.pt.sha256",
        f"step-{2 * n:08d}.pt", f"step-{2 * n:08d}.pt.sha256"]  # an epoch-end save each, keep_checkpoints=2
    last = checkpoint.load(ck / f"step-{2 * n:08d}.pt")
    assert last["kind"] == "epochs" and last["progress"]["step"] == 2 * n and last["progress"]["epoch"] == 2
    assert "optimizer" not in checkpoint.load(ck / "best.pt")
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk == result
    assert result["steps"] == 2 * n and result["epochs"] == 2 and result["stopped_by"] == "epochs"
    assert result["skipped_steps"] == 0 and result["test_ppl"] > 1
    assert records(out, "test")[-1]["ppl"] == pytest.approx(result["test_ppl"], rel=1e-9)
    assert load(out / "recipe.yaml") == load(recipe)  # the run's recipe, reloadable as is


def test_test_ppl_equals_an_independent_evaluation_of_best_pt(trained, toy_prepared):
    out, result, _ = trained
    model, ckpt = lm.generate.load_model(str(out / "checkpoints" / "best.pt"))
    test = TokenDataset(toy_prepared, "test")
    # all 40 test sequences in ONE packed batch: batching unlike the trainer's buckets
    batch = PackedCollator(pad_id=0)([test[i] for i in range(len(test))])
    with torch.no_grad():
        out_ = model(batch)
    assert out_.num_tokens == test.num_tokens == read_manifest(toy_prepared)["splits"]["test"]["tokens"]
    assert math.exp(out_.nll_sum.item() / out_.num_tokens) == pytest.approx(result["test_ppl"], rel=1e-6)


def test_plot_written(trained):
    out, _, _ = trained
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the trainer says so instead (matplotlib is an optional extra)
        assert not (out / "curves.png").exists()
        return
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- resume, in-process


RESUME_MODEL = {"cell": "lstm", "num_layers": 2, "dropout_emb": 0.1, "dropout_rnn": 0.2, "dropout_out": 0.1}


def test_resume_is_bit_identical_to_an_uninterrupted_run(toy_recipe, capsys):
    """8 steps, stop, resume to 16 (across the epoch end at 13) == 16 straight."""
    train = {"epochs": None, "schedule": "constant"}
    a = toy_recipe("a", model=RESUME_MODEL, train=train)
    b = toy_recipe("b", model=RESUME_MODEL, train=train)
    lm.train.run(load(a, ["train.max_steps=16"]))
    lm.train.run(load(b, ["train.max_steps=8"]))
    assert checkpoint.load(b.parent / "b" / "checkpoints" / "step-00000008.pt")["progress"]["consumed"] == 8
    capsys.readouterr()
    lm.train.run(load(b, ["train.max_steps=16", "train.resume=auto"]))
    assert "resumed from" in capsys.readouterr().err
    ck = "checkpoints/step-00000016.pt"
    assert_same_training_state(a.parent / "a" / ck, b.parent / "b" / ck)
    # the resumed half logged exactly what the straight run logged for the same steps
    ra = {r["step"]: r["loss"] for r in records(a.parent / "a", "train")}
    rb = {r["step"]: r["loss"] for r in records(b.parent / "b", "train")}
    assert [rb[s] for s in range(9, 17)] == [ra[s] for s in range(9, 17)]


def test_resuming_a_finished_run_trains_no_further(toy_recipe):
    """The same command again (a requeued job) after the run ended: no extra step or epoch."""
    for name, train, last in (("steps", {"epochs": None, "max_steps": 3}, 3), ("epochs", {"epochs": 1}, 13)):
        path = toy_recipe(name, train=train)
        first = lm.train.run(load(path))
        ck = path.parent / name / "checkpoints"
        final = ck / f"step-{last:08d}.pt"
        before = final.read_bytes()
        again = lm.train.run(load(path, ["train.resume=auto"]))
        assert (again["steps"], again["epochs"], again["tokens"]) == (first["steps"], first["epochs"], first["tokens"])
        assert checkpoint.step_checkpoints(ck)[0] == final and final.read_bytes() == before
        assert again["test_ppl"] == first["test_ppl"]


# --------------------------------------------------------------------------- resume after kill -9 and SIGTERM


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_sigterm_then_sigkill_then_resume_is_bit_identical(toy_recipe, lm_env):
    """One long epoch (batch_size=1: 300 steps), 120 of them; checkpoints every 7 steps.
    Run 1 gets SIGTERM: it saves, says how to resume, exits 143. Run 2 resumes and is
    killed with SIGKILL mid-epoch after its next checkpoint. Run 3 resumes and finishes.
    The final step checkpoint equals an uninterrupted in-process run's, bit for bit."""
    M = 120
    train = {"epochs": None, "max_steps": M, "max_tokens": None, "batch_size": 1, "checkpoint_every": 7,
             "log_every": 10}
    ref = toy_recipe("ref", model=RESUME_MODEL, train=train)
    rec = toy_recipe("killed", model=RESUME_MODEL, train=train)
    ckdir = rec.parent / "killed" / "checkpoints"

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "lm.train", str(rec), *extra], cwd=REPO_ROOT, env=lm_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def steps() -> list[int]:
        return [int(p.name[5:13]) for p in checkpoint.step_checkpoints(ckdir)]

    p1 = start()
    wait_for(lambda: steps(), p1, "a first checkpoint")
    p1.send_signal(signal.SIGTERM)
    _, err = p1.communicate(timeout=60)
    assert p1.returncode == 128 + signal.SIGTERM, err
    saved = max(steps())
    assert 7 <= saved < M
    assert "SIGTERM: stopping after this step; saving a checkpoint" in err  # acknowledged at once
    assert f"SIGTERM: saved a checkpoint at step {saved}" in err
    assert f"python -m lm.train {rec} train.resume=auto" in err

    p2 = start("train.resume=auto")
    wait_for(lambda: max(steps()) > saved, p2, "a checkpoint after the resumed one")
    p2.kill()  # SIGKILL: no handler, no final save
    p2.communicate(timeout=60)
    assert p2.returncode == -signal.SIGKILL
    killed_at = max(steps())
    assert killed_at < M and killed_at % 300 != 0  # mid-epoch

    p3 = start("train.resume=auto")
    lm.train.run(load(ref))  # meanwhile, the same run never interrupted, in this process
    _, err = p3.communicate(timeout=120)
    assert p3.returncode == 0, err
    assert f"resumed from {checkpoint.step_path(ckdir, killed_at)} at step {killed_at}" in err
    final = f"step-{M:08d}.pt"
    assert_same_training_state(ref.parent / "ref" / "checkpoints" / final, ckdir / final)


def test_a_log_file_gets_plain_progress_lines_at_the_time_interval(toy_recipe, lm_env):
    """stderr not a terminal (a job scheduler, ``> log 2>&1``): no bar, a plain line at least
    every ``train.progress_every`` seconds (here the step-based log never comes), and the
    validation and test perplexities as they are computed, naming protocol and tokens."""
    rec = toy_recipe("log", train={"epochs": None, "max_steps": 30, "max_tokens": None, "batch_size": 1,
                                   "log_every": 1000, "progress_every": 1e-9})  # due after every step
    proc = subprocess.run([sys.executable, "-m", "lm.train", str(rec)], cwd=REPO_ROOT, env=lm_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    progress = [line for line in lines if line.startswith("step ") and "loss" in line]
    assert len(progress) == 30, proc.stderr  # the time interval, not log_every, brought every line
    pattern = (r"^step (\d+) \| epoch 0 \| loss \d+\.\d{4} \| ppl \d+\.\d{2} \| lr 0\.01 \| [\d,]+ tok/s \| "
               r"\d+s \((\d+)% of max_steps 30\)$")
    for line in progress:
        step, pct = map(int, re.match(pattern, line).groups())
        assert pct == round(100 * step / 30)
    assert "\r" not in proc.stderr  # no progress bar redraws in a log file
    assert re.search(r"^step 30 \| epoch 0 \| validation perplexity [\d.]+ \(sequence protocol, 366 tokens\) \| best$",
                     proc.stderr, re.M)
    assert re.search(r"^test perplexity [\d.]+ \(sequence protocol, 332 tokens\)$", proc.stderr, re.M)
    recs = records(rec.parent / "log", "train")
    assert [r["step"] for r in recs] == [int(line.split()[1]) for line in progress]  # the same records


def test_the_resume_command_reproduces_a_torchrun_launch(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    argv = ["recipes/ptb.yaml", "train.prompts=[a b, c]"]
    assert resume_command(argv) == "python -m lm.train recipes/ptb.yaml 'train.prompts=[a b, c]' train.resume=auto"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(argv[:1]) == \
        "torchrun --nproc_per_node 2 -m lm.train recipes/ptb.yaml train.resume=auto"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert resume_command(argv[:1]) == ("torchrun --nproc_per_node 8 --nnodes 2 --rdzv_backend c10d "
                                                  "--rdzv_endpoint node0:29500 -m lm.train recipes/ptb.yaml "
                                                  "train.resume=auto")


# --------------------------------------------------------------------------- scheduled sampling


def test_scheduled_sampling_logs_the_linear_teacher_forcing_ratio(toy_recipe):
    path = toy_recipe(train={"epochs": None, "max_steps": 6, "lr": 1e-4, "warmup_steps": 1000,
                             "teacher_forcing": {"schedule": "linear", "start": 1.0, "end": 0.0, "decay_steps": 10}})
    lm.train.run(load(path))
    train = records(path.parent / "recipe", "train")
    # the ratio used for step i (0-based) is logged with step i + 1
    assert [r["teacher_forcing"] for r in train] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], abs=1e-12)
    # so is the lr, however small (warmup: 1e-4 * (i + 1) / 1000)
    assert [r["lr"] for r in train] == pytest.approx([1e-7 * (i + 1) for i in range(6)], rel=1e-9)
    assert all(math.isfinite(r["loss"]) for r in train)
    last = checkpoint.load(path.parent / "recipe" / "checkpoints" / "step-00000006.pt")
    assert last["tf_ratio"] == pytest.approx(0.4, abs=1e-12)  # what step 6 would use next


def test_non_finite_steps_are_skipped_then_abort_with_a_message(toy_recipe, monkeypatch):
    """Gradients that are not finite skip the step (weights untouched, counted); after
    max_nonfinite of them in a row the run stops with a UserError naming lr and clip."""
    path = toy_recipe(train={"epochs": None, "max_steps": 20, "max_nonfinite": 3, "log_every": 1})
    real_forward = lm.train.RNNLM.forward
    calls = []

    def poisoned(self, batch, *args, **kwargs):  # steps 3, 4, 5 (1-based) produce a NaN loss
        out = real_forward(self, batch, *args, **kwargs)
        calls.append(1)
        if self.training and 3 <= len(calls) <= 5:
            out.nll_sum = out.nll_sum * float("nan")
        return out

    monkeypatch.setattr(lm.train.RNNLM, "forward", poisoned)
    with pytest.raises(lm.train.UserError, match=r"not finite for 3 steps in a row at step 4; lower train.lr"):
        lm.train.run(load(path))
    train = records(path.parent / "recipe", "train")
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 2]
    assert [math.isfinite(r["grad_norm"]) for r in train] == [True, True, False, False]


# --------------------------------------------------------------------------- the CLIs


def test_cli_train_tiny_recipe_then_generate(tmp_path, toy_corpus, toy_prepared, lm_env, capsys):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "lm.train", "recipes/tiny.yaml", f"data.source.dir={toy_corpus}",
           f"data.output={toy_prepared}", f"train.output_dir={out}", "train.max_steps=3", "train.device=cpu",
           "train.plot=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=lm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cache hit" in proc.stderr  # the same data section as the toy fixture: nothing re-prepared
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["stopped_by"] == "max_steps" and result["test_ppl"] > 1
    best = out / "checkpoints" / "best.pt"

    prompts = ["the small cat", "one two"]
    args = [str(best), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "5"]
    gen = subprocess.run([sys.executable, "-m", "lm.generate", *args], cwd=REPO_ROOT, env=lm_env,
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.splitlines()
    assert len(lines) == 2
    for line, prompt in zip(lines, prompts):
        assert line.startswith(prompt)
        assert len(line[len(prompt):].split()) <= 5
    # greedy: a second invocation (in this process) prints exactly the same
    capsys.readouterr()
    assert lm.generate.main(args) == 0
    assert capsys.readouterr().out == gen.stdout


def test_a_forwarded_copy_of_the_signal_is_the_same_stop_and_a_later_one_stops_now(monkeypatch):
    """torchrun forwards the terminal's Ctrl-C to workers that already got it: that copy must
    not abort the checkpoint; a second Ctrl-C a second later must stop at once."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    clock = [100.0]
    monkeypatch.setattr(lm.distributed.time, "monotonic", lambda: clock[0])
    try:
        stop = StopSignal(announce=False)
        stop._handle(signal.SIGINT, None)
        clock[0] += 0.2
        stop._handle(signal.SIGINT, None)  # the launcher's copy: ignored
        assert stop.signum == signal.SIGINT
        clock[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
        other = StopSignal(announce=False)
        other.agree(signal.SIGTERM)  # learned from another rank; its own copy arrives next
        other._handle(signal.SIGTERM, None)
        assert other.signum == signal.SIGTERM
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_a_periodic_validation_a_few_steps_before_an_epoch_end_waits_for_it(toy_recipe, toy_prepared):
    """13 batches an epoch, eval_every 10: step 10 is 3 steps (< 10 / 2) before the epoch's
    own validation, so it waits for it; step 20 is 6 steps before, so it validates. The same
    holds before a max_steps stop. Without the rule: validations at 10 and 13, a plateau
    schedule and NT-ASGD counting one model twice."""
    assert batches_per_epoch(toy_prepared) == 13
    path = toy_recipe("epochs", train={"epochs": 2, "eval_every": 10, "log_every": 100})
    lm.train.run(load(path))
    assert [r["step"] for r in records(path.parent / "epochs", "validation")] == [13, 20, 26]
    path = toy_recipe("steps", train={"epochs": None, "max_steps": 12, "eval_every": 10, "log_every": 100})
    lm.train.run(load(path))
    assert [r["step"] for r in records(path.parent / "steps", "validation")] == [12]
