"""What a demanding user tries: two runs in one directory, bad manifests, stale caches, mistakes that
must fail before compute with one line naming the file and what was expected, damaged checkpoints."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.recipe import load_recipe
from tests.conftest import requires_offline, same_results, tiny_ctc_recipe, tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------------------ one run per directory

#: a run that stops after its second step until it is killed
HOLDING = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import parpkit

class Hold(TrainerCallback):
    def on_step_end(self, args, state, *a, **k):
        if state.global_step == 2:
            Path(sys.argv[3]).write_text("holding")
            time.sleep(600)

parpkit.run(sys.argv[1], output_dir=sys.argv[2], progress=False, callbacks=[Hold()])
"""


def test_a_run_starting_while_a_sweeps_list_reads_its_lock_waits_for_it_not_refused(tmp_path):
    """The list's lock_holder takes a shared lock for an instant; a run taking the directory in that instant had
    been told it was in use (and a sweep skipped the point): it tries again for up to half a second."""
    import fcntl
    import threading

    from parpkit.engine.rundir import RunDir, lock_holder
    from parpkit.errors import RunDirBusy

    folder = tmp_path / "point"
    folder.mkdir()
    (folder / ".lock").write_text("pid 1 on oldvm, started 2026-12-07T00:00:00+00:00\n")  # its holder long gone
    assert lock_holder(folder) is None
    lister = open(folder / ".lock")
    fcntl.flock(lister, fcntl.LOCK_SH)
    threading.Timer(0.2, lister.close).start()  # the list lets go 0.2 s later
    run = RunDir(folder, "seed: 0\n")
    run.acquire()
    assert lock_holder(folder).startswith(f"pid {os.getpid()} on ")
    run.release()
    reader = open(folder / ".lock")
    fcntl.flock(reader, fcntl.LOCK_SH)  # held for good: after its tries the run is told who holds it
    try:
        with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()} on "):
            RunDir(folder, "seed: 0\n").acquire()
    finally:
        reader.close()


@requires_offline
def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 4, "training.save_steps": 2}))
    other = write_recipe(tmp_path / "o.yaml", tiny_recipe(**{"training.max_steps": 3}))
    out, holding = tmp_path / "out", tmp_path / "holding"
    first = subprocess.Popen([sys.executable, "-c", HOLDING, str(path), str(out), str(holding)])
    deadline = time.time() + 180
    while not holding.exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "parpkit.cli", "run", str(path), "--output-dir", str(out), "--quiet"],
                            capture_output=True, text=True)
    assert second.returncode == 2
    message = " ".join(second.stderr.split())
    assert f"is in use by pid {first.pid} on " in message and "started 20" in message
    # another recipe with --fresh would have wiped the first run's files under it: refused too
    assert main(["run", str(other), "--output-dir", str(out), "--quiet", "--fresh"]) == 2
    assert f"in use by pid {first.pid}" in _err(capsys)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / ".lock").exists()  # left behind by the killed process, and no obstacle:
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").open()]
    assert events.count("done") == 1


