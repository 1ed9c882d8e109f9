"""
Tests for data.py: buckets, folder scanning, the latent and caption caches (reuse, invalidation, equality
with a direct encode), caption dropout with cached features, and the deterministic, resumable batches.
CPU only, offline, tiny random models from tinyworld.make_demo_weights.

    python -m pytest -q test_data.py
"""
import gc
import math
import os
import struct
import time
import warnings
import weakref
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFilter

import data
import files
import lumina2
import tinyworld
import weightfiles

SYS = lumina2.SYSTEM_PROMPTS["base"]




@pytest.fixture
def demo(tmp_path):
    return tinyworld.make_demo_dataset(str(tmp_path / "images"), n=6)


def count_calls(monkeypatch, obj, name):
    """Wrap obj.name so that calls[0] counts the batch rows it was given."""
    calls, inner = [0], getattr(obj, name)

    def wrapped(x, *args, **kwargs):
        calls[0] += len(x)
        return inner(x, *args, **kwargs)
    monkeypatch.setattr(obj, name, wrapped)
    return calls

# -----------------------------------------------------------------------------
# buckets and pixels


def test_bucket_sizes_official_rule():
    sizes = data.bucket_sizes(1024)
    # the official walk (generate_crop_size_list(4096, 16, 4.0)) visits 193 sizes, not the 51 the spec quotes
    assert len(sizes) == len(set(sizes)) == 193
    assert (1024, 1024) in sizes and sizes[0] == (2048, 512) and sizes[-1] == (512, 2048)
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= 1024 * 1024 and w * h >= 0.9 * 1024 * 1024
        assert max(w, h) / min(w, h) <= 4.0
    assert sorted((h, w) for w, h in sizes) == sorted(sizes)  # symmetric: every wide size has its tall twin
    assert (80, 48) in data.bucket_sizes(64) and (48, 80) in data.bucket_sizes(64)


def test_nearest_bucket():
    sizes = data.bucket_sizes(1024)
    assert data.nearest_bucket(1000, 1000, sizes) == (1024, 1024)
    assert data.nearest_bucket(512, 512, sizes) == (1024, 1024)
    assert data.nearest_bucket(10000, 100, sizes) == (2048, 512)
    assert data.nearest_bucket(100, 10000, sizes) == (512, 2048)
    w, h = data.nearest_bucket(1920, 1080, sizes)
    assert abs(math.log(w / h) - math.log(16 / 9)) < 0.02


def test_resize_cover_crop_keeps_the_centre():
    img = Image.new("RGB", (300, 100), (255, 0, 0))  # red | green | blue thirds
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = data.resize_cover_crop(img, 96, 96)
    assert out.size == (96, 96)
    x = data.to_tensor(out)
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    centre = x[:, 10:-10, 10:-10]
    assert torch.allclose(centre[1], torch.ones(1)) and torch.allclose(centre[0], -torch.ones(1))
    wide = data.resize_cover_crop(Image.new("RGB", (50, 40)), 80, 48)  # upscale to cover, then crop
    assert wide.size == (80, 48)


def resize_then_crop(img, w, h):
    """The former pipeline: resize the whole image to cover w x h, then cut the centre at whole pixels."""
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.resize((nw, nh), Image.LANCZOS).crop((left, top, left + w, top + h))


