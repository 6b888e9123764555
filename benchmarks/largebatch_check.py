"""One run of the study's charlm at batch 192 (same tokens as batch 12) at a chosen lr.

Usage: ``python -m benchmarks.largebatch_check OPTIMIZER LR`` (e.g. ``Adan 0.02``): a check of
the large-batch result without the square-root rule; prints the final validation loss.
"""

import sys

import torch

from adan.demo.charlm import CharData, CharLMConfig, find_data, train_charlm
from benchmarks import contenders
from benchmarks.train import scaled_config

torch.set_num_threads(1)
name, lr = sys.argv[1], float(sys.argv[2])
cfg = scaled_config(CharLMConfig(eval_interval=100), 192)
result = train_charlm(lambda groups: contenders.build(name, groups, lr, "lm"), cfg,
                      CharData.from_file(find_data()))
curve = ", ".join(f"{it}: {loss:.3f}" for it, loss in result["val_curve"])
print(f"{name} batch 192 lr {lr}: final val loss {result['final_val_loss']:.4f} ({curve})")
