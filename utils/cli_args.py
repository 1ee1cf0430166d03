"""Command-line flags shared by gpt2_generate_main.py and gpt2_train_main.py.

Both scripts choose weights the same way (--config_model, --pretrain_model_dir,
--pretrain_checkpoint, --checkpoint) and sample the same way (--temperature,
--top_k, ...), so the flags, their help and their checks live here once.
"""
import math

from utils.errors import UserError
from utils.generation import LENGTH_PENALTY_LIMIT
from utils.sampling import SMALLEST_TEMPERATURE

# Upper bound for --batch_size and --beam_width: far beyond what any memory
# holds (the memory check refuses much less), it keeps size arithmetic sane.
MAX_ROWS = 2 ** 31 - 1


def add_weight_args(group, *, checkpoint_help: str, config_model_help: str) -> None:
    """--config_model, --pretrain_model_dir, --pretrain_checkpoint, --checkpoint."""
    group.add_argument("--config_model", default=None, help=config_model_help)
    group.add_argument("--pretrain_model_dir", default=None,
                       help="Directory of OpenAI's GPT-2 files (default "
                            "gpt2_pretrained_models/model_117M, or the size "
                            "--config_model names).")
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
                       choices=("sample", "greedy", "beam"),
                       help="sample (temperature/top-k/top-p), greedy, or beam "
                            "search.")
    group.add_argument("--beam_width", type=int, default=4,
                       help="Beams kept by --decoding_strategy beam.")
    group.add_argument("--length_penalty", type=float, default=0.0,
                       help="Beam search length penalty alpha, between -10 and 10 "
                            "(0: off).")


def check_sampling_args(args) -> None:
    """Reject decoding flag values that cannot work, before a model is loaded.

    Also settles --top_k's default, which depends on --top_p.
    """
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be > 0 (got {args.temperature}): a "
                        f"finite number such as 0.7; lower is more conservative")
    if args.temperature < SMALLEST_TEMPERATURE:
        raise UserError(f"--temperature {args.temperature} is too small to divide "
                        f"by in float32 (at least {SMALLEST_TEMPERATURE:.3g}): for "
                        f"the most likely token every time use --decoding_strategy "
                        f"greedy")
    if args.top_k is None:
        args.top_k = 0 if args.top_p < 1 else 40
    if args.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (got {args.top_k}); 0 disables it")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {args.top_p}); 1 disables it")
    if not 1 <= args.beam_width <= MAX_ROWS:
        raise UserError(f"--beam_width must be between 1 and {MAX_ROWS} "
                        f"(got {args.beam_width})")
    if not (math.isfinite(args.length_penalty)
            and abs(args.length_penalty) <= LENGTH_PENALTY_LIMIT):
        raise UserError(f"--length_penalty must be a number between "
                        f"-{LENGTH_PENALTY_LIMIT:g} and {LENGTH_PENALTY_LIMIT:g} "
                        f"(got {args.length_penalty}); 0 turns it off")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1 (got {args.seed})")
    if args.max_decoding_length is not None and args.max_decoding_length < 2:
        raise UserError(f"--max_decoding_length must be at least 2 "
                        f"(got {args.max_decoding_length})")
