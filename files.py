"""
The user's files, so that a bad one is named and none half-written: the two failures a user sees as one line, atomic_write
(every writer uses it: LoRA, model, training state, caches, PNGs, bench), and reading captions and images, with a precise
message for what does not decode and a warning for what would train badly.

    python -c "import files; files.atomic_write('x.txt', lambda tmp: open(tmp, 'w').write('hi'))"
    python -c "import files; print(files.readable_image('photo.jpg'), files.read_text('photo.txt'))"
"""
import codecs
import contextlib
import json
import os
import shutil
import uuid
import warnings

import numpy as np
from PIL import Image


class BadInput(ValueError):
    """A problem with something the user brought (a weight file, an image, a caption, a value); its message says what to do.
    train.py and sample.py print it as one line; any other exception keeps its traceback, since that one is a bug."""


class WriteFailed(OSError):
    """A file could not be written (full disk, read-only folder, permissions); the file it was to replace, if any, is intact."""


def atomic_write(path, write):
    """write(tmp) into a temp file beside `path`, then rename it over `path`: a kill, a full disk or an error mid-write leaves
    the previous file as it was and no temp file behind. The temp name is unique per process and call; the file gets the
    umask's permissions, not the 0600 some writers use, so that another user's ComfyUI can read a LoRA."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free if os.path.exists(tmp) else None
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) or "I/O error" in str(e):  # safetensors' own error type, for one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if free is not None and free < 2**20:  # torch.save says "unexpected pos ..." for a full disk
                reason = f"no space left on the device: {free:,} bytes free, {reason}"
            raise WriteFailed(f"could not write {path} ({reason}); the file it was to replace, if any, is unchanged") from e
        raise


def save_file_atomic(tensors, path, metadata=None):
    """safetensors save through atomic_write, its header sorted: the same tensors and metadata give the same bytes."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: (save_file(tensors, tmp, metadata=metadata), sort_header(tmp)))


def sort_header(path):
    """Sort a safetensors file's JSON header keys in place, at the same length (data offsets stay valid): safetensors writes
    the metadata in a per-process order, so two runs saving the same tensors would write files of different sha256."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        text = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # the same keys and values, so the same length up to the padding
            f.seek(8)
            f.write(text.ljust(n))


# -----------------------------------------------------------------------------
# reading the user's captions and images


def to_8bit(img):
    """Greyscale of more than 8 bits (modes I;16*, I, F) -> mode L, or LA with a transparent value; others unchanged (16-bit
    RGB(A) and grey+alpha PNGs open as 8-bit). Pillow's convert() clips to 0..255, so a 16-bit PNG comes out almost white.
    Scaling: I;16* / 257; I (some Pillows' 16-bit PNG) / 257 when its max exceeds 255; F x 255 when in [0, 1]; else clipped."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    a = np.nan_to_num(np.asarray(img).astype(np.float64))  # (H, W)
    v = a
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255):
        v = a / 257
    elif img.mode == "F" and a.min() >= 0 and a.max() <= 1:
        v = a * 255
    grey = Image.fromarray(np.clip(np.round(v), 0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, (int, float)):  # a PNG tRNS grey value, in the image's own scale
        return Image.merge("LA", (grey, Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L")))
    return grey


WARNED = set()  # (path, kind) already warned about in this process: a file resized again (flipped, re-cached) warns once
MAX_UPSCALE, MIN_KEPT = 4.0, 0.5


def warn_extreme(path, scale, kept):
    """Warn once per file when its bucket enlarges it over MAX_UPSCALE times (it trains blurred) or the centre crop keeps
    under MIN_KEPT of its area (most never trains). scale: output px per source px; kept: the area fraction in the crop."""
    path = os.path.abspath(path)
    if scale > MAX_UPSCALE and (path, "upscale") not in WARNED:
        WARNED.add((path, "upscale"))
        warnings.warn(f"{path}: upscaled {scale:.1f}x to fill its bucket (more than {MAX_UPSCALE:g}x), so it trains "
                      f"blurred; use a larger image, or train it at a lower resolution")
    if kept < MIN_KEPT and (path, "crop") not in WARNED:
        WARNED.add((path, "crop"))
        warnings.warn(f"{path}: the centre crop to its bucket keeps {kept:.1%} of the image (less than {MIN_KEPT:.0%}); "
                      f"crop it yourself to an aspect of at most 4:1 to choose what trains")


def readable_image(path):
    """True when the image fully loads (a truncated JPEG passes verify() and fails on load()); else False, reason printed."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
        return True
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... all mean unusable
        print(f"skipping unreadable image {path}: {e}")
        return False


class NotUTF8(BadInput):
    """A text file that does not decode as UTF-8: its path, and where its first bad byte is."""
    def __init__(self, path):
        self.path, self.where = path, first_bad_byte(path)
        super().__init__(f"{path} is not UTF-8 ({self.where}): re-save it as UTF-8")


def first_bad_byte(path):
    """Where a file stops being UTF-8: "byte 0xff at offset 1234", counted from the file's start (a BOM included)."""
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:  # e.start counts from after the BOM
        return f"byte 0x{raw[bom + e.start]:02x} at offset {bom + e.start}"
    return "it decodes now: it changed while it was read"


def read_text(path):
    """A UTF-8 text file (a leading BOM dropped) -> str; else NotUTF8, naming the file and offset (UnicodeDecodeError can't)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise NotUTF8(path) from None


def not_utf8_message(errors, shown=10):
    """One message for many NotUTF8: the first `shown` files with their offsets, and the count."""
    lines = [f"  {e.path}: {e.where}" for e in errors[:shown]]
    more = [f"  ... and {len(errors) - shown} more"] if len(errors) > shown else []
    return "\n".join([f"{len(errors)} caption file(s) are not UTF-8; re-save them as UTF-8 (in most editors: "
                      f"Save As, encoding UTF-8):"] + lines + more)
