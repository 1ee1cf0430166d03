#!/bin/sh
# Download OpenAI's GPT-2 checkpoint files, as in the original example:
#   sh download_model.sh 117M        (or 345M, 774M, 1558M; 117M by default)
# Files go to gpt2_pretrained_models/model_<MODEL>/ under the current directory.
# All flags of `python -m utils.download --help` pass through.
here=$(cd "$(dirname "$0")" && pwd)
if command -v python >/dev/null 2>&1; then py=python; else py=python3; fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m utils.download "$@"
