"""`sdvgen generate` end to end on the embedded tiny preset, read back with PyAV."""

from __future__ import annotations

import subprocess
import sys

import av
import pytest

from sdvgen_core.cli import main

from conftest import draw_subject


def probe(path):
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return len(frames), frames[0].shape


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDVGEN_CACHE", str(tmp_path_factory.getbasetemp() / "sdvgen-cache"))


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "subject.png"
    draw_subject((300, 200), mode="RGBA").save(path)
    return path


def test_tiny_preset_as_a_user_runs_it(tmp_path, ref, cache):
    out = tmp_path / "video.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "sdvgen_core", "generate", "--preset", "tiny", "--ref", str(ref),
         "--prompt", "a toy ball rolls on the beach", "--subject", "ball", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "random" in result.stderr and "noise" in result.stderr  # the preset is labelled
    assert "a toy <cls> ball rolls on the beach" in result.stderr
    count, shape = probe(out)
    from sdvgen_core.presets import TINY_GENERATION_DEFAULTS as d

    assert count == d["num_frames"] and shape == (d["height"], d["width"], 3)


def test_asked_frame_count_and_size(tmp_path, ref, cache):
    out = tmp_path / "sized.mp4"
    code = main(["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "a dog runs", "--out", str(out),
                 "--frames", "13", "--width", "128", "--height", "80", "--steps", "2", "--scheduler", "dpm",
                 "--fit", "pad", "--tiled-decode"])
    assert code == 0
    assert probe(out) == (13, (80, 128, 3))


def test_bad_arguments_give_clear_errors(tmp_path, ref, cache, capsys):
    out = tmp_path / "bad.mp4"
    assert main(["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "a dog", "--out", str(out),
                 "--frames", "10"]) == 2
    assert "frames=10 must be 4k+1" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "a dog", "--out", str(out),
                 "--subject", "cat"]) == 2
    assert "'cat' does not occur in the prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--ref", str(ref), "--prompt", "a dog"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["generate", "--preset", "tiny", "--ref", str(tmp_path / "missing.png"), "--prompt", "a dog"])
    assert not out.exists()


def test_tiny_model_command_writes_a_loadable_folder(tmp_path):
    from sdvgen_core.pipeline import SDVGenPipeline

    assert main(["tiny-model", str(tmp_path / "CogVideoX-tiny")]) == 0
    pipe = SDVGenPipeline.from_model_dir(tmp_path / "CogVideoX-tiny", dtype="fp32")
    assert pipe.cls_info.row == "existing"


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    import torch

    from sdvgen_core.video import write_mp4

    umask = os.umask(0o022)
    try:
        path = write_mp4(torch.rand(5, 3, 32, 48), tmp_path / "clip.mp4")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert probe(path) == (5, (32, 48, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary file left
