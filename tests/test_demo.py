"""
The demo's tiny world, judged from outside: does what it draws match the caption? The judge is plain geometry on
the decoded picture, written here without the models: the background is the border's median colour, the
foreground the largest connected region that differs from it, its colour the nearest palette entry to its median,
its shape the circle, square or triangle drawn in its bounding box that overlaps it best (intersection over union).

The module's fixture runs the README's demo as written (`python train.py config/demo.py`, into a temporary folder),
then samples through sample.py, 16 seeds per prompt. A control trains the same base on the same pictures with the
captions shuffled across them: its colours must fall to chance, or the judge is measuring something else.

    python -m pytest tests/test_demo.py -q            # about 4 minutes on 2 cores
    python tests/test_demo.py out/demo docs/demo.png  # the README's numbers and picture, for a finished demo
"""
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

# The palette, written here (test_palette_is_the_worlds checks it against tinyworld.py)
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
NEW = {"purple": (150, 40, 190)}  # the LoRA's colour; the base never sees it
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SEEDS = list(range(16))
TRAINED = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS]  # 36 prompts
PURPLE = [f"a purple {s} on a {b} background" for s in SHAPES for b in BACKGROUNDS]  # 9 prompts


# -----------------------------------------------------------------------------
# the judge


def nearest(rgb, table):
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k], float) - rgb) ** 2)))


def largest_region(mask):
    """The largest 4-connected True region of a (H, W) bool array, as a bool array (all False if none)."""
    h, w = mask.shape
    label = np.zeros((h, w), int)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0], stack, size = n, [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not label[v, u]:
                    label[v, u] = n
                    stack.append((v, u))
        if size > best_size:
            best, best_size = n, size
    return label == best if best else np.zeros_like(mask)


def shape_masks(box, h, w):
    """The three shapes filling box = (x0, y0, x1, y1) (inclusive pixels), drawn 4x larger and box-filtered down."""
    x0, y0, x1, y1 = (4 * v for v in box)
    x1, y1 = x1 + 3, y1 + 3
    out = {}
    for shape in SHAPES:
        im = Image.new("L", (4 * w, 4 * h), 0)
        draw = ImageDraw.Draw(im)
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=255)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=255)
        else:  # apex up, as the world draws them
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
        out[shape] = np.asarray(im.resize((w, h), Image.BOX)) > 127
    return out


def judge(img):
    """A picture -> (background, foreground colour, shape); colour and shape are None when nothing stands out."""
    a = np.asarray(img.convert("RGB"), dtype=float)  # (H, W, 3)
    h, w, _ = a.shape
    bg = nearest(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0), BACKGROUNDS)
    dist = np.linalg.norm(a - np.asarray(BACKGROUNDS[bg], float), axis=-1)  # (H, W)
    region = largest_region(dist > 80)
    if region.sum() < 8:
        return bg, None, None
    fg_rgb = np.median(a[region], axis=0)
    fg = nearest(fg_rgb, {**COLORS, **NEW})
    region = largest_region(dist > np.linalg.norm(fg_rgb - BACKGROUNDS[bg]) / 2)  # halfway between the two colours
    ys, xs = np.nonzero(region)
    masks = shape_masks((xs.min(), ys.min(), xs.max(), ys.max()), h, w)
    iou = {s: (m & region).sum() / (m | region).sum() for s, m in masks.items()}
    return bg, fg, max(iou, key=iou.get)


def caption_words(prompt):
    """'a red circle on a white background' -> ('white', 'red', 'circle'), the judge's order."""
    words = prompt.split()
    return words[5], words[1], words[2]


def accuracy(judged):
    """{prompt: [(bg, fg, shape), ...]} -> {prompt: (bg, colour, shape) fractions right}."""
    return {p: tuple(float(np.mean([j[k] == caption_words(p)[k] for j in js])) for k in range(3)) for p, js in judged.items()}


# -----------------------------------------------------------------------------
# the world, trained once per module by the README's command


def draw(world, prompts, out_dir, lora=True, dit=None):
    """Sample prompts x SEEDS through sample.py from a finished demo folder -> {prompt: [PNG path, ...]}."""
    import sample
    os.makedirs(out_dir, exist_ok=True)
    prompt_file = os.path.join(out_dir, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(prompts) + "\n")
    paths = sample.main([
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "sample_demo.py"),
        f"--dit_path={dit or os.path.join(world, 'base', 'demo_base.safetensors')}",
        f"--gemma_path={os.path.join(world, 'world', 'weights', 'gemma_2_2b_fp16.safetensors')}",
        f"--ae_path={os.path.join(world, 'world', 'ae.safetensors')}",
        f"--lora_weights={[os.path.join(world, 'demo_lora.safetensors')] if lora else []}",
        f"--prompt_file={prompt_file}", f"--seeds={SEEDS}", f"--batch_size={len(SEEDS)}", f"--out_dir={out_dir}", "--grid=False"])
    drawn = {p: [] for p in prompts}
    for path in paths:
        with Image.open(path) as im:
            drawn[json.loads(im.info["parameters"])["prompt"]].append(path)
    return drawn


