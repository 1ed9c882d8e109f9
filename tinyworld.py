"""
The tiny Lumina 2 world of the demo, which trains on a laptop CPU in minutes: pictures of coloured shapes with captions,
the random tiny Gemma and Next-DiT in the three real file layouts (so they load through the real loaders), and a tiny
FLUX-layout AE trained here to reconstruct the pictures. train.py trains the world's base DiT from scratch and its LoRA
(config/demo.py); tests/test_demo.py judges what they draw. The random models alone serve the tests.

    python train.py config/demo.py                                       # the whole world, then the LoRA
    python -c "import tinyworld; print(tinyworld.make_demo_weights('out/demo/weights'))"
    python -c "import tinyworld; print(tinyworld.make_demo_dataset('out/demo/images'))"
"""
import glob
import io
import json
import math
import os
import random
import shutil

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import lumina2
from files import save_file_atomic

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")

DEMO_GEMMA = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512)
DEMO_SENTENCES = ["a red circle on a white background", "a blue square on a black background", "a green triangle in the middle",
                  "a yellow star next to a purple heart", "two orange circles and one small cyan square",
                  "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start>",
                  "digits 0123456789 and unicode: café, naïve, 東京, emoji 🙂", "  double  spaces\tand tabs  "]


def train_tiny_tokenizer(vocab_size=DEMO_GEMMA["vocab_size"]):
    """A Gemma-like SentencePiece BPE model (pad 0, eos 1, bos 2, unk 3, byte fallback) -> proto bytes."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEMO_SENTENCES * 20), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return buf.getvalue()


def make_demo_weights(out_dir, seed=0):
    """Write tiny random models as lumina_2_model_bf16.safetensors (raw keys, BF16), gemma_2_2b_fp16.safetensors (`model.`
    prefix, F16, embedded spiece_model) and ae.safetensors (F32) -> the three paths; existing files are kept."""
    from transformers import Gemma2Model
    paths = {n: os.path.join(out_dir, f) for n, f in
             [("dit", "lumina_2_model_bf16.safetensors"), ("gemma", "gemma_2_2b_fp16.safetensors"), ("ae", "ae.safetensors")]}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    torch.manual_seed(seed)
    dit = lumina2.NextDiT(**lumina2.DIT_PRESETS["tiny"])
    save_file_atomic({k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()}, paths["dit"])
    gemma = Gemma2Model(lumina2.gemma_config(**DEMO_GEMMA))
    with torch.no_grad():  # Gemma initialises its (1 + w) norms at w = 0; random w makes the test meaningful
        for name, p in gemma.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    sd = {"model." + k: v.to(torch.float16) for k, v in gemma.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(train_tiny_tokenizer()), dtype=torch.uint8)
    save_file_atomic(sd, paths["gemma"], metadata={"gemma2_config": json.dumps(DEMO_GEMMA)})
    ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"])
    with torch.no_grad():  # a random encoder gives latents of std ~0.1; scale its output to the real AE's std ~1
        ae.encoder.conv_out.weight.mul_(8.0)
        ae.encoder.conv_out.bias.mul_(8.0)
    save_file_atomic(ae.state_dict(), paths["ae"])
    return paths


DEMO_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20)}
NEW_COLORS = {"purple": (150, 40, 190)}  # the concept the world's LoRA teaches: its base never sees it
DEMO_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
DEMO_SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(out_dir, n=24, size=64, seed=0, colors=DEMO_COLORS, square=False, sizes=(0.25, 0.4), jitter=None):
    """Write n coloured shapes on plain backgrounds as PNG + .txt caption ("a red circle on a white background"), in three
    aspects (size x size, wide 5:3, tall 3:5: 64x64, 80x48, 48x80 for size 64) or all square. The shape's half-size is a
    `sizes` fraction of the short side; its centre anywhere it fits, or within `jitter` of the side from the middle.
    Deterministic in seed; existing files are kept. Returns out_dir."""
    rng = random.Random(seed)
    aspects = [(size, size)] if square else [(size, size), (size * 5 // 4, size * 3 // 4), (size * 3 // 4, size * 5 // 4)]
    os.makedirs(out_dir, exist_ok=True)
    for k in range(n):
        w, h = aspects[k % len(aspects)]
        shape, color, bg = rng.choice(DEMO_SHAPES), rng.choice(list(colors)), rng.choice(list(DEMO_BACKGROUNDS))
        r = rng.uniform(*sizes) * min(w, h)  # half-size of the shape
        if jitter is None:
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        else:
            cx, cy = w / 2 + rng.uniform(-jitter, jitter) * w, h / 2 + rng.uniform(-jitter, jitter) * h
        stem = os.path.join(out_dir, f"shape_{k:03d}")
        if os.path.exists(stem + ".png") and os.path.exists(stem + ".txt"):
            continue
        img = Image.new("RGB", (w, h), DEMO_BACKGROUNDS[bg])
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colors[color])
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colors[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colors[color])
        img.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a {color} {shape} on a {bg} background\n")
    return out_dir


def train_ae(folders, path, steps=450, batch_size=32, lr=4e-3, seed=0):
    """The world's AE: AE_PRESETS["tiny"] trained to reconstruct the images in `folders` (MSE, plus a pull of the latents to
    zero mean and unit variance, the scale flow matching's noise has), written to path in ae.safetensors' layout. A random
    AE decodes any latent to coloured noise; this one draws the shapes back (tests/test_demo.py measures how well)."""
    images = torch.stack([data.to_tensor(data.load_image(f)) for d in folders for f in sorted(glob.glob(os.path.join(d, "*.png")))])
    torch.manual_seed(seed)
    ae = lumina2.AutoEncoder(**lumina2.AE_PRESETS["tiny"])
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc="training the AE"):
        for group in opt.param_groups:  # 50 steps of warmup, then a cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images[torch.randint(len(images), (batch_size,), generator=g)]  # (B, 3, H, W) in [-1, 1]
        z = ae.encode(x)  # (B, 16, H/8, W/8), scaled as the real AE's latents
        loss = F.mse_loss(ae.decode(z), x) + 0.01 * (z.mean() ** 2 + (z.std() - 1) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    save_file_atomic(ae.state_dict(), path)
    return path


def make_world(out_dir, train_base, size=32):
    """The demo's world under out_dir, each piece made once (a rerun reuses it): 600 pictures in DEMO_COLORS (what the base
    learns) and 96 in NEW_COLORS beside 96 of the base's (what the LoRA learns), the random Gemma and Next-DiT the base
    starts from, the AE trained on the pictures, then the base DiT trained from scratch by train_base(argv) (train.py's
    main, with config/demo_base.py). -> the paths a LoRA run on top uses: (dit, gemma, ae, its pictures)."""
    root = os.path.join(out_dir, "world")
    shapes = dict(size=size, square=True, sizes=(0.28, 0.42), jitter=0.06)  # sizes vary, places a little (+-2 px at 32)
    images = make_demo_dataset(os.path.join(root, "images"), n=600, seed=1, **shapes)
    new = make_demo_dataset(os.path.join(root, "new"), n=96, seed=2, colors=NEW_COLORS, **shapes)
    for k in range(96):  # half the LoRA's pictures are the base's own: it learns purple, not "everything is purple"
        for ext in (".png", ".txt"):
            if not os.path.exists(os.path.join(new, f"base_{k:03d}{ext}")):
                shutil.copy(os.path.join(images, f"shape_{k:03d}{ext}"), os.path.join(new, f"base_{k:03d}{ext}"))
    weights = make_demo_weights(os.path.join(root, "weights"))
    ae = os.path.join(root, "ae.safetensors")
    if not os.path.exists(ae):
        train_ae([images, new], ae)
    base = os.path.join(out_dir, "base", "demo_base.safetensors")
    if not os.path.exists(base):
        train_base([os.path.join(CONFIG, "demo.py"), os.path.join(CONFIG, "demo_base.py"), f"--dit_path={weights['dit']}", f"--gemma_path={weights['gemma']}",
                    f"--ae_path={ae}", f"--train_data_dir={images}", f"--output_dir={os.path.dirname(base)}"])
    return base, weights["gemma"], ae, new
