"""Reference preprocessing (fit modes, masks, any image kind) and VAE encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from PIL import Image

from sdvgen_core.errors import SDVGenError
from sdvgen_core.reference import encode_reference, image_to_tensor, load_image, prepare_reference_image

from conftest import draw_subject

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(width=200, height=100):
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = RED
    image[:, width // 2 :] = BLUE
    return image


@pytest.mark.parametrize(
    "image",
    [
        draw_subject((123, 77)),
        draw_subject((300, 500), mode="RGBA"),
        draw_subject((64, 64)).convert("L"),
        np.random.default_rng(0).random((50, 90, 3)).astype(np.float32),
        torch.rand(3, 40, 70),
        torch.rand(1, 1, 40, 70),
    ],
    ids=["rgb", "rgba", "gray", "float-array", "tensor-chw", "tensor-gray-batch1"],
)
@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_any_image_is_fitted(image, fit):
    out = prepare_reference_image(image, 96, 160, fit=fit)
    assert out.shape == (1, 3, 96, 160)
    assert out.min() >= 0 and out.max() <= 1


def test_crop_keeps_aspect_and_centre():
    out = prepare_reference_image(halves(400, 100), 96, 96, fit="crop")[0]
    # a 4:1 image cropped to a square keeps the central quarter: left half red, right half blue
    assert torch.allclose(out[:, 48, 10], torch.tensor([1.0, 0, 0]), atol=0.02)
    assert torch.allclose(out[:, 48, 85], torch.tensor([0, 0, 1.0]), atol=0.02)


def test_pad_fills_outside_with_background():
    out = prepare_reference_image(halves(200, 100), 160, 160, fit="pad")[0]
    # 2:1 image inside a square: 40 px bands above and below are the white background
    assert torch.allclose(out[:, 5, 80], torch.ones(3))
    assert torch.allclose(out[:, 155, 80], torch.ones(3))
    assert torch.allclose(out[:, 80, 10], torch.tensor([1.0, 0, 0]), atol=0.02)


def test_stretch_fills_everything():
    out = prepare_reference_image(halves(200, 100), 160, 160, fit="stretch")[0]
    assert torch.allclose(out[:, 5, 5], torch.tensor([1.0, 0, 0]), atol=0.02)
    assert torch.allclose(out[:, 155, 155], torch.tensor([0, 0, 1.0]), atol=0.02)


def test_mask_blanks_background():
    image = draw_subject((160, 96), color=(200, 20, 20), background=(0, 200, 0))
    mask = np.zeros((96, 160), dtype=np.uint8)
    mask[24:72, 40:120] = 255  # ellipse bounding box
    out = prepare_reference_image(image, 96, 160, fit="stretch", subject_mask=Image.fromarray(mask))[0]
    assert torch.allclose(out[:, 2, 2], torch.ones(3))  # background -> white
    assert torch.allclose(out[:, 48, 80], torch.tensor([200, 20, 20]) / 255, atol=0.02)  # subject kept


def test_rgba_alpha_is_the_mask():
    image = draw_subject((160, 96), mode="RGBA", color=(10, 10, 200))
    out = prepare_reference_image(image, 96, 160, fit="stretch", background=0.5)[0]
    assert torch.allclose(out[:, 2, 2], torch.full((3,), 0.5))
    assert torch.allclose(out[:, 48, 80], torch.tensor([10, 10, 200]) / 255, atol=0.02)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": draw_subject(), "height": 100, "width": 160}, "multiples of 16"),
        ({"image": draw_subject(), "height": 96, "width": 160, "fit": "zoom"}, "fit mode 'zoom'"),
        ({"image": torch.rand(2, 3, 32, 32), "height": 96, "width": 160}, "batch has 2 images"),
        ({"image": torch.rand(5, 32, 32), "height": 96, "width": 160}, "5 channels"),
        ({"image": "photo.png", "height": 96, "width": 160}, "PIL image, numpy array or torch tensor"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "height": 96, "width": 160}, "at least 8x8"),
        ({"image": draw_subject((64, 64)), "height": 96, "width": 160, "subject_mask": torch.ones(32, 32)},
         "same size"),
    ],
)
def test_bad_inputs(kwargs, message):
    with pytest.raises(SDVGenError, match=message):
        prepare_reference_image(**kwargs)


def test_encode_reference_matches_direct_vae_sample(tiny_model_dir):
    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    pixels = prepare_reference_image(draw_subject(), 96, 160)
    latents = encode_reference(vae, pixels, generator=torch.Generator().manual_seed(3))
    assert latents.shape == (1, 1, 16, 12, 20)
    with torch.no_grad():
        dist = vae.encode((pixels * 2 - 1)[:, :, None]).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(3)) * 0.7
    torch.testing.assert_close(latents, expected.permute(0, 2, 1, 3, 4))
    assert not torch.allclose(latents, dist.mean.permute(0, 2, 1, 3, 4) * 0.7)  # sampled, not the mean


def test_encode_reference_runs_on_the_execution_device_of_an_offloaded_vae(tiny_model_dir):
    # Sequential offload keeps the weights on the meta device until each layer runs; the input must go to
    # the execution device (the CPU here), not to where the weights are.
    from accelerate import cpu_offload

    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_model_dir, subfolder="vae").eval()
    pixels = prepare_reference_image(draw_subject(), 48, 64)
    expected = encode_reference(vae, pixels, generator=torch.Generator().manual_seed(3))
    cpu_offload(vae, execution_device=torch.device("cpu"))
    assert next(vae.parameters()).device.type == "meta"
    offloaded = encode_reference(vae, pixels, generator=torch.Generator().manual_seed(3), device="cpu")
    torch.testing.assert_close(offloaded, expected)


def jpeg_with_orientation(path, orientation):
    """A 40x20 image, left half red and right half blue, stored with an EXIF orientation tag."""
    image = Image.fromarray(halves(40, 20))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "PNG", exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 = "rotate 90° clockwise to display": the viewer shows a 20x40 image with red on top."""
    image = load_image(jpeg_with_orientation(tmp_path / "rotated.png", 6))
    rgb, _ = image_to_tensor(image)
    assert rgb.shape == (1, 3, 40, 20)
    torch.testing.assert_close(rgb[0, :, 5, 10], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(rgb[0, :, 35, 10], torch.tensor([0.0, 0.0, 1.0]))


def gradient16(width=64, height=16):
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def test_16_bit_gradient_keeps_its_values(tmp_path):
    """A 16-bit gray PNG (Pillow mode I;16) is scaled by 65535, not clipped at 255 (which made it white)."""
    values = gradient16()
    Image.fromarray(values).save(tmp_path / "gradient.png")
    image = load_image(tmp_path / "gradient.png")
    assert image.mode.startswith("I;16")
    rgb, _ = image_to_tensor(image)
    torch.testing.assert_close(rgb[0, 1], torch.from_numpy(values / 65535.0).float(), atol=1e-6, rtol=0)
    # The same values as a uint16 array and as a mode I image give the same picture.
    torch.testing.assert_close(image_to_tensor(values)[0], rgb)
    torch.testing.assert_close(image_to_tensor(Image.fromarray(values.astype(np.int32)))[0], rgb)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_images_are_read_by_range(scale):
    values = np.linspace(0, 1, 64 * 16, dtype=np.float32).reshape(16, 64)
    expected = torch.from_numpy(values)
    torch.testing.assert_close(image_to_tensor(Image.fromarray(values * scale, mode="F"))[0][0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(image_to_tensor(torch.from_numpy(values * scale)[None])[0][0, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "L", "YCbCr"])
def test_other_modes_become_rgb(mode):
    image = Image.fromarray(halves(40, 20)).convert(mode)
    rgb, alpha = image_to_tensor(image)
    assert rgb.shape == (1, 3, 20, 40)
    assert (alpha is not None) == (mode == "LA")
    expected = image_to_tensor(image.convert("RGB"))[0]
    torch.testing.assert_close(rgb, expected)


def test_srgb_and_unusable_icc_profiles_leave_pixels_alone(caplog):
    from PIL import ImageCms

    source = Image.fromarray(halves(40, 20))
    for profile, warned in (("sRGB", False), ("LAB", True)):  # a Lab profile cannot describe RGB pixels
        image = source.copy()
        image.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile(profile)).tobytes()
        caplog.clear()
        torch.testing.assert_close(image_to_tensor(image)[0], image_to_tensor(source)[0])
        assert ("ICC colour profile" in caplog.text) == warned


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.full((3, 16, 16), float("nan")), "reference image has NaN"),
        (np.full((16, 16, 3), np.inf, np.float32), "reference image has NaN"),
        (torch.full((3, 16, 16), -0.5), "values from -0.5"),
        (torch.full((3, 16, 16), 70000.0), "values up to 70000"),
        (np.zeros((16, 16, 3), dtype=np.complex64), "dtype complex64"),
    ],
)
def test_bad_pixel_values(image, message):
    with pytest.raises(SDVGenError, match=message):
        prepare_reference_image(image, 48, 64)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SDVGenError, match="cannot read the image '.*broken.png'"):
        load_image(bad)
    with pytest.raises(SDVGenError, match="missing.png.*does not exist"):
        load_image(tmp_path / "missing.png")


