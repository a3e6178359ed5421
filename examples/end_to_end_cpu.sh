#!/usr/bin/env bash
# End to end on the embedded tiny recipe, CPU, about a minute:
#   pretrain (W&B offline + TensorBoard) -> torch_dist checkpoint -> gqla-serve on the path the
#   cost model picks, then forced onto each path: the generated tokens must be identical.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}
rm -rf "$RUN"
export WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" pretrain/pretrain_gqla.py --recipe tiny_cpu --mock-data --train-iters 30 --log-interval 10 \
    --save "$RUN/ckpt" --save-interval 30 --wandb-project gqla-quickstart --wandb-save-dir "$RUN" \
    --tensorboard-dir "$RUN/tb" 2>&1 | grep -E "^(gqla-pretrain|iter)"
for path in auto absorb gqa; do
  echo "== gqla-serve generate --decode-path $path"
  "$PY" serve/generate.py generate --load "$RUN/ckpt" --decode-path "$path" --max-new-tokens 8 \
      --prompt-ids "10 11 12 13" --prompt-ids "100 101" 2>/dev/null | tee "$RUN/serve_$path.txt" \
      | grep -E "chosen|KV-cache|^\["
done
if diff <(grep '^\[' "$RUN/serve_absorb.txt") <(grep '^\[' "$RUN/serve_gqa.txt") > /dev/null; then
  echo "OK: absorb and gqa paths generated identical tokens"
else
  echo "FAIL: the two decode paths disagree"; exit 1
fi
