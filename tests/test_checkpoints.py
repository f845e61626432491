import errno
import json
import os
import re
import shutil
import sys
import types

import jax
import numpy as np
import pytest

import auxtl
from auxtl import checkpoints, cli
from conftest import leaves_equal, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("pretrain")
    return auxtl.run_pretraining(tiny_config(out=str(out)), mnist_small)


def test_load_trunk_restores_identical_outputs(trained, mnist_small):
    trunk = auxtl.load_trunk(trained.trunk_path)
    model = auxtl.pretrain_step.nnx.merge(trained.graphdef, trained.state.params,
                                  trained.state.batch_stats)
    metadata = auxtl.read_metadata(trained.trunk_path)
    norm = auxtl.Normalization.from_json(metadata["normalization"])
    x = auxtl.normalize(mnist_small.images[:32], norm)
    np.testing.assert_array_equal(np.asarray(trunk(x)), np.asarray(model.trunk(x)))


def test_metadata_describes_the_trunk(trained):
    metadata = auxtl.read_metadata(trained.trunk_path)
    assert metadata["model"] == "small_cnn"
    assert metadata["layer_names"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]
    assert metadata["input_shape"] == [28, 28, 1]
    assert metadata["tasks"] == [{"name": "rotation", "weight": 1.0,
                                  "params": {"all_rotations": True}}]
    assert metadata["config"]["widths"] == [8, 8, 16, 16, 16]
    assert len(metadata["normalization"]["mean"]) == 1
    assert metadata["auxtl_version"] == auxtl.__version__


def test_metadata_is_typed_and_is_the_json_on_disk(trained):
    metadata = auxtl.read_metadata(trained.trunk_path)
    assert isinstance(metadata, auxtl.TrunkMetadata)
    assert metadata.layer_names == ("conv1", "conv2", "conv3", "conv4", "conv5", "fc")
    assert metadata.input_shape == (28, 28, 1)
    assert isinstance(metadata.normalization, auxtl.Normalization)
    assert isinstance(metadata.split, auxtl.SplitRecord) and metadata.steps == 6
    assert metadata.tasks[0].name == "rotation" and metadata.extra == {}
    on_disk = json.loads((checkpoints.resolve_checkpoint(trained.trunk_path)
                          / "metadata" / "metadata").read_text())
    assert metadata.to_json() == on_disk
    assert auxtl.TrunkMetadata.from_json(on_disk) == metadata
    # the compatibility layer: a read-only mapping over the JSON
    assert dict(metadata) == on_disk and list(metadata.keys()) == list(on_disk)
    assert metadata.get("target") is None and "split" in metadata
    with pytest.raises(KeyError):
        metadata["target"]


def test_an_older_checkpoint_reads_back_unchanged(trained, tmp_path):
    """JSON as auxtl wrote it before TrunkMetadata (no feature_dim, no split, a null
    data, a key this auxtl does not know) round-trips exactly through save and read."""
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    old = {k: v for k, v in metadata.to_json().items() if k not in ("feature_dim", "split")}
    old.update(data=None, plugin_notes={"by": "a newer auxtl", "n": [1, 2]})
    checkpoints.save_trunk(tmp_path / "old", trunk_params=params, trunk_batch_stats=stats,
                           metadata=old)
    read = auxtl.read_metadata(tmp_path / "old")
    assert read.to_json() == old
    assert read.extra == {"plugin_notes": {"by": "a newer auxtl", "n": [1, 2]}}
    assert read.data is None and read.split is None and read.feature_dim is None
    assert read.replace(data="mnist5k").to_json()["data"] == "mnist5k"


