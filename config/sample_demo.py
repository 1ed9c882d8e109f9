# Sample the tiny world after `python train.py config/demo.py`: its base DiT with the purple LoRA, on the CPU.
#   python sample.py config/sample_demo.py --prompt='"a purple triangle on a gray background"'
dit_path = "out/demo/base/demo_base.safetensors"
gemma_path = "out/demo/world/weights/gemma_2_2b_fp16.safetensors"
ae_path = "out/demo/world/ae.safetensors"
lora_weights = ["out/demo/demo_lora.safetensors"]
device = "cpu"
dtype = "float32"
system_prompt = ""
width = 32
height = 32
steps = 20
cfg = 2.0
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
batch_size = 8
prompt = "a purple circle on a white background"
out_dir = "out/demo/samples"
grid = True
