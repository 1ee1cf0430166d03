"""Training configuration for gpt2_train_main.py (--config_train configs.config_train).

The fields of the original Texar example's config_train.py, plus warm-up and
decay of the learning rate, gradient accumulation, precision and a seed. Copy
this file and pass the copy's path (--config_train my_train.py) to change them,
or lay single values over it on the command line: gpt2_train_main.py
--data_dir, --max_seq_length, --max_train_epoch, --max_steps, --lr,
--train_batch_size, and --set key=value for any field below.
Every public value set here must be one of these settings (a misspelt or
unknown one is an error); name your own helper values with a leading _.
"""

# ----------------------------------------------------------------- data
# Directory holding train.npy / dev.npy / test.npy written by prepare_data.py.
data_dir = "data/toy"
# The --max_seq_length the data was prepared with: most tokens per example,
# both <|endoftext|> included. None: the length prepare_data.py recorded in
# <data_dir>/prepared.json. A number must equal the data's (checked).
max_seq_length = None
# --do_test: most tokens per sample, the test line (context) included.
# --max_decoding_length overrides it. None: max_seq_length.
max_decoding_length = None

# ----------------------------------------------------------------- batches and length
# Examples per batch, per process (the global batch multiplies by the number
# of processes with --distributed and by gradient_accumulation_steps).
train_batch_size = 32
# Passes over train.npy. The learning-rate schedule spans all of them.
# The first lines of a run say how many steps that is; the log lines show
# step N/TOTAL with the time elapsed and an ETA.
max_train_epoch = 100
# A positive number: train exactly this many optimizer steps instead (the
# schedule spans them; epochs continue past max_train_epoch if needed).
# -1: max_train_epoch decides. (--stop_after_steps, unlike it, stops early
# and keeps the schedule of max_train_epoch.)
max_steps = -1
# Batch sizes for dev perplexity (--do_eval) and test continuations (--do_test).
eval_batch_size = 8
test_batch_size = 8
# Batches whose gradients are summed before one optimizer step: a larger
# effective batch in the same memory. The loss is normalised by the tokens of
# all of them, so 2 x 16 gives the same update as 1 x 32.
gradient_accumulation_steps = 1

# ----------------------------------------------------------------- logging and saving
# Print step, loss, perplexity, learning rate and tokens/s every this many
# optimizer steps (also appended to <output_dir>/metrics.jsonl); -1 disables.
# Every *_steps setting is a positive number of steps, or -1 (0 is refused).
display_steps = 10
# Dev perplexity every this many steps; -1 disables. The best model so far is
# kept in <output_dir>/model_best.ckpt.
eval_steps = 100
# Save <output_dir>/model.ckpt every this many steps; -1 disables. It is always
# saved at the end of training and on Ctrl-C.
checkpoint_steps = -1

# Write samples from sample_prompts into <output_dir>/samples.jsonl every this
# many steps (as gpt-2-simple's sample_every); -1 disables. Each prompt follows
# an <|endoftext|>; "" samples from scratch. Top-k 40 sampling, up to
# max_decoding_length tokens, seeded by seed and the step.
sample_steps = -1
sample_prompts = [""]
# Stop training after this many dev evaluations (eval_steps) in a row without
# a better dev perplexity; model_best.ckpt is then the result. -1 disables.
early_stopping_patience = -1

# ----------------------------------------------------------------- optimization
# texar-pytorch optimization hparams (texar.torch.core.default_optimization_hparams):
# "optimizer": any torch.optim class by name, and its keyword arguments; the
#     "lr" given here is the peak learning rate of the schedule below. Weight
#     decay applies to weight matrices and embeddings, not to biases and
#     LayerNorm parameters. Adam and AdamW use torch's fused implementation
#     where available unless "fused" or "foreach" is given here.
#     For big models on small machines: "Adafactor" (torch >= 2.5; factored
#     second moments, so nearly no optimizer state: kwargs such as
#     {"lr": 1e-3}) or "SGD" with {"lr": ..., "momentum": 0.9} (one
#     buffer per weight) instead of AdamW's two. See docs/fine-tuning.md, big models.
# "gradient_clip": a function of torch.nn.utils applied before each step, and
#     its keyword arguments; {"type": ""} disables clipping.
# (The original example used Adam with lr 0.001; AdamW with a smaller rate is
# the usual choice for fine-tuning a pre-trained GPT-2.)
opt = {
    "optimizer": {
        "type": "AdamW",
        "kwargs": {
            "lr": 1e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
        },
    },
    "gradient_clip": {
        "type": "clip_grad_norm_",
        "kwargs": {"max_norm": 1.0},
    },
}
# Learning rate: a linear warm-up from lr/warmup_steps to lr over the first
# warmup_steps optimizer steps (0: none), then "constant", "linear" or
# "cosine" decay that reaches lr * min_lr_ratio at the last step.
warmup_steps = 10
lr_decay = "linear"
min_lr_ratio = 0.0

# ----------------------------------------------------------------- numerics
# "fp32"; "bf16" (autocast to bfloat16, CPU or a recent GPU); "fp16" (autocast
# to float16 with loss scaling, CUDA only). Weights, gradients and optimizer
# states stay in float32 in every case (the weights are their own fp32 master
# copy); what shrinks is the activations kept for backward, the matrix products
# being computed and stored in 16 bits. On CUDA that saves memory and time; on
# a CPU without bfloat16 instructions it is mostly slower (bench_memory.py).
precision = "fp32"

# ----------------------------------------------------------------- memory
# Recompute each transformer block's activations in backward instead of
# keeping them: activation memory falls to about one block's, a step costs
# about a third more; gradients are identical.
gradient_checkpointing = False
# "all", or "transformer": freeze the token and position embeddings (and so
# the output layer, which is the token embedding); frozen weights get no
# gradient or optimizer state.
trainable = "all"
# LoRA: train low-rank adapters on texar's linear layers, the base frozen
# (utils/lora.py), e.g. {"rank": 8, "alpha": 16, "dropout": 0.0,
# "targets": ["attention", "mlp"]}. Checkpoints then hold the adapters and
# name their base model; gpt2_generate_main.py --checkpoint applies them and
# convert_checkpoint.py --merge_lora writes the merged model. None: off.
lora = None
# With --distributed: shard weights, gradients and optimizer state across the
# processes (PyTorch FSDP, utils/training/sharding.py) instead of a full copy
# each. AdamW, SGD or Adafactor (Adafactor's small state is kept whole on
# every process); not lora (docs/distributed.md says why). model.ckpt stays
# an ordinary checkpoint that resumes with any number of processes.
shard_model = False

# ----------------------------------------------------------------- speed
# "fused": attention through PyTorch's scaled_dot_product_attention (one
# kernel, no T x T tensors kept; flash attention on CPU and CUDA) and GPT-2's
# GELU as one kernel; "texar": texar's original attention and GELU (same
# parameters and, within float rounding, the same losses; slower and heavier
# at long context).
attention = "fused"
# torch.compile the model's forward (fused element-wise kernels). Compiling
# costs a minute or more at start and again for new sequence-length shapes;
# if it fails the run continues uncompiled, with a one-line note.
compile = False

# ----------------------------------------------------------------- logging
# A directory for TensorBoard event files (the metrics of metrics.jsonl as
# scalars), e.g. "output/tensorboard"; None: none. Needs `pip install tensorboard`.
tensorboard_dir = None
# Seeds the data order (a new shuffle every epoch), dropout, the initial
# weights of --from_scratch, and --do_test sampling unless --seed is given.
seed = 42