def photo_like(w, h, seed=0):
    """Smooth colour gradients, 30 discs with soft edges and fine grain: detail at every scale, as in a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([128 + 100 * np.sin(6 * x + 3 * y), 128 + 100 * np.cos(5 * y - 2 * x), 128 + 90 * np.sin(9 * x * y)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 60)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=float)
    grain = Image.fromarray(np.clip(128 + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    return Image.fromarray(np.clip(img + np.asarray(grain, dtype=float) - 128, 0, 255).astype(np.uint8))


def test_crop_box_matches_resize_then_crop():
    # where the former pipeline's sizes and offsets were whole pixels, the box gives the very same pixels
    for (W, H), (w, h) in [((640, 480), (512, 384)), ((300, 200), (512, 512)), ((1920, 1080), (1024, 576))]:
        img = photo_like(W, H)
        assert np.array_equal(np.asarray(data.resize_cover_crop(img, w, h)), np.asarray(resize_then_crop(img, w, h)))
    # elsewhere the former one rounded the size and floored the offset: up to half an output pixel off centre
    # (1000 x 700 -> 731 x 512, cut from x = 109, where the centre is at 109.5). Measured here: mean |diff|
    # 0.97/255, max 43/255 at the discs' edges, 99% of values within 9/255; the box is the exact centre.
    img = photo_like(1000, 700)
    diff = np.abs(np.asarray(data.resize_cover_crop(img, 512, 512), dtype=float) - np.asarray(resize_then_crop(img, 512, 512), dtype=float))
    assert diff.mean() < 1.5 and diff.max() < 64 and np.percentile(diff, 99) <= 12


def test_extreme_strip_is_not_resized_whole(monkeypatch):
    """A 20000 x 4 strip at 512 x 128: resize-then-crop makes a 640000 x 128 image first (about 1 s; 20000 x 20
    at 512 x 512 makes 512000 x 512, 1 GB and 4 s); the box resizes straight to 512 x 128."""
    sizes, resize = [], Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    img = Image.new("RGB", (20000, 4), (10, 200, 30))
    t = time.perf_counter()
    out = data.resize_cover_crop(img, 512, 128)
    seconds = time.perf_counter() - t
    assert out.size == (512, 128) and np.asarray(out)[64, 256].tolist() == [10, 200, 30]
    assert sizes and all(w * h <= 512 * 128 for w, h in sizes), sizes
    assert seconds < 0.5, seconds  # measured 0.001 s


def test_extreme_upscale_and_crop_warn_once_per_file(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "tiny.png")  # 8 x 8 at 256 x 256: 32x
    Image.new("RGB", (2000, 64), (0, 200, 0)).save(tmp_path / "strip.png")  # 2x into 512 x 128, which keeps 256 x 64 of it
    Image.new("RGB", (300, 240), (0, 0, 200)).save(tmp_path / "normal.png")
    for name in ("tiny", "strip", "normal"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = data.Dataset(str(tmp_path), resolution=256, flip=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # loaded twice, and mirrored: still one warning per file and kind
            for i in range(len(ds)):
                ds.pixels(i, False), ds.pixels(i, True)
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2, said
    assert said[0].startswith(str(tmp_path / "strip.png")) and "keeps 12.8% of the image" in said[0]
    assert said[1].startswith(str(tmp_path / "tiny.png")) and "upscaled 32.0x" in said[1]


def test_to_tensor_range():
    x = data.to_tensor(Image.new("RGB", (4, 2), (0, 255, 128)))
    assert x.shape == (3, 2, 4)
    assert x[0].eq(-1).all() and x[1].eq(1).all() and abs(x[2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6

def write_png16(path, a, transparent=None):
    """A 16-bit PNG written from the spec (Pillow cannot write 16-bit RGB): a (H, W) uint16 array as greyscale
    (colour type 0), (H, W, 3) as RGB (colour type 2); `transparent`: a grey value made transparent (tRNS)."""
    h, w = a.shape[:2]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if a.ndim == 2 else 2, 0, 0, 0)
    extra = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def to_8bit_reference(a):
    """round(v / 257) in integers: 16-bit 0..65535 -> 8-bit 0..255."""
    return (a.astype(np.int64) * 255 + 32767) // 65535


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")  # what Pillow opens it as: convert() would clip it
    got = np.asarray(data.load_image(str(tmp_path / "g16.png"))).astype(int)  # (16, 64, 3)
    want = to_8bit_reference(ramp)
    assert np.abs(got - want[..., None]).max() <= 1
    Image.fromarray(want.astype(np.uint8), "L").save(tmp_path / "g8.png")  # the same picture, written in 8 bits
    x16, x8 = (data.to_tensor(data.load_image(str(tmp_path / f))) for f in ("g16.png", "g8.png"))
    assert (x16 - x8).abs().max() <= 1 / 127.5 + 1e-6
    write_png16(tmp_path / "t16.png", ramp, transparent=0)  # 16-bit tRNS: the black corner is transparent -> white
    t = np.asarray(data.load_image(str(tmp_path / "t16.png"))).astype(int)
    assert (t[0, 0] == 255).all() and np.abs(t[:, 1:] - want[:, 1:, None]).max() <= 1


def test_16bit_mid_grey_trains_as_mid_grey(tmp_path):
    (tmp_path / "grey").mkdir()
    Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(tmp_path / "grey" / "g.png")  # 32896 = 128 x 257
    (tmp_path / "grey" / "g.txt").write_text("grey")
    ds = data.Dataset(str(tmp_path / "grey"), resolution=64)
    x = ds.pixels(0, False)  # what the AE encodes; the old convert("RGB") gave a mean of about +0.99 (white)
    assert abs(x.mean().item() - (128 / 127.5 - 1)) < 1e-3
    assert abs(data.to_tensor(Image.open(tmp_path / "grey" / "g.png")).mean().item() - (128 / 127.5 - 1)) < 1e-3


def test_high_bit_depth_modes_in_memory():
    ramp = np.linspace(0, 65535, 256).round().reshape(4, 64)
    want = to_8bit_reference(ramp.astype(np.uint16))
    as_int = files.to_8bit(Image.fromarray(ramp.astype(np.int32)))  # mode I, as some Pillow versions open 16-bit PNGs
    assert as_int.mode == "L" and np.abs(np.asarray(as_int).astype(int) - want).max() <= 1
    small = np.arange(256, dtype=np.int32).reshape(4, 64)  # mode I holding 8-bit values: kept as they are
    assert np.array_equal(np.asarray(files.to_8bit(Image.fromarray(small))), small)
    unit = files.to_8bit(Image.fromarray((ramp / 65535).astype(np.float32)))  # mode F in [0, 1]: x 255
    assert np.abs(np.asarray(unit).astype(int) - want).max() <= 1
    wide = files.to_8bit(Image.fromarray(np.array([[-5, 0, 100.4, 300]], np.float32)))  # mode F outside [0, 1]: clipped
    assert np.asarray(wide).tolist() == [[0, 0, 100, 255]]


def test_16bit_rgb_png_opens_scaled(tmp_path):
    """Pillow cannot write a 48-bit PNG (Image.fromarray refuses (H, W, 3) uint16), so the file is written
    by hand; Pillow opens it as 8-bit RGB, already scaled (it keeps the high byte, within 1 of round(v/257))."""
    rgb = np.random.default_rng(0).integers(0, 65536, (8, 16, 3)).astype(np.uint16)
    write_png16(tmp_path / "rgb48.png", rgb)
    got = np.asarray(data.load_image(str(tmp_path / "rgb48.png"))).astype(int)
    assert np.abs(got - to_8bit_reference(rgb)).max() <= 1


def test_exif_rotation_and_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, displayed rotated by 90 degrees: 20x40
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert data.image_size(str(tmp_path / "r.jpg")) == (20, 40)
    assert data.load_image(str(tmp_path / "r.jpg")).size == (20, 40)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert data.load_image(str(tmp_path / "t.png")).getpixel((3, 3)) == (255, 255, 255)

# -----------------------------------------------------------------------------
# scanning


def test_scan_skips_corrupt_and_truncated_images(tmp_path, capsys):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a good image\n")
    (tmp_path / "noise.png").write_bytes(os.urandom(2000))
    buf = tmp_path / "full.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    buf.unlink()
    png = tmp_path / "full.png"
    Image.effect_noise((256, 256), 64).convert("RGB").save(png)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "cut.PNG").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    png.unlink()
    for p in ["noise", "cut", "sub/cut"]:
        (tmp_path / f"{p}.txt").write_text("caption")
    items = data.scan_folder(str(tmp_path))
    out = capsys.readouterr().out
    assert items == [(str(tmp_path / "good.png"), "a good image")]
    for bad in ["noise.png", "cut.jpg", os.path.join("sub", "cut.PNG")]:
        assert str(tmp_path / bad) in out
    assert "3 unreadable image(s) skipped" in out
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_scan_missing_caption_warns(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.JPG")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.webp")
    (tmp_path / "b.txt").write_text("\ufeff  a webp picture \n")
    with pytest.warns(UserWarning, match="a.txt"):
        items = data.scan_folder(str(tmp_path))
    assert items == [(str(tmp_path / "a.JPG"), ""), (str(tmp_path / "b.webp"), "a webp picture")]


def test_scan_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no usable images") as e:
        data.scan_folder(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        data.scan_folder(str(tmp_path / "missing"))


def test_captions_not_utf8_are_all_listed_with_offsets(tmp_path):
    tinyworld.make_demo_dataset(str(tmp_path), n=14)
    for k in range(12):  # Latin-1 "café" in 12 of the 14 captions: 0xe9 is not UTF-8
        (tmp_path / f"shape_{k:03d}.txt").write_bytes(b"caf\xe9")
    (tmp_path / "shape_000.txt").write_bytes(b"\xef\xbb\xbf" + b"a" * 10000 + b"\xe9")  # past Python's first read chunk, after a BOM
    with pytest.raises(files.BadInput) as e:
        data.Dataset(str(tmp_path), resolution=64)
    said = str(e.value)
    assert "12 caption file(s) are not UTF-8" in said and "re-save them as UTF-8" in said and "and 2 more" in said
    assert sum(os.path.join(str(tmp_path), "shape_") in line for line in said.splitlines()) == 10
    assert f"{tmp_path / 'shape_000.txt'}: byte 0xe9 at offset 10003" in said
    assert f"{tmp_path / 'shape_001.txt'}: byte 0xe9 at offset 3" in said
    assert str(tmp_path / "shape_012.txt") not in said


def test_metadata_file_not_utf8_or_not_json_names_the_place(tmp_path):
    tinyworld.make_demo_dataset(str(tmp_path / "img"), n=1)
    meta = tmp_path / "meta.json"
    meta.write_bytes(b'{"shape_000": {"caption": "caf\xe9"}}')
    with pytest.raises(files.BadInput, match=r"meta\.json is not UTF-8 \(byte 0xe9 at offset 30\): re-save it as UTF-8"):
        data.scan_metadata(str(meta), str(tmp_path / "img"))
    meta.write_text('{"shape_000": {"caption": "a"},\n "shape_001" {"caption": "b"}}')
    with pytest.raises(files.BadInput, match=r"meta\.json' is not valid JSON: line 2, column 14: Expecting ':' delimiter"):
        data.scan_metadata(str(meta), str(tmp_path / "img"))


def test_demo_dataset_is_deterministic(tmp_path):
    a = tinyworld.make_demo_dataset(str(tmp_path / "a"), n=6)
    b = tinyworld.make_demo_dataset(str(tmp_path / "b"), n=6)
    for name in sorted(os.listdir(a)):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    sizes = {Image.open(os.path.join(a, f)).size for f in os.listdir(a) if f.endswith(".png")}
    assert sizes == {(64, 64), (80, 48), (48, 80)}
    assert open(os.path.join(a, "shape_000.txt")).read().strip().endswith("background")

# -----------------------------------------------------------------------------
# caches


def test_latents_equal_a_direct_encode(demo, ae):
    ds = data.Dataset(demo, resolution=64, flip=True)
    assert ds.cache_latents(ae) == (0, 2 * len(ds))
    for i in [0, 1, 2]:
        path, _ = ds.items[i]
        x = data.to_tensor(data.resize_cover_crop(Image.open(path).convert("RGB"), *ds.buckets[i]))[None]
        with torch.no_grad():
            assert torch.equal(ds.latents[(i, False)], ae.encode(x)[0])
            assert torch.equal(ds.latents[(i, True)], ae.encode(x.flip(-1))[0])
        w, h = ds.buckets[i]
        assert ds.latents[(i, False)].shape == (16, h // 8, w // 8)


def test_latent_cache_reuse_and_rebuild(demo, ae, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    ds = data.Dataset(demo, resolution=64)
    calls = count_calls(monkeypatch, ae, "encode")
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1", batch_size=4) == (0, len(ds))
    first = {k: data.cache_get(ds.latents, k) for k in ds.latents}
    n = calls[0]
    assert n == len(ds)

    ds = data.Dataset(demo, resolution=64)  # a fresh run: everything is reused, nothing encoded
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1") == (len(ds), 0)
    assert calls[0] == n
    assert all(torch.equal(first[k], data.cache_get(ds.latents, k)) for k in first)

    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-2") == (0, len(ds))  # another AE file
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1", sample=True) == (0, len(ds))  # another mode
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1", sample=True) == (len(ds), 0)

    path = ds.items[0][0]  # a changed image: only that one is re-encoded
    Image.new("RGB", Image.open(path).size, (9, 99, 199)).save(path)
    os.utime(path, ns=(1, 1))
    ds = data.Dataset(demo, resolution=64)
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1") == (len(ds) - 1, 1)
    assert not torch.equal(first[(0, False)], data.cache_get(ds.latents, (0, False)))
    os.utime(ds.items[1][0], ns=(2, 2))  # same bytes, new mtime: re-encoded too (identity is path, size, mtime)
    assert data.Dataset(demo, resolution=64).cache_latents(ae, cache_dir=cache, ae_id="ae-1") == (len(ds) - 1, 1)

    ds = data.Dataset(demo, resolution=80)  # another resolution: other buckets, all re-encoded
    assert ds.cache_latents(ae, cache_dir=cache, ae_id="ae-1") == (0, len(ds))


def test_broken_cache_file_is_rebuilt(demo, ae, tmp_path):
    cache = str(tmp_path / "cache")
    ds = data.Dataset(demo, resolution=64)
    ds.cache_latents(ae, cache_dir=cache, ae_id="ae")
    with open(ds.latents[(0, False)], "r+b") as f:
        f.truncate(10)
    assert data.Dataset(demo, resolution=64).cache_latents(ae, cache_dir=cache, ae_id="ae") == (len(ds) - 1, 1)


def test_sampled_latents_are_reproducible(demo, ae):
    a, b = data.Dataset(demo, resolution=64), data.Dataset(demo, resolution=64)
    a.cache_latents(ae, sample=True, batch_size=1)
    b.cache_latents(ae, sample=True, batch_size=4)
    mean = data.Dataset(demo, resolution=64)
    mean.cache_latents(ae)
    assert all(torch.allclose(a.latents[k], b.latents[k], atol=1e-5) for k in a.latents)
    assert not torch.allclose(a.latents[(0, False)], mean.latents[(0, False)])


def test_text_cache_reuse_and_rebuild(demo, te, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    ds = data.Dataset(demo, resolution=64)
    distinct = len({c for _, c in ds.items} | {""})
    calls = count_calls(monkeypatch, te, "forward")
    assert ds.cache_text(te, SYS, 256, cache_dir=cache, te_id="gemma-1") == (0, distinct)
    assert calls[0] == distinct
    ds = data.Dataset(demo, resolution=64)
    assert ds.cache_text(te, SYS, 256, cache_dir=cache, te_id="gemma-1") == (distinct, 0)
    assert calls[0] == distinct
    align = lumina2.SYSTEM_PROMPTS["align"]
    assert ds.cache_text(te, align, 256, cache_dir=cache, te_id="gemma-1") == (0, distinct)
    assert ds.cache_text(te, SYS, 20, cache_dir=cache, te_id="gemma-1") == (0, distinct)
    assert all(data.cache_get(ds.text, c).shape[0] <= 20 for c in ds.text)
    assert ds.cache_text(te, SYS, 256, cache_dir=cache, te_id="gemma-2") == (0, distinct)

    caption = ds.items[0][1]  # the cache holds the valid tokens of a direct encode
    feats, mask = te([caption], SYS)
    torch.testing.assert_close(data.cache_get(ds.text, caption), feats[0, : int(mask.sum())], atol=1e-5, rtol=1e-5)


def test_truncation_warning_names_the_caption_file(demo, weights):
    """The demo prompts are 55 to 70 tokens with the system prompt; one caption made 150 tokens long is the one
    truncated at 100, and its warning names its file and quotes it (not the system prompt every prompt starts with)."""
    te = weightfiles.load_text_encoder(weights["gemma"], dtype=torch.float32, max_length=100)
    long = "a red circle on a white background " * 8
    with open(os.path.join(demo, "shape_003.txt"), "w") as f:
        f.write(long)
    ds = data.Dataset(demo, resolution=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.cache_text(te, SYS, 256)
    said = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(os.path.join(demo, "shape_003.txt") + ": caption of ")
    assert "truncated to 100 tokens (gemma2_max_token_length" in said[0] and f"it starts {long.strip()[:60]!r}" in said[0]
    with pytest.warns(UserWarning, match=r"^prompt of \d+ tokens truncated to 100 tokens"):  # a bare prompt, unnamed
        te.tokenize([long * 2])


def test_dataset_holds_no_model(demo, weights):
    ae = weightfiles.load_ae(weights["ae"], dtype=torch.float32)
    te = weightfiles.load_text_encoder(weights["gemma"], dtype=torch.float32)
    ds = data.Dataset(demo, resolution=64)
    ds.cache_latents(ae)
    ds.cache_text(te, SYS, 256)
    refs = [weakref.ref(ae), weakref.ref(te)]
    del ae, te
    gc.collect()
    assert all(r() is None for r in refs)
    assert next(ds.batches(2, seed=0, epoch=0))["latents"].dtype == torch.float32

# -----------------------------------------------------------------------------
# caption dropout and batches


@pytest.fixture
def cached(demo, ae, te):
    ds = data.Dataset(demo, resolution=64, flip=True, repeats=2)
    ds.cache_latents(ae)
    ds.cache_text(te, SYS, 256)
    return ds


def test_batches_require_caches(demo):
    ds = data.Dataset(demo, resolution=64)
    with pytest.raises(RuntimeError, match="cache_latents"):
        next(ds.batches(2, seed=0, epoch=0))


def test_caption_dropout_uses_the_cached_empty_caption(cached, te):
    empty, mask = te([""], SYS)  # "" still gets the system prompt
    empty = empty[0, : int(mask.sum())]
    n_empty = empty.shape[0]
    for b in cached.batches(4, seed=0, epoch=0, caption_dropout=1.0):
        assert b["captions"] == [""] * len(b["captions"])
        assert b["cap_mask"].sum(1).eq(n_empty).all()
        for f in b["cap_feats"]:
            assert torch.equal(f[:n_empty], data.cache_get(cached.text, ""))
            torch.testing.assert_close(f[:n_empty], empty, atol=1e-5, rtol=1e-5)
    for b in cached.batches(4, seed=0, epoch=0, caption_dropout=0.0):
        for f, m, c, p in zip(b["cap_feats"], b["cap_mask"], b["captions"], b["paths"]):
            assert c and c == dict(cached.items)[p]
            assert torch.equal(f[m], data.cache_get(cached.text, c))
            assert not (m.sum() == n_empty and torch.equal(f[:n_empty], empty))
    dropped = sum(c == "" for b in cached.batches(4, seed=0, epoch=0, caption_dropout=0.5) for c in b["captions"])
    assert 0 < dropped < 2 * len(cached)


def test_batches_deterministic_and_resumable(cached):
    def run(epoch, skip=0, p=0.3):
        return list(cached.batches(3, seed=7, epoch=epoch, caption_dropout=p, skip=skip))
    a, b = run(0), run(0)
    assert len(a) == cached.len_batches(3) == sum(math.ceil(2 * cached.buckets.count(k) / 3) for k in set(cached.buckets))
    assert [x["paths"] for x in a] == [x["paths"] for x in b]
    assert all(torch.equal(x["latents"], y["latents"]) and torch.equal(x["cap_feats"], y["cap_feats"]) for x, y in zip(a, b))
    assert [x["paths"] for x in run(1)] != [x["paths"] for x in a]
    assert [x["paths"] for x in run(0, p=0.0)] == [x["paths"] for x in a]  # dropout does not move the order
    paths = [p for x in a for p in x["paths"]]
    assert sorted(paths) == sorted(p for p, _ in cached.items for _ in range(2))  # repeats applied
    bucket = dict(zip((p for p, _ in cached.items), cached.buckets))
    for x in a:
        assert len({bucket[p] for p in x["paths"]}) == 1  # one bucket per batch
        w, h = bucket[x["paths"][0]]
        assert x["latents"].shape[1:] == (16, h // 8, w // 8) and x["latents"].dtype == torch.float32
        assert x["cap_mask"].dtype == torch.bool and x["cap_feats"].shape[:2] == x["cap_mask"].shape
        assert x["cap_mask"][:, 0].all() and x["cap_mask"].sum(1).max() == x["cap_mask"].shape[1]
    tail = run(0, skip=3)
    assert len(tail) == len(a) - 3
    for x, y in zip(tail, a[3:]):
        assert x["paths"] == y["paths"] and x["captions"] == y["captions"]
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["cap_feats"], y["cap_feats"])


def test_flip_is_drawn_per_item(cached):
    index = {p: i for i, (p, _) in enumerate(cached.items)}
    seen = set()
    for epoch in range(2):
        for x in cached.batches(4, seed=0, epoch=epoch):
            for lat, p in zip(x["latents"], x["paths"]):
                i = index[p]
                flipped = torch.equal(lat, cached.latents[(i, True)])
                assert flipped or torch.equal(lat, cached.latents[(i, False)])
                seen.add(flipped)
    assert seen == {True, False}
    plain = data.Dataset(os.path.dirname(cached.items[0][0]), resolution=64)
    plain.latents, plain.text = {k: v for k, v in cached.latents.items() if not k[1]}, cached.text
    assert all(not f for batch in plain.epoch_plan(4, 0, 0) for _, f, _ in batch)


def test_dataset_keeps_incomplete_batches(demo, ae, te):
    ds = data.Dataset(demo, resolution=64)
    ds.cache_latents(ae)
    ds.cache_text(te, SYS, 256)
    sizes = sorted(len(x["paths"]) for x in ds.batches(3, seed=0, epoch=0))
    counts = [ds.buckets.count(b) for b in set(ds.buckets)]
    assert sum(sizes) == len(ds) and len(sizes) == sum(math.ceil(c / 3) for c in counts)
    assert min(sizes) == min(c % 3 or 3 for c in counts)

