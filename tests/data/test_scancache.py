"""The pre-flight scan cache: unchanged files are not decoded again, anything else is."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import ftsgd.data.scan
from ftsgd.data import scancache
from ftsgd.data.folders import discover_splits
from ftsgd.data.scan import preflight_scan
from ftsgd.errors import DataError
from ftsgd.recipe.schema import DataConfig

OLD_NS = 1_600_000_000 * 10**9  # 2020: well before any scan, so files are not "racily clean"


def _age(root: Path) -> None:
    """Give every file under ``root`` the same old modification time."""
    for path in root.rglob("*.png"):
        os.utime(path, ns=(OLD_NS, OLD_NS))


def _garble(path: Path, *, keep_mtime: bool) -> None:
    """Overwrite ``path`` with non-image bytes of the same size; optionally restore its mtime."""
    st = path.stat()
    path.write_bytes(b"not an image ".ljust(st.st_size, b"!"))
    assert path.stat().st_size == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _scan(root: Path) -> None:
    _, splits = discover_splits(DataConfig(root=str(root)))
    preflight_scan(splits, root=root)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the scan really decodes (the real ``check_image`` still runs)."""
    seen: list[Path] = []
    real = ftsgd.data.scan.check_image
    monkeypatch.setattr(ftsgd.data.scan, "check_image", lambda p: seen.append(Path(p)) or real(p))
    return seen


def test_unchanged_files_are_not_decoded_again_and_changed_ones_are(make_folder, counted) -> None:
    root = make_folder({"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    _age(root)
    _scan(root)
    assert len(counted) == 7
    counted.clear()
    _scan(root)
    assert counted == []  # nothing changed: nothing decoded

    # Garbage with the size and mtime of the good file it replaced is *not* noticed: the proof that
    # the cache, keyed by (path, size, mtime_ns), answered instead of the decoder.
    _garble(root / "train" / "a" / "0.png", keep_mtime=True)
    _scan(root)
    assert counted == []

    _garble(root / "train" / "a" / "1.png", keep_mtime=False)  # same size, new mtime
    with pytest.raises(DataError, match=r"1 of 7 image files .* cannot be read") as info:
        _scan(root)
    assert "train/a/1.png" in str(info.value) and "0.png" not in str(info.value)
    assert counted == [root / "train" / "a" / "1.png"]

    counted.clear()
    other = root / "val" / "b" / "0.png"  # same mtime, another size: cut in half
    other.write_bytes(other.read_bytes()[: other.stat().st_size // 2])
    os.utime(other, ns=(OLD_NS, OLD_NS))
    with pytest.raises(DataError, match=r"2 of 7 image files"):
        _scan(root)
    assert sorted(counted) == sorted([root / "train" / "a" / "1.png", other])


def test_a_bad_file_stays_bad_until_it_changes(make_folder, counted, _private_scan_cache: Path) -> None:
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"GIF89a")
    _age(root)
    for _ in range(2):
        with pytest.raises(DataError, match=r"train/a/1\.png"):
            _scan(root)
    assert counted.count(bad) == 2  # decoded on every scan, never remembered as good
    entries = scancache.load_entries(_private_scan_cache / "scan", root / "train")
    assert entries is not None and sorted(entries) == ["a/0.png", "b/0.png"]

    bad.write_bytes((root / "train" / "a" / "0.png").read_bytes())  # fixed: another size, same mtime
    _age(root)
    _scan(root)
    assert sorted(scancache.load_entries(_private_scan_cache / "scan", root / "train") or {}) == [
        "a/0.png",
        "a/1.png",
        "b/0.png",
    ]


def test_skip_keeps_working_with_the_cache(make_folder) -> None:
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    (root / "train" / "a" / "0.png").write_bytes(b"")
    _age(root)
    _, splits = discover_splits(DataConfig(root=str(root)))
    for _ in range(2):
        kept, skipped = preflight_scan(splits, on_bad_image="skip")
        assert [b.path.name for b in skipped] == ["0.png"] and len(kept["train"]) == 2


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff garbage",
        b'{"format": "ftsgd-scan-cache", "version": 1, "root": "/x", "fi',  # torn
        b"[1, 2, 3]",
        b'{"format": "ftsgd-scan-cache", "version": 999, "root": "ROOT", "files": {}}',
        b'{"format": "ftsgd-scan-cache", "version": 1, "root": "/elsewhere", "files": {}}',
        b'{"format": "ftsgd-scan-cache", "version": 1, "root": "ROOT", "files": {"a/0.png": 5}}',
        b'{"format": "ftsgd-scan-cache", "version": 1, "root": "ROOT", "files": []}',
    ],
)
def test_a_corrupt_cache_file_is_ignored_and_rewritten(
    make_folder, counted, _private_scan_cache: Path, content: bytes
) -> None:
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    _age(root)
    directory = _private_scan_cache / "scan"
    directory.mkdir()
    target = scancache.cache_file(directory, root / "train")
    target.write_bytes(content.replace(b"ROOT", os.path.abspath(root / "train").encode()))
    _scan(root)
    assert len(counted) == 4  # nothing trusted from the damaged file
    assert sorted(scancache.load_entries(directory, root / "train") or {}) == [
        "a/0.png",
        "a/1.png",
        "b/0.png",
    ]
    counted.clear()
    _scan(root)
    assert counted == []


def test_environment_turns_the_cache_off(
    make_folder, counted, monkeypatch, _private_scan_cache: Path
) -> None:
    monkeypatch.setenv("FTSGD_SCAN_CACHE", "0")
    assert scancache.scan_cache_dir() is None
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    _age(root)
    _scan(root)
    _garble(root / "train" / "a" / "0.png", keep_mtime=True)
    with pytest.raises(DataError, match=r"train/a/0\.png"):
        _scan(root)  # decoded again, so the replaced file is found
    assert len(counted) == 8
    assert not (_private_scan_cache / "scan").exists()


def test_the_cache_argument_turns_it_off(make_folder, counted) -> None:
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    _age(root)
    _, splits = discover_splits(DataConfig(root=str(root)))
    preflight_scan(splits)
    preflight_scan(splits, cache=False)
    assert len(counted) == 8


def test_cache_location_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FTSGD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert scancache.scan_cache_dir() == tmp_path / "xdg" / "ftsgd" / "scan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()  # a home that does not exist means no cache (test below)
    assert scancache.scan_cache_dir() == tmp_path / "home" / ".cache" / "ftsgd" / "scan"
    monkeypatch.setenv("FTSGD_CACHE_DIR", str(tmp_path / "mine"))
    assert scancache.scan_cache_dir() == tmp_path / "mine" / "scan"
    for off in ("0", "off", "false", "NO"):
        monkeypatch.setenv("FTSGD_SCAN_CACHE", off)
        assert scancache.scan_cache_dir() is None


def test_an_unwritable_cache_is_not_an_error(make_folder, counted, monkeypatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FTSGD_CACHE_DIR", str(blocker))
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})
    _age(root)
    _scan(root)
    _scan(root)
    assert len(counted) == 8
    assert blocker.read_text().startswith("a file")


