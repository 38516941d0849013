"""Atomic writes (`t2jax.files`)."""

from __future__ import annotations

import json

import pytest

from t2jax import files


def test_write_text_and_json_replace_the_file(tmp_path):
    path = tmp_path / "out.json"
    files.write_text_atomically(path, "old")
    assert path.read_text() == "old"
    files.write_json_atomically(path, {"b": 1, "a": [1.5, None], "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1, "path": str(tmp_path)}
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_error_inside_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "expert.safetensors"
    path.write_text("old content")

    def failing_write(temporary):
        assert temporary.parent == tmp_path and not temporary.exists()
        temporary.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomically(path, failing_write)
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["expert.safetensors"]


def test_unserializable_json_leaves_no_file(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(ValueError, match="Circular"):
        cyclic = []
        cyclic.append(cyclic)
        files.write_json_atomically(path, cyclic)
    assert list(tmp_path.iterdir()) == []


def test_every_cache_lives_under_t2jax_cache(monkeypatch, tmp_path):
    from t2jax import native
    from t2jax.svf import cache as svf_cache
    from t2jax.tasks import code_tasks

    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    assert files.cache_dir() == tmp_path
    assert svf_cache.default_cache_root() == tmp_path / "svd"
    assert code_tasks.ground_truth_cache_dir() == tmp_path / "code_ground_truth"
    assert native.library_path("c++").parent == tmp_path / "native"
