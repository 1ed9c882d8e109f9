# The CPU demo of sample.py: tiny random weights (written once to out/demo/weights by data.make_demo_weights,
# because demo=True), 128x128 pixels, a few steps. The images are noise-like: the point is the pipeline.
#   python sample.py config/sample_demo.py
demo = True
device = "cpu"
dtype = "float32"
width = 128
height = 128
steps = 8
seeds = [0, 1, 2, 3]
batch_size = 2
prompt = "a red circle on a white background"
out_dir = "out/demo/samples"
grid = True
