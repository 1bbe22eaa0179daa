"""The offline bundle: packed into bounded parts, joined and checked, extracted as it was."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from benchmarks import offline_bundle, pretrained


@pytest.fixture
def sources(tmp_path, monkeypatch):
    minilm = tmp_path / "pkg" / "minilm"
    (minilm / "1_Pooling").mkdir(parents=True)
    (minilm / "config.json").write_text("{}")
    (minilm / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (minilm / "1_Pooling" / "config.json").write_text("{}")
    gguf_file = tmp_path / "pkg" / pretrained.SMOLLM2_GGUF
    gguf_file.write_bytes(b"GGUF" + bytes(5000))
    gguf_package = tmp_path / "pkg" / "gguf"
    (gguf_package / "__pycache__").mkdir(parents=True)
    (gguf_package / "__init__.py").write_text("")
    (gguf_package / "__pycache__" / "x.pyc").write_bytes(b"stale")
    gguf_info = tmp_path / "pkg" / "gguf-0.19.0.dist-info"
    gguf_info.mkdir()
    (gguf_info / "METADATA").write_text("Name: gguf\nVersion: 0.19.0\n")
    data = tmp_path / "data"
    for name in offline_bundle.DEFAULT_DATA:
        (data / name).mkdir(parents=True)
        (data / name / "part.txt").write_text(name * 100)
    (data / "SHA256SUMS").write_text("sums\n")
    monkeypatch.setattr(pretrained, "minilm_dir", lambda: minilm)
    monkeypatch.setattr(pretrained, "smollm2_file", lambda: gguf_file)
    monkeypatch.setattr(offline_bundle, "_gguf_site", lambda: [gguf_package, gguf_info])
    return data


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_parts_are_bounded_and_unpack_to_the_models_data_and_gguf(tmp_path, sources):
    parts = offline_bundle.pack(tmp_path / "out", part_bytes=4000, data_dir=sources)
    assert len(parts) > 3
    assert all(p.stat().st_size <= 4000 for p in parts)
    to = offline_bundle.unpack(tmp_path / "out", tmp_path / "offline")
    tree = _tree(to)
    assert tree["models/minilm/model.safetensors"] == bytes(range(256)) * 40
    assert tree["models/minilm/1_Pooling/config.json"] == b"{}"
    assert tree[f"models/smollm2/{pretrained.SMOLLM2_GGUF}"] == b"GGUF" + bytes(5000)
    assert tree["data/wikitext-2/part.txt"] == b"wikitext-2" * 100
    assert tree["data/SHA256SUMS"] == b"sums\n"
    assert "site/gguf/__init__.py" in tree
    assert tree["site/gguf-0.19.0.dist-info/METADATA"].startswith(b"Name: gguf")
    assert not any("__pycache__" in name for name in tree)


def test_a_missing_or_foreign_part_is_refused(tmp_path, sources, capsys):
    parts = offline_bundle.pack(tmp_path / "out", part_bytes=4000, data_dir=sources)
    parts[1].unlink()
    with pytest.raises(offline_bundle._cli.UserError, match="do not match"):
        offline_bundle.unpack(tmp_path / "out", tmp_path / "offline")
    assert not (tmp_path / "offline").exists()  # nothing is extracted from a broken bundle
    assert offline_bundle.main(["unpack", str(tmp_path / "empty"), "--to", str(tmp_path)]) == 2
    assert "holds no bundle" in capsys.readouterr().err


def test_packing_again_replaces_the_old_parts_and_checks_its_inputs(tmp_path, sources, capsys):
    offline_bundle.pack(tmp_path / "out", part_bytes=1000, data_dir=sources)
    parts = offline_bundle.pack(tmp_path / "out", part_bytes=10**6, data_dir=sources)
    assert sorted((tmp_path / "out").glob(offline_bundle.PART_GLOB)) == parts == parts[:1]
    argv = ["pack", "--out", str(tmp_path / "o"), "--data-dir", str(sources), "--data", "nope"]
    assert offline_bundle.main(argv) == 2
    assert "dataset 'nope' is not a folder" in capsys.readouterr().err
    with pytest.raises(offline_bundle._cli.UserError, match="part size"):
        offline_bundle.pack(tmp_path / "o", part_bytes=0, data_dir=sources)


def test_a_glue_only_bundle_carries_minilm_and_glue_alone(tmp_path, sources, capsys):
    argv = ["pack", "--out", str(tmp_path / "out"), "--data-dir", str(sources)]
    assert offline_bundle.main([*argv, "--models", "minilm", "--data", "glue"]) == 0
    tree = _tree(offline_bundle.unpack(tmp_path / "out", tmp_path / "offline"))
    assert {name.split("/")[1] for name in tree} == {"minilm", "glue", "SHA256SUMS"}
    assert offline_bundle.main([*argv, "--models", "minilm,bert"]) == 2
    assert "Invalid models ['minilm', 'bert']" in capsys.readouterr().err


def test_the_installed_gguf_travels_with_its_metadata():
    pytest.importorskip("gguf")
    package, info = offline_bundle._gguf_site()
    assert (package / "__init__.py").is_file()
    assert (info / "METADATA").is_file()  # transformers reads gguf's version from it
    assert info.name == f"gguf-{importlib.metadata.version('gguf')}.dist-info"


def test_folders_put_one_part_in_each_and_unpack_in_place_or_gathered(tmp_path, sources, capsys):
    out = tmp_path / "out"
    offline_bundle.pack(out, part_bytes=1000, data_dir=sources)  # flat parts, to be replaced
    argv = ["pack", "--out", str(out), "--data-dir", str(sources), "--part-mb", "0.0025"]
    assert offline_bundle.main([*argv, "--folders"]) == 0
    assert "parts to" in capsys.readouterr().out
    folders = sorted((p for p in out.iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))
    assert len(folders) > 10  # so that p10/ sorts before p2/ by path
    assert not list(out.glob("bundle.tar*"))  # the flat parts and sha256 are gone
    for index, folder in enumerate(folders):
        names = sorted(p.name for p in folder.iterdir())
        part = f"bundle.tar.part{index:03d}"
        last = index == len(folders) - 1
        assert names == ([part, offline_bundle.DIGEST_FILE] if last else [part])
    expected = _tree(offline_bundle.unpack(out, tmp_path / "in-place"))
    gathered = tmp_path / "gathered"  # what lease.sh stash makes of them, one call at a time
    gathered.mkdir()
    for folder in folders:
        for path in folder.iterdir():
            (gathered / path.name).write_bytes(path.read_bytes())
    assert _tree(offline_bundle.unpack(gathered, tmp_path / "offline")) == expected
    assert expected["data/wikitext-2/part.txt"] == b"wikitext-2" * 100
    offline_bundle.pack(out, part_bytes=10**6, data_dir=sources)  # flat again: folders go
    assert sorted(p.name for p in out.iterdir()) == ["bundle.tar.part000", "bundle.tar.sha256"]
