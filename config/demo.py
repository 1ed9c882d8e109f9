# The README's main command: python train.py config/demo.py
# Tiny random models in the three real file layouts and a synthetic dataset of coloured shapes are
# written under output_dir, then the normal pipeline runs: cache, train a LoRA, sample, save.
demo = True
output_dir = "out/demo"
output_name = "demo_lora"
resolution = 64  # 64x64-area buckets: 8x8 latents, 16 image tokens
train_batch_size = 4
network_dim = 16
network_alpha = 16.0
learning_rate = 2e-3
lr_scheduler = "cosine"
lr_warmup_steps = 10
max_train_steps = 1000
max_train_epochs = 0
save_every_n_epochs = 0
save_every_n_steps = 250
mixed_precision = "no"  # fp32: a CPU runs fp32 faster than bf16
gradient_checkpointing = False
device = "cpu"
sample_prompts = ["a red circle on a white background", "a blue square on a black background"]
sample_every_n_steps = 500
sample_width = 64
sample_height = 64
sample_steps = 20
overwrite = True  # the demo reruns from scratch into the same folder
