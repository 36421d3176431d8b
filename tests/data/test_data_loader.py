"""load_dataset / validate_dataset: format detection, counts, features, duplicates and the
dataset-level defects (missing or empty split, ids without feature rows, row count mismatches)."""
from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import mem_url, write_goat  # noqa: F401 (pytest fixtures)
from goat_dist.config import DataConfig
from goat_dist.data import DataError, load_dataset, validate_dataset
from goat_dist.data.inter import write_inter


def _feat(rows, dim=3, dtype=np.float32):
    return np.arange(rows * dim, dtype=dtype).reshape(rows, dim)


def test_goat_folder_with_features_local(tmp_path, write_goat):
    write_goat(tmp_path, item_image=_feat(4), user_profile=_feat(2, 5, np.float16))
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert (ds.n_users, ds.n_items) == (2, 4)
    assert ds.train.users.tolist() == [0, 0, 1] and ds.train.items.tolist() == [1, 2, 0]
    assert ds.train.users.dtype == np.int32
    assert isinstance(ds.item_features["image"], np.memmap) and ds.user_features["profile"].dtype == np.float16
    assert ds.source.startswith("goat:")


def test_goat_folder_memory_url(mem_url, write_goat):
    write_goat(mem_url, item_text=_feat(4))
    ds = load_dataset(DataConfig(path=mem_url))
    assert (ds.n_users, ds.n_items, len(ds.splits["test"])) == (2, 4, 1)
    assert np.array_equal(ds.item_features["text"], _feat(4))


def test_feature_rows_beyond_ids_are_items_without_interactions(tmp_path, write_goat):
    write_goat(tmp_path, item_image=_feat(6))
    assert load_dataset(DataConfig(path=str(tmp_path))).n_items == 6


def test_configured_feature_paths(tmp_path, write_goat):
    write_goat(tmp_path)
    np.save(tmp_path / "image_vectors.npy", _feat(4))
    ds = load_dataset(DataConfig(path=str(tmp_path), item_features={"image": "image_vectors.npy"}))
    assert list(ds.item_features) == ["image"]


