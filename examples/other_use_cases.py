"""examples/README.md's "Other Use Cases", runnable: texar's own decoding API on our GPT-2.

    python examples/other_use_cases.py [--checkpoint output/model.ckpt]

Each `# [name]` ... `# [end]` block is shown verbatim in examples/README.md,
and tests/test_other_use_cases.py runs every one on a tiny model (and checks
that page still shows the same code), so the snippets cannot rot. Without
--checkpoint a tiny model is built with random weights: the calls run, the
text is noise. With one written by gpt2_train_main.py, or --pretrain_model_dir
for OpenAI's GPT-2, the samples read as text.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.model import build_model, import_texar  # noqa: E402
from utils.processor import EOS_ID  # noqa: E402

tx = import_texar()
end_token = EOS_ID  # <|endoftext|>


def context_of(encoder, text):
    """A batch of one prompt: <|endoftext|> + BPE(text), and its length."""
    ctx = torch.tensor([[end_token] + encoder.encode(text)])
    return ctx, torch.tensor([ctx.size(1)])


def greedy(model, ctx, ctx_len):
    # [greedy]
    output, output_length = model(
        context=ctx,
        context_sequence_length=ctx_len,
        decoding_strategy="infer_greedy",
        end_token=end_token,
        max_decoding_length=30)  # steps after the first token, context included
    sample_id = output.sample_id  # [batch, time]: the context, then the continuation
    logits = output.logits        # [batch, time - 1, vocab]: one per generated step
    # [end]
    return sample_id, output_length


def top_k(model, ctx, ctx_len):
    # [top_k]
    helper = tx.modules.TopKSampleEmbeddingHelper(
        start_tokens=ctx[:, 0],
        end_token=end_token,
        top_k=40,
        softmax_temperature=0.7)
    output, output_length = model(
        context=ctx,
        context_sequence_length=ctx_len,
        helper=helper,
        max_decoding_length=30)
    # [end]
    return output.sample_id, output_length


def gumbel_softmax(model, batch_size):
    # [gumbel]
    helper = tx.modules.GumbelSoftmaxEmbeddingHelper(
        start_tokens=torch.full((batch_size,), end_token),
        end_token=end_token,
        tau=0.5,                 # lower: closer to one-hot, noisier gradients
        straight_through=False)  # True: one-hot forward, soft gradient
    output, output_length = model(helper=helper, max_decoding_length=12)
    soft_ids = output.sample_id  # [batch, time, vocab]: a distribution per step
    # Differentiable: e.g. reward the expected count of a token, back into the model.
    reward = soft_ids[:, :, model.hparams.vocab_size // 2].sum()
    reward.backward()
    # [end]
    return soft_ids


def beam_search(model):
    # [beam]
    output = model(
        start_tokens=torch.tensor([end_token]),
        end_token=end_token,
        beam_width=4,
        length_penalty=0.6,
        max_decoding_length=20)
    best = output["sample_id"][:, :, 0]  # [batch, time, beam]: beam 0 scores best
    # [end]
    return output


def perplexity(model, encoder, text):
    # [perplexity]
    ids = torch.tensor([[end_token] + encoder.encode(text) + [end_token]])
    length = torch.tensor([ids.size(1)])
    logits = model(inputs=ids[:, :-1], decoding_strategy="train_greedy").logits
    nll = tx.losses.sequence_sparse_softmax_cross_entropy(
        labels=ids[:, 1:], logits=logits, sequence_length=length - 1,
        average_across_timesteps=True, sum_over_timesteps=False)  # mean per token
    ppl = math.exp(float(nll))
    # [end]
    return ppl


def memory_model(hparams, gpt2_state):
    # [memory_model]
    model = build_model(hparams, with_memory=True)  # or `memory = True` in a model config
    # GPT-2's weights; the cross-attention blocks keep their fresh initialisation.
    missing, unexpected = model.load_state_dict(gpt2_state, strict=False)
    assert not unexpected and all(".enc_dec_attns." in k or ".end_dec_attn_" in k
                                  for k in missing)
    # [end]
    return model


def memory_step(model, src, src_len, tgt, tgt_len):
    # [memory]
    dim, heads = model.hparams.embedding_size, model.hparams.decoder.multihead_attention.num_heads
    source_encoder = tx.modules.TransformerEncoder(hparams={
        "dim": dim, "num_blocks": 2,
        "multihead_attention": {"num_units": dim, "num_heads": heads, "output_dim": dim},
        "poswise_feedforward": tx.modules.default_transformer_poswise_net_hparams(dim, dim)})
    optimizer = torch.optim.AdamW([*model.parameters(), *source_encoder.parameters()], lr=1e-3)

    # The source is embedded by GPT-2's own embeddings, then encoded.
    positions = torch.arange(src.size(1)).expand_as(src)
    source_hidden_states = source_encoder(model.decoder.embed_tokens(src, positions), src_len)
    output = model(
        memory=source_hidden_states,
        memory_sequence_length=src_len,
        inputs=tgt[:, :-1],
        decoding_strategy="train_greedy")  # teacher forcing
    loss = tx.losses.sequence_sparse_softmax_cross_entropy(
        labels=tgt[:, 1:], logits=output.logits, sequence_length=tgt_len - 1)
    loss.backward()
    optimizer.step()

    # Decoding reads the same memory.
    with torch.no_grad():
        source_hidden_states = source_encoder(model.decoder.embed_tokens(src, positions),
                                              src_len)
        answer, answer_length = model(
            memory=source_hidden_states, memory_sequence_length=src_len,
            start_tokens=tgt[:, 0], end_token=end_token,
            decoding_strategy="infer_greedy", max_decoding_length=20)
    # [end]
    return loss.item(), answer.sample_id


def main(argv=None):
    from utils.processor import get_encoder
    from utils.checkpoints.weights import load_weights, resolve_model
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--pretrain_model_dir", default=None)
    args = parser.parse_args(argv)
    from_scratch = not (args.checkpoint or args.pretrain_model_dir)
    loaded = load_weights(resolve_model(
        config_model="configs.config_model_tiny" if from_scratch else None,
        checkpoint=args.checkpoint, pretrain_model_dir=args.pretrain_model_dir,
        from_scratch=from_scratch))
    model, encoder = loaded.model.eval(), get_encoder(loaded.vocab_dir)
    ctx, ctx_len = context_of(encoder, "The weather today")
    with torch.no_grad():
        print("greedy:", encoder.decode(greedy(model, ctx, ctx_len)[0][0].tolist()))
        print("top-k: ", encoder.decode(top_k(model, ctx, ctx_len)[0][0].tolist()))
        best = beam_search(model)["sample_id"][0, :, 0].tolist()
        print("beam:  ", encoder.decode(best))
        print("perplexity of 'The weather today is sunny.':",
              perplexity(model, encoder, "The weather today is sunny."))
    soft = gumbel_softmax(model, 1)
    print("gumbel-softmax argmax:", encoder.decode(soft[0].argmax(-1).tolist()))


if __name__ == "__main__":
    main()
