"""Artifact integrity: sha256 recorded at write and checked at load; a file cut short is one sentence, exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from circuits.cli import main
from decomposer.errors import DamagedArtifactError, VpdError
from decomposer.integrity import check_sha256, file_sha256, load_safetensors, record_sha256
from decomposer.vpd.bundle import bundled_run_path
from decomposer.vpd.run import (
    META_FILE,
    STATE_DIR,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    Decomposition,
    load_decomposition,
    save_state,
)
from tests.conftest import toy_config, toy_target


def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_check_passes_intact_files_and_names_a_changed_or_missing_one(tmp_path):
    save_file({"x": torch.arange(1000.0)}, tmp_path / "a.safetensors")
    recorded = record_sha256(tmp_path, ["a.safetensors"])
    check_sha256(tmp_path, recorded, fix="write it again")
    _cut(tmp_path / "a.safetensors", 0.99)
    with pytest.raises(DamagedArtifactError, match=r"a\.safetensors is damaged: .*cut short.*; write it again\.$"):
        check_sha256(tmp_path, recorded, fix="write it again")
    (tmp_path / "a.safetensors").unlink()
    with pytest.raises(DamagedArtifactError, match=r"a\.safetensors is missing"):
        check_sha256(tmp_path, recorded, fix="write it again")


def test_an_unreadable_safetensors_file_is_one_sentence(tmp_path):
    save_file({"x": torch.arange(1000.0)}, tmp_path / "a.safetensors")
    assert torch.equal(load_safetensors(tmp_path / "a.safetensors", fix="f")["x"], torch.arange(1000.0))
    _cut(tmp_path / "a.safetensors", 0.01)
    with pytest.raises(DamagedArtifactError, match=r"a\.safetensors cannot be read as safetensors") as err:
        load_safetensors(tmp_path / "a.safetensors", fix="copy it again")
    assert isinstance(err.value, VpdError) and "\n" not in str(err.value)


def test_a_saved_run_records_its_files_and_refuses_a_damaged_one(tmp_path):
    d = Decomposition.create(toy_config(), toy_target())
    state = save_state(tmp_path, d, step=3, target_name="toy", train_state={"rng": torch.arange(4)})
    meta = json.loads((state / META_FILE).read_text())
    assert meta["files"] == {n: file_sha256(state / n) for n in (WEIGHTS_FILE, TRAIN_STATE_FILE)}
    (state / TRAIN_STATE_FILE).unlink()  # only `--resume` needs the training state
    load_decomposition(tmp_path, toy_target())
    _cut(state / WEIGHTS_FILE, 0.999)
    with pytest.raises(DamagedArtifactError, match=WEIGHTS_FILE):
        load_decomposition(tmp_path, toy_target())


def test_the_shipped_decomposition_records_the_sha256_of_its_weights():
    state = bundled_run_path() / STATE_DIR
    meta = json.loads((state / META_FILE).read_text())
    assert meta["files"] == {WEIGHTS_FILE: file_sha256(state / WEIGHTS_FILE)}


@pytest.fixture
def damaged_run(tmp_path):
    """A copy of the bundled run whose weights file is cut short, as by an interrupted copy."""
    run = tmp_path / "run"
    shutil.copytree(bundled_run_path(), run)
    _cut(run / STATE_DIR / WEIGHTS_FILE)
    return run


@pytest.mark.parametrize("command", [["eval", "--batches", "1"], ["graph", "--prompt", "The princess lost"]])
@pytest.mark.parametrize("recorded", [True, False], ids=["sha256-recorded", "written-before-sha256"])
def test_vpd_eval_and_graph_on_a_cut_short_run_exit_2_naming_the_file(damaged_run, tmp_path, capsys, command, recorded):
    if not recorded:
        meta_path = damaged_run / STATE_DIR / META_FILE
        meta = json.loads(meta_path.read_text())
        del meta["files"]
        meta_path.write_text(json.dumps(meta))
    argv = [command[0], "--run", str(damaged_run), *command[1:]]
    if command[0] == "graph":
        argv += ["--out", str(tmp_path / "g")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(damaged_run / STATE_DIR / WEIGHTS_FILE) in err, err
    assert ("is damaged" if recorded else "cannot be read as safetensors") in err, err
    assert "copy the run folder again" in err and "Traceback" not in err


def test_a_shipped_copy_records_only_the_weights_it_ships(tmp_path):
    from decomposer.vpd.bundle import bundle_run

    d = Decomposition.create(toy_config(), toy_target())
    save_state(tmp_path / "run", d, step=1, target_name="bundled", train_state={"rng": torch.arange(4)})
    shipped = bundle_run(tmp_path / "run", dest=tmp_path / "shipped")
    meta = json.loads((shipped / STATE_DIR / META_FILE).read_text())
    assert meta["files"] == {WEIGHTS_FILE: file_sha256(shipped / STATE_DIR / WEIGHTS_FILE)}
    assert not (shipped / STATE_DIR / TRAIN_STATE_FILE).exists()
    reloaded, _, train_state = load_decomposition(shipped, toy_target())
    assert train_state == {} and torch.equal(reloaded.tensors()["components.enc.V"], d.tensors()["components.enc.V"])
