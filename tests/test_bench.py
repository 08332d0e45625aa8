"""Every ``bench/`` script runs, so a moved or renamed name breaks the suite, not a user.

Each script runs with its smallest flags on a generated corpus shaped like WikiText-2's
folder (train/valid/test.txt, 20,000 / 2,000 / 2,000 lines), in a fresh interpreter as a
user starts it, and must print the line its report is made of. Scripts that only launch
``python -m lm.train`` runs for a long measured window (train_speed, train_memory,
ptex_protocol) print their help here, and the recipe overrides they pass are loaded
through ``lm.config.load``, so a renamed recipe key breaks this test too. ``bench/gpu.py``
is tested in ``tests/test_gpu_bench.py``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT.parent / "shared" / "anchors"
WORDS = ("the cat dog sat on a mat and ran to house tree red blue big small quick slow who what it "
         "is was saw found left right , . <unk>").split()


def _lines(rng: random.Random, n: int) -> str:
    return "".join(" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 30))) + " \n" if i % 7 else "\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A WikiText-2-shaped folder: lines of 1-30 words from a 32-word vocabulary, every
    seventh line blank (as WikiText's are)."""
    folder = tmp_path_factory.mktemp("bench") / "corpus"
    folder.mkdir()
    rng = random.Random(0)
    for name, n in (("train.txt", 20_000), ("valid.txt", 2_000), ("test.txt", 2_000)):
        (folder / name).write_text(_lines(rng, n))
    return folder


@pytest.fixture(scope="module", autouse=True)
def _own_tmpdir(tmp_path_factory):
    """The benches cache prepared copies under $TMPDIR (bench/common.py): here, under pytest's
    temporary folder, so test runs leave nothing behind in /tmp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        yield


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def bench(*args: str, timeout: float = 300) -> str:
    """Run ``python bench/ARGS`` from the repository root; its stdout + stderr (it must succeed)."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def script(name: str):
    """``bench/NAME.py`` imported as a module (its ``main`` not run)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def needs_anchors() -> None:
    if not (ANCHORS / "ptex_like.py").is_file():
        pytest.skip(f"{ANCHORS} is absent (pytorch/examples' reference scripts, ../shared/anchors)")


def test_collate(corpus):
    out = bench("bench/collate.py", "--data", str(corpus), "--repeats", "1")
    assert re.search(r"PackedCollator.*\d", out)


def test_loader(corpus):
    out = bench("bench/loader.py", "--data", str(corpus), "--max-tokens", "512")
    assert re.search(r"make_loader \(packed\), num_workers=0 +[\d,]+ batches/s", out)


def test_prepare(corpus, tmp_path):
    out = bench("bench/prepare.py", "--data", str(corpus), "--repeat", "1", "--scales", "1", "--num-proc", "1",
                "--no-anchor", "--workdir", str(tmp_path / "work"))
    assert re.search(r"pipeline\.prepare num_proc=1 .* [\d,]+ ", out)


def test_stream(corpus):
    out = bench("bench/stream.py", "--data", str(corpus), "--repeat", "1", "--rounds", "1")
    assert "x1       20,000 rows" in out


def test_train_profile(corpus):
    out = bench("bench/train_profile.py", "--data", str(corpus), "--steps", "1", "--rounds", "1",
                "--variants", "fp32, tuned", "prealloc out, tuned", "bf16 autocast, tuned", "eval, tuned")
    for variant in ("fp32, tuned", "prealloc out, tuned", "bf16 autocast, tuned", "eval, tuned"):
        assert re.search(rf"^{re.escape(variant)} +[\d,]+ +[\d.]+x", out, re.M), variant
    assert "bf16 accuracy: mean |NLL_bf16 - NLL_fp32|" in out


def test_cpu_bf16(corpus, tmp_path):
    prepared = tmp_path / "prepared"
    bench("-m", "pipeline.prepare", "recipes/wikitext.yaml", f"data.source.dir={corpus}", f"data.output={prepared}",
          "--quiet")
    out = bench("bench/cpu_bf16.py", str(prepared), "--rounds", "1", "--batches", "1", "--max-tokens", "512")
    assert re.search(r"^train +fp32 +[\d,]+ tok/s +bf16 +[\d,]+ tok/s", out, re.M)


def test_time_to_quality_and_results(corpus, tmp_path):
    """Our side of time_to_quality (a few seconds of the CPU profile), then RESULTS.md rows
    from a finished run (bench/results.py reads what lm.train writes in result.json)."""
    out = bench("bench/time_to_quality.py", "--data", str(corpus), "--minutes", "0.05", "--only", "ours",
                "--keep", str(tmp_path / "keep"),
                "--extra", "train.device=cpu", "train.prompts=[]", "model.adaptive_cutoffs=[8, 16]")  # 33 ids
    result = json.loads(out.split("(CPU profile), 0.05 min: ", 1)[1].splitlines()[0])
    assert result["val_ppl"] > 1 and result["steps"] > 0
    kept = tmp_path / "keep" / "cpu_0.05min"
    assert json.loads((kept / "result.json").read_text())["best_val_ppl"] == result["val_ppl"]
    run = tmp_path / "run"
    bench("-m", "lm.train", "recipes/tiny.yaml", f"data.source.dir={corpus}", f"data.output={tmp_path / 'data'}",
          f"train.output_dir={run}", "train.max_steps=2", "train.eval_every=null", "train.plot=false", "train.prompts=[]")
    out = bench("bench/results.py", str(run), "--per-minute", str(kept))
    assert re.search(r"^\| `recipes/tiny\.yaml` \| sequence \| [\d.]+ \([\d,]+\) \|", out, re.M)
    assert re.search(rf"^\| 0\.05 min \| {result['val_ppl']:.2f} \(", out, re.M)
    assert "train.max_time=3 " in out  # the kept run's own command


@pytest.mark.parametrize("name", ["train_speed", "train_memory", "ptex_protocol", "time_to_quality", "results",
                                  "gpu"])
def test_help(name):
    assert "usage:" in bench(f"bench/{name}.py", "--help")


def test_the_overrides_of_the_trainer_benches_are_recipe_keys():
    from lm.config import load

    recipe = ROOT / "recipes" / "wikitext.yaml"
    assert load(recipe, script("train_speed").SAME_MODEL).model.hidden_size == 200
    assert load(recipe, script("train_memory").MODEL).model.hidden_size == 64


def test_train_speed_measures_against_the_anchor(corpus):
    """Both sides of the throughput bench for a few seconds: the anchor's tokens/s is parsed."""
    needs_anchors()
    speed = script("train_speed")
    r = speed.anchor(corpus, 3.0, {})
    assert r["rate"] > 0 and r["user"] >= 0
