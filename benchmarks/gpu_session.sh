#!/usr/bin/env bash
# Every GPU check and benchmark of one device session, in one call (the lent H200 has 15 minutes).
# Wheels for what the device image lacks travel in .whl/ (see docs/performance.md, "GPU (H200)").
# Output: $OUT/gpu.log (copied into benchmarks/results/ afterwards).
set -u
LOG=${OUT:-/tmp}/gpu.log
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
run() { echo "\$ $*" | tee -a "$LOG"; "$@" 2>&1 | tee -a "$LOG"; }
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__)"
run python3 -m pytest -q -p no:cacheprovider tests/test_clip_loss.py tests/test_teachers.py tests/test_models.py
run python3 benchmarks/pretrain_step.py --device cuda --precision bf16 --sizes eva_base,eva_large --batch 64 --steps 10
run python3 benchmarks/pretrain_step.py --device cuda --precision bf16 --sizes eva_base --batch 64 --steps 10 --adamw foreach
run python3 benchmarks/pretrain_step.py --device cuda --precision bf16 --sizes eva_giant --teacher ViT-L-14-quickgelu --batch 32 --steps 5
run python3 benchmarks/pretrain_step.py --device cuda --precision bf16 --sizes eva_base --batch 64 --steps 10 --compile student
# Dense tasks on the GPU: global attention's rel-pos as a mask vs as channels, and Mask2Former's loss
# and attention vs transformers' own, each pair measured in one run (docs/detect.md, docs/segment.md).
run timeout 300 python3 benchmarks/detect_step.py --device cuda --configs eva_giant@1280,eva_giant@1536 --grad-checkpointing --backbone-only --rel-pos mask,channels --steps 2
run timeout 300 python3 benchmarks/segment_step.py --device cuda --size eva_giant --crop 896 --decoders mask2former_hf,mask2former --m2f-hidden 1024 --m2f-heads 32 --m2f-ffn 4096 --m2f-layers 8 --queries 200 --grad-checkpointing --steps 3
