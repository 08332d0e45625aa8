"""Ingestion speed and memory: ``python -m pipeline.prepare`` on WikiText-2 and on WikiText-2
train repeated (``--repeat 50``: about 104 M tokens, 540 MB), against what a user would
otherwise write — pytorch/examples ``word_language_model/data.py`` (a Python loop filling a
dict vocabulary, one tensor of ids per line, ``torch.cat``) — timed the same way in the
same run.

Every row is one fresh child process, timed from start to exit (interpreter start and
imports included, as a user sees it). Memory per row:

* ``peak RSS``: the child's ``ru_maxrss`` from ``wait4`` — the largest single process
  (with ``data.num_proc=2``, datasets' workers are not added to it);
* ``tree PSS``: the largest sum of PSS over the child and its descendants, sampled every
  0.1 s from ``/proc/*/smaps_rollup`` (shared pages split between sharers, so forked
  workers are not double counted); ``anon PSS`` is its anonymous part: heap, as opposed
  to the page cache of memory-mapped Arrow files, which the kernel can drop at will.

``--rounds N`` alternates the tools N times per corpus (ours, anchor, ours, anchor, ...) and
reports each tool's best wall time and the ratio of the bests, plus every round's ratio: on a
shared machine, the load moves between runs.

``--subword bpe,unigram,bytelevel`` adds, per kind, ``pipeline.prepare`` with a tokenizer of
that kind (trained once on WikiText-2 x1, passed as ``data.tokenizer.path``, so only
encoding is timed) against ``tokenizers``' ``encode_batch_fast`` alone over the same lines
in one process (its lower bound; timed from after reading the lines), at ``--subword-scale``.

Usage: python bench/prepare.py [--data ../shared/data/wikitext-2] [--repeat 50]
           [--scales 1,10] [--num-proc 1,2] [--rounds 1] [--no-anchor] [--keep]
           [--subword bpe,unigram,bytelevel] [--subword-scale 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# pytorch/examples word_language_model/data.py, Corpus + Dictionary, verbatim in substance
ANCHOR = r"""
import os, sys, torch
class Dictionary:
    def __init__(self):
        self.word2idx, self.idx2word = {}, []
    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]
class Corpus:
    def __init__(self, path):
        self.dictionary = Dictionary()
        self.train = self.tokenize(os.path.join(path, 'train.txt'))
        self.valid = self.tokenize(os.path.join(path, 'valid.txt'))
        self.test = self.tokenize(os.path.join(path, 'test.txt'))
    def tokenize(self, path):
        with open(path, 'r', encoding='utf8') as f:
            for line in f:
                for word in line.split() + ['<eos>']:
                    self.dictionary.add_word(word)
        with open(path, 'r', encoding='utf8') as f:
            idss = []
            for line in f:
                ids = [self.dictionary.word2idx[w] for w in line.split() + ['<eos>']]
                idss.append(torch.tensor(ids).type(torch.int64))
            return torch.cat(idss)
c = Corpus(sys.argv[1])
print(len(c.train) + len(c.valid) + len(c.test), len(c.dictionary.idx2word))
"""


# tokenizers alone: encode_batch_fast over every line of the three files, batches as prepare's;
# tokens counted as the manifest counts them: ids + <eos> (the predicted ones)
ENCODE_ONLY = r"""
import sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
lines = []
for name in ("train.txt", "valid.txt", "test.txt"):
    with open(sys.argv[2] + "/" + name, encoding="utf-8-sig") as f:
        lines += f.read().splitlines()  # as datasets' text loader, for these files (no \x1c.. or \u2028)
batch = int(sys.argv[3])
t0 = time.perf_counter()
tokens = 0
for i in range(0, len(lines), batch):
    tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(lines[i : i + batch], add_special_tokens=False))
