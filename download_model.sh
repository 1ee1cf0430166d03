#!/bin/sh
# Download OpenAI's GPT-2 checkpoint files, as in the original example:
#   sh download_model.sh 117M        (or 345M, 774M, 1558M; 117M by default)
# Files go to gpt2_pretrained_models/model_<MODEL>/ under the current directory.
# All flags of `python -m utils.download --help` pass through.
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
# Import this project's utils even when the current directory has a utils/ of its own.
exec "$py" -c 'import sys
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "download_model.sh"
from utils.download import main
from utils.errors import run_main
run_main(main)' "$here" "$@"
