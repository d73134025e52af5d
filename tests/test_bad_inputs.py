"""Every bad input a hostile new user tried (issue 14, DESIGN section 9): one line, exit 2, nothing left.

Each row runs the real command line (``pipeline.cli.main``) in this process, which is what the
console script runs, minus the interpreter start-up that would make ~60 rows take minutes. A row
passes when the command exits with 2, prints exactly one non-empty line on stderr with no
traceback, that line names what is wrong, and the folder of inputs is byte for byte as before
(no store, run folder, report or plot left behind, and no input modified).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.datasets import store as store_module
from pipeline.datasets.merge import merge_stores
from pipeline.datasets.store import EpisodeWriter
from pipeline.envs.spec import ObsSpec
from tests.test_store import make_episode, write


def _damage(url: Path, key: str, how: str) -> None:
    path = url / key
    if how == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of things to point commands at: good, empty, damaged and foreign stores, a file,
    an earlier eval report, an unfinished merge."""
    root = tmp_path_factory.mktemp("inputs")
    write(str(root / "a.zarr"), [make_episode(1, 12), make_episode(2, 9)])
    write(str(root / "b.zarr"), [make_episode(3, 7)])
    EpisodeWriter(str(root / "zero.zarr"), ObsSpec()).close()  # as a collect killed before its first commit
    for name, key, how in (("no-frames.zarr", "frames/c/0/0/0", "delete"),
                           ("flipped-action.zarr", "action/c/0/0", "flip"),
                           ("no-length.zarr", "episodes/length/c/0", "delete")):
        write(str(root / name), [make_episode(4, 10), make_episode(5, 6)])
        _damage(root / name, key, how)
    shutil.copytree(root / "a.zarr", root / "not-metadata.zarr")
    (root / "not-metadata.zarr" / "zarr.json").write_text("[1, 2, 3]")
    (root / "afile").write_text("a regular file\n")
    (root / "notckpt.pt").write_text("not a checkpoint\n")
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text(json.dumps({"format": "earlier report"}))

    # an unfinished merge: the writer dies (as under kill -9) after its first episode
    original = store_module.EpisodeWriter.append

    def die_after_one(writer, episode, source=-1):
        if writer.committed_episodes == 1:
            raise KeyboardInterrupt
        return original(writer, episode, source)

    store_module.EpisodeWriter.append = die_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_stores([str(root / "a.zarr"), str(root / "b.zarr")], str(root / "unfinished.zarr"))
    finally:
        store_module.EpisodeWriter.append = original
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# (command line with {placeholders} under the inputs folder, words the error line must contain)
ROWS = [
    # collect
    ("collect --episodes 99999999999999999999 --out {new}.zarr", ["--episodes", "seed range"]),
    ("collect --episodes 0 --out {new}.zarr", ["--episodes"]),
    ("collect --episodes abc --out {new}.zarr", ["--episodes", "abc"]),
    ("collect --noise -1 --episodes 1 --out {new}.zarr", ["--noise"]),
    ("collect --max-steps -5 --episodes 1 --out {new}.zarr", ["--max-steps"]),
    ("collect --max-steps 0 --episodes 1 --out {new}.zarr", ["--max-steps"]),
    ("collect --traffic -2 --episodes 1 --out {new}.zarr", ["--traffic"]),
    ("collect --workers -1 --episodes 1 --out {new}.zarr", ["--workers"]),
    ("collect --route nowhere --episodes 1 --out {new}.zarr", ["nowhere", "racetrack"]),
    ("collect --resume --overwrite --episodes 1 --out {new}.zarr", ["--resume", "--overwrite"]),
    ("collect --episodes 1 --max-steps 3 --out {dir}/a.zarr", ["already exists"]),
    ("collect --episodes 1 --max-steps 3 --out {dir}/afile/x.zarr", ["cannot write"]),
    ("collect --episodes 1 --max-steps 3 --overwrite --out {dir}/afile", ["not a zarr store"]),
    ("collect --resume --episodes 3 --max-steps 3 --out {dir}/unfinished.zarr", ["unfinished merge", "--resume"]),
    ("collect --policy {dir}/notckpt.pt --episodes 1 --out {new}.zarr", ["notckpt.pt", "not a torch checkpoint"]),
    # train: options
    ("train --data {dir}/a.zarr --out {dir}/afile", ["--out", "is a file"]),
    ("train --data {dir}/a.zarr --checkpoint-every 0 --out {new}", ["--checkpoint-every"]),
    ("train --data {dir}/a.zarr --log-every 0 --out {new}", ["--log-every"]),
    ("train --data {dir}/a.zarr --steps 0 --out {new}", ["--steps"]),
    ("train --data {dir}/a.zarr --online-mix 0.5 --online-capacity 0 --out {new}", ["--online-capacity 0"]),
    ("train --data {dir}/a.zarr --online-capacity -1 --out {new}", ["--online-capacity"]),
    ("train --data {dir}/a.zarr --eval-every 1 --eval-episodes 0 --out {new}", ["--eval-episodes"]),
    ("train --data {dir}/a.zarr --online-every 0 --online-mix 0.5 --out {new}", ["--online-every 0", "--online-mix 0"]),
    ("train --data {dir}/a.zarr --exploration-noise -1 --out {new}", ["--exploration-noise"]),
    ("train --data {dir}/a.zarr --bc-alpha -1 --out {new}", ["--bc-alpha", "-1"]),
    ("train --data {dir}/a.zarr --replay-memory 0 --out {new}", ["--replay-memory", "4GiB"]),
    ("train --data {dir}/a.zarr --n-step 0 --out {new}", ["--n-step"]),
    ("train --data {dir}/a.zarr --gamma 2 --out {new}", ["--gamma"]),
    ("train --data {dir}/a.zarr --encoder-lr 0 --out {new}", ["--encoder-lr", "above 0"]),
    ("train --data {dir}/a.zarr --lr -1 --out {new}", ["--lr", "above 0"]),
    ("train --data {dir}/a.zarr --online-mix 1.5 --out {new}", ["--online-mix"]),
    ("train --data {dir}/a.zarr --encoder-update sideways --out {new}", ["--encoder-update", "sideways"]),
    ("train --resume", ["--resume", "--out"]),
    ("train --resume --out {new}", ["nothing to resume"]),
    ("train --data {dir}/a.zarr --route nowhere --batch-size 4 --out {new}", ["nowhere", "racetrack"]),
    ("train --data {dir}/a.zarr --device nonsense --out {new}", ["nonsense"]),
    # train: data
    ("train --data {dir}/a.zarr --batch-size 100000 --online-mix 0 --out {new}", ["--batch-size", "21 transitions"]),
    ("train --batch-size 100000000 --out {new}", ["--batch-size", "GiB"]),
    ("train --data {dir}/zero.zarr --out {new}", ["zero.zarr", "no committed episodes"]),
    ("train --data {dir}/zero.zarr --route racetrack --out {new}", ["zero.zarr", "no committed episodes"]),
    ("train --data {dir}/missing.zarr --out {new}", ["no dataset store", "missing.zarr"]),
    ("train --data {dir}/afile --out {new}", ["afile"]),
    ("train --data {dir}/no-frames.zarr --batch-size 4 --online-mix 0 --out {new}",
     ["frames", "chunk 0", "no-frames.zarr", "missing"]),
    ("train --data {dir}/flipped-action.zarr --batch-size 4 --online-mix 0 --out {new}",
     ["action", "chunk 0", "flipped-action.zarr", "sha256"]),
    ("train --data {dir}/no-length.zarr --out {new}", ["episodes/length", "no-length.zarr"]),
    ("train --data {dir}/not-metadata.zarr --out {new}", ["not-metadata.zarr", "zarr metadata"]),
    ("train --data {dir}/unfinished.zarr --out {new}", ["unfinished merge", "--resume"]),
    # datasets
    ("datasets info {dir}/missing.zarr", ["no dataset store"]),
    ("datasets info {dir}/afile", ["afile"]),
    ("datasets info {dir}/not-metadata.zarr", ["zarr metadata"]),
    ("datasets info {dir}/no-length.zarr", ["episodes/length", "missing"]),
    ("datasets verify {dir}/not-metadata.zarr", ["zarr metadata"]),
    ("datasets verify {dir}/missing.zarr", ["no dataset store"]),
    ("datasets stats {dir}/no-length.zarr", ["episodes/length", "missing"]),
    ("datasets stats {dir}/flipped-action.zarr", ["action", "chunk 0", "sha256"]),
    ("datasets stats {dir}/a.zarr --bins 0", ["--bins"]),
    ("datasets stats {dir}/a.zarr --png {dir}/afile/x.png", ["cannot write", "x.png"]),
    ("datasets merge {dir}/a.zarr -o {new}.zarr", ["at least two"]),
    ("datasets merge {dir}/a.zarr {dir}/a.zarr -o {new}.zarr", ["a.zarr", "twice"]),
    ("datasets merge {dir}/a.zarr {dir}/b.zarr -o {dir}/a.zarr", ["one of the sources"]),
    ("datasets merge {dir}/a.zarr {dir}/no-frames.zarr -o {new}.zarr", ["frames", "no-frames.zarr", "chunk 0"]),
    ("datasets merge {dir}/a.zarr {dir}/b.zarr -o {dir}/unfinished.zarr", ["already exists", "--resume"]),
    ("datasets merge {dir}/b.zarr {dir}/a.zarr -o {dir}/unfinished.zarr --resume", ["same sources"]),
    ("datasets merge {dir}/a.zarr {dir}/b.zarr -o {dir}/zero.zarr --resume", ["nothing to resume"]),
    ("datasets merge {dir}/a.zarr {dir}/unfinished.zarr -o {new}.zarr", ["unfinished merge"]),
    ("datasets push {dir}/a.zarr {dir}/afile", ["afile", "is a file"]),
    ("datasets push {dir}/no-frames.zarr {new}.zarr", ["frames/c/0/0/0"]),
    ("datasets push {dir}/flipped-action.zarr {new}.zarr", ["action/c/0/0", "checksum"]),
    ("datasets push {dir}/unfinished.zarr {new}.zarr", ["unfinished"]),
    ("datasets pull {dir}/missing.zarr {new}.zarr", ["no dataset store"]),
    # eval
    ("eval --policy expert --episodes 1 --out {dir}/report", ["already holds", "--overwrite"]),
    ("eval --policy expert --episodes 0 --out {new}", ["--episodes"]),
    ("eval --policy expert --route nowhere --out {new}", ["nowhere", "racetrack"]),
    ("eval --checkpoint {dir}/missing.pt --out {new}", ["missing.pt"]),
    ("routes --backend nowhere", ["--backend", "nowhere"]),
]


@pytest.mark.parametrize("command, needles", ROWS,
                         ids=[(row.values if hasattr(row, "values") else row)[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(command, needles, inputs, capsys, monkeypatch):
    argv = command.format(dir=inputs, new=inputs / "new").split()
    before = _snapshot(inputs)
    monkeypatch.setattr(sys, "argv", ["pipeline", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _snapshot(inputs) == before, "the command left something behind or changed an input"