def judged(drawn):
    """{prompt: [PNG path, ...]} -> {prompt: [judge(image), ...]}."""
    out = {}
    for prompt, paths in drawn.items():
        out[prompt] = []
        for path in paths:
            with Image.open(path) as im:
                out[prompt].append(judge(im))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo as the README runs it (config/demo.py), into a temporary folder: world, AE, base, LoRA."""
    import train
    out = str(tmp_path_factory.mktemp("demo"))
    train.main([os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "demo.py"),
                f"--output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def base_judged(world, tmp_path_factory):
    return accuracy(judged(draw(world, TRAINED + PURPLE, str(tmp_path_factory.mktemp("base")), lora=False)))


# -----------------------------------------------------------------------------
# the judge's own tests


def test_palette_is_the_worlds():
    import tinyworld
    assert tinyworld.DEMO_COLORS == COLORS and tinyworld.NEW_COLORS == NEW
    assert tinyworld.DEMO_BACKGROUNDS == BACKGROUNDS and tuple(tinyworld.DEMO_SHAPES) == SHAPES


@pytest.mark.parametrize("colors, seed", [(COLORS, 1), (NEW, 2)])
def test_judge_reads_the_training_pictures(tmp_path, colors, seed):
    """The world's own pictures (32x32, sizes and places varied): the judge must read them near perfectly."""
    import tinyworld
    folder = tinyworld.make_demo_dataset(str(tmp_path), n=120, size=32, seed=seed, colors=colors, square=True,
                                         sizes=(0.28, 0.42), jitter=0.06)
    judged = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            with open(os.path.join(folder, name[:-4] + ".txt")) as f, Image.open(os.path.join(folder, name)) as im:
                judged.setdefault(f.read().strip(), []).append(judge(im))
    acc = np.mean(list(accuracy(judged).values()), axis=0)
    assert acc[0] == 1.0 and acc[1] == 1.0 and acc[2] >= 0.98, acc


def test_judge_sees_nothing_on_a_plain_picture():
    assert judge(Image.new("RGB", (32, 32), (128, 128, 128))) == ("gray", None, None)


# -----------------------------------------------------------------------------
# the world's tests