@pytest.mark.parametrize("change,fragment", [
    ({"layer_names": None}, "metadata lacks the field(s) layer_names"),
    ({"input_shape": [28, "28", 1]}, "field 'input_shape' must be a list of positive whole"),
    ({"normalization": {"mean": [0.5]}}, "field 'normalization' is malformed"),
    ({"steps": "six"}, "field 'steps' must be a whole number, got 'six'"),
    ({"split": {"seed": 0}}, "field 'split' is malformed"),
    ({"tasks": [{"weight": 1.0}]}, "holds a task without a 'name'"),
    ({"format": "auxtl.trunk/9"}, "has format 'auxtl.trunk/9', expected 'auxtl.trunk/1'"),
])
def test_bad_metadata_names_the_checkpoint_and_the_field(trained, tmp_path, change, fragment):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints.resolve_checkpoint(trained.trunk_path), folder)
    raw = json.loads((folder / "metadata" / "metadata").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    (folder / "metadata" / "metadata").write_text(json.dumps(raw))
    with pytest.raises(auxtl.InputError, match=re.escape(fragment)) as caught:
        auxtl.read_metadata(folder)
    assert str(folder) in str(caught.value)
    with pytest.raises(auxtl.InputError, match=re.escape(fragment)):
        checkpoints.save_trunk(tmp_path / "again", trunk_params={}, trunk_batch_stats={},
                               metadata=raw)
    assert not (tmp_path / "again").exists()


def test_a_failed_save_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    path = tmp_path / "trunk"
    checkpoints.save_trunk(path, trunk_params=params, trunk_batch_stats=stats,
                           metadata=metadata)
    bad = jax.tree.map(lambda x: x + 1, params)

    def broken_json_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.ocp.args, "JsonSave", broken_json_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_trunk(path, trunk_params=bad, trunk_batch_stats=stats,
                               metadata=metadata)
    restored, _, _ = checkpoints.load_trunk_state(path)
    assert leaves_equal(restored, params)
    version = os.readlink(path)  # the checkpoint path links to its current version
    assert sorted(p.name for p in tmp_path.iterdir()) == [version, "trunk"]


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        auxtl.read_metadata(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an auxtl trunk checkpoint"):
        auxtl.read_metadata(tmp_path / "empty")


def test_unknown_model_in_metadata_is_refused(trained, tmp_path):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    checkpoints.save_trunk(tmp_path / "t", trunk_params=params, trunk_batch_stats=stats,
                           metadata={**metadata, "model": "evil_model"})
    with pytest.raises(ValueError, match="evil_model"):
        auxtl.load_trunk(tmp_path / "t")


# --------------------------------------------------------------------------- interrupted saves

class Crash(BaseException):
    """The process dying at a file-system step (BaseException: nothing may swallow it)."""


def save_crashing_at(path, params, stats, metadata, step: int, monkeypatch) -> bool:
    """save_trunk, dying at the `step`-th rename/replace/symlink/rmtree after orbax has
    written the new data; True if it died (False: the save has fewer steps and completed)."""
    calls = {"n": 0}

    def crashing(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                raise Crash(f"step {step}: {real.__name__}{args}")
            return real(*args, **kwargs)
        return call

    real_checkpointer = checkpoints._composite_checkpointer

    class CrashAfterWriting:
        def save(self, *args, **kwargs):
            real_checkpointer().save(*args, **kwargs)  # the real orbax save, complete
            for module, name in ((os, "rename"), (os, "replace"), (os, "symlink"),
                                 (shutil, "rmtree")):
                monkeypatch.setattr(module, name, crashing(getattr(module, name)))

    monkeypatch.setattr(checkpoints, "_composite_checkpointer", CrashAfterWriting)
    try:
        checkpoints.save_trunk(path, trunk_params=params, trunk_batch_stats=stats,
                               metadata=metadata)
        return False
    except Crash:
        return True
    finally:
        monkeypatch.undo()


def scaled(tree, factor):
    return jax.tree.map(lambda x: np.asarray(x) * factor, tree)


@pytest.mark.parametrize("existing", ["link", "folder"])
def test_a_save_interrupted_at_any_step_leaves_the_old_or_the_new_checkpoint(
        trained, tmp_path, monkeypatch, existing):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    new = scaled(params, 2.0)
    crashes = 0
    for step in range(1, 20):
        path = tmp_path / f"step{step}" / "trunk"
        checkpoints.save_trunk(path, trunk_params=params, trunk_batch_stats=stats,
                               metadata=metadata)
        if existing == "folder":  # as an older auxtl left it: a plain folder at the path
            real = path.resolve()
            if real != path:
                path.unlink()
                shutil.move(real, path)
        crashed = save_crashing_at(path, new, stats, metadata, step, monkeypatch)
        restored, _, _ = checkpoints.load_trunk_state(path)
        assert leaves_equal(restored, params) or leaves_equal(restored, new), step
        assert auxtl.load_trunk(path).layer_names == tuple(metadata["layer_names"])
        if not crashed:
            assert leaves_equal(restored, new)
            break
        crashes += 1
    assert crashes >= 3  # every file-system step after the data is written was a crash point


def test_saving_again_replaces_the_version_and_leaves_no_debris(trained, tmp_path):
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    folder = tmp_path / "run"
    for factor in (1.0, 3.0):
        checkpoints.save_trunk(folder / "trunk", trunk_params=scaled(params, factor),
                               trunk_batch_stats=stats, metadata=metadata)
    path = folder / "trunk"
    assert path.is_symlink() and not os.path.isabs(os.readlink(path))
    assert sorted(p.name for p in folder.iterdir()) == [os.readlink(path), "trunk"]
    restored, _, _ = checkpoints.load_trunk_state(path)
    assert leaves_equal(restored, scaled(params, 3.0))
    shutil.move(folder, tmp_path / "moved")  # the relative link moves with its folder
    restored, _, _ = checkpoints.load_trunk_state(tmp_path / "moved" / "trunk")
    assert leaves_equal(restored, scaled(params, 3.0))


def test_without_symbolic_links_the_version_folder_is_renamed_into_place(trained, tmp_path,
                                                                        monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)  # as on a FAT or CIFS mount
    params, stats, metadata = checkpoints.load_trunk_state(trained.trunk_path)
    folder = tmp_path / "run"
    for factor in (1.0, 3.0):
        checkpoints.save_trunk(folder / "trunk", trunk_params=scaled(params, factor),
                               trunk_batch_stats=stats, metadata=metadata)
        restored, _, _ = checkpoints.load_trunk_state(folder / "trunk")
        assert leaves_equal(restored, scaled(params, factor))
    assert [p.name for p in folder.iterdir()] == ["trunk"]
    assert (folder / "trunk").is_dir() and not (folder / "trunk").is_symlink()


# --------------------------------------------------------------------------- damaged checkpoints

def largest(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {  # name: (what to do to a copy of the checkpoint folder, the file the error names)
    "array data file deleted": (lambda f: largest(f / "trunk" / "ocdbt.process_0" / "d").unlink(),
                                "trunk/ocdbt.process_0/d/"),
    "array data file truncated": (
        lambda f: os.truncate(largest(f / "trunk" / "ocdbt.process_0" / "d"), 100),
        "trunk/ocdbt.process_0/d/"),
    "B-tree node deleted": (lambda f: next((f / "trunk" / "d").iterdir()).unlink(), "trunk/d/"),
    "OCDBT manifest deleted": (lambda f: (f / "trunk" / "manifest.ocdbt").unlink(),
                               "trunk/manifest.ocdbt"),
    "OCDBT manifest garbled": (lambda f: (f / "trunk" / "manifest.ocdbt").write_bytes(b"junk"),
                               "trunk/manifest.ocdbt"),
    "tree metadata deleted": (lambda f: (f / "trunk" / "_METADATA").unlink(), "trunk/_METADATA"),
    "trunk item deleted": (lambda f: shutil.rmtree(f / "trunk"), "trunk/"),
    "heads B-tree node deleted": (lambda f: next((f / "heads" / "d").iterdir()).unlink(),
                                  "heads/d/"),
    "checkpoint metadata deleted": (lambda f: (f / "_CHECKPOINT_METADATA").unlink(),
                                    "_CHECKPOINT_METADATA"),
    "metadata JSON corrupted": (
        lambda f: (f / "metadata" / "metadata").write_text('{"format": "auxtl.tr'),
        "metadata/metadata"),
    "metadata JSON deleted": (lambda f: (f / "metadata" / "metadata").unlink(),
                              "metadata/metadata"),
}


@pytest.fixture(scope="module")
def heads_checkpoint(trained):
    assert (trained.trunk_path / "heads").is_dir()  # pretraining saves the heads too
    return trained.trunk_path


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_before_any_plan(
        heads_checkpoint, tmp_path, capsys, damage, dry_run):
    damaged = tmp_path / "trunk"
    shutil.copytree(heads_checkpoint.resolve(), damaged)
    spoil, file = DAMAGE[damage]
    spoil(damaged)
    args = ["transfer", "--trunk", str(damaged), "--reuse", "2", "--seeds", "1",
            "--no-baseline", "--phases", "head:1", "--no-progress", "--out", str(tmp_path / "o")]
    assert cli.main(args + (["--dry-run"] if dry_run else [])) == 2
    out, err = capsys.readouterr()
    assert out == ""                                 # no surgery plan, nothing trained
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"auxtl: error: checkpoint {str(damaged)!r} is ")
    assert file in err
    assert not (tmp_path / "o").exists()


def test_damage_only_restore_finds_is_one_named_error(trained, tmp_path, capsys):
    """Bytes garbled in place (sizes intact): validation passes, tensorstore fails in the
    restore, and that becomes one InputError naming the checkpoint, the cause chained."""
    damaged = tmp_path / "trunk"
    shutil.copytree(trained.trunk_path.resolve(), damaged)
    data = largest(damaged / "trunk" / "ocdbt.process_0" / "d")
    data.write_bytes(b"\0" * data.stat().st_size)
    with pytest.raises(ValueError, match=f"checkpoint {str(damaged)!r} is damaged: ") as caught:
        checkpoints.load_trunk_state(damaged)
    assert isinstance(caught.value, auxtl.errors.InputError)
    assert caught.value.__cause__ is not None
    checkpoints.validate_checkpoint(damaged)  # every file is there, at its full length
    assert cli.main(["transfer", "--trunk", str(damaged), "--seeds", "1", "--no-baseline",
                     "--phases", "head:1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is damaged" in err, err


def test_inspect_validates_too(trained, tmp_path, capsys):
    damaged = tmp_path / "trunk"
    shutil.copytree(trained.trunk_path.resolve(), damaged)
    (damaged / "trunk" / "_METADATA").unlink()
    assert cli.main(["inspect", str(damaged)]) == 2
    assert "trunk/_METADATA is missing" in capsys.readouterr().err


def test_after_a_failed_restore_only_closed_loop_callbacks_are_silenced(monkeypatch):
    """Reads still in flight when a restore fails call back into orbax's closed event loop;
    those unraisable reports are dropped (no traceback after the one-line error), others
    still reach the previous hook."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpoints._drop_late_callbacks_into_closed_loops()
    checkpoints._drop_late_callbacks_into_closed_loops()  # installed once
    report = lambda error: sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    report(RuntimeError("Event loop is closed"))
    report(RuntimeError("something else"))
    assert [str(r.exc_value) for r in reported] == ["something else"]


def test_a_device_error_while_restoring_is_not_called_damage(trained, monkeypatch):
    class OutOfMemory:
        def restore(self, *args, **kwargs):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(checkpoints, "_composite_checkpointer", OutOfMemory)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as caught:
        checkpoints.load_trunk_state(trained.trunk_path)
    assert not isinstance(caught.value, auxtl.AuxtlError)