def test_valid_split_is_optional(tmp_path, write_goat):
    write_goat(tmp_path, valid=None)
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert len(ds.splits["valid"]) == 0 and len(ds.train) == 3


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_required_split(tmp_path, write_goat, missing):
    write_goat(tmp_path, **{missing: None})
    with pytest.raises(DataError, match=rf"^{missing}\.txt: required split '{missing}' is missing"):
        load_dataset(DataConfig(path=str(tmp_path)))


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_empty_split(tmp_path, write_goat, split):
    write_goat(tmp_path, **{split: "0\n1\n"})  # users named, no items
    with pytest.raises(DataError, match=rf"^{split}\.txt: split '{split}' is empty: 0 interactions in 2 line"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_item_without_feature_row_names_line(tmp_path, write_goat):
    write_goat(tmp_path, train="0 1\n1 0 2\n2 3 1\n", item_image=_feat(3))
    with pytest.raises(DataError, match=r"^train\.txt:3: item id 3 has no feature row \(item_image\.npy has 3 rows\)"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_user_without_feature_row_names_line(tmp_path, write_goat):
    write_goat(tmp_path, test="1 2\n5\n", user_profile=_feat(2))
    with pytest.raises(DataError, match=r"^test\.txt:2: user id 5 has no feature row"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_feature_row_counts_disagree(tmp_path, write_goat):
    write_goat(tmp_path, item_a=_feat(4), item_b=_feat(5))
    with pytest.raises(DataError, match=r"^item_b\.npy: 5 rows, but item_a\.npy has 4: feature row count != item count"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_nan_feature_names_row(tmp_path, write_goat):
    f = _feat(4)
    f[2, 1] = np.nan
    write_goat(tmp_path, item_image=f)
    with pytest.raises(DataError, match=r"^item_image\.npy: row 2: NaN in column 1$"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_duplicates_are_counted_not_dropped(tmp_path, write_goat):
    write_goat(tmp_path, train="0 1 2 1 1\n1 0\n0 2\n", test="1 2 2\n")
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert len(ds.train) == 6 and ds.duplicates == {"train": 3, "valid": 0, "test": 1}
    report = validate_dataset(str(tmp_path))
    assert report.ok and "duplicates: train 3 / valid 0 / test 1" in report.format()


def test_inter_file_detected_and_required_labels(tmp_path):
    from goat_dist.data.dataset import Interactions

    z = np.zeros(0, np.int32)
    splits = {"train": Interactions(np.array([0, 1], np.int32), np.array([1, 2], np.int32)),
              "valid": Interactions(z, z), "test": Interactions(np.array([1], np.int32), np.array([3], np.int32))}
    write_inter(str(tmp_path / "toy.inter"), splits)
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert ds.source.startswith("inter:") and (ds.n_users, ds.n_items) == (2, 4)
    splits["test"] = Interactions(z, z)
    write_inter(str(tmp_path / "toy.inter"), splits)
    with pytest.raises(DataError, match=r"^toy\.inter: required split 'test' is empty: no row with x_label 2"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_inter_id_without_feature_row_names_line(tmp_path):
    (tmp_path / "toy.inter").write_text("userID\titemID\tx_label\n0\t1\t0\n0\t2\t2\n1\t4\t0\n")
    np.save(tmp_path / "item_image.npy", _feat(3))
    with pytest.raises(DataError, match=r"^toy\.inter:4: item id 4 has no feature row"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_table_dataset_keeps_original_ids(tmp_path):
    (tmp_path / "log.csv").write_text("user,item,split\nu9,i7,train\nu3,i7,test\nu3,i8,train\n")
    ds = load_dataset(DataConfig(path=str(tmp_path)))
    assert ds.user_ids.tolist() == ["u9", "u3"] and ds.item_ids.tolist() == ["i7", "i8"]
    assert (ds.n_users, ds.n_items) == (2, 2)


def test_no_dataset_in_folder(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="no dataset found"):
        load_dataset(DataConfig(path=str(tmp_path)))


def test_validate_collects_errors_from_several_files(tmp_path, write_goat):
    write_goat(tmp_path, train="0 1\n1 x\n", test="0 -2\n", item_image=np.zeros(4, np.float32))
    report = validate_dataset(str(tmp_path))
    assert not report.ok
    joined = "\n".join(report.errors)
    assert "train.txt:2: non-integer token 'x'" in joined
    assert "test.txt:1: negative id -2" in joined
    assert "item_image.npy: features must be 2-D" in joined
    assert "ERRORS (3)" in report.format()


def test_cli_validate_exit_codes(tmp_path, write_goat, capsys):
    from goat_dist.cli import main

    write_goat(tmp_path / "good")
    assert main(["data", "validate", str(tmp_path / "good")]) == 0
    assert "users: 2" in capsys.readouterr().out
    write_goat(tmp_path / "bad", valid="0 1.5\n")
    assert main(["data", "validate", str(tmp_path / "bad")]) == 1
    assert "valid.txt:1: float token '1.5'" in capsys.readouterr().out


def test_feature_norm_at_load(tmp_path, write_goat):
    rng = np.random.default_rng()
    image = (rng.standard_normal((4, 3)) * 3 + 20).astype(np.float32)
    write_goat(tmp_path, item_image=image, user_profile=rng.standard_normal((2, 5)).astype(np.float16))
    ds = load_dataset(DataConfig(path=str(tmp_path), feature_norm="standardize"))
    for arr in (ds.item_features["image"], ds.user_features["profile"]):
        assert arr.dtype == np.float32 and not isinstance(arr, np.memmap)
        np.testing.assert_allclose(arr.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(arr.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(ds.item_features["image"], (image - image.mean(0)) / image.std(0), atol=1e-5)
    ds = load_dataset(DataConfig(path=str(tmp_path), feature_norm="center_l2"))
    np.testing.assert_allclose(np.linalg.norm(ds.item_features["image"], axis=1), 1, atol=1e-5)
    with pytest.raises(DataError, match="unknown data.feature_norm 'zscore'"):
        load_dataset(DataConfig(path=str(tmp_path), feature_norm="zscore"))