def test_world_ae_draws_the_pictures_back(world):
    """The AE the demo trains: its reconstructions of the world's pictures keep the colours and most shapes."""
    import torch
    import data
    import weightfiles
    ae = weightfiles.load_ae(os.path.join(world, "world", "ae.safetensors"), dtype=torch.float32)
    folder = os.path.join(world, "world", "images")
    names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".png"))[:96]
    x = torch.stack([data.to_tensor(data.load_image(os.path.join(folder, n + ".png"))) for n in names])
    with torch.no_grad():
        y = ae.decode(ae.encode(x))
    judged = {}
    for n, img in zip(names, ((y / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        with open(os.path.join(folder, n + ".txt")) as f:
            judged.setdefault(f.read().strip(), []).append(judge(Image.fromarray(img)))
    acc = np.mean([a for p, a in accuracy(judged).items() for _ in judged[p]], axis=0)
    assert acc[0] == 1.0 and acc[1] >= 0.97 and acc[2] >= 0.85, acc


def test_base_draws_the_captions(base_judged):
    """The base, on all 36 captions it was trained on (4 colours x 3 shapes x 3 backgrounds), 16 seeds each.
    Chance is 1/3 for the background and the shape, 1/4 for the colour."""
    acc = np.array([base_judged[p] for p in TRAINED])  # (36, 3)
    print("\nbase, trained captions: background, colour, shape", acc.mean(axis=0), "worst caption", acc.min(axis=0))
    assert acc[:, 0].mean() >= 0.95 and acc[:, 1].mean() >= 0.90 and acc[:, 2].mean() >= 0.65, acc.mean(axis=0)
    assert acc[:, 0].min() >= 0.75 and acc[:, 1].min() >= 0.5, acc.min(axis=0)  # every caption, 16 seeds


def test_lora_teaches_purple(world, base_judged, tmp_path):
    """Purple: at most chance before the LoRA (the base never read the word), learned after; the known colours stay."""
    before = np.array([base_judged[p] for p in PURPLE])
    after = accuracy(judged(draw(world, PURPLE + TRAINED[::4], str(tmp_path))))
    new, old = np.array([after[p] for p in PURPLE]), np.array([after[p] for p in TRAINED[::4]])
    print("\npurple before the LoRA", before.mean(axis=0), "after", new.mean(axis=0), "trained captions after", old.mean(axis=0))
    assert before[:, 1].mean() <= 0.2, before.mean(axis=0)
    assert new[:, 1].mean() >= 0.75 and new[:, 2].mean() >= 0.5, new.mean(axis=0)
    assert old[:, 1].mean() >= 0.85, old.mean(axis=0)


def test_control_shuffled_captions_draw_chance_colours(world, tmp_path):
    """The same base, trained on the same pictures with their captions shuffled across them: the caption says nothing
    of the picture, so colours and backgrounds must fall to chance (1/4, 1/3). If this fails, the judge measures
    something other than what the caption asked for."""
    import train
    pictures = os.path.join(world, "world", "images")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = sorted(f[:-4] for f in os.listdir(pictures) if f.endswith(".png"))
    captions = [open(os.path.join(pictures, n + ".txt")).read() for n in names]
    random.Random(0).shuffle(captions)
    for n, caption in zip(names, captions):
        shutil.copy(os.path.join(pictures, n + ".png"), shuffled / (n + ".png"))
        (shuffled / (n + ".txt")).write_text(caption)
    weights = os.path.join(world, "world", "weights")
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
    train.main([os.path.join(config, "demo.py"), os.path.join(config, "demo_base.py"),  # as tinyworld.make_world runs it
                f"--dit_path={os.path.join(weights, 'lumina_2_model_bf16.safetensors')}",
                f"--gemma_path={os.path.join(weights, 'gemma_2_2b_fp16.safetensors')}",
                f"--ae_path={os.path.join(world, 'world', 'ae.safetensors')}", f"--train_data_dir={shuffled}",
                f"--output_dir={tmp_path / 'control'}", "--sample_prompts=[]"])
    seen = judged(draw(world, TRAINED, str(tmp_path / "samples"), lora=False, dit=str(tmp_path / "control" / "demo_base.safetensors")))
    acc = np.array(list(accuracy(seen).values()))
    shapes = np.mean([j[1] is not None for js in seen.values() for j in js])
    print("\ncontrol, trained captions: background, colour, shape", acc.mean(axis=0), "a shape drawn", shapes)
    assert acc[:, 1].mean() <= 0.4 and acc[:, 0].mean() <= 0.5, acc.mean(axis=0)
    assert shapes >= 0.9  # it still draws a shape on a background: only what the words say was cut


# -----------------------------------------------------------------------------
# the README's table


SHOWN = ["a red circle on a white background", "a blue square on a black background", "a yellow triangle on a gray background",
         "a purple circle on a white background", "a purple square on a black background", "a purple triangle on a gray background"]


def picture(folder, tmp, path):
    """docs/demo.png: the demo's six sample captions (rows) x 8 seeds, 2x, before the LoRA | after it."""
    halves = []
    for lora in (False, True):
        drawn = draw(folder, SHOWN, os.path.join(tmp, f"shown{int(lora)}"), lora=lora)
        half = Image.new("RGB", (8 * 64, len(SHOWN) * 64), (255, 255, 255))
        for r, prompt in enumerate(SHOWN):
            for k, png in enumerate(drawn[prompt][:8]):
                with Image.open(png) as im:
                    half.paste(im.convert("RGB").resize((64, 64), Image.NEAREST), (k * 64, r * 64))
        halves.append(half)
    sheet = Image.new("RGB", (2 * halves[0].width + 16, halves[0].height), (255, 255, 255))
    sheet.paste(halves[0], (0, 0))
    sheet.paste(halves[1], (halves[0].width + 16, 0))
    sheet.quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # 128 colours: about 50 KB


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "out/demo"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tmp = os.path.join(folder, "judged")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, prompts, lora in [("base", TRAINED, False), ("base", PURPLE, False), ("base + LoRA", PURPLE, True),
                                ("base + LoRA", TRAINED, True)]:
        acc = accuracy(judged(draw(folder, prompts, os.path.join(tmp, f"{len(prompts)}-{int(lora)}"), lora=lora)))
        rows = np.array(list(acc.values()))
        by_shape = ", ".join(f"{s} {np.mean([a[2] for p, a in acc.items() if f' {s} ' in p]):.0%}" for s in SHAPES)
        print(f"{name:12s} {len(prompts)} {'purple' if prompts is PURPLE else 'trained'} captions x {len(SEEDS)} seeds: "
              f"background {rows[:, 0].mean():.1%}, colour {rows[:, 1].mean():.1%} (worst caption {rows[:, 1].min():.0%}), "
              f"shape {rows[:, 2].mean():.1%} ({by_shape})")
    if len(sys.argv) > 2:
        picture(folder, tmp, sys.argv[2])
        print("picture:", sys.argv[2])
