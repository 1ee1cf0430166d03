#!/usr/bin/env bash
# Conditional fine-tuning end to end, offline: "given this source, write that
# target". Prepares data/toy_qa (question<TAB>answer pairs we wrote), trains a
# tiny GPT-2 from scratch on <|endoftext|> question <|endoftext|> answer
# <|endoftext|> with the loss on the answers only, reports the dev perplexity of
# the answers, answers the test questions into a TSV, and answers one more
# question with gpt2_generate_main.py --conditional. A few minutes on two cores.
# OUTPUT_DIR=... puts the results elsewhere (default: output_demo_qa); a previous
# demo run there is replaced, nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR="${OUTPUT_DIR:-output_demo_qa}"

bash scripts/setup.sh
. .venv/bin/activate

echo "== 1/4 Prepare data/toy_qa (source<TAB>target pairs)"
python prepare_data.py --data_dir data/toy_qa --max_seq_length 32

echo "== 2/4 Train configs.config_model_tiny on the pairs; dev perplexity of the answers"
. scripts/demo_output.sh
run_demo_training python gpt2_train_main.py --do_train --do_eval --do_test --from_scratch \
    --config_model configs.config_model_tiny \
    --config_train configs.config_train_demo_qa

echo "== 3/4 Test answers (question<TAB>generated answer<TAB>reference answer)"
cat "$OUTPUT_DIR/test_samples.tsv"

echo "== 4/4 One question through gpt2_generate_main.py --conditional"
echo "What sound does a dog make?" | python gpt2_generate_main.py --is_interactive \
    --conditional --checkpoint "$OUTPUT_DIR/model.ckpt" \
    --max_decoding_length 32 --decoding_strategy greedy
