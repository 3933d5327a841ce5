import subprocess
import sys


def test_import_is_light_and_never_touches_cuda():
    code = (
        "import sys, torch, flashllm\n"
        "assert not torch.cuda.is_initialized(), 'import initialized CUDA'\n"
        "heavy = [m for m in ('cupy', 'transformers', 'triton', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api():
    import flashllm

    for name in ("prune_", "sparsify_", "spmm", "SparseLinear", "BitmapWeight", "TiledCSLWeight", "TiledCSL16Weight"):
        assert hasattr(flashllm, name), name
    assert set(flashllm.FORMATS) == {"bitmap", "tiled_csl", "tiled_csl16"}
