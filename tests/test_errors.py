"""The bad-input matrix: every mistake a user can make with ``pipeline.prepare``,
``lm.train`` and ``lm.generate`` ends with exit code 2 and one ``error: ...`` line on
stderr — no traceback — and writes nothing (every file under the test's folder keeps
its name, size and mtime; no output folder appears).

``CASES`` is the table (case → the one line a user sees). Most rows call the CLI's
``main`` in-process (it is wrapped by ``pipeline.errors.cli`` exactly as ``python -m``
runs it); the ``subprocess`` rows run the real command, concurrently.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import lm.generate
import lm.train
import pipeline.prepare
from lm.config import load

REPO_ROOT = Path(__file__).resolve().parents[1]


def _toy_fixtures():
    """tests/lm/conftest.py (the toy corpus and recipe writers): not a package, so by path."""
    spec = importlib.util.spec_from_file_location("_lm_toy_fixtures", Path(__file__).parent / "lm" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = _toy_fixtures()


@dataclass
class World:
    """Everything the rows point at, in one folder that must not change."""

    root: Path

    def __getattr__(self, name: str) -> Path:  # world.corpus -> root/corpus, etc.
        return self.root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from pipeline.config import DataConfig
    from pipeline.typed_yaml import from_dict
    from pipeline.prepare import prepare

    w = World(tmp_path_factory.mktemp("errors"))
    toy.write_toy_corpus(w.corpus)
    toy.write_toy_corpus(w.other_corpus, train=60, valid=10, test=0, seed=1)  # other words, other ids
    for corpus, out in ((w.corpus, w.prepared), (w.other_corpus, w.other_prepared)):
        prepare(from_dict(DataConfig, toy.toy_data_section(corpus, out), "data", w.root), quiet=True)
    # a finished 3-step run: step-00000003.pt and best.pt
    run = toy.write_recipe(w.root, w.corpus, w.prepared, "run", train={"epochs": None, "max_steps": 3})
    lm.train.run(load(run))
    # recipes that point at the good data, with one mistake each
    (w.root / "bad_yaml.yaml").write_text("data:\n  source:\n    dir: corpus\n  output: [prepared\nmodel: {}\n")
    toy.write_recipe(w.root, w.corpus, w.prepared, "typo", train={"max_step": 5})
    toy.write_recipe(w.root, w.corpus, w.prepared, "wrong_type", model={"hidden_size": "big"})
    # broken corpora
    w.empty.mkdir()
    (w.empty / "train.txt").write_bytes(b"")
    toy.write_toy_corpus(w.latin1, valid=0, test=0)
    lines = (w.latin1 / "train.txt").read_bytes().split(b"\n")
    lines[41] = b"the caf\xe9 sees the dog ."  # latin-1, not UTF-8: line 42
    (w.latin1 / "train.txt").write_bytes(b"\n".join(lines))
    # damaged checkpoints (with their checksum files, as a copy would bring them)
    ck = w.run / "checkpoints"
    for name in ("flipped", "truncated", "bare"):
        shutil.copy(ck / "step-00000003.pt", w.root / f"{name}.pt")
        shutil.copy(ck / "step-00000003.pt.sha256", w.root / f"{name}.pt.sha256")
    data = bytearray((w.root / "flipped.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (w.root / "flipped.pt").write_bytes(bytes(data))
    for name in ("truncated", "bare"):
        (w.root / f"{name}.pt").write_bytes(data[: len(data) // 3])
    (w.root / "bare.pt.sha256").unlink()  # no checksum: torch.load itself finds the damage
    return w


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    tool: str  # prepare | train | generate
    args: Callable[[World], list[str]]
    message: str  # regex the error line must match (after "error: ")
    after_prepare: bool = False  # lm.train got past data preparation: a "cache hit" line may come first
    subprocess: bool = False

    def __str__(self) -> str:
        return f"{self.tool}-{self.id}"


def R(name: str) -> Callable[[World], str]:
    return lambda w: str(w.root / name)


def _ok(w: World) -> str:  # a good recipe whose outputs would land in the world folder
    return str(w.root / "run.yaml")


def _fresh(w: World) -> list[str]:  # ...redirected to folders that must not appear
    return [f"data.output={w.root / 'new_prepared'}", f"train.output_dir={w.root / 'new_run'}"]


def _data_to(w: World) -> list[str]:
    return [f"data.output={w.root / 'new_prepared'}"]


CASES = [
    # ---------------------------------------------------------------- pipeline.prepare
    Case("missing-recipe", "prepare", lambda w: [R("nope.yaml")(w)], r"recipe not found: .*nope\.yaml$"),
    Case("yaml-syntax", "prepare", lambda w: [R("bad_yaml.yaml")(w)],
         r"bad_yaml\.yaml:5:6: YAML syntax error: expected ',' or ']', but got ':'$",
         subprocess=True),
    Case("unknown-key", "prepare", lambda w: [_ok(w), "data.tokenizer.knd=bpe", *_data_to(w)],
         r"unknown key data\.tokenizer\.knd — did you mean data\.tokenizer\.kind\?$"),
    Case("wrong-type", "prepare", lambda w: [_ok(w), "data.max_len=abc", *_data_to(w)],
         r"^data\.max_len=abc: expected int \| null$"),
    Case("missing-folder", "prepare", lambda w: [_ok(w), f"data.source.dir={w.root / 'nope'}", *_data_to(w)],
         r"data\.source\.dir: no such folder: .*nope$"),
    Case("missing-file", "prepare", lambda w: [_ok(w), f"data.source.files.train={w.root / 'nope.txt'}", *_data_to(w)],
         r"data\.source\.files\.train: no such file: .*nope\.txt$"),
    Case("empty-corpus", "prepare", lambda w: [_ok(w), f"data.source.dir={w.empty}", *_data_to(w)],
         r"^empty corpus: the train split's file is empty \(.*train\.txt\)$"),
    Case("invalid-utf8", "prepare", lambda w: [_ok(w), f"data.source.dir={w.latin1}", *_data_to(w)],
         r"latin1/train\.txt:42: invalid UTF-8 \(byte 0xe9 at column 8\); fix the file or set data\.errors=replace$"),
    Case("max-len-1", "prepare", lambda w: [_ok(w), "data.max_len=1", *_data_to(w)],
         r"^data\.max_len=1: a sequence needs at least 2 ids"),
    Case("unknown-flag", "prepare", lambda w: [_ok(w), "--bogus"],
         r"^unrecognized arguments: --bogus \(see python -m pipeline\.prepare --help\)$"),
    Case("nan", "prepare", lambda w: [_ok(w), "data.holdout=nan", *_data_to(w)], r"^data\.holdout=nan: must be a finite number$"),
    Case("absurd-vocab-size", "prepare", lambda w: [_ok(w), "data.tokenizer.vocab_size=1000000000000", *_data_to(w)],
         r"^data\.tokenizer\.vocab_size=1000000000000: must be <= 16777216$", subprocess=True),
    Case("output-below-a-file", "prepare", lambda w: [_ok(w), f"data.output={w.root / 'run.yaml' / 'out'}"],
         r"^data\.output=.*run\.yaml/out: .*run\.yaml is a file, not a folder$"),
    Case("output-of-another-source", "prepare", lambda w: [_ok(w), f"data.source.dir={w.other_corpus}"],
         r"^data\.output=.*/prepared holds data prepared from .*/corpus, but this recipe's source is .*/other_corpus; "
         r"choose another data\.output, or replace it with python -m pipeline\.prepare RECIPE --force$"),
    Case("same-file-twice", "prepare",
         lambda w: [_ok(w), f"data.source.files.train=[{w.corpus / 'train.txt'}, {w.corpus / 'train.txt'}]", *_data_to(w)],
         r"corpus/train\.txt is listed twice in data\.source\.files\.train; list each file once$"),
    # ---------------------------------------------------------------- lm.train
    Case("missing-recipe", "train", lambda w: [R("nope.yaml")(w)], r"recipe not found: .*nope\.yaml$"),
    Case("yaml-syntax", "train", lambda w: [R("bad_yaml.yaml")(w)], r"bad_yaml\.yaml:5:6: YAML syntax error: "),
    Case("unknown-key", "train", lambda w: [R("typo.yaml")(w)], r"^unknown key train\.max_step — did you mean train\.max_steps\?$"),
    Case("wrong-type", "train", lambda w: [R("wrong_type.yaml")(w)], r"^model\.hidden_size='big': expected int$"),
    Case("wrong-type-override", "train", lambda w: [_ok(w), "train.max_steps=ten", *_fresh(w)],
         r"^train\.max_steps=ten: expected int \| null$"),
    Case("missing-folder", "train", lambda w: [_ok(w), f"data.source.dir={w.root / 'nope'}", *_fresh(w)],
         r"data\.source\.dir: no such folder: .*nope$"),
    Case("empty-corpus", "train", lambda w: [_ok(w), f"data.source.dir={w.empty}", *_fresh(w)], r"^empty corpus: "),
    Case("invalid-utf8", "train", lambda w: [_ok(w), f"data.source.dir={w.latin1}", *_fresh(w)],
         r"latin1/train\.txt:42: invalid UTF-8 \(byte 0xe9 at column 8\)"),
    Case("other-tokenizer", "train",
         lambda w: [_ok(w), f"data.source.dir={w.other_corpus}", f"data.output={w.other_prepared}",
                    f"train.output_dir={w.root / 'new_run'}", f"train.resume={w.run / 'checkpoints' / 'step-00000003.pt'}"],
         r"step-00000003\.pt was trained with another tokenizer/vocabulary than the prepared data in .*other_prepared; "
         r"resume with the same data, or start a new train\.output_dir$", after_prepare=True),
    Case("other-model-shape", "train", lambda w: [_ok(w), "train.resume=auto", "model.hidden_size=12"],
         r"^model\.hidden_size=12 differs from the checkpoint's model\.hidden_size=16, and a resume cannot change it; "
         r"keep the old value, or start a new run in another train\.output_dir$",
         after_prepare=True),
    Case("corrupt-checkpoint", "train", lambda w: [_ok(w), f"train.resume={w.root / 'truncated.pt'}", *_fresh(w)[1:]],
         r"truncated\.pt is corrupt or truncated \(checksum mismatch\)$", after_prepare=True),
    Case("max-len-1", "train", lambda w: [_ok(w), "data.max_len=1", *_fresh(w)], r"^data\.max_len=1: a sequence needs at least 2 ids"),
    Case("lr-nan", "train", lambda w: [_ok(w), "train.lr=nan", *_fresh(w)], r"^train\.lr=nan: must be a finite number$",
         subprocess=True),
    Case("min-lr-negative", "train", lambda w: [_ok(w), "train.min_lr=-1", *_fresh(w)], r"^train\.min_lr=-1\.0: must be >= 0$"),
    Case("max-time-nan", "train", lambda w: [_ok(w), "train.max_time=nan", *_fresh(w)],
         r"^train\.max_time=nan: must be a finite number$"),
    Case("clip-nan", "train", lambda w: [_ok(w), "train.clip=nan", *_fresh(w)], r"^train\.clip=nan: must be a finite number$"),
    Case("warmup-negative", "train", lambda w: [_ok(w), "train.warmup_steps=-5", *_fresh(w)],
         r"^train\.warmup_steps=-5: must be >= 0$"),
    Case("prompts-yaml-syntax", "train", lambda w: [_ok(w), "train.prompts=[a, b", *_fresh(w)],
         r"^train\.prompts=\[a, b: YAML syntax error: expected ',' or '\]', but got '<stream end>'$", subprocess=True),
    Case("data-of-another-source", "train", lambda w: [_ok(w), f"data.source.dir={w.other_corpus}", *_fresh(w)[1:]],
         r"^data\.output=.*/prepared holds data prepared from .*/corpus, but this recipe's source is .*/other_corpus; "),
    Case("max-tokens-3", "train", lambda w: [_ok(w), "train.max_tokens=3", *_fresh(w)[1:]],
         r"^train\.max_tokens=3 is smaller than the longest train sequence \(14 ids\); raise it, or cap sequences with data\.max_len$",
         after_prepare=True, subprocess=True),
    Case("cutoffs-past-vocab", "train", lambda w: [_ok(w), "model.adaptive_cutoffs=[10, 500]", *_fresh(w)[1:]],
         r"^model\.adaptive_cutoffs=\[10, 500\] needs more than 500 ids, and this data has \d+: lower the cutoffs, "
         r"or set model\.adaptive_cutoffs=null$", after_prepare=True),
    Case("no-gpu", "train", lambda w: [_ok(w), "train.device=cuda", *_fresh(w)],
         r"^train\.device=cuda but no CUDA GPU is available \(use train\.device=auto or cpu\)$", subprocess=True),
    # ---------------------------------------------------------------- lm.generate
    Case("missing-checkpoint", "generate", lambda w: [R("nope.pt")(w), "--prompt", "the"], r"^checkpoint not found: .*nope\.pt$"),
    Case("corrupt-checkpoint", "generate", lambda w: [R("flipped.pt")(w), "--prompt", "the"],
         r"flipped\.pt is corrupt or truncated \(checksum mismatch\)$", subprocess=True),
    Case("truncated-checkpoint", "generate", lambda w: [R("bare.pt")(w), "--prompt", "the"],
         r"bare\.pt is not a readable checkpoint \(truncated"),
    Case("not-a-checkpoint", "generate", lambda w: [R("run.yaml")(w), "--prompt", "the"], r"run\.yaml is not a readable checkpoint"),
    Case("max-new-tokens-0", "generate", lambda w: [str(w.run / "checkpoints" / "best.pt"), "--prompt", "the", "--max-new-tokens", "0"],
         r"^--max-new-tokens=0: must be >= 1$"),
    Case("no-gpu", "generate", lambda w: [str(w.run / "checkpoints" / "best.pt"), "--prompt", "the", "--device", "cuda"],
         r"^--device=cuda but no CUDA GPU is available \(use --device=auto or cpu\)$", subprocess=True),
]
MAINS = {"prepare": pipeline.prepare.main, "train": lm.train.main, "generate": lm.generate.main}
MODULES = {"prepare": "pipeline.prepare", "train": "lm.train", "generate": "lm.generate"}
NEW_FOLDERS = ("new_prepared", "new_run")


def snapshot(root: Path) -> dict:
    """Every path under ``root``; files with their size and mtime. A run folder's ``.lock`` is
    left out: its holder line (pid, host) is process bookkeeping that every start rewrites."""
    return {str(p.relative_to(root)): ((s := p.stat()).st_size, s.st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


def check(case: Case, rc: int, err: str) -> None:
    lines = err.splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    before = lines[:-1]
    if case.after_prepare:  # "cache hit: <data.output> is up to date ...", then the error
        assert all(line.startswith("cache hit: ") for line in before), err
    else:
        assert before == [], err
    assert re.search(case.message, lines[-1][len("error: "):]), lines[-1]


def skip_if_gpu(case: Case) -> None:
    if case.id == "no-gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")


@pytest.mark.parametrize("case", [c for c in CASES if not c.subprocess], ids=str)
def test_bad_input_in_process(case: Case, world: World, capsys):
    skip_if_gpu(case)
    before = snapshot(world.root)
    capsys.readouterr()
    rc = MAINS[case.tool](case.args(world))
    _, err = capsys.readouterr()
    check(case, rc, err)
    assert snapshot(world.root) == before
    assert not any((world.root / n).exists() for n in NEW_FOLDERS)


@pytest.fixture(scope="module")
def as_a_user(world: World) -> dict:
    """The subprocess rows, run concurrently (each pays the torch import): id -> (rc, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RNNLM_DEBUG", None)
    before = snapshot(world.root)
    procs = {str(c): subprocess.Popen([sys.executable, "-m", MODULES[c.tool], *c.args(world)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in CASES if c.subprocess}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[k] = (p.returncode, out + err)
    results["unchanged"] = snapshot(world.root) == before
    return results


@pytest.mark.parametrize("case", [c for c in CASES if c.subprocess], ids=str)
def test_bad_input_as_a_user_runs_it(case: Case, as_a_user: dict, world: World):
    skip_if_gpu(case)
    rc, output = as_a_user[str(case)]
    check(case, rc, output)  # stdout and stderr together: nothing else printed anywhere
    assert as_a_user["unchanged"]
    assert not any((world.root / n).exists() for n in NEW_FOLDERS)


def test_debug_flag_shows_the_traceback(world: World):
    """The way out of the one-line rule, for bug reports: --debug re-raises."""
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="recipe not found"):
        lm.train.main([str(world.root / "nope.yaml"), "--debug"])


# --------------------------------------------------------------------------- command lines and prompts
# argparse mistakes in all three tools, and lm.generate's own bad input: the same contract.
# One argparse mistake per tool and the non-UTF-8 prompt (argv bytes) run as real commands,
# concurrently; the rest call main in-process (wrapped by the same `cli`).


def _best(w: World) -> str:
    return str(w.run / "checkpoints" / "best.pt")


ARGV_CASES = [
    Case("unknown-flag", "prepare", lambda w: [_ok(w), "--frce"],
         r"^unrecognized arguments: --frce \(see python -m pipeline\.prepare --help\)$", subprocess=True),
    Case("unknown-flag", "train", lambda w: [_ok(w), "--resume"],
         r"^unrecognized arguments: --resume \(see python -m lm\.train --help\)$", subprocess=True),
    Case("no-prompt", "generate", lambda w: [_best(w)],
         r"^the following arguments are required: --prompt \(see python -m lm\.generate --help\)$", subprocess=True),
    Case("bad-int", "generate", lambda w: [_best(w), "--prompt", "the", "--max-new-tokens", "1e9"],
         r"^argument --max-new-tokens: invalid int value: '1e9'"),
    Case("huge-max-new-tokens", "generate", lambda w: [_best(w), "--prompt", "the", "--max-new-tokens", str(10**18)],
         r"^--max-new-tokens=1000000000000000000: at most 100,000$"),
    Case("invalid-utf8-prompt", "generate", lambda w: [_best(w), "--prompt", "the", "--prompt", "caf\udce9 au lait"],
         r"^--prompt #2 \(caf\\udce9 au lait\): invalid UTF-8 \(byte 0xe9 at character 4\); "
         r"prompts must be UTF-8 text$", subprocess=True),
    Case("no-tokenizer", "generate", lambda w: [str(w.root / "no_tokenizer.pt"), "--prompt", "the"],
         r"no_tokenizer\.pt holds no tokenizer \(a checkpoint written by lm\.train carries one\); "
         r"it cannot turn text into ids$"),
    Case("top-k-greedy", "generate", lambda w: [_best(w), "--prompt", "the", "--top-k", "5", "--temperature", "0"],
         r"^--top-k=5 samples, but --temperature=0 means greedy; drop one of them$"),
    Case("nan-temperature", "generate", lambda w: [_best(w), "--prompt", "the", "--temperature", "nan"],
         r"^--temperature=nan: must be a finite number >= 0$"),
    Case("ban-unknown-token", "generate", lambda w: [_best(w), "--prompt", "the", "--ban", "zebra"],
         r"^--ban zebra: not a token of this checkpoint's vocabulary, nor an id$"),
    Case("ban-bad-id", "generate", lambda w: [_best(w), "--prompt", "the", "--ban", "99999"],
         r"^--ban 99999: no such id \(the vocabulary has ids 0\.\.\d+\)$"),
]


@pytest.fixture(scope="module")
def argv_world(world: World) -> World:
    """The world plus a checkpoint without a tokenizer (another program's, or hand-edited)."""
    path = world.root / "no_tokenizer.pt"
    if not path.exists():
        from lm import checkpoint

        ckpt = torch.load(world.run / "checkpoints" / "best.pt", weights_only=True)
        del ckpt["tokenizer"]
        checkpoint.save(ckpt, path)
    return world


@pytest.fixture(scope="module")
def argv_as_a_user(argv_world: World) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RNNLM_DEBUG", None)
    before = snapshot(argv_world.root)
    procs = {str(c): subprocess.Popen([sys.executable, "-m", MODULES[c.tool], *c.args(argv_world)], cwd=REPO_ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in ARGV_CASES if c.subprocess}
    results = {}
    for k, p in procs.items():
        output = "".join(p.communicate(timeout=120))
        results[k] = (p.returncode, output)
    results["unchanged"] = snapshot(argv_world.root) == before
    return results


@pytest.mark.parametrize("case", [c for c in ARGV_CASES if not c.subprocess], ids=str)
def test_command_line_mistakes_in_process(case: Case, argv_world: World, capsys):
    before = snapshot(argv_world.root)
    capsys.readouterr()
    rc = MAINS[case.tool](case.args(argv_world))
    out, err = capsys.readouterr()
    check(case, rc, out + err)
    assert snapshot(argv_world.root) == before


@pytest.mark.parametrize("case", [c for c in ARGV_CASES if c.subprocess], ids=str)
def test_command_line_mistakes_as_a_user(case: Case, argv_as_a_user: dict, world: World):
    rc, output = argv_as_a_user[str(case)]
    check(case, rc, output)  # stdout and stderr together: no usage block, no traceback
    assert argv_as_a_user["unchanged"]
    assert not any((world.root / n).exists() for n in NEW_FOLDERS)