def test_files_modified_just_now_are_not_cached(make_folder, counted) -> None:
    root = make_folder({"train": {"a": 2, "b": 1}, "val": {"a": 1}})  # written just now: racily clean
    _scan(root)
    _scan(root)
    assert len(counted) == 8


def test_least_recently_used_files_are_evicted(tmp_path: Path) -> None:
    entries = {f"c/{i:05d}.png": (1000 + i, OLD_NS) for i in range(200)}
    for k, name in enumerate(["old", "mid", "new"]):
        assert scancache.store_entries(tmp_path, f"/data/{name}", entries)
        os.utime(scancache.cache_file(tmp_path, f"/data/{name}"), (1_000_000 + k, 1_000_000 + k))
    one = scancache.cache_file(tmp_path, "/data/old").stat().st_size
    scancache.touch(tmp_path, "/data/old")  # used now: the most recent
    stale = tmp_path / ".abc.json.123.tmp"
    stale.write_text("left by a killed writer")
    os.utime(stale, (1_000_000, 1_000_000))
    live = tmp_path / ".def.json.456.tmp"
    live.write_text("being written right now")

    assert scancache.store_entries(tmp_path, "/data/latest", entries, max_bytes=int(2.5 * one))
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = [scancache.cache_file(tmp_path, f"/data/{n}").name for n in ("old", "latest")]
    assert left == sorted([*expected, live.name])
    assert scancache.load_entries(tmp_path, "/data/latest") == entries
    assert not scancache.store_entries(tmp_path, "/data/huge", entries, max_bytes=100)  # too big alone
    assert scancache.load_entries(tmp_path, "/data/huge") is None


@pytest.mark.slow
def test_concurrent_writers_never_leave_a_partial_file(tmp_path: Path) -> None:
    """Writers replacing the same cache file while a reader reads: every read is a whole file."""
    big = {f"c/{i:06d}.png": (i, OLD_NS + i) for i in range(20000)}
    small = {"c/0.png": (1, OLD_NS)}
    scancache.store_entries(tmp_path, "/data/x", small)
    stop = time.monotonic() + 1.5
    seen: list[int] = []

    def write(entries: dict[str, scancache.Entry]) -> None:
        while time.monotonic() < stop:
            scancache.store_entries(tmp_path, "/data/x", entries)

    def read() -> None:
        while time.monotonic() < stop:
            got = scancache.load_entries(tmp_path, "/data/x")
            seen.append(-1 if got is None else len(got))

    threads = [threading.Thread(target=write, args=(e,)) for e in (big, small)] + [
        threading.Thread(target=read)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and set(seen) <= {1, 20000}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    raw = json.loads(scancache.cache_file(tmp_path, "/data/x").read_text())
    assert raw["root"] == "/data/x" and len(raw["files"]) in (1, 20000)


def test_without_a_home_directory_there_is_no_cache_and_no_home_is_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ftsgd.sweep.compare import cache_root
    from ftsgd.utils import cachedir

    home = tmp_path / "nonexistent"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FTSGD_CACHE_DIR", raising=False)
    monkeypatch.setattr(cachedir, "_noted", set())
    assert scancache.scan_cache_dir() is None
    assert scancache.scan_cache_dir() is None
    err = capsys.readouterr().err
    assert err.count(f"the home directory {home} does not exist, so ftsgd keeps no cache") == 1
    assert not cache_root().is_relative_to(home)
    assert not home.exists()
    home.mkdir()
    assert scancache.scan_cache_dir() == home / ".cache" / "ftsgd" / "scan"
