# The sd-scripts docs' lumina_train_network.py command, as our constants (README maps every flag):
# python train.py config/lora_1024.py --train_data_dir=my_images --output_name=my_lora
dit_path = "models/lumina_2_model_bf16.safetensors"
gemma_path = "models/gemma_2_2b_fp16.safetensors"
ae_path = "models/ae.safetensors"
output_dir = "out/lora"
output_name = "my_lumina_lora"
network_dim = 8
network_alpha = 8.0
learning_rate = 1e-4
optimizer_type = "AdamW"
lr_scheduler = "constant"
timestep_sampling = "nextdit_shift"
discrete_flow_shift = 6.0
model_prediction_type = "raw"
system_prompt = "You are an assistant designed to generate high-quality images based on user prompts."
max_train_epochs = 10
save_every_n_epochs = 1
mixed_precision = "bf16"
gradient_checkpointing = True
resolution = 1024
