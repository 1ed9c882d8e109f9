# Full fine-tuning of all 2.6B DiT weights in one 16 GB budget (the sd-scripts lumina_train.py use case):
# bf16 weights stepped by Adafactor through fp32 copies with stochastic rounding, the step fused into backward
# (no whole-model gradient), per-block gradient checkpointing. Memory: 5.2 GB of weights, a few MB of
# Adafactor state, one tensor's fp32 copy at a time, plus activations.
# python train.py config/full_1024.py --train_data_dir=my_images --output_name=my_finetune
# torchrun --nproc_per_node=8 train.py config/full_1024.py --fused_backward_pass=False --parallel=fsdp
dit_path = "models/lumina_2_model_bf16.safetensors"
gemma_path = "models/gemma_2_2b_fp16.safetensors"
ae_path = "models/ae.safetensors"
output_dir = "out/full"
output_name = "my_lumina_finetune"
train_mode = "full"
mixed_precision = "bf16"
bf16_update = "stochastic"
optimizer_type = "Adafactor"
learning_rate = 5e-4  # torch's Adafactor: the cap on a step relative to a weight's RMS (~0.02 here: ~1e-5 absolute)
weight_decay = 0.0
fused_backward_pass = True
gradient_checkpointing = True
max_grad_norm = 1.0  # per tensor with the fused step (like sd-scripts' fused_backward_pass)
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100
timestep_sampling = "nextdit_shift"
system_prompt = "You are an assistant designed to generate high-quality images based on user prompts."
max_train_epochs = 10
save_every_n_epochs = 1
resolution = 1024
train_batch_size = 1
