from __future__ import annotations

import dinoapp
from dinoapp.cli import main


def test_info_convert_archs(tiny_meta_file, tmp_path, capsys):
    assert main(["info", tiny_meta_file]) == 0
    out = capsys.readouterr().out
    assert "dim 192, depth 4" in out and "layout: meta" in out and "sha256" in out
    assert main(["convert", tiny_meta_file, str(tmp_path / "t.safetensors")]) == 0
    bb = dinoapp.load_backbone(tmp_path / "t.safetensors")
    assert bb.provenance["layout"] == "dinoapp" and bb.provenance["source"].endswith("t.safetensors")
    assert main(["archs"]) == 0
    assert "vit7b16" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
