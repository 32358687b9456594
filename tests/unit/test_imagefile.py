"""Decoding and normalisation of the image kinds users bring, and the reasons for rejecting files."""

import cv2
import numpy as np
import pytest

from msbt.images.imagefile import ImageError, read_image, to_rgb8


def noise(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    return rng.integers(0, hi, size=shape, endpoint=True).astype(dtype)


def test_gray_bmp_becomes_three_equal_channels(tmp_path):
    gray = noise((40, 50))
    cv2.imwrite(str(tmp_path / "a.bmp"), gray)
    rgb = read_image(tmp_path / "a.bmp")
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_color_png_is_returned_in_rgb_order(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[0, 0] = (0, 0, 10)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)


def test_rgba_is_composited_over_black(tmp_path):
    bgra = np.zeros((20, 20, 4), np.uint8)
    bgra[..., 2] = 200  # red
    bgra[..., 3] = 255
    bgra[:10, :, 3] = 0  # top half transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgb = read_image(tmp_path / "a.png")
    assert (rgb[:10] == 0).all() and (rgb[10:, :, 0] == 200).all()


def test_sixteen_bit_policies(tmp_path):
    img = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in 16 bits
    img[0, 0] = 0
    cv2.imwrite(str(tmp_path / "a.png"), img)
    scaled = read_image(tmp_path / "a.png", sixteen_bit="scale")
    stretched = read_image(tmp_path / "a.png", sixteen_bit="minmax")
    assert scaled.max() == round(4095 / 257)  # full 16-bit range mapped linearly
    assert stretched.min() == 0 and stretched.max() == 255
    full = np.array([[0, 65535]], np.uint16).repeat(8, 0).repeat(4, 1)
    assert set(np.unique(to_rgb8(full))) == {0, 255}


def test_float_images():
    img = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    assert to_rgb8(img).max() == 255
    with pytest.raises(ImageError, match="NaN"):
        to_rgb8(np.full((10, 10), np.nan, np.float32))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("notes.txt", b"hello", "not an image file"),
        ("junk.png", b"this is not a png at all", "cannot be decoded"),
    ],
)
def test_reject_reasons(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        read_image(tmp_path / name)
    assert info.value.path == str(tmp_path / name)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_truncated_files_are_named_truncated(tmp_path, ext):
    ok, buf = cv2.imencode(ext, noise((64, 64, 3)))
    data = buf.tobytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ImageError, match="truncated"):
        read_image(tmp_path / f"cut{ext}")
    (tmp_path / f"whole{ext}").write_bytes(data)
    assert read_image(tmp_path / f"whole{ext}").shape == (64, 64, 3)


def test_blank_and_tiny_images_are_rejected(tmp_path):
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((32, 32), 7, np.uint8))
    with pytest.raises(ImageError, match="blank image"):
        read_image(tmp_path / "blank.png")
    cv2.imwrite(str(tmp_path / "tiny.png"), noise((4, 40)))
    with pytest.raises(ImageError, match="too small"):
        read_image(tmp_path / "tiny.png")


def test_clahe_evens_out_a_depth_dependent_gain():
    """CLAHE ("intensity: clahe") brings a frame whose lower half is darker (another scanner's time-gain
    compensation) close to the evenly lit one; the grey content stays grey."""
    from msbt.images.imagefile import normalize_intensity

    rng = np.random.default_rng(0)
    tissue = rng.uniform(60, 160, (128, 128)).astype(np.float32)
    even = np.dstack([tissue] * 3).astype(np.uint8)
    ramp = np.linspace(1.0, 0.4, 128, dtype=np.float32)[:, None]
    dim = np.dstack([tissue * ramp] * 3).astype(np.uint8)
    a, b = normalize_intensity(even, "clahe"), normalize_intensity(dim, "clahe")
    assert a.shape == even.shape and a.dtype == np.uint8 and np.array_equal(b[..., 0], b[..., 2])
    before = abs(dim[96:].mean() - even[96:].mean())
    after = abs(b[96:].astype(float).mean() - a[96:].astype(float).mean())
    assert after < 0.7 * before, (before, after)  # 58 -> 37 grey levels with these numbers


def test_equalize_removes_a_global_gain_and_contrast_difference():
    """Histogram equalisation ("intensity: equalize") maps one frame and the same frame at another scanner's
    gain and dynamic range (grey = 0.5 * grey + 20) to nearly the same image, since it depends on the grey
    levels' order only; colour images keep their hue (only lightness changes)."""
    from msbt.images.imagefile import normalize_intensity

    rng = np.random.default_rng(0)
    tissue = rng.uniform(30, 220, (128, 128)).astype(np.float32)
    frame = np.dstack([tissue] * 3).astype(np.uint8)
    other = np.dstack([0.5 * tissue + 20] * 3).astype(np.uint8)
    a, b = normalize_intensity(frame, "equalize"), normalize_intensity(other, "equalize")
    assert a.dtype == np.uint8 and np.array_equal(b[..., 0], b[..., 2])
    before = np.abs(frame.astype(float) - other).mean()
    after = np.abs(a.astype(float) - b).mean()
    assert after < 0.1 * before, (before, after)
    assert a.min() <= 2 and a.max() >= 253  # spread over the whole range
    colour = frame.copy()
    colour[..., 0] = np.clip(tissue + 30, 0, 255).astype(np.uint8)  # a reddish overlay
    out = normalize_intensity(colour, "equalize")
    assert out.shape == colour.shape and (out[..., 0].astype(int) - out[..., 2]).mean() > 10
