"""`sdvgen generate` end to end on the embedded tiny preset, read back with PyAV."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import av
import pytest
import torch
from PIL import Image

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


def assert_one_error_line(err):
    """One `error:` line naming the problem, and no traceback (progress bars of the tiny model build aside)."""
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error: ")] == [
        err.strip().splitlines()[-1]
    ], err


def generate(ref, out, *extra):
    return main(["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "a dog runs", "--out", str(out), *extra])


FAST = ["--frames", "1", "--steps", "1", "--width", "32", "--height", "32"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model starts loading: every bad argument must be refused before that."""
    from sdvgen_core.pipeline import SDVGenPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(SDVGenPipeline, "from_model_dir", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--frames", "0"], "--frames=0 is out of range; expected 1 to 49"),
        (["--frames", "10"], "--frames=10 must be 4k\\+1"),
        (["--frames", "53"], "--frames=53 is out of range"),
        (["--width", "0"], "--width=0 is out of range"),
        (["--height", "-16"], "--height=-16 is out of range"),
        (["--width", "100"], "--width=100 must be a multiple of 16"),
        (["--width", "4096"], "--width=4096 is out of range; expected 16 to 1440"),
        (["--steps", "0"], "--steps=0 is out of range"),
        (["--steps", "5000"], "--steps=5000 is out of range; expected 1 to 1000"),
        (["--cfg", "nan"], "--cfg must be a finite number"),
        (["--cfg", "-2"], "--cfg=-2 is out of range"),
        (["--reference-guidance", "inf"], "--reference-guidance must be a finite number"),
        (["--reference-guidance", "-1"], "--reference-guidance=-1 is out of range"),
        (["--lora-strength", "nan"], "--lora-strength must be a finite number"),
        (["--lora-strength", "1e30"], "--lora-strength=1e\\+30 is out of range"),
        (["--eta", "2"], "--eta=2 is out of range"),
        (["--fps", "0"], "--fps=0 is out of range; expected 1 to 240"),
        (["--seed", "-1"], "--seed=-1 is out of range"),
        (["--device", "banana"], "--device 'banana' is not a torch device"),
        (["--device", "meta"], "--device 'meta': no meta device"),
        (["--subject", "cat"], "'cat' does not occur in the prompt"),
        (["--lora", "{tmp}/missing.safetensors"], "missing.safetensors' does not exist"),
        (["--lora", "{tmp}"], "is a folder"),
        (["--fuse-lora"], "--fuse-lora needs --lora"),
        (["--lora", "{tmp}/not_lora.safetensors"], "not a readable safetensors file"),
        (["--mask", "{tmp}/small_mask.png"], "subject mask is 30x20 but the image is 300x200"),
        (["--mask", "{tmp}/missing.png"], "cannot read the image .*missing.png.*does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_loads(tmp_path, ref, cache, capsys, no_model_load, extra, message):
    (tmp_path / "not_lora.safetensors").write_bytes(b"\x80\x04pickle")
    Image.new("L", (30, 20), 255).save(tmp_path / "small_mask.png")
    out = tmp_path / "bad.mp4"
    assert generate(ref, out, *[e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert_one_error_line(err)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(tmp_path, ref, cache, capsys, no_model_load):
    assert generate(ref, tmp_path / "x.mp4", "--device", "cuda") == 2
    assert "--device 'cuda': no cuda device is available" in capsys.readouterr().err


def test_bad_paths_are_refused_before_the_model_loads(tmp_path, ref, cache, capsys, no_model_load, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cases = [
        ((ref, tmp_path), "is a folder; give a file name"),
        ((ref, tmp_path / "video.avi"), "must be an .mp4 file name"),
        ((ref, tmp_path / "a_file" / "video.mp4"), "is a file, not a folder"),
        ((tmp_path / "missing.png", tmp_path / "v.mp4"), "cannot read the image .*missing.png.*does not exist"),
        ((broken, tmp_path / "v.mp4"), "cannot read the image .*broken.jpg"),
    ]
    for (image, out), message in cases:
        assert generate(image, out) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert_one_error_line(err)
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--ref", str(ref), "--prompt", "a dog"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "  ", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_read_only_output_folder_is_refused_before_the_model_loads(tmp_path, ref, cache, capsys, no_model_load, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the write itself fail as on a read-only mount
        import tempfile

        def read_only(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    else:
        folder.chmod(0o555)
    assert generate(ref, folder / "sub" / "video.mp4") == 2
    err = capsys.readouterr().err
    assert f"cannot write in '{folder}' (Permission denied); choose another --out" in err
    assert not (folder / "sub").exists()


def test_existing_output_is_never_overwritten_unasked(tmp_path, ref, cache, capsys, caplog):
    out = tmp_path / "robot.mp4"
    out.write_bytes(b"precious")
    (tmp_path / "robot_00001.mp4").write_bytes(b"also precious")
    assert generate(ref, out, *FAST) == 0
    captured = capsys.readouterr()
    written = tmp_path / "robot_00002.mp4"
    assert captured.out.strip() == str(written)
    assert f"robot.mp4 exists, so the video was written to {written}" in caplog.text
    assert out.read_bytes() == b"precious" and (tmp_path / "robot_00001.mp4").read_bytes() == b"also precious"
    assert probe(written) == (1, (32, 32, 3))
    assert generate(ref, out, *FAST, "--overwrite") == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert probe(out) == (1, (32, 32, 3))
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["robot.mp4", "robot_00001.mp4", "robot_00002.mp4"]


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, ref, cache, capsys, monkeypatch):
    import sdvgen_core.video

    def full_disk(name, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", name)

    monkeypatch.setattr(sdvgen_core.video.av, "open", full_disk)
    out = tmp_path / "out" / "video.mp4"
    assert generate(ref, out, *FAST) == 1
    err = capsys.readouterr().err
    assert "No space left on device; free some disk space" in err, err
    assert_one_error_line(err)
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is gone too


def test_nan_lora_is_refused_with_exit_code_2(tmp_path, ref, cache, capsys):
    from safetensors.torch import load_file, save_file

    from sdvgen_core.cli import _tiny_model_dir
    from tiny_lora import write_tiny_lora

    good = write_tiny_lora(_tiny_model_dir(), tmp_path / "good.safetensors")
    tensors = load_file(good)
    key = sorted(tensors)[2]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"))
    out = tmp_path / "v.mp4"
    assert generate(ref, out, *FAST, "--lora", str(tmp_path / "inf.safetensors")) == 2
    assert f"NaN or infinite values at '{key}'" in capsys.readouterr().err
    assert not out.exists()


def test_tiny_model_command_writes_a_loadable_folder(tmp_path):
    from sdvgen_core.pipeline import SDVGenPipeline

    assert main(["tiny-model", str(tmp_path / "CogVideoX-tiny")]) == 0
    pipe = SDVGenPipeline.from_model_dir(tmp_path / "CogVideoX-tiny", dtype="fp32")
    assert pipe.cls_info.row == "existing"


def test_tiny_model_never_writes_over_a_folder_with_files(tmp_path, capsys):
    real = tmp_path / "CogVideoX-5b"
    (real / "transformer").mkdir(parents=True)
    (real / "transformer" / "config.json").write_text("{}")
    assert main(["tiny-model", str(real)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in real.rglob("*")) == ["config.json", "transformer"]
    (tmp_path / "file").write_text("x")
    assert main(["tiny-model", str(tmp_path / "file")]) == 2
    assert main(["tiny-model", str(real), "--overwrite"]) == 0
    assert (real / "model_index.json").is_file()


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


def test_write_mp4_refuses_to_overwrite_unless_asked(tmp_path):
    import torch

    from sdvgen_core.errors import NonFiniteError, SDVGenError
    from sdvgen_core.files import OutputExistsError, atomic_output
    from sdvgen_core.video import write_mp4

    path = tmp_path / "clip.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="clip.mp4' exists"):
        write_mp4(torch.rand(3, 3, 16, 16), path)
    assert path.read_bytes() == b"precious"
    write_mp4(torch.rand(3, 3, 16, 16), path, overwrite=True)
    assert probe(path) == (3, (16, 16, 3))
    # A file that appears while the video is being written is not replaced either.
    late = tmp_path / "late.mp4"
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        with atomic_output(late, overwrite=False) as tmp_name:
            open(tmp_name, "wb").write(b"new")
            late.write_bytes(b"theirs")
    assert late.read_bytes() == b"theirs"
    frames = torch.rand(3, 3, 16, 16)
    frames[1, 0, 2, 2] = float("nan")
    for bad, message in ((frames, "NaN or infinite"), (torch.rand(3, 16, 16), "must be \\[T, 3, H, W\\]"),
                         (torch.rand(2, 3, 15, 16), "must be even")):
        with pytest.raises(SDVGenError, match=message):
            write_mp4(bad, tmp_path / "new.mp4")
    with pytest.raises(NonFiniteError):
        write_mp4(frames, tmp_path / "new.mp4")
    for bad, message in ((torch.rand(2, 3, 16, 16) * 2 - 1, "values from -"), (torch.rand(2, 3, 16, 16).double() * 255, "to 2")):
        with pytest.raises(SDVGenError, match=message):
            write_mp4(bad, tmp_path / "new.mp4")
    as_float = torch.rand(2, 3, 16, 16)
    write_mp4(as_float, tmp_path / "float.mp4")
    write_mp4((as_float * 255).round().to(torch.uint8), tmp_path / "uint8.mp4")
    assert (tmp_path / "float.mp4").read_bytes() == (tmp_path / "uint8.mp4").read_bytes()  # same pixels, same file
    for name in ("float.mp4", "uint8.mp4"):
        (tmp_path / name).unlink()
    with pytest.raises(SDVGenError, match="fps=0 is out of range"):
        write_mp4(torch.rand(2, 3, 16, 16), tmp_path / "new.mp4", fps=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "late.mp4"]  # no temporary files left
