# The tiny world's base DiT, trained from scratch: tinyworld.make_world runs it once (python train.py config/demo.py),
# with the world's paths as flags. Every DiT weight trains (fp32 on the CPU) on 600 pictures of red, green, blue and
# yellow shapes; 1 caption in 10 is dropped, so that the sampler's CFG has an unconditional velocity to push against.
train_mode = "full"
output_name = "demo_base"
resolution = 32  # 32x32 pictures: 4x4 latents, 4 image tokens
train_batch_size = 32
learning_rate = 1e-3
optimizer_type = "AdamW"
weight_decay = 0.0
lr_scheduler = "cosine"
lr_warmup_steps = 50
max_train_steps = 2000
max_train_epochs = 0
save_every_n_epochs = 0
caption_dropout_rate = 0.1
system_prompt = ""  # the bare caption: shorter sequences, and the tiny Gemma was never taught the system prompt
mixed_precision = "no"  # fp32: a CPU runs fp32 faster than bf16
gradient_checkpointing = False
device = "cpu"
sample_prompts = ["a red circle on a white background", "a blue square on a black background", "a yellow triangle on a gray background",
                  "a purple circle on a white background", "a purple square on a black background", "a purple triangle on a gray background"]
sample_width = 32
sample_height = 32
sample_steps = 20
sample_cfg = 2.0  # the tiny world draws best with mild guidance
overwrite = True
