import os

import torch

# Triton kernels run in the interpreter where there is no GPU. This must be in the environment
# before anything imports triton (importing torch does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

torch.set_num_threads(1)  # unit tests are small; 2 cores are shared with launcher tests' ranks