@requires_offline
def test_fresh_leaves_nothing_of_the_earlier_run_that_a_later_step_could_read(tmp_path, capsys):
    a, b = _wav(tmp_path / "a.wav", 1.0), _wav(tmp_path / "b.wav", 0.7)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"audio": x}) + "\n" for x in (a, b, a, b)))  # unlabelled
    (tmp_path / "test.jsonl").write_text(json.dumps({"audio": a, "text": "hello there"}) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "dataset": dataset, "training.max_steps": 2, "training.save_steps": 1, "training.keep_checkpoints_when_done": True,
        "distillation": {"weight": 0.5}, "pruning.criterion": {"name": "structured"}, "pruning.schedule": {"name": "fixed"}}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert main(["export", str(out), "--compact"]) == 0
    earlier = {p.name for p in out.iterdir()}
    assert {"model", "compact", "masks.safetensors", "masks_initial.safetensors", "sparsity.csv", "pseudo_labels.jsonl",
            "transcripts_final.jsonl", "checkpoints", "metrics.json"} <= earlier
    # a fresh run that fails once it has claimed the directory (its test split has nothing to score)
    (tmp_path / "test.jsonl").write_text(json.dumps({"audio": a, "text": "..."}) + "\n")
    capsys.readouterr()
    assert main(["run", str(path), "--output-dir", str(out), "--quiet", "--fresh"]) == 2
    assert "has nothing to score" in _err(capsys)
    assert {p.name for p in out.iterdir()} <= {".lock", "recipe.yaml", "log.jsonl"}  # nothing of the earlier run
    assert main(["export", str(out), "--compact"]) == 2  # used the earlier run's model/
    assert main(["compare-masks", str(out), str(out), "--output", str(tmp_path / "cmp")]) == 2  # … and its masks
    capsys.readouterr()
    # pseudo-labels an earlier run left behind are not trained on by a fresh one
    (tmp_path / "test.jsonl").write_text(json.dumps({"audio": a, "text": "hello there"}) + "\n")
    (out / "pseudo_labels.jsonl").write_text("".join(json.dumps({"id": f"train-{i:06d}", "text": "stale words"}) + "\n"
                                                     for i in range(4)))
    assert main(["run", str(path), "--output-dir", str(out), "--quiet", "--fresh"]) == 0
    labels = [json.loads(line)["text"] for line in (out / "pseudo_labels.jsonl").open()]
    assert len(labels) == 4 and "stale words" not in labels


# ------------------------------------------------------------------------------------ manifests

def _wav(path: Path, seconds: float = 0.5) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000)
    return str(path)


def _manifest(tmp_path, name: str, text: str, **options):
    from parpkit.progress import QUIET
    from parpkit_plugins.datasets.manifest import Manifest, ManifestOptions

    (tmp_path / name).write_text(text, encoding="utf-8")
    m = Manifest(ManifestOptions(splits={"train": str(tmp_path / name)}, **options), cache_dir=tmp_path)
    return m, lambda: m.load_split("train", QUIET)


def test_a_missing_transcript_is_an_error_naming_the_row_or_skipped_and_counted(tmp_path):
    from parpkit.errors import ParpkitError

    a, b = _wav(tmp_path / "a.wav"), _wav(tmp_path / "b.wav")
    jsonl = json.dumps({"audio": a, "text": "hello there"}) + "\n" + json.dumps({"audio": b, "text": None}) + "\n"
    _, load = _manifest(tmp_path, "m.jsonl", jsonl)
    with pytest.raises(ParpkitError, match=r"m\.jsonl: row 2 has no transcript in column 'text'"):
        load()
    m, load = _manifest(tmp_path, "m.jsonl", jsonl, skip_unreadable=True)
    assert [u.text for u in load()] == ["hello there"]  # not the string "None"
    assert m.report()["skipped_unreadable"] == 1 and "row 2: no transcript" in m.report()["skipped_files"][0]
    _, load = _manifest(tmp_path, "m.csv", f"audio,text\n{a},hello\n{b},\n")
    with pytest.raises(ParpkitError, match=r"m\.csv: row 2 has no transcript"):
        load()


def test_manifest_lines_that_are_not_objects_and_csv_byte_order_marks(tmp_path):
    from parpkit.errors import ParpkitError

    a = _wav(tmp_path / "a.wav")
    _, load = _manifest(tmp_path, "m.jsonl", json.dumps({"audio": a, "text": "hi"}) + "\n[1, 2]\n")
    with pytest.raises(ParpkitError, match=r"m\.jsonl:2: expected a JSON object with the columns, got list"):
        load()
    # a spreadsheet program's UTF-8 byte-order mark before the first column name
    _, load = _manifest(tmp_path, "bom.csv", f"\ufeffaudio,text\n{a},hello\n")
    assert [u.text for u in load()] == ["hello"]


