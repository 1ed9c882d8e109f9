# The tiny world's base DiT, trained from scratch: tinyworld.make_world runs it once (python train.py config/demo.py),
# with the world's paths as flags. Every DiT weight trains (fp32 on the CPU) on 600 pictures of red, green, blue and
# yellow shapes; 1 caption in 10 is dropped, so that the sampler's CFG has an unconditional velocity to push against.
demo = False  # read after config/demo.py, whose settings it shares (sampling, CPU, fp32, 32x32): only the differences
train_mode = "full"
output_name = "demo_base"
train_batch_size = 32
learning_rate = 1e-3
optimizer_type = "AdamW"
weight_decay = 0.0
lr_scheduler = "cosine"
lr_warmup_steps = 50
max_train_steps = 2000
caption_dropout_rate = 0.1
