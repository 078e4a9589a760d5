"""Fused blend: torch backend, backend choice, CUDA sources compile, GPU parity."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.errors import FailedPreconditionError
from esper.kasmina import KasminaConfig, wrap
from esper.kasmina.backends import select_blend, torch_backend
from tests.unit.kasmina.kasmina_hosts import ZeroOutSeed, mlp, train_steps

ROOT = Path(__file__).resolve().parents[3]
CU_FILES = sorted((ROOT / "kernels").glob("*.cu"))


def test_torch_blend_value_and_gradients() -> None:
    h = torch.randn(4, 6, requires_grad=True)
    s = torch.randn(4, 6, requires_grad=True)
    alpha = torch.tensor(0.5)
    y = torch_backend.blend(h, s, alpha)
    assert torch.equal(y, h + 0.5 * s)
    g = torch.randn(4, 6)
    y.backward(g)
    assert torch.equal(h.grad, g) and torch.equal(s.grad, 0.5 * g)


def test_torch_blend_keeps_low_precision_dtype() -> None:
    h = torch.randn(3, 5, dtype=torch.bfloat16)
    s = torch.randn(3, 5, dtype=torch.bfloat16)
    y = torch_backend.blend(h, s, torch.tensor(0.25))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (h.float() + 0.25 * s.float()).to(torch.bfloat16))


def test_cpu_tensors_use_torch_and_forced_cupy_is_refused() -> None:
    assert select_blend(torch.device("cpu"), torch.float32, "auto") is torch_backend.blend
    with pytest.raises(FailedPreconditionError, match="blend_backend='cupy' cannot run here"):
        select_blend(torch.device("cpu"), torch.float32, "cupy")


def test_importing_and_training_on_cpu_never_imports_cupy() -> None:
    code = (
        "import sys, torch\n"
        "import esper.kasmina as k\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n"
        "x = torch.randn(8, 4)\n"
        "mm = k.wrap(m, sites=['1'], example_input=x, config=k.KasminaConfig(stats_interval=1, incubation=1,"
        " gate_interval=1, blend_duration=3))\n"
        "seed = nn.Linear(4, 4); nn.init.zeros_(seed.weight); nn.init.zeros_(seed.bias)\n"
        "mm.germinate('1', seed, kernel_id='k', blueprint_id='b')\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1); mm.attach_optimizer(opt)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); mm(x).sum().backward(); opt.step(); mm.step()\n"
        "assert mm.slots['1'].current_stage == k.SeedStage.BLENDING, mm.slots['1'].current_stage\n"
        "print('cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_there_are_cuda_sources() -> None:
    assert [p.name for p in CU_FILES] == ["blend.cu"]


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_every_cuda_source_compiles_to_ptx_with_nvrtc(path: Path) -> None:
    compiler = pytest.importorskip("cupy.cuda.compiler")
    ptx = compiler._NVRTCProgram(path.read_text(), path.name).compile(("-arch=compute_80",))[0]
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    entries = set(re.findall(r"\.entry\s+(\w+)", text))
    declared = set(re.findall(r'extern "C" __global__ void (\w+)', path.read_text()))
    assert declared and entries == declared


def test_backend_kernel_names_exist_in_the_source() -> None:
    src = (ROOT / "kernels" / "blend.cu").read_text()
    for dt in ("f32", "f16", "bf16"):
        assert f"void blend_fwd_{dt}(" in src and f"void blend_bwd_seed_{dt}(" in src
    assert "void blend_fwd_f32_vec4(" in src


# ---- GPU (skipped without CUDA by tests/conftest.py) -----------------------------------


def _cupy_blend():
    cupy_backend = pytest.importorskip("esper.kasmina.backends.cupy_backend")
    if not cupy_backend.available():
        pytest.skip("cupy sees no CUDA device")
    return cupy_backend


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 4096, 1_000_003])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_cupy_blend_matches_torch(dtype: torch.dtype, n: int, offset: int) -> None:
    cb = _cupy_blend()
    dev = torch.device("cuda")
    # `offset` makes the fp32 views 4-byte but not 16-byte aligned: the scalar kernel path
    hb = torch.randn(n + offset, device=dev, dtype=dtype)[offset:].requires_grad_()
    sb = torch.randn(n + offset, device=dev, dtype=dtype)[offset:].requires_grad_()
    h2 = hb.detach().clone().requires_grad_()
    s2 = sb.detach().clone().requires_grad_()
    alpha = torch.tensor(0.37, device=dev)
    y = cb.blend(hb, sb, alpha)
    y_ref = torch_backend.blend(h2, s2, alpha)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(hb.grad, h2.grad)
    torch.testing.assert_close(sb.grad, s2.grad, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_gpu_blend_half_is_exact() -> None:
    cb = _cupy_blend()
    h = torch.randn(1000, device="cuda")
    s = torch.randn(1000, device="cuda")
    assert torch.equal(cb.blend(h, s, torch.tensor(0.5, device="cuda")), h + 0.5 * s)


@pytest.mark.gpu
def test_gpu_training_steps_do_not_synchronise() -> None:
    _cupy_blend()
    host = mlp().cuda()
    x = torch.randn(64, 8, device="cuda")
    mm = wrap(host, sites=["1", "3"], example_input=x,
              config=KasminaConfig(stats_interval=1, incubation=1, gate_interval=1,
                                  blend_duration=1000))
    opt = torch.optim.SGD(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="k", blueprint_id="b")
    train_steps(mm, opt, x, 2)  # warm-up (and the gate read) may sync; then BLENDING
    assert mm.slots["3"].current_stage.name == "BLENDING"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.zero_grad()
            mm(x).pow(2).mean().backward()
            mm.clip_grad_norms(1.0, 1.0)
            opt.step()
            mm.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mm.health()[1].seed_grad_norm > 0