print(tokens, time.perf_counter() - t0)
"""


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # the child's user + system time (its threads included; less sensitive to other jobs)
    peak_rss_mb: float
    tree_pss_mb: float | None
    tree_anon_mb: float | None
    stdout: str


def _descendants(pid: int) -> list[int]:
    """``pid`` and its descendants: from ``/proc/PID/task/*/children`` (cheap: a full scan of
    ``/proc`` every 0.1 s took ~20% of a core away from the timed child), else a scan."""
    if Path(f"/proc/{pid}/task/{pid}/children").exists():
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.scandir(f"/proc/{p}/task"):
                    with open(f"{task.path}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return out
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _tree_memory(pid: int) -> tuple[float, float]:
    """(PSS, anonymous PSS) in MB, summed over ``pid`` and its descendants."""
    pss = anon = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key == "Pss":
                        pss += int(rest.split()[0])
                    elif key == "Pss_Anon":
                        anon += int(rest.split()[0])
        except OSError:
            continue
    return pss / 1024, anon / 1024


def run(cmd: list[str], cwd: Path = REPO) -> Run:
    """Run ``cmd`` as a child; wall time, its own peak RSS, and the sampled tree PSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        peak = [None, None]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                pss, anon = _tree_memory(child.pid)
                if pss and (peak[0] is None or pss > peak[0]):
                    peak[0] = pss
                if anon and (peak[1] is None or anon > peak[1]):
                    peak[1] = anon

        sampler = threading.Thread(target=sample, daemon=True)
        if Path("/proc/self/smaps_rollup").exists():
            sampler.start()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not every child's
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        if sampler.is_alive():
            sampler.join()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {child.returncode}:\n{stderr[-2000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak[0], peak[1], stdout)


def fmt(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:,.0f}"


def make_corpus(data: Path, repeat: int, workdir: Path) -> Path:
    """``data`` with train.txt repeated ``repeat`` times (valid.txt, test.txt as they are)."""
    if repeat == 1:
        return data
    folder = workdir / f"wt2x{repeat}"
    folder.mkdir()
    train = (data / "train.txt").read_bytes()
    with open(folder / "train.txt", "wb") as f:
        for _ in range(repeat):
            f.write(train)
    for name in ("valid.txt", "test.txt"):
        shutil.copyfile(data / name, folder / name)
    return folder


def prepare_cmd(corpus: Path, output: Path, num_proc: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.prepare", "recipes/wikitext.yaml",
        f"data.source.dir={corpus}", f"data.output={output}", f"data.num_proc={num_proc}", *extra, "--force", "--quiet",
    ]


def subword(args, work: Path) -> list[str]:
    """prepare (encoding with a given subword tokenizer) vs encode_batch_fast alone, M tokens/s."""
    corpus = make_corpus(args.data, args.subword_scale, work)
    lines = []
    for kind in [k for k in args.subword.split(",") if k]:
        tok_dir = work / f"tok-{kind}"
        run(prepare_cmd(args.data, tok_dir, 1, f"data.tokenizer.kind={kind}"))
        tok = tok_dir / "tokenizer.json"
        out = work / f"out-{kind}"
        res = run(prepare_cmd(corpus, out, 1, f"data.tokenizer.path={tok}"))
        tokens = sum(s["tokens"] for s in json.loads((out / "manifest.json").read_text())["splits"].values())
        shutil.rmtree(out)
        lines.append(f"{kind:9s} x{args.subword_scale}: pipeline.prepare {tokens / res.wall_s / 1e6:.2f} M tok/s ({res.wall_s:.1f} s, "
                     f"imports, reading and writing included; peak RSS {res.peak_rss_mb:,.0f} MB)")
        print(lines[-1], flush=True)
        for batch in (1000, 65536):  # datasets.map's default batch; prepare's Arrow chunk
            alone = run([sys.executable, "-c", ENCODE_ONLY, str(tok), str(corpus), str(batch)])
            a_tokens, a_s = alone.stdout.split()
            same = "same tokens" if int(a_tokens) == tokens else f"TOKENS DIFFER ({int(a_tokens):,} vs {tokens:,})"
            lines.append(f"{'':9s} encode_batch_fast alone, batches of {batch:>5}: {int(a_tokens) / float(a_s) / 1e6:.2f} M tok/s "
                         f"({float(a_s):.1f} s); prepare takes {res.wall_s / float(a_s):.2f}x its time ({same})")
            print(lines[-1], flush=True)
    if corpus != args.data:
        shutil.rmtree(corpus)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2", help="train.txt, valid.txt, test.txt")
    p.add_argument("--repeat", type=int, default=50, help="the large corpus: train.txt repeated this many times")
    p.add_argument("--scales", default="1,10", help="smaller repeats to run too (memory vs corpus size)")
    p.add_argument("--num-proc", default="1,2", help="data.num_proc values to run at every scale")
    p.add_argument("--no-anchor", action="store_true", help="skip pytorch/examples' data.py")
    p.add_argument("--workdir", type=Path, default=None, help="where the repeated corpora and outputs go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--rounds", type=int, default=1, help="alternate the tools this many times per corpus")
    p.add_argument("--subword", default="", help="subword kinds to time against encode_batch_fast (bpe,unigram,bytelevel)")
    p.add_argument("--subword-scale", type=int, default=10, help="corpus repeat for the subword rows")
    args = p.parse_args()

    if not all((args.data / n).is_file() for n in ("train.txt", "valid.txt", "test.txt")):
        sys.exit(f"error: {args.data} has no train.txt, valid.txt and test.txt; pass --data FOLDER (e.g. ../shared/data/wikitext-2)")
    scales = sorted({int(s) for s in args.scales.split(",") if s} | {args.repeat})
    procs = [int(n) for n in args.num_proc.split(",")]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.workdir))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other jobs on the machine skew wall times
    print(f"cpus {os.cpu_count()}, load average {load}, python {sys.version.split()[0]}, work folder {work}", flush=True)

    header = ("corpus", "tool", "wall s", "cpu s", "tokens", "Mtok/s", "peak RSS MB", "tree PSS MB", "anon PSS MB")
    rows, ratios = [header], []
    try:
        for r in scales:
            corpus = make_corpus(args.data, r, work)
            name = f"wt2 x{r} ({sum((corpus / n).stat().st_size for n in ('train.txt', 'valid.txt', 'test.txt')) / 1e6:,.0f} MB)"
            best: dict[str, tuple[Run, int]] = {}
            walls: dict[str, list[float]] = {}
            cpus: dict[str, list[float]] = {}
            for _ in range(args.rounds):  # interleaved: ours, anchor, ours, anchor, ...
                for n in procs:
                    out = work / f"out-x{r}-np{n}"
                    res = run(prepare_cmd(corpus, out, n))
                    m = json.loads((out / "manifest.json").read_text())
                    tokens = sum(s["tokens"] for s in m["splits"].values())
                    key = f"pipeline.prepare num_proc={n}"
                    walls.setdefault(key, []).append(res.wall_s)
                    cpus.setdefault(key, []).append(res.cpu_s)
                    if key not in best or res.wall_s < best[key][0].wall_s:
                        best[key] = (res, tokens)
                    shutil.rmtree(out)
                if not args.no_anchor:
                    res = run([sys.executable, "-c", ANCHOR, str(corpus)])
                    tokens, vocab = map(int, res.stdout.split())
                    key = "pytorch/examples data.py"
                    walls.setdefault(key, []).append(res.wall_s)
                    cpus.setdefault(key, []).append(res.cpu_s)
                    if key not in best or res.wall_s < best[key][0].wall_s:
                        best[key] = (res, tokens)
                print(f"{name} round: " + ", ".join(f"{k} {v[-1]:.1f} s (cpu {cpus[k][-1]:.1f} s)" for k, v in walls.items()), flush=True)
            for key, (res, tokens) in best.items():
                rows.append((name, key, f"{res.wall_s:.1f}", f"{res.cpu_s:.1f}", f"{tokens:,}", f"{tokens / res.wall_s / 1e6:.2f}",
                             fmt(res.peak_rss_mb), fmt(res.tree_pss_mb), fmt(res.tree_anon_mb)))
            anchor = best.get("pytorch/examples data.py")
            if anchor:
                for n in procs:
                    key = f"pipeline.prepare num_proc={n}"
                    mine, my_tokens = best[key]
                    same = "same tokens" if my_tokens == anchor[1] else f"TOKENS DIFFER ({my_tokens:,} vs {anchor[1]:,})"
                    per_round = ", ".join(f"{a / m:.2f}" for a, m in zip(walls["pytorch/examples data.py"], walls[key]))
                    cpu_ratio = min(cpus["pytorch/examples data.py"]) / min(cpus[key])
                    ratios.append(f"{name}: pytorch/examples wall / pipeline.prepare (num_proc={n}) wall = "
                                  f"{anchor[0].wall_s / mine.wall_s:.2f}x best vs best (rounds: {per_round}), "
                                  f"cpu time ratio {cpu_ratio:.2f}x, "
                                  f"peak RSS ratio {anchor[0].peak_rss_mb / mine.peak_rss_mb:.2f}x ({same})")
            if corpus != args.data:
                shutil.rmtree(corpus)
        if args.subword:
            ratios += subword(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()
    for line in ratios:
        print(line)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
