"""The conditional demo's training config (scripts/demo_conditional.sh):
configs.config_model_tiny trained from scratch on the question<TAB>answer pairs
of data/toy_qa, a couple of minutes on two CPU cores.

Everything not set here is as in configs/config_train_demo.py (and
configs/config_train.py); see those for what each field means.
"""
from configs.config_train_demo import *  # noqa: F401,F403

data_dir = "data/toy_qa"
max_seq_length = 32       # a question and its answer fit whole
train_batch_size = 8
max_train_epoch = 40
eval_steps = 40
checkpoint_steps = 40
# <|endoftext|> question <|endoftext|> is about a dozen tokens; the answer ten.
max_decoding_length = 32