def test_a_tsv_transcript_opening_a_double_quote_keeps_every_row_and_a_csv_one_is_named(tmp_path):
    from parpkit.errors import ParpkitError

    a = _wav(tmp_path / "a.wav")
    texts = [f"line {i}" for i in range(8)]
    texts[2] = '"so he said and went on'  # a quote that never closes: it used to swallow the rows after it
    _, load = _manifest(tmp_path, "m.tsv", "audio\ttext\n" + "".join(f"{a}\t{t}\n" for t in texts))
    utts = load()
    assert [u.text for u in utts] == texts and len(utts) == 8
    # CSV quotes fields by design; one left open is an error naming where it began, not fewer rows
    body = "".join(f'{a},{t}\n' for t in texts)
    _, load = _manifest(tmp_path, "m.csv", "audio,text\n" + body)
    with pytest.raises(ParpkitError, match=r"m\.csv:4: row 3: .*a double quote without its closing one"):
        load()
    quoted = texts[:2] + ['"a quote, closed later', 'on the next line"'] + texts[4:]
    _, load = _manifest(tmp_path, "q.csv", "audio,text\n" + "".join(f'{a},{t}\n' for t in quoted))
    with pytest.raises(ParpkitError, match=r"q\.csv:4: row 3 has a field that runs over lines 4-5"):
        load()
    _, load = _manifest(tmp_path, "ok.csv", f'audio,text\n{a},"hello, there"\n{a},"say ""hi"""\n')
    assert [u.text for u in load()] == ["hello, there", 'say "hi"']


# ------------------------------------------------------------------------------------ caches

@requires_offline
def test_the_ctranslate2_conversion_is_keyed_on_every_file_it_reads(tmp_path):
    from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions
    from tests.conftest import TINY_WHISPER, offline_file
    from tests.ct2_writer import write_ct2
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51864, **TINY_WHISPER, decoder_start_token_id=50257, pad_token_id=50256, eos_token_id=50256,
                        bos_token_id=50257)
    src = write_ct2(WhisperForConditionalGeneration(cfg), tmp_path / "ct2", offline_file("model/tokenizer.json"))

    def converted() -> set[str]:
        WhisperBackbone(WhisperOptions(model=str(src), max_new_tokens=8), cache_dir=tmp_path / "cache").load()
        return {p.name for p in (tmp_path / "cache" / "whisper-ct2").iterdir() if (p / "COMPLETE").exists()}

    first = converted()
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:-1]  # a different tokenizer beside the same model.bin
    (src / "tokenizer.json").write_text(json.dumps(tok))
    second = converted()
    assert len(first) == 1 and len(second) == 2  # converted again, not the stale conversion reused
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "suppress_ids": [1, 2, 3]}))
    assert len(converted()) == 3


# ------------------------------------------------------------------------------------ before compute

@pytest.mark.parametrize("changes, message", [
    ({"training.adam_beta1": 5}, r"training\.adam_beta1: Input should be less than 1"),
    ({"training.max_steps": True}, r"training\.max_steps: expected a number, got True"),
    # inside a list or a mapping of numbers too (YAML's true had become 1: a 1-utterance split, 1 s gaps)
    ({"dataset.concatenate": {"p": 0.5, "max_seconds": 5, "gap_seconds": [0.5, True]}},
     r"dataset\.concatenate\.gap_seconds: expected numbers, got a boolean at \[1\]"),
    # plugin options: checked at resolve (below)
    ({"pruning.schedule.options": {"interval": True}}, r"pruning\.schedule\.options\.interval: expected a number, got True"),
    ({"dataset.options.sizes": {"train": True, "test": 4}}, r"dataset\.options\.sizes: expected numbers, got a boolean at train"),
])
def test_numbers_are_numbers(tmp_path, changes, message):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes))
    if ".options" in next(iter(changes)):
        from parpkit.registry import Plugins
        from parpkit.resolve import resolve

        recipe = load_recipe(path)[0]
        with pytest.raises(RecipeError, match=message):
            resolve(recipe, Plugins(), str(path))
        return
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_yaml_1_1_floats_without_a_dot_are_numbers(tmp_path):
    text = write_recipe(tmp_path / "r.yaml", tiny_recipe()).read_text().replace("sparsity: 0.5", "sparsity: 5e-1")
    (tmp_path / "r.yaml").write_text(text + "\n")
    recipe, _ = load_recipe(tmp_path / "r.yaml", ["training.learning_rate=3e-4"])
    assert recipe.pruning.sparsity == 0.5 and recipe.training.learning_rate == 3e-4


