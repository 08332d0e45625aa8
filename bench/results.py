"""Write RESULTS.md from the ``result.json`` of finished runs — never typed by hand.

    python bench/results.py runs/zaremba_small runs/wikitext [...] > RESULTS.md
    python bench/results.py RUNS... --per-minute runs/cpu_minutes/cpu_*min > RESULTS.md

``--per-minute`` adds a quality-per-CPU-minute table: one recipe run with several
``train.max_time`` budgets (``bench/time_to_quality.py --only ours --minutes 5 10 20 40 --keep DIR``),
one row per budget, shortest first.

A run folder may also hold ``anchor.json`` (``bench/ptex_protocol.py --keep``): what a user
would run instead, measured in the same bench run; it fills the reference column.

Each run folder holds ``result.json`` (written by ``lm.train`` at the end: the command that
launched it, hardware, train seconds, tokens/s, protocol, validation and test perplexity
with their token counts, parameter count) and ``recipe.yaml``. Published references, where a
recipe reproduces a paper, are listed in ``REFERENCES`` below with their source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# recipe file name -> (what, validation, test)
REFERENCES = {
    "zaremba_small.yaml": ("Zaremba et al. 2014, Table 1, non-regularized LSTM", 120.7, 114.5),
}


def row(run: Path) -> dict:
    res = json.loads((run / "result.json").read_text())
    recipe = res["command"].split(" lm.train ", 1)[-1].split()[0]
    anchor = run / "anchor.json"  # written by bench/ptex_protocol.py --keep: the other side of that bench run
    return {**res, "recipe": recipe, "run": str(run), "anchor": json.loads(anchor.read_text()) if anchor.is_file() else None}


def reference(r: dict) -> str:
    ref = REFERENCES.get(Path(r["recipe"]).name)
    if ref:
        return f"{ref[1]} / {ref[2]} ({ref[0]})"
    a = r["anchor"]
    if a:
        test = f"{a['test_ppl']:.2f}" if a.get("test_ppl") else "—"
        return f"{a['val_ppl']:.2f} / {test} ({a['what']}; {a['tokens_per_s']:,.0f} tokens/s)"
    return "—"


def _test(r: dict) -> str:
    return f"{r['test_ppl']:.2f} ({r['test_tokens']:,})" if r.get("test_ppl") else "—"


def table(rows: list[dict]) -> str:
    out = ["| recipe | protocol | validation ppl (tokens) | test ppl (tokens) | reference (val / test) | parameters "
           "| train time | tokens/s | hardware |",
           "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| `{r['recipe']}` | {r['mode']} | {r['best_val_ppl']:.2f} ({r['val_tokens']:,}) | {_test(r)} "
            f"| {reference(r)} | {r['parameters']:,} "
            f"| {r['train_seconds'] / 60:.1f} min ({r['epochs']} epochs, {r['steps']:,} steps, {r['stopped_by']}) "
            f"| {r['tokens_per_s']:,.0f} | {r['device']}: {r['hardware']}, torch {r['torch']} |")
    return "\n".join(out)


def _budgetless(command: str) -> str:
    """A launch command without the options that differ between budgets of one run series."""
    return " ".join(w for w in command.split() if not w.startswith(("train.max_time=", "train.output_dir=")))


def _budget(r: dict) -> float:
    """The run's ``train.max_time`` in seconds, as launched."""
    for w in r["command"].split():
        if w.startswith("train.max_time="):
            return float(w.split("=", 1)[1])
    raise SystemExit(f"--per-minute: {r['run']} was not launched with train.max_time=: {r['command']}")


def per_minute(rows: list[dict]) -> str:
    """One row per training budget of one command: what each CPU minute buys."""
    commands = {_budgetless(r["command"]) for r in rows}
    if len(commands) != 1:
        raise SystemExit("--per-minute: the runs must differ only in train.max_time (and train.output_dir), got:\n  "
                         + "\n  ".join(sorted(commands)))
    out = ["| budget | validation ppl (tokens) | test ppl (tokens) | tokens trained | epochs | steps | tokens/s | hardware |",
           "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=_budget):
        out.append(f"| {_budget(r) / 60:g} min | {r['best_val_ppl']:.2f} ({r['val_tokens']:,}) | {_test(r)} "
                   f"| {r['tokens']:,} | {r['epochs']} | {r['steps']:,} | {r['tokens_per_s']:,.0f} "
                   f"| {r['device']}: {r['hardware']}, torch {r['torch']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (train.output_dir) holding result.json")
    ap.add_argument("--per-minute", nargs="+", type=Path, default=[], metavar="RUN",
                    help="runs of one recipe at several train.max_time budgets: a quality-per-CPU-minute table")
    args = ap.parse_args(argv)
    if not args.runs and not args.per_minute:
        ap.error("give run folders, --per-minute run folders, or both")
    rows, budget = [row(r) for r in args.runs], [row(r) for r in args.per_minute]
    command = "python bench/results.py " + " ".join(
        [*map(str, args.runs), *(["--per-minute", *map(str, args.per_minute)] if budget else [])])
    if rows:
        print("# Results\n")
        print(f"Generated by `{command}` from each run's "
              "`result.json`. Perplexity = exp(total NLL / predicted tokens); the protocol says whether the state is "
              "carried across the text (stream, as published tables) or every line starts from zero (sequence).\n")
        print(table(rows))
        print("\nCommands, as each run was launched:\n")
        for r in rows:
            print(f"- `{r['command']}`")
            if r["anchor"]:
                bench = f"; both measured by `{r['anchor']['bench_command']}`" if r["anchor"].get("bench_command") else ""
                print(f"  (its reference, in the same bench run: `{r['anchor']['command']}`{bench})")
        missing = sorted(set(REFERENCES) - {Path(r["recipe"]).name for r in rows})
        if missing:
            print("\nRecipes with a published reference and no run in this table: "
                  + ", ".join(f"`recipes/{m}` ({REFERENCES[m][0]}: {REFERENCES[m][1]} / {REFERENCES[m][2]})"
                              for m in missing) + ".")
    if budget:
        print(f"\n## Quality per CPU minute: `{budget[0]['recipe']}`, {budget[0]['mode']} protocol\n")
        if not rows:
            print(f"Generated by `{command}` from each run's `result.json`.")
        print("The same command with `train.max_time` set to each budget (validation included in it; the "
              "learning-rate schedule ends with the budget), run one at a time on the same otherwise idle "
              "machine. Validation is the best of the run; test is measured with those weights.\n")
        print(per_minute(budget))
        print("\nCommands, as each run was launched:\n")
        for r in sorted(budget, key=_budget):
            print(f"- `{r['command']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
