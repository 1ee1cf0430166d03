"""The offline demo's training config (scripts/demo.sh): configs.config_model_tiny
trained from scratch on data/toy in a few minutes on two CPU cores.

Everything not set here is as in configs/config_train.py; see that file for
what each field means.
"""
from configs.config_train import *  # noqa: F401,F403

train_batch_size = 16
max_train_epoch = 20
display_steps = 10
eval_steps = 50
checkpoint_steps = 50
# A small model trained from random weights takes a larger step than fine-tuning.
opt = {
    "optimizer": {"type": "AdamW",
                  "kwargs": {"lr": 2e-3, "betas": (0.9, 0.98), "eps": 1e-8,
                             "weight_decay": 0.01}},
    "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 1.0}},
}
warmup_steps = 20
lr_decay = "cosine"
min_lr_ratio = 0.1
max_decoding_length = 40
