#!/usr/bin/env bash
# The main job end to end, offline (only the package index is needed, for setup):
# prepare the toy data with the shipped GPT-2 vocabulary, train a tiny GPT-2 from
# scratch, evaluate dev perplexity, continue the test lines into a TSV, and
# generate from the fine-tuned checkpoint. A few minutes on two CPU cores.
# OUTPUT_DIR=... puts the results elsewhere (default: output_demo, so that
# the README's commands find their output folders free).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR="${OUTPUT_DIR:-output_demo}"

bash scripts/setup.sh
. .venv/bin/activate

echo "== 1/4 Prepare data/toy (BPE, <|endoftext|> around each line)"
python prepare_data.py --data_dir data/toy --max_seq_length 128

echo "== 2/4 Train configs.config_model_tiny from scratch; dev perplexity; test continuations"
. scripts/demo_output.sh
run_demo_training python gpt2_train_main.py --do_train --do_eval --do_test --from_scratch \
    --config_model configs.config_model_tiny \
    --config_train configs.config_train_demo

echo "== 3/4 First test continuations (context<TAB>continuation)"
head -n 4 "$OUTPUT_DIR/test_samples.tsv"

echo "== 4/4 Generate from the fine-tuned checkpoint"
python gpt2_generate_main.py --checkpoint "$OUTPUT_DIR/model.ckpt" \
    --nsamples 2 --batch_size 2 --max_decoding_length 40 \
    --temperature 0.7 --top_k 40 --seed 0

echo
echo "Done. Test continuations: $OUTPUT_DIR/test_samples.tsv"
echo "Checkpoints: $OUTPUT_DIR/model.ckpt (last; resume with --do_train --checkpoint)," \
     "$OUTPUT_DIR/model_best.ckpt (best dev perplexity); metrics: $OUTPUT_DIR/metrics.jsonl"
echo "Interactive: python gpt2_generate_main.py --checkpoint $OUTPUT_DIR/model.ckpt --is_interactive"
