"""Unmapping resident pages of memory-mapped files (goat_dist.data.pages): RSS goes down, the
arrays keep their contents, a written copy-on-write page is never lost, other files are untouched."""
import sys

import numpy as np
import pytest

from goat_dist.data.pages import file_mappings, release_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux")

MB = 1 << 20


def _rss_file_kb() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def _npy(path, n_mb: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).standard_normal(n_mb * MB // 8)
    np.save(path, arr)
    return arr


def test_release_drops_resident_pages_and_keeps_contents(tmp_path):
    inside, outside = tmp_path / "data", tmp_path / "other"
    inside.mkdir(), outside.mkdir()
    ref_a, ref_b = _npy(inside / "a.npy", 32, 1), _npy(outside / "b.npy", 16, 2)
    a, b = np.load(inside / "a.npy", mmap_mode="r"), np.load(outside / "b.npy", mmap_mode="r")
    assert float(a.sum()) == float(ref_a.sum()) and float(b.sum()) == float(ref_b.sum())  # touch every page
    (ma,), (mb,) = file_mappings([inside]), file_mappings([outside])
    assert ma.rss_kb >= 31 * 1024 and mb.rss_kb >= 15 * 1024 and ma.anonymous_kb == 0
    rss_before = _rss_file_kb()

    report = release_mapped_pages([inside])

    assert report["mappings"] == 1 and report["pageout"] == 0
    assert report["resident_before_mb"] >= 31 and report["resident_after_mb"] < 1
    assert rss_before - _rss_file_kb() >= 30 * 1024
    (mb_after,) = file_mappings([outside])
    assert mb_after.rss_kb == mb.rss_kb  # a file outside the roots keeps its pages
    np.testing.assert_array_equal(a, ref_a)  # faulted back in: the same bytes
    np.testing.assert_array_equal(b, ref_b)


def test_written_copy_on_write_page_survives(tmp_path):
    ref = _npy(tmp_path / "c.npy", 8, 3)
    c = np.load(tmp_path / "c.npy", mmap_mode="c")
    c[5] = 12345.0  # a private change: the mapping now holds an anonymous page
    assert float(c.sum()) == pytest.approx(float(ref.sum()) - ref[5] + 12345.0)
    (m,) = file_mappings([tmp_path])
    assert m.anonymous_kb > 0

    report = release_mapped_pages([tmp_path])

    assert report["pageout"] == 1
    assert c[5] == 12345.0
    expect = ref.copy()
    expect[5] = 12345.0
    np.testing.assert_array_equal(c, expect)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), ref)  # the file itself never changes


def test_nothing_to_release(tmp_path):
    assert release_mapped_pages([]) is None
    report = release_mapped_pages([tmp_path])  # no mapping under it
    assert report["mappings"] == 0 and report["resident_before_mb"] == 0
