"""Feature matrices: memory-mapped when local, in memory for memory://, and every defect named."""
from __future__ import annotations

import fsspec
import numpy as np
import pytest

from data_fixtures import mem_url  # noqa: F401 (pytest fixtures)
from goat_dist.data.errors import DataError
from goat_dist.data.features import check_finite, discover_features, load_matrix, save_matrix


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_local_features_are_memory_mapped(tmp_path, dtype):
    arr = np.random.default_rng(0).standard_normal((50, 8)).astype(dtype)
    np.save(tmp_path / "item_image.npy", arr)
    got = load_matrix(str(tmp_path / "item_image.npy"))
    assert isinstance(got, np.memmap) and got.dtype == dtype
    assert np.array_equal(np.asarray(got), arr)


def test_memory_url_round_trip(mem_url):
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_matrix(f"{mem_url}/user_profile.npy", arr)
    got = load_matrix(f"{mem_url}/user_profile.npy")
    assert not isinstance(got, np.memmap) and np.array_equal(got, arr)


def test_not_a_npy(tmp_path):
    (tmp_path / "item_text.npy").write_text("hello")
    with pytest.raises(DataError, match=r"^item_text\.npy: not a \.npy file"):
        load_matrix(str(tmp_path / "item_text.npy"))


def test_one_dimensional(tmp_path):
    np.save(tmp_path / "item_text.npy", np.zeros(5, np.float32))
    with pytest.raises(DataError, match=r"^item_text\.npy: features must be 2-D .* \(5,\)"):
        load_matrix(str(tmp_path / "item_text.npy"))


def test_integer_dtype_rejected(tmp_path):
    np.save(tmp_path / "item_text.npy", np.zeros((5, 2), np.int64))
    with pytest.raises(DataError, match=r"^item_text\.npy: dtype int64 is not supported"):
        load_matrix(str(tmp_path / "item_text.npy"))


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "+Inf"), (-np.inf, "-Inf")])
def test_non_finite_names_row_and_column(tmp_path, value, what):
    arr = np.zeros((300, 4), np.float16)
    arr[217, 2] = value
    np.save(tmp_path / "item_image.npy", arr)
    m = load_matrix(str(tmp_path / "item_image.npy"))
    with pytest.raises(DataError, match=rf"^item_image\.npy: row 217: {what.replace('+', '[+]')} in column 2$"):
        check_finite("item_image.npy", m, block_rows=64)


def test_discovery_and_feat_convention(mem_url):
    for name in ("item_image.npy", "user_profile.npy", "audio_feat.npy", "notes.txt"):
        with fsspec.open(f"{mem_url}/{name}", "wb") as f:
            f.write(b"x")
    items, users = discover_features(mem_url)
    assert sorted(items) == ["audio", "image"] and sorted(users) == ["profile"]
    with fsspec.open(f"{mem_url}/image_feat.npy", "wb") as f:
        f.write(b"x")
    with pytest.raises(DataError, match=r"^image_feat\.npy: ambiguous"):
        discover_features(mem_url)


def test_non_finite_in_a_memmap_slice_names_the_slice_row(tmp_path):
    arr = np.zeros((100, 3), np.float32)
    arr[70, 0] = np.nan
    np.save(tmp_path / "item_image.npy", arr)
    m = load_matrix(str(tmp_path / "item_image.npy"))
    with pytest.raises(DataError, match=r"row 20: NaN in column 0"):
        check_finite("item_image.npy", m[50:], block_rows=8)


def _normalized_reference(a: np.ndarray, how: str) -> np.ndarray:
    """Plain float64 numpy: the whole matrix at once."""
    x = a.astype(np.float64)
    x = x - x.mean(0)
    if how == "standardize":
        std = x.std(0)
        x = x / np.where(std > 0, std, 1.0)
    else:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    return x


@pytest.mark.parametrize("how", ["standardize", "center_l2"])
@pytest.mark.parametrize("block_rows", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_normalize_features_matches_reference(tmp_path, how, block_rows, dtype):
    from goat_dist.data.features import normalize_features

    rng = np.random.default_rng()
    a = (rng.standard_normal((53, 6)) * rng.uniform(0.1, 5, 6) + rng.uniform(-30, 30, 6)).astype(dtype)
    a[:, 2] = 4.0  # a constant column: centred to 0, never divided by 0
    a[11] = a.mean(0, dtype=np.float64).astype(dtype)  # a row that is (nearly) the mean
    np.save(tmp_path / "f.npy", a)
    mm = load_matrix(str(tmp_path / "f.npy"))
    out = normalize_features(mm, how, block_rows=block_rows)
    assert out.dtype == np.float32 and out.shape == a.shape and not isinstance(out, np.memmap)
    np.testing.assert_allclose(out, _normalized_reference(a, how), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out)) and np.all(out[:, 2] == 0)
    assert normalize_features(mm, "none") is mm
    with pytest.raises(ValueError, match="data.feature_norm must be one of"):
        normalize_features(mm, "zscore")
