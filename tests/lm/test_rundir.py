"""Run ownership of an output folder: identity in run.json, an flock held while training
(a second process refused, a killed holder's lock taken over), a new run refusing a folder
holding another run, checkpoints checked against the folder's run, nothing left by a
failed claim, and the resume-change rules."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lm import rundir
from lm.config import Recipe
from pipeline.config import DataConfig, SourceConfig
from pipeline.errors import UserError
from pipeline.typed_yaml import field_names, to_dict

RECIPE = to_dict(Recipe(data=DataConfig(source=SourceConfig(dir=Path("corpus")))))
REPO_ROOT = Path(__file__).resolve().parents[2]


def claim(folder: Path, resume: str | None = None) -> rundir.RunDir:
    """A claim whose start succeeded, as the trainer makes it (``run.json`` written)."""
    run = rundir.claim(folder, resume=resume, recipe=RECIPE)
    run.start()
    return run


def finished_run(folder: Path) -> str:
    """A folder as a run leaves it: run.json, a step checkpoint, metrics; returns its run id."""
    with claim(folder) as run:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "step-00000120.pt").write_bytes(b"x")
        (folder / "metrics.jsonl").write_text('{"step": 1}\n')
        return run.run_id


# --------------------------------------------------------------------------- identity


def test_a_claim_records_the_run_and_the_holder(tmp_path):
    folder = tmp_path / "a" / "run"
    with claim(folder) as run:
        info = json.loads((folder / rundir.RUN_FILE).read_text())
        assert info["run_id"] == run.run_id and info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["recipe_fingerprint"] == rundir.recipe_fingerprint(RECIPE)
        assert "fresh" not in info
        assert (folder / rundir.LOCK_FILE).read_text() == f"{os.getpid()} {socket.gethostname()} {run.run_id}\n"
        assert run.checkpoint_fields() == {"run_id": run.run_id}


def test_two_claims_get_different_run_ids(tmp_path):
    with claim(tmp_path / "a") as a, claim(tmp_path / "b") as b:
        assert a.run_id != b.run_id


# --------------------------------------------------------------------------- new run vs. existing run


@pytest.mark.parametrize("what", ["step", "best", "metrics", "result"])
def test_a_new_run_refuses_a_folder_holding_another_run_and_writes_nothing(tmp_path, what):
    folder = tmp_path / "run"
    run_id = finished_run(folder)
    if what != "step":
        (folder / "checkpoints" / "step-00000120.pt").unlink()
    if what not in ("metrics",):
        (folder / "metrics.jsonl").write_text("")  # empty: not precious by itself
    if what == "best":
        (folder / "checkpoints" / "best.pt").write_bytes(b"x")
    if what == "result":
        (folder / "result.json").write_text("{}")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as e:
        claim(folder)
    kind = {"step": "checkpoints", "best": "checkpoints", "metrics": "metrics.jsonl", "result": "result.json"}[what]
    assert str(e.value) == (f"train.output_dir={folder} already holds run {run_id} ({kind}); continue it with "
                            "train.resume=auto, or choose another or an empty train.output_dir")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_folder_from_before_run_ids_is_refused_then_adopted_by_resume(tmp_path):
    folder = tmp_path / "old"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000003.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"already holds another run \(checkpoints\)"):
        claim(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints"]  # the refusal left no lock or run.json
    with claim(folder, "auto") as run:
        assert run.info["adopted"] is True
        run.check_checkpoint({"model": {}}, folder / "checkpoints" / "step-00000003.pt")  # no run id: accepted
        with pytest.raises(UserError, match="belongs to run other"):
            run.check_checkpoint({"run_id": "other"}, Path("x.pt"))


def test_a_folder_whose_run_never_got_going_is_reused_under_a_new_id(tmp_path):
    folder = tmp_path / "run"
    with claim(folder) as first:
        (folder / "recipe.yaml").write_text("x: 1\n")
        (folder / "metrics.jsonl").write_text("")
    with claim(folder) as second:
        assert second.run_id != first.run_id
        assert json.loads((folder / rundir.RUN_FILE).read_text())["run_id"] == second.run_id


def test_resume_auto_continues_the_folders_run_and_checks_its_checkpoints(tmp_path):
    folder = tmp_path / "run"
    run_id = finished_run(folder)
    with claim(folder, "auto") as run:
        assert run.run_id == run_id
        run.check_checkpoint({"run_id": run_id}, folder / "checkpoints" / "step-00000120.pt")
        with pytest.raises(UserError) as e:
            run.check_checkpoint({"run_id": "20990101-000000-deadbeef"}, Path("/x/step-00000002.pt"))
        assert str(e.value) == (f"/x/step-00000002.pt belongs to run 20990101-000000-deadbeef, but train.output_dir="
                                f"{folder} holds run {run_id}; resume it into its own folder, or into an empty "
                                "train.output_dir")
        with pytest.raises(UserError, match="belongs to no recorded run"):
            run.check_checkpoint({"model": {}}, Path("/x/step-00000002.pt"))


def test_resume_auto_on_an_empty_folder_starts_a_new_run(tmp_path):
    with claim(tmp_path / "run", "auto") as run:
        assert "adopted" not in run.info and "fresh" not in run.info


def test_resume_from_a_path_into_a_fresh_folder_forks_the_run(tmp_path):
    parent = finished_run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000120.pt"
    with rundir.claim(tmp_path / "b", resume=str(ckpt), recipe=RECIPE) as run:
        run.check_checkpoint({"run_id": parent}, ckpt)
        run.start()  # the trainer starts the run once the checkpoint checks passed
        assert run.run_id != parent
        info = json.loads((tmp_path / "b" / rundir.RUN_FILE).read_text())
        assert info["resumed_from"] == {"run_id": parent, "checkpoint": str(ckpt)} and "fresh" not in info
    # the fork's folder now belongs to the fork: its parent's checkpoints are foreign there
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 121}\n')
    with claim(tmp_path / "b", str(ckpt)) as run:
        with pytest.raises(UserError, match=f"belongs to run {parent}"):
            run.check_checkpoint({"run_id": parent}, ckpt)


def test_a_failed_start_leaves_nothing(tmp_path):
    folder = tmp_path / "x" / "y" / "run"
    with pytest.raises(ZeroDivisionError):
        with claim(folder):
            1 / 0
    assert list(tmp_path.iterdir()) == []
    # a folder that existed keeps itself and what it held; only the claim's files go
    (tmp_path / "keep").mkdir()
    with pytest.raises(UserError):
        with claim(tmp_path / "keep"):
            raise UserError("bad data")
    assert list(tmp_path.iterdir()) == [tmp_path / "keep"] and list((tmp_path / "keep").iterdir()) == []
    # once the run wrote something, a failure keeps everything
    with pytest.raises(ZeroDivisionError):
        with claim(folder) as run:
            (folder / "metrics.jsonl").write_text("{}\n")
            1 / 0
    assert sorted(p.name for p in folder.iterdir()) == [rundir.LOCK_FILE, "metrics.jsonl", rundir.RUN_FILE]
    assert json.loads((folder / rundir.RUN_FILE).read_text())["run_id"] == run.run_id


def test_an_output_dir_below_a_file_or_read_only_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"train.output_dir=.*file/run: .*file is a file, not a folder$"):
        claim(tmp_path / "file" / "run")
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(UserError, match=r"train.output_dir=.*ro/run: cannot write there \(Permission denied\)$"):
        claim(tmp_path / "ro" / "run")


# --------------------------------------------------------------------------- the lock


HOLDER = textwrap.dedent("""
    import sys, time
    from lm import rundir
    run = rundir.claim(sys.argv[1], resume=None, recipe={})
    run.start()
    print(run.run_id, flush=True)
    time.sleep(120)
