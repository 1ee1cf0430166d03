"""Summed cross-entropy over GPT-2's 50,257 logits that keeps less for backward.

`F.cross_entropy(logits, targets, reduction="sum")` keeps the log-softmax of
every position (a second [N, V] tensor) for backward, and its backward
allocates two more: a zero-filled NLL gradient and the log-softmax gradient.
At 1 x 1,024 tokens each is 206 MB in float32, so the loss alone peaks at four
logit-sized tensors. Under bf16 autocast it also makes a float32 copy of the
logits first.

`cross_entropy_sum` computes the same sum from one log-sum-exp per position,
taken over row chunks (a chunk-sized temporary, never an [N, V] one), and keeps
only the logits (which autograd holds anyway until the output layer's
backward) and those N numbers. Its backward writes the gradient,
softmax - one-hot, into a single new [N, V] tensor in the logits' dtype, chunk
by chunk. Peak: the logits and their gradient.

The arithmetic is float32 whatever the logits' dtype (as autocast does for
cross_entropy); tests compare values and gradients with F.cross_entropy.
"""
import torch

# Rows per chunk: 256 x 50,257 float32 is 51 MB of temporary.
CHUNK_ROWS = 256


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
        log_z = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            log_z[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, log_z, safe_targets, keep)
        return torch.where(keep, log_z - picked, torch.zeros_like(log_z)).sum()

    @staticmethod
    def backward(ctx, grad_sum: torch.Tensor):
        logits, log_z, safe_targets, keep = ctx.saved_tensors
        grad = torch.empty_like(logits)
        # d(sum)/d(logit) = softmax - one-hot on kept rows, 0 on ignored rows.
        scale = (grad_sum.float() * keep.float())[:, None]
        for start in range(0, logits.size(0), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            probs = torch.exp(logits[rows].float() - log_z[rows, None])
            grad[rows] = probs.mul_(scale[rows])
        grad.scatter_add_(1, safe_targets[:, None], -scale.to(grad.dtype))
        return grad, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """sum over rows of -log softmax(logits)[target], rows whose target is
    `ignore_index` left out: F.cross_entropy(..., reduction="sum") in float32.
    logits [N, V], targets [N]."""
    return _CrossEntropySum.apply(logits, targets, ignore_index)