@requires_offline
@pytest.mark.parametrize("changes, message", [
    ({"backbone.options.max_new_tokens": 80}, r"max_new_tokens 80 and the 2-token prompt do not fit the decoder's 64 positions"),
    ({"backbone.options.config.encoder_layer": 3}, r"backbone\.options: config: WhisperConfig has no key 'encoder_layer' "
                                                   r"\(did you mean 'encoder_layers'\?\)"),
    ({"dataset.options.speakers": {"train": 90, "test": 10}, "dataset.options.sizes": {"train": 90, "test": 10}},
     r"100 speakers asked for, but only 96 voice/variant pairs exist"),
    ({"dataset.options.speakers": {"train": 9, "test": 2}}, r"speakers\.train: 9 speakers for 8 utterances"),
    ({"backbone.options.config.vocab_size": 51865, "backbone.options.language": "klingon"}, r"unknown language 'klingon'"),
])
def test_mistakes_are_caught_by_validate_and_before_run_loads_anything(tmp_path, capsys, changes, message):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes))
    assert main(["validate", str(path)]) == 2
    assert __import__("re").search(message, _err(capsys))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert __import__("re").search(message, _err(capsys))
    assert not (tmp_path / "out" / "recipe.yaml").exists()  # nothing claimed, nothing computed


def test_an_empty_recipe_and_a_broken_set_value_are_named(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["validate", str(tmp_path / "empty.yaml")]) == 2
    assert "empty.yaml: the recipe is empty" in _err(capsys)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    assert main(["validate", str(path), "--set", "pruning.exclude=[a, b"]) == 2  # meant as a list: not taken as text
    assert "--set pruning.exclude=[a, b: the value is not valid YAML" in _err(capsys)
    assert main(["validate", str(path), "--set", "output_dir=runs/a: b: c"]) == 0  # plain text that is not YAML stays text


@requires_offline
def test_a_run_that_failed_before_training_does_not_block_its_corrected_rerun(tmp_path, capsys):
    a = _wav(tmp_path / "a.wav")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"audio": a, "text": "..."}) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": a, "text": "hello there"}) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "empty.jsonl")}}}
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(**{"dataset": dataset, "training.max_steps": 1}))
    out = tmp_path / "out"
    assert main(["run", str(bad), "--output-dir", str(out), "--quiet"]) == 2
    assert "split 'test' has nothing to score: every one of its 1 transcripts is empty once normalised" in _err(capsys)
    dataset["options"]["splits"]["test"] = str(tmp_path / "train.jsonl")
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe(**{"dataset": dataset, "training.max_steps": 1}))
    assert main(["run", str(good), "--output-dir", str(out), "--quiet"]) == 0  # not "a different recipe"
    assert (out / "metrics.json").exists()