""")


def _holder(folder: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    run_id = proc.stdout.readline().strip()
    assert run_id, "the holder process failed to claim the folder"
    return proc, run_id


def test_a_second_trainer_is_refused_while_a_live_process_holds_the_folder(tmp_path):
    folder = tmp_path / "run"
    proc, run_id = _holder(folder)
    try:
        for resume in (None, "auto"):
            with pytest.raises(UserError) as e:
                claim(folder, resume)
            assert str(e.value) == (f"train.output_dir={folder} is in use by pid {proc.pid} on {socket.gethostname()} "
                                    f"(run {run_id}); wait for it to finish, or choose another train.output_dir")
        assert json.loads((folder / rundir.RUN_FILE).read_text())["run_id"] == run_id  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc, run_id = _holder(folder)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (folder / rundir.LOCK_FILE).read_text().startswith(f"{proc.pid} ")  # the stale lock file is still there
    with claim(folder, "auto") as run:
        assert run.run_id == run_id
        assert (folder / rundir.LOCK_FILE).read_text() == f"{os.getpid()} {socket.gethostname()} {run_id}\n"
        with pytest.raises(UserError, match=f"is in use by pid {os.getpid()} "):  # held now, by us
            claim(folder, "auto")
    with claim(folder, "auto"):  # released at the end of the with block
        pass


# --------------------------------------------------------------------------- resume changes


def changed(**keys) -> dict:
    new = json.loads(json.dumps(RECIPE))
    for dotted, value in keys.items():
        node = new
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return new


def test_applied_changes_are_returned_sorted():
    new = changed(train__lr=0.5, train__max_steps=100, train__prompts=["a"], train__teacher_forcing__start=0.5,
                  data__output="elsewhere", train__device="cpu")
    assert rundir.resume_changes(RECIPE, new) == [
        "data.output", "train.device", "train.lr", "train.max_steps", "train.prompts", "train.teacher_forcing.start"]
    assert rundir.resume_changes(RECIPE, RECIPE) == []
    # what may change does not enter the run's fingerprint; what may not, does
    assert rundir.recipe_fingerprint(new) == rundir.recipe_fingerprint(RECIPE)
    assert rundir.recipe_fingerprint(changed(train__seed=1)) != rundir.recipe_fingerprint(RECIPE)


@pytest.mark.parametrize("key, value", [
    ("model__hidden_size", 12), ("model__dropout_emb", 0.5), ("data__max_len", 64), ("data__tokenizer__kind", "bpe"),
    ("train__seed", 1), ("train__optimizer", "sgd"), ("train__max_tokens", 100), ("train__weight_decay", 0.1),
    ("train__warmup_steps", 10), ("train__schedule", "cosine"),
])
def test_refused_changes_name_the_key_and_both_values(key, value):
    dotted = key.replace("__", ".")
    old = _get(RECIPE, dotted)
    with pytest.raises(UserError) as e:
        rundir.resume_changes(RECIPE, changed(**{key: value}))
    assert str(e.value) == (f"{dotted}={value} differs from the checkpoint's {dotted}={'null' if old is None else old}, "
                            "and a resume cannot change it; keep the old value, or start a new run in another "
                            "train.output_dir")


def test_a_key_the_rules_do_not_list_is_refused_and_one_only_one_side_has_is_not_compared():
    saved = {**RECIPE, "train": {**RECIPE["train"], "brand_new_key": None}}
    new = {**RECIPE, "train": {**RECIPE["train"], "brand_new_key": 1}}
    with pytest.raises(UserError, match=r"^train\.brand_new_key=1 differs from the checkpoint's train\.brand_new_key=null"):
        rundir.resume_changes(saved, new)
    assert rundir.resume_changes(RECIPE, new) == []  # a checkpoint from before the key existed
    assert rundir.resume_changes(new, RECIPE) == []


def test_every_applied_rule_names_a_real_key():
    keys = set(field_names(Recipe))
    for rule in rundir.APPLIED:
        assert (rule[:-2] if rule.endswith(".*") else rule) in keys, rule


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_a_folder_that_refuses_writes_is_a_user_error(tmp_path, monkeypatch):
    """The read-only case above, for a root user (permissions do not stop root): the lock
    file cannot be created."""
    real = os.open

    def deny(path, *args, **kwargs):
        if str(path).endswith(rundir.LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", deny)
    with pytest.raises(UserError, match=r"^train.output_dir=.*/run: cannot write there \(Permission denied\)$"):
        claim(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
