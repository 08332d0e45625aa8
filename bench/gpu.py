"""One prepared GPU run: CUDA tests, tokens/s against pytorch/examples, a budgeted quality run.

For a machine with one CUDA GPU and only torch, pyarrow, tokenizers, tqdm and pyyaml
installed (no ``datasets``, no network). Everything it needs is staged beforehand on the
CPU side into one folder (``gpu_data/`` by default), which travels with the checkout:

    python bench/gpu.py --stage              # CPU side: raw WikiText-2, anchors, pytest copied in;
                                             # WikiText-2 prepared into gpu_data/wt2
    python bench/gpu.py --dry-run            # anywhere: checks that everything below would be found
    bench/gpu.sh [--out gpu_result.json]     # GPU side, <= 10 min: writes one JSON file

Stages of a run (each appended to the JSON as it finishes, so a timeout keeps the rest):
``env`` (torch, GPU, cuDNN, the precision policy), ``cuda_tests`` (pytest -m cuda and the
precision tests), ``anchor`` (pytorch/examples' default model, ``../shared/anchors/ptex_like.py``
run on the GPU), ``ours_same_model`` (lm.train with that model), ``recipe_speed``
(recipes/wikitext.yaml), ``quality`` (recipes/wikitext.yaml for ``--quality-seconds``, stream
protocol: the recipe's CUDA sections). Stages that no longer fit ``--budget`` are
recorded as skipped.

Prepared data is found by content: ``pipeline.prepare`` keys its cache on the source files'
absolute paths, so after the checkout moves, the manifest is re-keyed here when the staged
raw files have the very bytes (sha256) it was built from.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "wikitext.yaml"
PYTEST_PACKAGES = ["pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py"]

# Block `datasets` in a child interpreter: what the GPU machine lacks.
NO_DATASETS = (
    "import sys, importlib.abc\n"
    "class _Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'datasets' or name.startswith('datasets.'):\n"
    "            raise ImportError(f'{name} is blocked: the GPU machine has no datasets')\n"
    "sys.meta_path.insert(0, _Block())\n"
)

# pytorch/examples' anchor, unchanged, with torch's default device set to CUDA. Its loop reads
# the clock every step; syncing there is what pytorch/examples' own loss.item() per step does.
ANCHOR_ON_CUDA = (
    "import runpy, sys, time, torch\n"
    "torch.set_default_device('cuda')\n"
    "_clock = time.perf_counter\n"
    "time.perf_counter = lambda: (torch.cuda.synchronize(), _clock())[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


class Layout:
    """Where the staged files are (``--dir``) and where they come from (``--shared``)."""

    def __init__(self, stage_dir: Path, shared: Path | None) -> None:
        self.dir = stage_dir
        self.raw = stage_dir / "wikitext-2"
        self.prepared = stage_dir / "wt2"
        self.pylib = stage_dir / "pylib"
        self.shared = shared
        self.runs = stage_dir / "runs"

    @property
    def anchor(self) -> Path | None:
        """``ptex_like.py``: the staged copy, else ``<shared>/anchors``."""
        for p in (self.dir / "anchors" / "ptex_like.py", self.shared and self.shared / "anchors" / "ptex_like.py"):
            if p and p.is_file():
                return p
        return None

    def data_overrides(self) -> list[str]:
        return [f"data.source.dir={self.raw}", f"data.output={self.prepared}"]


def _shared_default() -> Path | None:
    env = os.environ.get("RNNLM_SHARED")
    for p in (Path(env) if env else None, ROOT.parent / "shared", ROOT / "shared"):
        if p and (p / "data").is_dir():
            return p
    return None


def _child_env(lay: Layout) -> dict:
    path = [str(ROOT), os.environ.get("PYTHONPATH", ""), str(lay.pylib)]  # the staged pytest last: an installed one wins
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


# --------------------------------------------------------------------------- stage (CPU side)


def stage(lay: Layout) -> None:
    """Copy raw WikiText-2, the anchors and pytest into ``lay.dir``; prepare WikiText-2 there."""
    if lay.shared is None:
        raise SystemExit("error: no ../shared (with data/ and anchors/) found; pass --shared")
    lay.dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(lay.shared / "data" / "wikitext-2", lay.raw, dirs_exist_ok=True)
    shutil.copytree(lay.shared / "anchors", lay.dir / "anchors", dirs_exist_ok=True)
    lay.pylib.mkdir(exist_ok=True)
    for name in PYTEST_PACKAGES:  # pure Python; the GPU machine has no pip access
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        src = Path(spec.origin)
        if src.name == "__init__.py":
            shutil.copytree(src.parent, lay.pylib / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, lay.pylib / src.name)
    cmd = [sys.executable, "-m", "pipeline.prepare", str(RECIPE), *lay.data_overrides()]
    subprocess.run(cmd, cwd=ROOT, env=_child_env(lay), check=True)
    print(f"staged in {lay.dir}: carry this folder with the checkout, then run bench/gpu.sh there", file=sys.stderr)


# --------------------------------------------------------------------------- checks


def rekey_prepared(lay: Layout) -> str:
    """Make the prepared folder a cache hit for this checkout's paths, if its sources' bytes match.

    Returns:
        What was done, one line.

    Raises:
        RuntimeError: the staged raw files are not the ones the data was prepared from.
    """
    from pipeline.config import load_data_config
    from pipeline.data import MANIFEST, read_manifest
    from pipeline.prepare import fingerprint  # the cache key, as prepare computes it
    from pipeline.typed_yaml import to_dict

    cfg = load_data_config(RECIPE, lay.data_overrides())
    manifest = read_manifest(cfg.output)
    sources = []
    for src in manifest["sources"]:
        if "path" not in src:
            raise RuntimeError(f"{cfg.output} was not prepared from local files (sources: {src}); run --stage")
        here = cfg.source.dir / Path(src["path"]).name
        sha = hashlib.sha256(here.read_bytes()).hexdigest() if here.is_file() else None
        if sha != src["sha256"]:
            raise RuntimeError(f"{here} is not the file {cfg.output} was prepared from; run --stage again")
        sources.append({**src, "path": str(here)})
    fp = fingerprint(cfg, sources)
    if fp == manifest["fingerprint"]:
        return "prepared data: cache hit as is"
    manifest.update(fingerprint=fp, sources=sources, data=to_dict(cfg))
    (cfg.output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return "prepared data: re-keyed to this checkout's paths (same source bytes)"


def _run_py(code: str, lay: Layout, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_child_env(lay), capture_output=True,
                          text=True, timeout=timeout)


def check(lay: Layout, quality_overrides: list[str]) -> tuple[list[str], list[str]]:
    """Everything a run needs, checked without a GPU. Returns ``(notes, problems)``."""
    notes, problems = [], []
    if lay.anchor is None:
        problems.append(f"no anchors/ptex_like.py in {lay.dir} or {lay.shared}")
    else:
        notes.append(f"anchor: {lay.anchor}")
    if not (lay.raw / "train.txt").is_file():
        problems.append(f"no raw WikiText-2 in {lay.raw} (the anchor reads it; the manifest is checked against it)")
    if not (lay.prepared / "manifest.json").is_file():
        problems.append(f"no prepared data in {lay.prepared}: run `python bench/gpu.py --stage` on the CPU side")
    else:
        try:
            notes.append(rekey_prepared(lay))
        except (RuntimeError, OSError, KeyError) as e:
            problems.append(str(e))
    # the trainer's whole import chain and the prepare cache check, with `datasets` blocked
    probe = NO_DATASETS + (
        "import lm.train, lm.precision, lm.decode, lm.generate\n"
        "from pipeline.config import load_data_config\n"
        "from pipeline.prepare import prepare\n"
        f"prepare(load_data_config({str(RECIPE)!r}, {lay.data_overrides()!r}), quiet=True)\n"
        "assert 'datasets' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = _run_py(probe, lay)
    if proc.returncode != 0 or "ok" not in proc.stdout:
        problems.append("lm.train on the prepared data needs `datasets`, or the data is stale: " + proc.stderr.strip()[-400:])
    else:
        notes.append("lm.train + prepared-data cache hit: no `datasets` imported")
    proc = _run_py("import pytest; print(pytest.__version__)", lay)
    if proc.returncode != 0:
        problems.append("pytest is neither installed nor staged in " + str(lay.pylib))
    else:
        notes.append(f"pytest {proc.stdout.strip()}")
    if lay.pylib.is_dir():  # the staged copy alone, without site-packages: complete?
        alone = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(lay.pylib)!r}); import pytest"],
                               capture_output=True, text=True)
        if alone.returncode != 0:
            problems.append(f"the staged pytest in {lay.pylib} is incomplete: {alone.stderr.strip()[-300:]}")
    from lm.config import load

    try:
        load(RECIPE, [*lay.data_overrides(), *quality_overrides])
        notes.append(f"quality run overrides load: {' '.join(quality_overrides) or '(none)'}")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"recipes/wikitext.yaml with {quality_overrides}: {e}")
    return notes, problems


def _stream_overrides() -> list[str]:
    """The recipe's own CUDA sections (no CPU profile, even in a dry run on a CPU): the stream
    protocol with the AWD-LSTM regularisers."""
    return ["train.device=cuda"]


# --------------------------------------------------------------------------- run (GPU side)


def _train(lay: Layout, name: str, overrides: list[str], timeout: float) -> dict:
    out = lay.runs / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lm.train", str(RECIPE), *lay.data_overrides(), f"train.output_dir={out}",
           "train.plot=false", "train.checkpoint_every=null", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(lay), capture_output=True, text=True, timeout=timeout)
    rec = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        return {**rec, "stderr_tail": proc.stderr[-2000:]}
    rec["precision_line"] = next((ln for ln in proc.stderr.splitlines() if ln.startswith("precision:")), None)
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    rates = [m["tokens_per_s"] for m in metrics if m.get("split") == "train"][1:]  # the first window warms up
    rec["tokens_per_s_median"] = round(statistics.median(rates)) if rates else None
    rec["result"] = json.loads((out / "result.json").read_text())
    return rec


def _cuda_tests(lay: Layout, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/lm/test_cuda.py", "tests/lm/test_precision.py"]
    if importlib.util.find_spec("hypothesis") is not None:  # test_collate imports it
        cmd.append("tests/pipeline/test_collate.py")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(lay), capture_output=True, text=True, timeout=timeout)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed)", summary)}
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary, "counts": counts,
            "wall_s": round(time.perf_counter() - t0, 1),
            "failures": [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]}


def _anchor(lay: Layout, seconds: float, timeout: float) -> dict:
    cmd = [sys.executable, "-c", ANCHOR_ON_CUDA, str(lay.anchor), str(lay.raw), str(seconds)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(lay), capture_output=True, text=True, timeout=timeout)
    m = re.search(r"anchor tokens/s (\d+)", proc.stdout)
    return {"script": str(lay.anchor), "seconds": seconds, "returncode": proc.returncode,
            "tokens_per_s": int(m.group(1)) if m else None, "line": proc.stdout.strip()[-300:] or proc.stderr[-1000:]}


def _env(lay: Layout) -> dict:
    import torch

    from lm import precision

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "datasets_installed": importlib.util.find_spec("datasets") is not None,
        "precision_auto": precision.for_device("auto", "cuda" if cuda else "cpu").description,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(lay: Layout, args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --dry-run to check the setup", file=sys.stderr)
        return 2
    deadline = time.perf_counter() + args.budget
    out = Path(args.out)
    report: dict = {"env": _env(lay)}
    quality = [f"train.max_time={args.quality_seconds}", "train.log_every=50", *_stream_overrides()]
    notes, problems = check(lay, quality)
    report["checks"] = {"notes": notes, "problems": problems}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")

    save()
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    speed = [f"train.max_time={args.speed_seconds}", "train.log_every=10", "train.eval_every=null", "train.prompts=[]"]
    sys.path.insert(0, str(ROOT / "bench"))
    from train_speed import SAME_MODEL  # pytorch/examples' default model, as bench/train_speed.py runs it

    same = [o for o in SAME_MODEL if not o.startswith("train.device=")] + ["train.device=cuda"]
    stages = [  # name, seconds it needs at most, what runs
        ("cuda_tests", 240, lambda t: _cuda_tests(lay, t)),
        ("anchor", args.speed_seconds + 60, lambda t: _anchor(lay, args.speed_seconds, t)),
        ("ours_same_model", args.speed_seconds + 90, lambda t: _train(lay, "same_model", [*same, *speed], t)),
        ("recipe_speed", args.speed_seconds + 90, lambda t: _train(lay, "recipe_speed", speed, t)),
        ("quality", args.quality_seconds + 120, lambda t: _train(lay, "quality", quality, t)),
    ]
    for name, need, fn in stages:
        left = deadline - time.perf_counter()
        if name in args.skip or left < min(need, 60):
            report[name] = {"skipped": "--skip" if name in args.skip else f"{left:.0f} s of the budget left"}
        else:
            try:
                report[name] = fn(min(need, left))
            except subprocess.TimeoutExpired as e:
                report[name] = {"timeout_s": e.timeout}
        save()
        print(f"{name}: {json.dumps(report[name])[:300]}", file=sys.stderr)
    a, o = report.get("anchor", {}).get("tokens_per_s"), report.get("ours_same_model", {}).get("tokens_per_s_median")
    if a and o:
        report["ours_over_anchor"] = round(o / a, 2)
    save()
    print(f"wrote {out}", file=sys.stderr)
    return 0 if report.get("cuda_tests", {}).get("returncode") in (0, None) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--stage", action="store_true", help="CPU side: copy raw data, anchors, pytest; prepare WikiText-2")
    mode.add_argument("--dry-run", action="store_true", help="check that a run would find everything (no GPU needed)")
    ap.add_argument("--dir", type=Path, default=ROOT / "gpu_data", help="staged folder (default: gpu_data/)")
    ap.add_argument("--shared", type=Path, default=_shared_default(), help="folder with data/ and anchors/ (default: ../shared)")
    ap.add_argument("--out", default="gpu_result.json", help="the JSON report (default: gpu_result.json)")
    ap.add_argument("--budget", type=float, default=570, help="seconds for the whole run (default: 570)")
    ap.add_argument("--speed-seconds", type=float, default=40, help="timed seconds per throughput stage (default: 40)")
    ap.add_argument("--quality-seconds", type=float, default=240, help="train.max_time of the quality run (default: 240)")
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip: cuda_tests anchor ours_same_model recipe_speed quality")
    args = ap.parse_args(argv)
    lay = Layout(args.dir.resolve(), args.shared.resolve() if args.shared else None)
    if args.stage:
        stage(lay)
        return 0
    if args.dry_run:
        quality = [f"train.max_time={args.quality_seconds}", "train.log_every=50", *_stream_overrides()]
        notes, problems = check(lay, quality)
        for n in notes:
            print(f"ok: {n}", file=sys.stderr)
        for p in problems:
            print(f"missing: {p}", file=sys.stderr)
        print("dry run: " + ("ready" if not problems else f"{len(problems)} problem(s)"), file=sys.stderr)
        return 1 if problems else 0
    return run(lay, args)


if __name__ == "__main__":
    sys.exit(main())