@requires_offline
def test_duplicate_ids_non_finite_audio_and_other_sample_rates_are_refused_when_a_split_loads(tmp_path, capsys):
    from parpkit.engine import run
    from parpkit.errors import ParpkitError
    from parpkit.progress import QUIET
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    good = [_wav(tmp_path / f"{i}.wav") for i in range(3)]
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, float("nan"), 0.2] * 2000, np.float32), 16000, subtype="FLOAT")

    def manifest(name, rows):
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "audio": a, "text": "hello there"}) + "\n" for i, a in rows))
        return str(tmp_path / name)

    def recipe(train, test, **changes):
        dataset = {"name": "manifest", "options": {"splits": {"train": train, "test": test}, "id_column": "id"}}
        return write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"dataset": dataset, "training.max_steps": 1, **changes}))

    ok = manifest("ok.jsonl", [("a", good[0]), ("b", good[1])])
    # the same id twice in a split: with distillation one utterance took the other's pseudo-label
    twice = manifest("twice.jsonl", [("a", good[0]), ("b", good[1]), ("a", good[2])])
    assert main(["run", str(recipe(twice, ok)), "--output-dir", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "dataset: split 'train': utterance id 'a' occurs more than once" in _err(capsys)
    # NaN audio in an evaluation split was scored silently (and in training became "lower the learning rate")
    bad = manifest("bad.jsonl", [("a", good[0]), ("n1", str(nan))])
    assert main(["run", str(recipe(ok, bad)), "--output-dir", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "dataset: split 'test': utterance 'n1' has 2000 non-finite audio samples (NaN or infinity) of 6000" in _err(capsys)
    assert main(["run", str(recipe(bad, ok)), "--output-dir", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "dataset: split 'train': utterance 'n1' has 2000 non-finite" in _err(capsys)
    # a dataset that hands over audio at another rate than the backbone's
    path = recipe(ok, ok)
    resolved = resolve(load_recipe(path)[0], Plugins(), str(path))
    loader = resolved.dataset.load_split

    def at_8k(split, progress):
        return [dataclasses.replace(u, sample_rate=8000) if split == "test" else u for u in loader(split, progress)]

    resolved.dataset.load_split = at_8k
    with pytest.raises(ParpkitError, match=r"dataset: split 'test': utterance 'a' is at 8000 Hz; the backbone takes 16000 Hz"):
        run(resolved, QUIET, output_dir=tmp_path / "o4")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "o5"), "--quiet"]) == 0


def test_a_yaml_alias_bomb_fails_at_once(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(8):
        prev, cur = chr(97 + i), chr(98 + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: x\n")
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 100,000 values once its YAML aliases are followed"):
        load_recipe(bomb)
    assert time.perf_counter() - started < 5  # was minutes and gigabytes; here it is milliseconds (suite timing shows it)
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(bomb.read_text())
    assert main(["export", str(run_dir), "--compact"]) == 2  # export re-reads recipe.yaml through the same guard


# ------------------------------------------------------------------------------------ one line, no traceback

@requires_offline
def test_damaged_model_and_mask_files_are_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))), "--output-dir", str(out),
                 "--quiet"]) == 0
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    recipe = tiny_recipe(**{"training.max_steps": 1})
    recipe["backbone"]["options"] = {"model": str(out / "model"), "encoder_window_s": 6, "max_new_tokens": 8}
    assert main(["run", str(write_recipe(tmp_path / "m.yaml", recipe)), "--output-dir", str(tmp_path / "m"), "--quiet"]) == 2
    err = _err(capsys)
    assert f"whisper: cannot load '{out / 'model'}'" in err and "Traceback" not in err
    (tmp_path / "not-masks.safetensors").write_text("these are not masks")
    taker = tiny_recipe(**{"pruning.schedule": {"name": "fixed"}, "pruning.mask_from": str(tmp_path / "not-masks.safetensors")})
    assert main(["run", str(write_recipe(tmp_path / "t.yaml", taker)), "--output-dir", str(tmp_path / "t"), "--quiet"]) == 2
    assert "not-masks.safetensors is not a readable safetensors mask file" in _err(capsys)
    weights.unlink()
    assert main(["export", str(out), "--compact"]) == 2
    assert "model: no model weights (model.safetensors)" in _err(capsys)


@requires_offline
def test_an_output_directory_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))
    (tmp_path / "file").write_text("x")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "file"), "--quiet"]) == 2
    assert "the run directory is a file" in _err(capsys)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: no read-only folder to test with here
            pytest.skip("running as root: a read-only folder is writable")
        assert main(["run", str(path), "--output-dir", str(locked / "out"), "--quiet"]) == 2
        assert "cannot write the run directory (Permission denied)" in _err(capsys)
    finally:
        locked.chmod(0o700)


@requires_offline
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from parpkit.engine import rundir

    def full(self, metrics):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "metrics.json"))

    monkeypatch.setattr(rundir.RunDir, "write_metrics", full)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 3  # failed while working
    err = _err(capsys)
    assert f"error: {tmp_path / 'out' / 'metrics.json'}: No space left on device" in err and "Traceback" not in err


