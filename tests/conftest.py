import os

# Must be set before anything imports triton: the kernels then run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)  # unit tests are small; 2 cores are shared with launcher tests' ranks
