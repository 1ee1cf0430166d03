"""What --dtype int8 (and bfloat16) costs in quality, against float32.

For each model: perplexity of float32, bfloat16 and int8 (utils/decoding/int8_linear.py)
on data/toy (dev.txt + test.txt: never trained on by the demo) and on a
held-out text (this repository's README prose: no model here saw it), and
the share of positions where each precision's greedy choice (teacher-forced
argmax) is float32's.

Models: the TF-written fixtures tests/fixtures/tf_gpt2/models/tiny_a and
tiny_b (small random models: their perplexities are near-uniform, the
agreement is what counts), and each --checkpoint given (e.g. the model
scripts/demo.sh trains: output/model.ckpt).

Run:  python benchmarks/bench_int8_quality.py [--checkpoint output/model.ckpt]
"""
import argparse
import copy
import json
import math
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "tf_gpt2")
PRECISIONS = ("float32", "bfloat16", "int8")


def texts():
    """{name: text} of the evaluation texts."""
    def read(*parts):
        with open(os.path.join(REPO_ROOT, *parts), encoding="utf-8") as f:
            return f.read()
    readme = [line for line in read("README.md").splitlines()
              if line and line[0].isalpha()]  # prose lines, no tables or code
    return {"data/toy": read("data", "toy", "dev.txt") + read("data", "toy", "test.txt"),
            "held-out": "\n".join(readme)[:6000]}


def fixture_model(name: str):
    from utils.model import build_model, hparams_from_openai
    from utils.checkpoints.openai_weights import load_openai_weights
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        meta = json.load(f)
    model = build_model(hparams_from_openai(meta["hparams"])).eval()
    load_openai_weights(model, os.path.join(FIXTURES, "models", name, "model.ckpt"))
    return model


def checkpoint_model(path: str):
    from utils.checkpoints.weights import load_weights, resolve_model
    return load_weights(resolve_model(checkpoint=path)).model.eval()


def in_precision(model, precision: str):
    import torch
    from utils.decoding.int8_linear import quantize_for_decoding
    copied = copy.deepcopy(model)
    if precision == "int8":
        return quantize_for_decoding(copied)
    return copied.to(getattr(torch, precision))


def windows(ids, n_ctx: int):
    """Non-overlapping windows of n_ctx tokens (the last one shorter)."""
    return [ids[i:i + n_ctx] for i in range(0, len(ids) - 1, n_ctx)]


def score(model, ids, n_ctx: int):
    """(mean negative log-likelihood per predicted token, argmax ids) of `ids`."""
    import torch
    import torch.nn.functional as F
    from utils.decoding.generation import forward_logits
    nll, count, choices = 0.0, 0, []
    for window in windows(ids, n_ctx):
        if len(window) < 2:
            continue
        logits = forward_logits(model, torch.tensor([window])).float()[0, :-1]
        target = torch.tensor(window[1:])
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(target)
        choices.append(logits.argmax(-1))
    return nll / count, torch.cat(choices)


def evaluate(name: str, model, corpora) -> list:
    from utils.processor import get_encoder
    encoder = get_encoder()
    n_ctx = model.position_embedder.embedding.shape[0]
    rows = []
    for corpus, text in corpora.items():
        ids = encoder.encode(text)
        reference = None
        for precision in PRECISIONS:
            nll, choices = score(in_precision(model, precision), ids, n_ctx)
            if reference is None:
                reference = choices
            agree = (choices == reference).float().mean().item()
            rows.append({"model": name, "text": corpus, "tokens": len(ids),
                         "precision": precision, "ppl": math.exp(nll), "agree": agree})
            print(f"{name:>14} {corpus:>9} {precision:>9} {math.exp(nll):12.2f} "
                  f"{100 * agree:8.1f}%", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a model saved by gpt2_train_main.py (repeatable)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    corpora = texts()
    print(f"{'model':>14} {'text':>9} {'precision':>9} {'perplexity':>12} "
          f"{'same top-1':>9}")
    rows = []
    for name in ("tiny_a", "tiny_b"):
        rows += evaluate(name, fixture_model(name), corpora)
    for path in args.checkpoint:
        rows += evaluate(os.path.basename(os.path.dirname(os.path.abspath(path)))
                         + "/" + os.path.basename(path), checkpoint_model(path), corpora)
    print("\nsame top-1: share of positions whose argmax is float32's "
          "(teacher-forced: each position sees the true text before it).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
