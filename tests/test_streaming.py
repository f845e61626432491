"""Streamed pretraining input (auxtl.streaming, grain): the stateless (seed, step) order
kept across process counts, crops a pure function of (seed, step, index), bad files
named, shard sources read, a mid-epoch resume through `run_pretraining` bit-identical
(in-process decoding), a worker process's batches and iterator state equal to in-process
ones, a resume after a resume and across process counts, and an asynchronously saved
checkpoint complete and restorable mid-run."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import auxtl
from auxtl import pretrain_checkpoint, streaming
from auxtl.pretrain_data import check_record, load_pretrain_data, write_record
from auxtl.errors import InputError
from auxtl.reporting import read_metrics
from auxtl.streaming.pipeline import LoadBatch
from auxtl.streaming.transforms import crop_rng, decode, random_resized_crop
from conftest import leaves_equal, tiny_config

PIL = pytest.importorskip("PIL.Image")


def write_png(path, rng, *, grey: bool, size=None):
    h, w = size or rng.integers(16, 41, size=2)
    pixels = rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """96 PNGs of mixed sizes (16..40 px), a third grey, the rest RGB."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(96):
        write_png(root / f"{i:03d}.png", rng, grey=i % 3 == 0)
    return root


def stream_of(folder, size=(16, 16)):
    return streaming.prepare_stream(f"folder:{folder}", test_fraction=0.1, split_seed=0,
                                    image_size=size, log=lambda *_: None)


def test_batches_equal_across_process_counts_and_crops_depend_on_seed_step_index(folder):
    data = stream_of(folder)
    assert data.image_shape == (16, 16, 3) and len(data.train) + len(data.test) == 96
    one = LoadBatch(data, batch_size=16, seed=5)
    halves = [LoadBatch(data, batch_size=16, seed=5, process_index=p, process_count=2)
              for p in range(2)]
    for step in (0, 4, 7):  # 86 training images: 5 steps an epoch, so 7 is mid-epoch 1
        whole = one(step)["images"]
        assert np.array_equal(whole, np.concatenate([h(step)["images"] for h in halves]))
        # each row is its example's crop drawn from (seed, step, index) alone
        index = int(one.indices(step)[3])
        image = decode(data.source.read(index), 3, name="x")
        assert np.array_equal(whole[3], random_resized_crop(image, (16, 16),
                                                            crop_rng(5, step, index)))
    assert not np.array_equal(one(0)["images"], LoadBatch(data, batch_size=16, seed=6)(0)["images"])
    # resized, not cropped, for the held-out images: deterministic and in split order
    held_out = streaming.EvalImages(data, limit=4)
    assert len(held_out) == 4 and held_out[0:3].shape == (3, 16, 16, 3)
    assert np.array_equal(held_out[1:3], held_out[0:4][1:3])
    # the normalisation sample: a float64 statistic close to the one of the same images
    norm = streaming.normalization_sample(data)
    sample = streaming.pipeline.LoadImages(data.source, data.image_shape)(
        streaming.pipeline._sample(data.train)).astype(np.float64) / 255
    tol = 64 * np.finfo(np.float64).eps * sample.size  # float64 accumulation, not float32
    np.testing.assert_allclose(norm.mean, sample.mean(axis=(0, 1, 2)), rtol=0, atol=tol)
    np.testing.assert_allclose(norm.std, sample.std(axis=(0, 1, 2)), rtol=0, atol=tol)


