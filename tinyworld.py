"""
The tiny demo: random models in the three real file layouts (so they load through the same loaders as the real
files) and a folder of coloured shapes with captions, so that everything runs on a CPU with no downloads.

    python -c "import tinyworld; print(tinyworld.make_demo_weights('out/demo/weights'))"
    python -c "import tinyworld; print(tinyworld.make_demo_dataset('out/demo/images'))"
"""
import io
import json
import os
import random

import torch
from PIL import Image, ImageDraw

import lumina2
from files import save_file_atomic

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
DEMO_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
DEMO_SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(out_dir, n=24, size=64, seed=0):
    """Write n coloured shapes on plain backgrounds as PNG + .txt caption ("a red circle on a white
    background"), in three aspects: size x size, wide (5:3) and tall (3:5), sides multiples of 16 for
    size 64 (64x64, 80x48, 48x80). Deterministic in seed; existing files are kept. Returns out_dir."""
    rng = random.Random(seed)
    aspects = [(size, size), (size * 5 // 4, size * 3 // 4), (size * 3 // 4, size * 5 // 4)]
    os.makedirs(out_dir, exist_ok=True)
    for k in range(n):
        w, h = aspects[k % len(aspects)]
        shape, color, bg = rng.choice(DEMO_SHAPES), rng.choice(list(DEMO_COLORS)), rng.choice(list(DEMO_BACKGROUNDS))
        r = rng.uniform(0.25, 0.4) * min(w, h)  # half-size of the shape, centre jittered inside the frame
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        stem = os.path.join(out_dir, f"shape_{k:03d}")
        if os.path.exists(stem + ".png") and os.path.exists(stem + ".txt"):
            continue
        img = Image.new("RGB", (w, h), DEMO_BACKGROUNDS[bg])
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=DEMO_COLORS[color])
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=DEMO_COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=DEMO_COLORS[color])
        img.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a {color} {shape} on a {bg} background\n")
    return out_dir
