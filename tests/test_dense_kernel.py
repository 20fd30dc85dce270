"""The compiled small-batch fp32 linear equals F.linear (odd shapes, every row count it takes, bias)."""

import pytest
import torch
import torch.nn.functional as F

from tuneserve.kernels import dense_ops


@pytest.mark.parametrize("k,n", [(576, 1536), (37, 5), (100, 33), (64, 49)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_kernel_equals_f_linear(k, n, bias):
    g = torch.Generator().manual_seed(k * n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    if not dense_ops.kernel_applies(torch.zeros(1, k), w):
        pytest.skip("no compiled kernels here (no C compiler)")
    for m in range(1, dense_ops.SMALL_M):
        x = torch.randn(m, k, generator=g)
        torch.testing.assert_close(dense_ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_large_batches_and_other_dtypes_take_torch():
    w = torch.randn(8, 32)
    assert not dense_ops.kernel_applies(torch.zeros(dense_ops.SMALL_M, 32), w)
    assert not dense_ops.kernel_applies(torch.zeros(2, 32, dtype=torch.bfloat16), w.bfloat16())
    assert not dense_ops.kernel_applies(torch.zeros(2, 32), w.t())  # a non-contiguous weight
    x = torch.randn(2, 32)
    torch.testing.assert_close(dense_ops.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))


def test_loading_a_kernel_keeps_the_processes_floating_point_environment():
    """-ffast-math libraries turn on flush-to-zero when loaded (gcc < 13); ours must not leak that into the
    process (a fresh interpreter: a library loaded before would not run its constructor again)."""
    import subprocess
    import sys

    from tuneserve.kernels import cpu_build

    if not cpu_build.enabled():
        pytest.skip("no compiled kernels here")
    code = ("import numpy as np; from tuneserve.kernels import cpu_build; assert cpu_build.load('dense_matmul'); "
            "t = np.float32(np.finfo(np.float32).tiny); print(bool(t / np.float32(4) != 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