def test_a_full_disk_under_other_writers_is_one_line_and_other_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import shutil

    import parpkit.api

    def failing(error):
        def run(*args, **kw):
            raise error
        return run

    argv = ["run", str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path / "out"), "--quiet"]
    # safetensors' own error type, ENOSPC only in its message (seen when a sweep filled the disk)
    monkeypatch.setattr(parpkit.api, "run", failing(RuntimeError("Error while serializing: I/O error: No space left on "
                                                                 "device (os error 28)")))
    assert main(argv) == 3  # a run that failed, not a refused input
    err = _err(capsys)
    assert "error: the disk is full (Error while serializing" in err and "resume" in err and "Traceback" not in err
    # torch.save says only "unexpected pos": a full disk is recognised by the free space left
    pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60948096 vs 60947988")
    monkeypatch.setattr(parpkit.api, "run", failing(pos))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: a bug, with its traceback
        main(argv)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    assert main(argv) == 3
    assert "error: the disk is full ([enforce fail" in _err(capsys)


@requires_offline
def test_report_skips_a_damaged_run_and_writes_csv_into_a_new_folder(tmp_path, capsys):
    good, bad = tmp_path / "runs" / "good", tmp_path / "runs" / "bad"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))), "--output-dir", str(good),
                 "--quiet"]) == 0
    bad.mkdir()
    (bad / "metrics.json").write_text('{"stages": {"final": ')
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--csv", str(tmp_path / "new" / "folder" / "r.csv")]) == 0
    err = _err(capsys)
    assert f"skipped {bad / 'metrics.json'}: unreadable (JSONDecodeError" in err
    assert (tmp_path / "new" / "folder" / "r.csv").read_text().count("\n") == 2


def test_a_ctc_batch_of_empty_transcripts_is_all_blank_not_a_crash(tmp_path):
    from parpkit.interfaces import Utterance
    from parpkit_plugins.backbones.wav2vec2 import CTCBackbone, CTCOptions
    from tests.conftest import TINY_WAV2VEC2

    b = CTCBackbone(CTCOptions(config=dict(TINY_WAV2VEC2), mask_time_prob=0.0), cache_dir=tmp_path)
    b.prepare([Utterance("x", np.zeros(1), 16000, "some words")], "words")
    model = b.load()
    utts = [Utterance(str(i), (np.random.default_rng(i).standard_normal(8000) * 0.1).astype(np.float32), 16000, "") for i in range(2)]
    batch = b.collate(utts)
    assert batch["labels"].shape == (2, 1) and (batch["labels"] == -100).all()
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


