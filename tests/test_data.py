"""Tests for auxtl.data: embedded sets, loaders, validation, splits, normalisation, batches."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from auxtl import data
from auxtl.data import (Dataset, Normalization, batch_indices, compute_normalization,
                        load_dataset, normalize, validate_images, validate_labels)
from auxtl.splits import SplitRecord, content_hash, train_test_split


def _toy(n=60, classes=3, shape=(4, 4, 1), seed=0, labeled=True) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32) % classes if labeled else None
    return Dataset("toy", images, labels)


# --------------------------------------------------------------------------- embedded

@pytest.mark.parametrize("name, n, hw", [("mnist5k", 5000, 28), ("digits", 1797, 8)])
def test_embedded_sets_load(name, n, hw):
    ds = load_dataset(name)
    assert ds.name == name
    assert ds.images.shape == (n, hw, hw, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    assert ds.num_classes == 10 and ds.image_shape == (hw, hw, 1) and len(ds) == n
    assert ds.images.max() == 255 and ds.images.min() == 0


def test_mnist5k_is_balanced_and_digits_rescaled():
    assert np.bincount(load_dataset("mnist5k").labels).tolist() == [500] * 10
    # digits were 0..16; round(v * 255 / 16) takes only 17 distinct values
    values = np.unique(load_dataset("digits").images)
    expected = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert set(values.tolist()) <= set(expected.tolist())


# --------------------------------------------------------------------------- npz / folder

@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_npz_round_trip(tmp_path, keys):
    ds = _toy()
    path = tmp_path / "set.npz"
    np.savez(path, **{keys[0]: ds.images, keys[1]: ds.labels})
    for spec in (f"npz:{path}", str(path)):
        loaded = load_dataset(spec)
        np.testing.assert_array_equal(loaded.images, ds.images)
        np.testing.assert_array_equal(loaded.labels, ds.labels)
        assert loaded.labels.dtype == np.int32 and loaded.name == spec


def test_npz_without_labels_and_rank3_float(tmp_path):
    images = np.random.default_rng(0).random((5, 6, 7))
    path = tmp_path / "u.npz"
    np.savez(path, images=images)
    ds = load_dataset(f"npz:{path}")
    assert ds.labels is None and ds.num_classes is None
    assert ds.images.shape == (5, 6, 7, 1) and ds.images.dtype == np.float32


def test_npz_without_image_array_names_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pixels=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\['pixels'\].*'images' or 'x'"):
        load_dataset(str(path))


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for cls, count in (("cat", 2), ("ant", 3)):
        for i in range(count):
            arr = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            _write_png(tmp_path / cls / f"{i}.png", arr)
            written[(cls, i)] = arr
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.images.shape == (5, 5, 6, 3) and ds.images.dtype == np.uint8
    # classes sorted by folder name: ant=0, cat=1; files sorted within a class
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.class_names == ("ant", "cat") and ds.num_classes == 2
    np.testing.assert_array_equal(ds.images[0], written[("ant", 0)])
    np.testing.assert_array_equal(ds.images[4], written[("cat", 1)])
    assert load_dataset(str(tmp_path)).labels.tolist() == [0, 0, 0, 1, 1]  # bare dir


def test_flat_grey_folder_is_unlabeled(tmp_path):
    arrays = [np.full((4, 3), 10 * i, np.uint8) for i in range(3)]
    for i, arr in enumerate(arrays):
        _write_png(tmp_path / f"img{i}.png", arr)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.labels is None
    assert ds.images.shape == (3, 4, 3, 1)
    np.testing.assert_array_equal(ds.images[..., 0], np.stack(arrays))


def test_folder_size_mismatch_names_files(tmp_path):
    _write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png.*4x5.*a\.png.*4x4.*share one size.*--stream"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_mixed_grey_and_rgb_promotes_to_rgb(tmp_path):
    _write_png(tmp_path / "a.png", np.full((3, 3), 7, np.uint8))
    _write_png(tmp_path / "b.png", np.zeros((3, 3, 3), np.uint8))
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (2, 3, 3, 3)
    assert (ds.images[0] == 7).all()


def test_empty_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        load_dataset(f"folder:{tmp_path}")


# --------------------------------------------------------------------------- spec errors

def test_unknown_spec_lists_forms_and_embedded_names():
    with pytest.raises(ValueError, match=r"unknown data spec 'mnist'.*mnist5k, digits.*npz:PATH"
                                         r".*folder:PATH"):
        load_dataset("mnist")


@pytest.mark.parametrize("spec", ["npz:{p}/nope.npz", "folder:{p}/nope", "{p}/nope.npz",
                                  "{p}/nope"])
def test_missing_path_is_file_not_found(tmp_path, spec):
    spec = spec.format(p=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(spec)


# --------------------------------------------------------------------------- validation

def test_validate_wrong_rank_names_source_shape_and_expectation():
    with pytest.raises(ValueError, match=r"from my\.npz have shape \(3, 4\).*expected "
                                         r"\(N, H, W\) or \(N, H, W, C\)"):
        validate_images(np.zeros((3, 4), np.uint8), source="my.npz")


@pytest.mark.parametrize("shape", [(0, 4, 4, 1), (2, 0, 4, 1), (2, 4, 0)])
def test_validate_empty(shape):
    with pytest.raises(ValueError, match="empty"):
        validate_images(np.zeros(shape, np.uint8), source="s")


def test_validate_channels_first_hint():
    with pytest.raises(ValueError, match=r"channels-first.*transpose\(0, 2, 3, 1\)"):
        validate_images(np.zeros((2, 1, 28, 28), np.uint8), source="s")


def test_validate_nan_counts_and_locates():
    x = np.zeros((3, 2, 2, 1), np.float32)
    x[1, 0, 1, 0] = np.nan
    x[2, 1, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite values.*\(1, 0, 1, 0\).*image 1"):
        validate_images(x, source="s")


def test_validate_float_out_of_range_suggests_scaling():
    x = np.zeros((1, 2, 2))
    x[0, 1, 1] = 200.0
    with pytest.raises(ValueError, match=r"\[0, 200\].*expected \[0, 1\].*divide by 255"):
        validate_images(x, source="s")
    x[0, 0, 0] = -1.0
    with pytest.raises(ValueError, match=r"\[-1, 200\].*rescale"):
        validate_images(x, source="s")


def test_validate_integer_conversion_and_range():
    out = validate_images(np.full((1, 2, 2), 255, np.int64), source="s")
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 1) and (out == 255).all()
    with pytest.raises(ValueError, match=r"\[0, 4095\].*expected 0\.\.255"):
        validate_images(np.array([[[0, 4095]]], np.uint16), source="s")
    with pytest.raises(ValueError, match="dtype bool"):
        validate_images(np.zeros((1, 2, 2), bool), source="s")


def test_validate_labels_problems():
    with pytest.raises(ValueError, match="number 4 but there are 5 images"):
        Dataset("d", np.zeros((5, 2, 2), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"shape \(5, 1\); expected 1-D"):
        validate_labels(np.zeros((5, 1), np.int64), 5, source="s")
    with pytest.raises(ValueError, match="dtype float64; expected integer"):
        validate_labels(np.zeros(5), 5, source="s")
    with pytest.raises(ValueError, match=r"\[-1, 0\]; expected class indices >= 0"):
        validate_labels(np.array([0, -1]), 2, source="s")
    assert validate_labels([0, 3], 2, source="s").dtype == np.int32


# --------------------------------------------------------------------------- splits

def test_split_disjoint_covering_stratified_deterministic():
    ds = _toy(n=100, classes=4)
    train, test = train_test_split(ds, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == 100 and len(test) == 20
    # recover original indices through the (distinct) image bytes
    index = {ds.images[i].tobytes(): i for i in range(len(ds))}
    train_idx = {index[im.tobytes()] for im in train.images}
    test_idx = {index[im.tobytes()] for im in test.images}
    assert not train_idx & test_idx and train_idx | test_idx == set(range(100))
    assert np.bincount(test.labels).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(train.labels, ds.labels[sorted(train_idx)])
    again = train_test_split(ds, test_fraction=0.2, seed=3)[1]
    np.testing.assert_array_equal(again.images, test.images)
    other = train_test_split(ds, test_fraction=0.2, seed=4)[1]
    assert not np.array_equal(other.images, test.images)


def test_split_unlabeled_and_errors():
    train, test = train_test_split(_toy(n=10, labeled=False), test_fraction=0.3)
    assert (len(train), len(test)) == (7, 3) and test.labels is None
    with pytest.raises(ValueError, match="both must be non-empty"):
        train_test_split(_toy(n=3), test_fraction=0.1)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        train_test_split(_toy(), test_fraction=1.0)


def test_content_hash_is_a_pure_function_of_dtype_shape_and_bytes():
    images = _toy().images
    digest = content_hash(images)
    assert len(digest) == 64 and digest == content_hash(images.copy())
    assert digest == content_hash(np.asfortranarray(images))  # C-order bytes, not memory order
    assert content_hash(load_dataset("digits").images) == content_hash(
        load_dataset("digits").images)
    changed = images.copy()
    changed[5, 1, 2, 0] ^= 1
    assert content_hash(changed) != digest
    assert content_hash(images.reshape(30, 8, 4, 1)) != digest          # same bytes, shape
    assert content_hash(images.view(np.int8)) != digest                  # same bytes, dtype
    assert content_hash(images[::-1]) != digest                          # same set, order


def test_split_record_recomputes_the_split_and_names_other_data():
    ds = _toy(n=100, classes=4)
    record = SplitRecord.of(ds, data="toy", test_fraction=0.2, seed=3)
    assert SplitRecord.from_json(record.to_json()) == record
    expected = train_test_split(ds, test_fraction=0.2, seed=3)
    for got, want in zip(record.split(ds), expected):
        np.testing.assert_array_equal(got.images, want.images)
    same = SplitRecord.of(Dataset("again", ds.images.copy(), ds.labels.copy()), data=None,
                          test_fraction=0.1, seed=0)
    assert record.mismatch(same) is None        # same content, whatever the name or fraction
    other = _toy(n=100, classes=4, seed=1)
    assert "images differ" in record.mismatch(SplitRecord.of(other, data="toy",
                                                             test_fraction=0.2, seed=3))
    relabeled = Dataset("toy", ds.images, (ds.labels + 1) % 4)
    assert "labels differ" in record.mismatch(SplitRecord.of(relabeled, data="toy",
                                                             test_fraction=0.2, seed=3))
    with pytest.raises(ValueError, match="data_hash"):
        SplitRecord.from_json({"test_fraction": 0.1, "seed": 0})


def test_a_split_recorded_on_unlabeled_data_is_recomputed_unstratified_on_labeled_data():
    ds = _toy(n=100, classes=4)
    unlabeled = Dataset("toy", ds.images)
    record = SplitRecord.of(unlabeled, data="folder:x", test_fraction=0.3, seed=2)
    assert record.labels_hash is None
    target = SplitRecord.of(ds, data="folder:x", test_fraction=0.1, seed=0)
    assert record.mismatch(target) is None
    _, test = record.split(ds)
    _, unlabeled_test = train_test_split(unlabeled, test_fraction=0.3, seed=2)
    np.testing.assert_array_equal(test.images, unlabeled_test.images)
    assert test.labels is not None


def test_subset_and_repr():
    ds = _toy(n=10)
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.images, ds.images[[3, 1]])
    assert sub.labels.tolist() == [0, 1]
    assert "images=(10, 4, 4, 1) uint8" in repr(ds)


# --------------------------------------------------------------------------- normalisation

def test_normalization_standardises_its_data():
    images = load_dataset("digits").images
    norm = compute_normalization(images)
    x = np.asarray(normalize(images, norm))
    assert x.dtype == np.float32
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-4


def test_normalization_per_channel_and_chunking():
    rng = np.random.default_rng(0)
    images = rng.random((37, 3, 3, 3)).astype(np.float32) * np.array([0.2, 0.5, 1.0], np.float32)
    norm = compute_normalization(images, chunk_size=5)
    np.testing.assert_allclose(norm.mean, images.mean(axis=(0, 1, 2), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(norm.std, images.std(axis=(0, 1, 2), dtype=np.float64), rtol=1e-9)
    x = np.asarray(jax.jit(lambda im: normalize(im, norm))(images))
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_normalization_constant_channel_floor_and_json():
    norm = compute_normalization(np.full((4, 2, 2, 1), 51, np.uint8))
    assert norm.mean == pytest.approx((0.2,)) and norm.std == (1e-6,)
    assert Normalization.from_json(norm.to_json()) == norm
    with pytest.raises(ValueError, match="one mean and one std per channel"):
        Normalization(mean=(0.5,), std=(0.1, 0.2))
    with pytest.raises(ValueError, match="3 channels.*normalization has 1"):
        normalize(np.zeros((1, 2, 2, 3), np.uint8), norm)


def test_normalize_uint8_divides_by_255():
    norm = Normalization(mean=(0.0,), std=(1.0,))
    out = normalize(np.full((1, 1, 1, 1), 255, np.uint8), norm)
    assert out.dtype == np.float32 and float(out[0, 0, 0, 0]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- batching

def test_batch_indices_epoch_without_repeats_and_determinism():
    n, b = 103, 10
    epoch0 = np.concatenate([batch_indices(n, b, seed=7, step=s) for s in range(10)])
    assert len(set(epoch0.tolist())) == 100 and epoch0.min() >= 0 and epoch0.max() < n
    epoch1 = np.concatenate([batch_indices(n, b, seed=7, step=s) for s in range(10, 20)])
    assert len(set(epoch1.tolist())) == 100 and not np.array_equal(epoch0, epoch1)
    data._epoch_permutation.cache_clear()
    np.testing.assert_array_equal(batch_indices(n, b, seed=7, step=3), epoch0[30:40])
    assert not np.array_equal(batch_indices(n, b, seed=8, step=3), epoch0[30:40])


def test_batch_indices_resume_continues_exactly():
    n, b = 50, 8
    full = [batch_indices(n, b, seed=1, step=s) for s in range(20)]
    data._epoch_permutation.cache_clear()  # a fresh process resuming at step 13
    resumed = [batch_indices(n, b, seed=1, step=s) for s in range(13, 20)]
    for a, r in zip(full[13:], resumed):
        np.testing.assert_array_equal(a, r)
    full[0][:] = -1  # returned arrays are copies: mutating one cannot poison the cache
    assert (batch_indices(n, b, seed=1, step=0) >= 0).all()


def test_batch_indices_errors():
    with pytest.raises(ValueError, match="batch_size 11 exceeds the 10 examples"):
        batch_indices(10, 11, seed=0, step=0)
    with pytest.raises(ValueError, match="step and seed must be >= 0"):
        batch_indices(10, 2, seed=0, step=-1)
