# The README's main command: python train.py config/demo.py
# The tiny world first (tinyworld.py, each piece once): pictures of coloured shapes with captions, a tiny AE trained to
# draw them, and a base Next-DiT trained from scratch by train.py (config/demo_base.py). Then this run: a LoRA on that
# base teaches one colour the base never saw, purple. Samples before (out/demo/base/samples) and after (out/demo/samples).
# Then: python sample.py config/sample_demo.py --prompt='"a purple triangle on a gray background"'
demo = True
output_dir = "out/demo"
output_name = "demo_lora"
resolution = 32
train_batch_size = 16
network_dim = 16
network_alpha = 16.0
learning_rate = 2e-3
lr_scheduler = "cosine"
lr_warmup_steps = 20
max_train_steps = 500
max_train_epochs = 0
save_every_n_epochs = 0
system_prompt = ""
mixed_precision = "no"  # fp32: a CPU runs fp32 faster than bf16
gradient_checkpointing = False
device = "cpu"
sample_prompts = ["a red circle on a white background", "a blue square on a black background", "a yellow triangle on a gray background",
                  "a purple circle on a white background", "a purple square on a black background", "a purple triangle on a gray background"]
sample_width = 32
sample_height = 32
sample_steps = 20
sample_cfg = 2.0  # the tiny world draws best with mild guidance
overwrite = True  # the demo reruns its LoRA into the same folder (the world is reused)
