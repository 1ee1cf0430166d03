#!/bin/sh
# Download OpenAI's GPT-2 checkpoint files, as in the original example:
#   sh download_model.sh 117M        (or 345M, 774M, 1558M; 117M by default)
# Files go to gpt2_pretrained_models/model_<MODEL>/ under the current directory.
# All flags of `python -m utils.checkpoints.download --help` pass through, e.g.
#   sh download_model.sh 1558M --total_timeout 14400   (give up on a file after 4 h)
# Every file is checked (complete, not an HTML page, parses) before it gets its
# final name; a file already there that fails its check is downloaded again.
# Environment: GPT2_DOWNLOAD_BASE_URL (a mirror), GPT2_DOWNLOAD_TOTAL_TIMEOUT
# (seconds per file; default no limit), GPT2_DOWNLOAD_BACKOFF (first wait between
# retries, seconds; default 0.5).
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
# Import this project's utils even when the current directory has a utils/ of its own.
exec "$py" -c 'import sys
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "download_model.sh"
from utils.checkpoints.download import main
from utils.errors import run_main
run_main(main)' "$here" "$@"