# ------------------------------------------------------------------------------------ damaged checkpoints

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A recipe and one finished run of it, with its checkpoints."""
    tmp = tmp_path_factory.mktemp("finished")
    path = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 6, "training.save_steps": 2,
                                                       "training.learning_rate": 3e-3,
                                                       "training.keep_checkpoints_when_done": True}))
    assert main(["run", str(path), "--output-dir", str(tmp / "alone"), "--quiet"]) == 0
    return path, tmp / "alone"


@requires_offline
@pytest.mark.parametrize("damage, in_place", [("parpkit_state.json", False), ("model.safetensors", False), ("optimizer.pt", False),
                                              ("model.safetensors", True), ("scheduler.pt", True)])
def test_a_damaged_complete_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage, in_place, finished_run):
    import shutil

    path, alone = finished_run
    hurt = tmp_path / "hurt"
    shutil.copytree(alone, hurt)  # the same run, killed after its last checkpoint was marked complete
    (hurt / "metrics.json").unlink()
    newest = hurt / "checkpoints" / "phase-0" / "checkpoint-6"
    assert (newest / "COMPLETE").exists()
    data = (newest / damage).read_bytes()
    if in_place:  # bytes overwritten, same length: headers and zip directories still read (weights become NaN)
        middle = len(data) // 2
        (newest / damage).write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64:])
    else:
        (newest / damage).write_bytes(data[: len(data) // 2])  # damaged after it was marked complete
    capsys.readouterr()
    assert main(["run", str(path), "--output-dir", str(hurt), "--quiet"]) == 0
    err = _err(capsys)
    assert f"{newest} is damaged" in err and "passing over it" in err
    if in_place:
        assert f"({damage} does not match the checksum written when it was complete)" in err
    resume = [json.loads(line) for line in (hurt / "log.jsonl").open() if '"resume"' in line]
    assert resume[-1]["checkpoint"].endswith("checkpoint-4")
    same_results(alone, hurt)


@requires_offline
def test_a_sweeps_list_says_where_each_started_point_would_resume(tmp_path, finished_run):
    import shutil

    from parpkit.cli import point_state

    _, alone = finished_run
    killed = tmp_path / "killed"
    shutil.copytree(alone, killed)
    assert point_state(killed, 1) == "finished" and point_state(tmp_path / "none", 1) == ""
    (killed / "metrics.json").unlink()
    assert point_state(killed, 1) == "started, resumes at update 6 of 6"
    assert point_state(killed, 2) == "started, resumes at update 6 of 6 of phase 1"
    from parpkit.engine.rundir import RunDir

    working = RunDir(killed, (killed / "recipe.yaml").read_text())
    working.acquire()  # as a run in another process holds it: the list said "resumes at …" of a point running now
    try:
        state = point_state(killed, 1)
        logged = [json.loads(line) for line in (killed / "log.jsonl").open()]
        update = [e["step"] for e in logged if e["event"] == "train"][-1]
        assert state.startswith(f"running now (pid {os.getpid()} on ")
        assert state.endswith(f"; last logged update {update}): the sweep skips it")
        with (killed / "log.jsonl").open("a") as log:  # a line being written as the list reads: passed over
            log.write('{"event": "train", "step": 99, "lo')
        assert point_state(killed, 1).endswith(f"; last logged update {update}): the sweep skips it")
    finally:
        working.release()
    assert point_state(killed, 1) == "started, resumes at update 6 of 6"  # its holder gone, the lock file stays
    (killed / ".lock").unlink()
    os.mkfifo(killed / ".lock")  # opening a FIFO to read would wait for a writer: it had hung the list
    assert point_state(killed, 1) == ".lock is not a file: the point will fail"
    (killed / ".lock").unlink()
    ckpts = killed / "checkpoints" / "phase-0"
    (ckpts / "checkpoint-²").mkdir()  # str.isdigit() takes "²", int() does not: it had stopped the whole sweep
    newest = ckpts / "checkpoint-6" / "trainer_state.json"
    newest.write_text(newest.read_text().replace('"global_step": 6', '"global_step": Infinity'))
    assert point_state(killed, 1) == "started, resumes at update 4 of 6 (1 damaged checkpoint passed over)"
    shutil.rmtree(ckpts / "checkpoint-6")
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": Infinity, "max_steps": 6}')
    (ckpts / "checkpoint-4" / "COMPLETE").write_text("ok")  # as an older parpkit marked it: no checksums
    assert point_state(killed, 1) == "started, resumes from checkpoints/phase-0/checkpoint-4"
    # a phase the recipe does not have is not where the run resumes (it had said "resumes ... of phase 2")
    ckpts.rename(killed / "checkpoints" / "phase-1")
    assert point_state(killed, 1) == "started, starts over: no checkpoint yet"
    (killed / "checkpoints" / "phase-100000000000").mkdir()  # had walked every phase up to it
    assert point_state(killed, 1) == "started, starts over: no checkpoint yet"
    # what the run itself would refuse is said, not taken for finished or started
    (killed / "metrics.json").write_text("{trunc")
    assert point_state(killed, 1) == "metrics.json cannot be read: the point will fail (--fresh runs it again)"
    (tmp_path / "file").write_text("x")
    assert point_state(tmp_path / "file", 1) == "not a directory: the point will fail"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert point_state(tmp_path / "loop", 1) == "not a directory: the point will fail"


@requires_offline
def test_wav2vec2_config_keys_are_checked(tmp_path, capsys):
    recipe = tiny_ctc_recipe()
    recipe["backbone"]["options"]["config"]["num_layers"] = 3
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "Wav2Vec2Config has no key 'num_layers' (did you mean 'num_hidden_layers'?)" in _err(capsys)