def test_bad_input_is_named(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no image files"):
        stream_of(empty)
    name = f"{int(stream_of(folder).train[0]):03d}.png"  # a training image (in the sample)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / name).write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=rf"{name}.*not a readable image"):
        stream_of(bad, size=(16, 16))  # the header check of the normalisation sample
    deep = tmp_path / "deep"
    shutil.copytree(folder, deep)
    PIL.fromarray(np.full((20, 20), 40000, np.uint16)).save(deep / name)
    data = stream_of(deep, size=(16, 16, 3))
    with pytest.raises(InputError, match=rf"{name}.*16-bit"):
        streaming.normalization_sample(data)
    with pytest.raises(InputError, match="--image-size"):
        streaming.parse_image_size("16,16,2")
    with pytest.raises(InputError, match="'folder:PATH'"):
        auxtl.run_pretraining(tiny_config(data="digits", stream=True))


def test_npz_and_arrayrecord_shards_are_read(tmp_path, folder):
    rng = np.random.default_rng(1)
    shards = [rng.integers(0, 256, (n, 12, 10, 3), dtype=np.uint8) for n in (5, 7)]
    for i, images in enumerate(shards):
        np.savez(tmp_path / f"part{i}.npz", images=images)
    np.savez_compressed(tmp_path / "part2.npz", images=shards[0][:3])
    source = streaming.open_source(f"npz-shards:{tmp_path}/part*.npz")
    assert len(source) == 15 and "part1.npz" in source.describe(6)
    expected = np.concatenate([*shards, shards[0][:3]])
    for index in (6, 0, 13, 11, 4, 12, 5):   # across shards, in any order
        np.testing.assert_array_equal(source.read(index), expected[index])
    assert isinstance(source._mapped(0), np.memmap) and source._mapped(2) is None
    from array_record.python.array_record_module import ArrayRecordWriter
    files = sorted(folder.iterdir())[:6]
    writer = ArrayRecordWriter(str(tmp_path / "images.array_record"), "group_size:1")
    for file in files:
        writer.write(file.read_bytes())
    writer.close()
    data = streaming.prepare_stream(f"arrayrecord:{tmp_path}/*.array_record", test_fraction=0.2,
                                    split_seed=0, image_size=(8, 8), log=lambda *_: None)
    assert data.image_shape == (8, 8, 3) and len(data.source) == 6
    assert np.array_equal(decode(data.source.read(2), None, name="r"),
                          decode(str(files[2]), None, name="f"))


def stream_config(folder, out, **overrides):
    return tiny_config(data=f"folder:{folder}", stream=True, image_size=(16, 16), steps=8,
                       batch_size=16, checkpoint_every=3, log_every=2, eval_every=4,
                       workers=0, eval_examples=8, out=str(out), **overrides)


def drop_after(out, step):
    """Simulates a run stopped after the checkpoint at `step`."""
    for path in (out / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    shutil.rmtree((out / "trunk").resolve())
    (out / "trunk").unlink()


def test_mid_epoch_resume_is_bit_identical_and_async_checkpoints_are_complete(tmp_path,
                                                                               folder):
    out = tmp_path / "run"
    config = stream_config(folder, out)
    full = auxtl.run_pretraining(config)
    written = read_metrics(out / "metrics.jsonl")
    metadata = json.loads((out / "trunk" / "metadata" / "metadata").read_text())
    assert metadata["stream"]["files"] == 96 and len(metadata["stream"]["listing_sha256"]) == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_save_blocked_s"]["saves"] == 3  # steps 3, 6 and the last
    # the step-6 checkpoint (epoch 1, position 1 of 5), saved asynchronously mid-run, is
    # complete: the train state and the input state restore
    manager = pretrain_checkpoint.open_manager(out / "checkpoints", keep=2)
    assert manager.all_steps() == [6, 8]
    like = {"step": full.state.step, "params": full.state.params,
            "batch_stats": full.state.batch_stats, "opt_state": full.state.opt_state,
            "rng": full.state.rng}
    restored, input_state = pretrain_checkpoint.restore(manager, 6, like)
    assert int(restored["step"]) == 6 and jax.tree.structure(restored) == jax.tree.structure(like)
    assert input_state == {"workers": 0, "offset": 0, "grain": {"next_index": 6}}
    drop_after(out, 6)
    resumed = auxtl.run_pretraining(dataclasses.replace(config, resume=True))
    assert leaves_equal(full.state.params, resumed.state.params)
    assert leaves_equal(full.state.opt_state, resumed.state.opt_state)
    same = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rs]
    assert same(read_metrics(out / "metrics.jsonl")) == same(written)


def test_a_worker_process_gives_the_same_batches_and_its_state_resumes(folder):
    data = stream_of(folder)
    inline = streaming.train_batches(data, batch_size=16, seed=0, steps=6, workers=0)
    worker = streaming.train_batches(data, batch_size=16, seed=0, steps=6, workers=1)
    try:
        expected = [next(inline)["images"] for _ in range(6)]
        got = [next(worker) for _ in range(3)]
        state = worker.get_state()  # after step 2: grain's multiprocess iterator state
        got += [next(worker) for _ in range(2)]
        worker.set_state(state)
        assert int(next(worker)["step"]) == 3
        for step, element in enumerate(got):
            assert int(element["step"]) == step and np.array_equal(element["images"],
                                                                   expected[step])
    finally:
        inline.close()
        worker.close()


def test_a_restored_input_state_continues_where_it_was_saved_resume_after_resume(folder):
    """The state of an iterator started at a step (a resume that could not reuse the
    saved state: another worker count) restores at its own position on the next resume;
    one of another worker count starts afresh at the step. Every batch is step-exact."""
    data = load_pretrain_data(f"folder:{folder}", stream=True, test_fraction=0.1,
                              split_seed=0, batch_size=16, seed=0, image_size=(16, 16),
                              workers=0, log=lambda *_: None)
    try:
        expected = [images for images, _ in data.batches(8)]
        first_resume = data.batches(8, start=3, state={"workers": 2, "offset": 0,
                                                       "grain": {"next_index": 3}})
        seen = [next(first_resume) for _ in range(2)]          # steps 3 and 4
        state = seen[-1][1]
        assert state["offset"] == 3 and state["workers"] == 0
        second_resume = list(data.batches(8, start=5, state=state))
        for step, (images, _) in zip(range(3, 8), seen + second_resume):
            np.testing.assert_array_equal(images, expected[step])
    finally:
        data.close()


def test_an_older_single_item_checkpoint_still_restores(tmp_path):
    """Run folders from before the composite layout (the state alone, under `default/`)
    resume: the state comes back and the input state is None (the step is enough)."""
    tree = {"step": np.asarray(4, np.int32), "params": {"w": np.arange(6, dtype=np.float32)}}
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False)) as old:
        old.save(4, args=ocp.args.StandardSave(tree))
    manager = pretrain_checkpoint.open_manager(tmp_path, keep=2)
    restored, input_state = pretrain_checkpoint.restore(manager, 4, tree)
    assert input_state is None and leaves_equal(restored, tree)
    pretrain_checkpoint.save(manager, 5, tree, {"next_step": 5})
    manager.wait_until_finished()
    assert pretrain_checkpoint.restore(manager, 5, tree)[1] == {"next_step": 5}
    # saved by two processes, resumed by one: the state alone (the step is enough)
    data = tmp_path / "5" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    restored, input_state = pretrain_checkpoint.restore(manager, 5, tree)
    assert input_state is None and leaves_equal(restored, tree)


def test_device_prefetch_puts_the_next_batch_before_the_current_step_runs():
    put = []
    batches = streaming.device_prefetch(((i, {"after": i}) for i in range(4)),
                                        lambda b: put.append(b) or b * 10, depth=2)
    first = next(batches)
    assert first == (0, {"after": 0}) and put == [0, 1]  # batch 1 is on its way already
    assert list(batches) == [(10, {"after": 1}), (20, {"after": 2}), (30, {"after": 3})]


def test_a_resume_refuses_a_folder_whose_listing_changed(tmp_path, folder):
    """Files added or removed change the split and the batches: a streamed run records its
    listing's hash in data.json and --resume compares it."""
    data = load_pretrain_data(f"folder:{folder}", stream=True, test_fraction=0.1,
                              split_seed=0, batch_size=16, seed=0, image_size=(16, 16),
                              workers=0, log=lambda *_: None)
    write_record(tmp_path, data)
    assert json.loads((tmp_path / "data.json").read_text())["files"] == 96
    check_record(tmp_path, data)                                   # the same listing
    changed = dataclasses.replace(data, stream={**data.stream, "listing_sha256": "b" * 64})
    with pytest.raises(InputError, match="streamed data's file listing changed"):
        check_record(tmp_path, changed)
