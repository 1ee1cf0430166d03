"""sample_steps in config_train: samples from fixed prompts during training, into samples.jsonl.

Every `sample_steps` optimizer steps rank 0 continues each of `sample_prompts`
(each after an <|endoftext|>, as training examples start; "" samples from
scratch) with top-k 40 sampling, seeded by the config's seed and the step so
that the same run writes the same samples and the training's random numbers
are untouched. Each sample is one line of <output_dir>/samples.jsonl:
{"step", "prompt", "text"}, appended and flushed as it is made, as
gpt-2-simple's sample_every prints them.
"""
import json
import os
from typing import List, Sequence

import torch
from utils.decoding.generation import generate

SAMPLES_LOG = "samples.jsonl"
SAMPLE_TOP_K = 40


def sample_contexts(encoder, prompts: Sequence[str]) -> List[List[int]]:
    return [[encoder.eos_id] + encoder.encode(prompt) for prompt in prompts]


def write_training_samples(model, encoder, prompts: Sequence[str], *, step: int,
                           seed: int, max_decoding_length: int, output_dir: str) -> None:
    """Append one line per prompt to samples.jsonl; the model is left as it was."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + step)
    was_training = model.training
    model.eval()
    try:
        outputs = generate(model, sample_contexts(encoder, prompts), max_decoding_length,
                           strategy="sample", top_k=SAMPLE_TOP_K,
                           end_token=encoder.eos_id, generator=generator)
    finally:
        model.train(was_training)
    with open(os.path.join(output_dir, SAMPLES_LOG), "a", encoding="utf-8") as f:
        for prompt, ids in zip(prompts, outputs):
            f.write(json.dumps({"step": step, "prompt": prompt,
                                "text": encoder.decode(ids)}, ensure_ascii=False) + "\n")
        f.flush()
