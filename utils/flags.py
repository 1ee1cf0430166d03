"""Command-line flags shared by the entry scripts (gpt2_generate_main.py,
gpt2_train_main.py, gpt2_serve_main.py): which weights a run uses and how it
samples, with their help text. Their value rules live with what they govern
(utils/decoding/limits.py, utils/decoding/settings.py); this module only
turns them into flags. Packages below do not import it.
"""
from typing import Any, Dict

from utils.checkpoints.openai_files import DEFAULT_MODEL, default_model_dir
from utils.decoding.loading import DECODING_DTYPES
from utils.device import add_device_arg
from utils.decoding.limits import DECODING_STRATEGIES, MAX_ROWS
from utils.errors import UserError

WEIGHT_FLAGS = ("config_model", "pretrain_model_dir", "pretrain_checkpoint",
                "checkpoint")


def check_batching(nsamples: int, batch_size: int) -> None:
    """gpt2_generate_main.py's --nsamples and --batch_size."""
    if nsamples < 1 or batch_size < 1:
        raise UserError("--nsamples and --batch_size must be at least 1")
    if batch_size > MAX_ROWS:
        raise UserError(f"--batch_size must be at most {MAX_ROWS} (got {batch_size})")
    if nsamples % batch_size:
        raise UserError(f"--nsamples ({nsamples}) must be divisible by "
                        f"--batch_size ({batch_size})")


# ---------------------------------------------------------------------------
# The flags

def add_model_args(parser, *, compile_help: str) -> None:
    """The flags choosing the model and how it decodes (--dtype, --compile,
    --device, the weight flags) of gpt2_generate_main.py and gpt2_serve_main.py."""
    parser.add_argument("--dtype", default="float32", choices=sorted(DECODING_DTYPES),
                        help="Precision of the weights while generating. bfloat16 "
                             "and float16 halve the memory and, as decoding is "
                             "bound by reading the weights, run faster; samples "
                             "differ slightly from float32's. int8 (CPU only) runs "
                             "the linear layers in 8 bits, quantized at load time "
                             "from float32 weights: fastest on a CPU, at a small "
                             "quality cost (benchmarks/README.md).")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help=compile_help)
    add_device_arg(parser)
    add_weight_args(
        parser,
        config_model_help="Model config module or .py path (default: the "
                          "checkpoint's hparams.json).",
        checkpoint_help="A model saved by gpt2_train_main.py; takes precedence "
                        "over --pretrain_checkpoint.")


def add_weight_args(group, *, checkpoint_help: str, config_model_help: str) -> None:
    """--config_model, --pretrain_model_dir, --pretrain_checkpoint, --checkpoint."""
    group.add_argument("--config_model", default=None, help=config_model_help)
    group.add_argument("--pretrain_model_dir", default=None,
                       help=f"Directory of OpenAI's GPT-2 files, or a Hugging Face "
                            f"GPT-2 directory (config.json + model.safetensors), "
                            f"or hf:NAME to fetch one from the Hugging Face Hub "
                            f"(needs huggingface_hub). Default "
                            f"{default_model_dir(DEFAULT_MODEL)}, or the size "
                            f"--config_model names.")
    group.add_argument("--pretrain_checkpoint", default=None,
                       help="OpenAI checkpoint prefix (default: "
                            "<pretrain_model_dir>/model.ckpt); ignored with "
                            "--checkpoint.")
    group.add_argument("--checkpoint", default=None, help=checkpoint_help)


def add_sampling_args(group, *, max_decoding_length_default, max_decoding_length_help):
    """The decoding flags: length, temperature, top-k/top-p, strategy, beam, seed."""
    group.add_argument("--max_decoding_length", type=int,
                       default=max_decoding_length_default,
                       help=max_decoding_length_help)
    group.add_argument("--temperature", type=float, default=0.7,
                       help="Softmax temperature, a finite number > 0 (at least "
                            "1.2e-38); lower is more conservative (default 0.7).")
    group.add_argument("--top_k", type=int, default=None,
                       help="Sample among the k most likely tokens (0: all). "
                            "Default 40, or 0 when --top_p is given (as in the "
                            "original example, top-p then replaces top-k).")
    group.add_argument("--top_p", type=float, default=1.0,
                       help="Nucleus sampling: the smallest set of tokens whose "
                            "probability reaches p (1.0: off).")
    group.add_argument("--decoding_strategy", default="sample",
                       choices=DECODING_STRATEGIES,
                       help="sample (temperature/top-k/top-p), greedy, or beam "
                            "search.")
    group.add_argument("--beam_width", type=int, default=4,
                       help="Beams kept by --decoding_strategy beam.")
    group.add_argument("--length_penalty", type=float, default=0.0,
                       help="Beam search length penalty alpha, between -10 and 10 "
                            "(0: off).")


def weight_flags(args) -> Dict[str, Any]:
    """The weight flags as keyword arguments of utils.checkpoints.weights.resolve_model."""
    flags = {name: getattr(args, name) for name in WEIGHT_FLAGS}
    flags["from_scratch"] = getattr(args, "from_scratch", False)
    return flags