def test_mask_with_odd_values():
    image = draw_subject((64, 48))
    with pytest.raises(SDVGenError, match="subject mask has NaN"):
        prepare_reference_image(image, 48, 64, subject_mask=torch.full((48, 64), float("nan")))
    full = prepare_reference_image(image, 48, 64, subject_mask=torch.full((48, 64), 255.0))  # 0..255 mask
    torch.testing.assert_close(full, prepare_reference_image(image, 48, 64))


def icc_rgb_profile(red, green, blue, gamma=2.2) -> bytes:
    """A minimal ICC v2 display profile (matrix + gamma curves) built by hand: primaries as D50 XYZ."""
    import struct

    def s15(value):
        return struct.pack(">i", round(value * 65536))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    name = b"test profile"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(name) + 1) + name + b"\0" * 79
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table, data = table + signature + struct.pack(">II", offset + len(data), len(body)), data + body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acspAPPL" + b"\0" * 24 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def test_icc_profile_is_applied():
    """Pixels tagged with a profile whose red primary is sRGB's green show as green, as in a colour-managed viewer."""
    srgb_red, srgb_green, srgb_blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    for mode in ("RGB", "RGBA"):
        image = Image.fromarray(halves(40, 20)).convert(mode)
        image.info["icc_profile"] = icc_rgb_profile(srgb_green, srgb_red, srgb_blue)
        rgb, alpha = image_to_tensor(image)
        torch.testing.assert_close(rgb[0, :, 10, 5], torch.tensor([0.0, 1.0, 0.0]), atol=0.02, rtol=0)
        torch.testing.assert_close(rgb[0, :, 10, 35], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)
        assert (alpha is not None) == (mode == "RGBA")
