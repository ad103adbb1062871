# Sourced by the GPU scripts (gpu_bench.sh, gpu_session.sh) from the repository root: installs the wheels in
# .whl/ (for a machine without network; see gpu_bench.sh for the list) into /tmp/site, puts src/ on the path
# when rwkvunet is not installed, and prints the GPU and the library versions.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import rwkvunet" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), 'timm', timm.__version__, 'transformers', transformers.__version__)"
