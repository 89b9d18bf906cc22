# Sourced by the GPU session scripts (scripts/gpu_*.sh): $OUT made, the carried wheels (.whl)
# installed, the project importable, no hub access, the GPU and the versions printed and kept in
# $OUT/versions.txt.
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuDNN', torch.backends.cudnn.version())"; } | tee "$OUT/versions.txt"
