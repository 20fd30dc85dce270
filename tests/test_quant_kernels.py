"""The compiled low-bit matmul kernels against the portable PyTorch path (the oracle)."""

import pytest
import torch

from tuneserve.kernels import quant_ops as Q
from tuneserve.kernels.config import resolve

pytestmark = pytest.mark.skipif(not Q.compiled_available(), reason="no C compiler / kernels disabled")


def _int4(n, k, group, dtype, g):
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).to(dtype)
    m = (-torch.rand(n, k // group, generator=g) * 0.8).to(dtype)
    return Q.pack_int4(q), s, m


def _int8(n, k, group, dtype, g):
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return q, (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).to(dtype), None


def _weights(bits, n, k, group, dtype, g):
    """(qweight, scales, mins, extra keyword arguments): int5 is int4 plus random high-bit words (qhigh)."""
    if bits == 8:
        return *_int8(n, k, group, dtype, g), {}
    qw, s, m = _int4(n, k, group, dtype, g)
    if bits == 4:
        return qw, s, m, {}
    return qw, s, m, {"qhigh": torch.randint(-2**31, 2**31 - 1, (n, k // 32), generator=g, dtype=torch.int32)}


CASES = [  # (bits, N, K, group, scale dtype)
    (4, 97, 32, 32, torch.float16), (4, 33, 96, 32, torch.float16), (4, 13, 128, 64, torch.float16),
    (4, 50, 576, 64, torch.float16), (4, 7, 384, 128, torch.float16), (4, 31, 256, 256, torch.float32),
    (4, 9, 640, 32, torch.float32), (4, 21, 192, 32, torch.float32), (4, 22, 320, 64, torch.float16),
    (8, 97, 48, 48, torch.float32), (8, 29, 576, 576, torch.float32), (8, 33, 96, 32, torch.float16),
    (8, 17, 256, 16, torch.float16), (8, 5, 160, 32, torch.float32), (8, 11, 160, 16, torch.float32),
    (8, 40, 640, 32, torch.float16), (8, 16, 512, 128, torch.float16),  # q8: whole 16-row blocks, fp16 scales gathered
    (5, 97, 32, 32, torch.float16), (5, 33, 96, 32, torch.float16), (5, 50, 576, 64, torch.float16),
    (5, 31, 256, 256, torch.float32), (5, 48, 896, 32, torch.float16), (5, 22, 320, 64, torch.float16),
    (4, 18, 2112, 32, torch.float16), (8, 20, 1056, 16, torch.float16),  # scale rows past 64 bytes
]


def _int8_config():
    """The int8-activation kernels asked for by name (AVX-512 VNNI, or AVX2); skips where neither is built."""
    if Q.libraries.qmatmul_vnni() is None:
        pytest.skip("no int8-activation kernels on this CPU (AVX-512 VNNI or AVX2)")
    return resolve(quant_activations="int8")


@pytest.mark.parametrize("act", ["auto", "int8"])
@pytest.mark.parametrize("bits,n,k,group,dtype", CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 15, 16, 40, 48, 57])
def test_matmul_kernel_equals_portable(bits, n, k, group, dtype, m, act):
    cfg = _int8_config() if act == "int8" else None  # None: the machine's default (config.detected)
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    qw, s, mn, kw = _weights(bits, n, k, group, dtype, g)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    act_int8 = Q.uses_act_int8(m, qw, s, mn, cfg)  # the int8 kernels round x to int8 per 32 inputs
    act_bf16 = Q.uses_act_bf16(m, qw, s, mn, cfg)  # large batches on bf16 CPUs: bf16 tiles, bf16 GEMM
    ref = Q.matmul(x, qw, s, mn, bias, path="portable", act_int8=act_int8, act_bf16=act_bf16, **kw)
    out = Q.matmul(x, qw, s, mn, bias, kernels=cfg, **kw)
    scale = ref.abs().max().item() + 1
    tol = 4e-3 if act_bf16 else 2e-5  # the bf16 GEMM's output is rounded to bf16
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("bits,n,k,group", [(4, 50, 576, 32), (4, 13, 640, 64), (8, 29, 576, 32), (8, 22, 160, 32),
                                            (8, 19, 160, 16), (8, 40, 640, 32), (5, 50, 576, 32), (5, 37, 896, 32)])
def test_int8_kernels_give_a_row_the_same_bits_in_any_batch(bits, n, k, group):
    """Greedy output under load must equal the output alone (the soak test checks it on SmolLM2): every row count
    computes a row's outputs with the same float operations in the same order. Tiles of 4 weight rows by 8 rows
    of x, summed across lanes in another order than one row alone, once broke this."""
    cfg = _int8_config()
    g = torch.Generator().manual_seed(k + bits)
    qw, s, mn, kw = _weights(bits, n, k, group, torch.float16, g)
    x = torch.randn(Q.VNNI_MAX_M - 1, k, generator=g)
    alone = torch.cat([Q.matmul(x[i:i + 1], qw, s, mn, kernels=cfg, **kw) for i in range(x.shape[0])])
    for m in (2, 5, 8, 13, 21, Q.VNNI_MAX_M - 1):
        assert Q.uses_act_int8(m, qw, s, mn, cfg)
        assert torch.equal(Q.matmul(x[:m], qw, s, mn, kernels=cfg, **kw), alone[:m]), m


def test_int8_kernels_cover_the_model_shapes():
    cfg = _int8_config()
    shapes = [(4, 576, 64), (4, 896, 128), (4, 1536, 32), (8, 576, 576), (8, 4864, 32), (8, 96, 32),
              (8, 4864, 16), (8, 2048, 16)]  # the last two: Q6_K's ffn_down in Qwen2.5-Coder and Gemma 3
    for bits, k, group in shapes:
        g = torch.Generator().manual_seed(k)
        qw, s, mn, kw = _weights(bits, 8, k, group, torch.float16, g)
        assert Q.uses_act_int8(1, qw, s, mn, cfg) and not Q.uses_act_int8(Q.VNNI_MAX_M, qw, s, mn, cfg)


def test_auto_takes_int8_activations_only_with_vnni(monkeypatch):
    """On AVX2 the int8 kernels run when asked for; "auto" keeps fp32 (or bf16) activations there."""
    from tuneserve.kernels import config as C

    monkeypatch.setattr(C.libraries, "qmatmul_vnni", lambda: object())
    avx2, vnni = C.CpuFeatures(avx2=True), C.CpuFeatures(avx2=True, avx512=True, avx512_vnni=True)
    assert C._runnable_act("auto", "compiled", avx2) == "fp32"
    assert C._runnable_act("int8", "compiled", avx2) == "int8"
    assert C._runnable_act("auto", "compiled", vnni) == "int8"


def test_int8_activation_rounding_costs_little():
    g = torch.Generator().manual_seed(3)
    qw, s, mn = _int4(64, 576, 64, torch.float16, g)
    x = torch.randn(4, 576, generator=g)
    exact = Q.matmul(x, qw, s, mn, path="portable")
    approx = Q.matmul(x, qw, s, mn, path="portable", act_int8=True)
    assert ((approx - exact).norm() / exact.norm()) < 0.01


@pytest.mark.parametrize("bits,n,k,group,dtype", CASES)
def test_dequant_kernel_equals_portable(bits, n, k, group, dtype):
    g = torch.Generator().manual_seed(k)
    qw, s, mn, kw = _weights(bits, n, k, group, dtype, g)
    rows = torch.tensor([n - 1, 0, n // 2, n - 1])
    qh = kw.get("qhigh")
    torch.testing.assert_close(Q.dequant_rows(qw, s, mn, rows=rows, qhigh=qh), Q.dequant_portable(qw, s, mn, rows, qh),
                               rtol=2e-6, atol=1e-7)  # the C code may fuse q * s + m
    torch.testing.assert_close(Q.dequant_rows(qw, s, mn, row0=1, nrows=n - 1, qhigh=qh),
                               Q.dequant_portable(qw, s, mn, slice(1, n), qh), rtol=2e-6, atol=1e-7)
    bf = Q.dequant_rows(qw, s, mn, rows=rows, dtype=torch.bfloat16, qhigh=qh)  # rounded to nearest even, like torch
    want = Q.dequant_portable(qw, s, mn, rows, qh).bfloat16().float()
    torch.testing.assert_close(bf.float(), want, rtol=8e-3, atol=0)


def test_large_batch_tiles_cover_every_row(monkeypatch):
    monkeypatch.setattr(Q, "TILE_ELEMS", 64 * 40)  # tiles of 40 rows over 97: a ragged last tile
    g = torch.Generator().manual_seed(9)
    qw, s, mn = _int4(97, 64, 32, torch.float16, g)
    fp32 = resolve(quant_activations="fp32")  # fp32 tiles: exact up to summation order
    x = torch.randn(max(Q.large_m(fp32), Q.VNNI_MAX_M) + 3, 64, generator=g)
    want = x @ Q.dequant_portable(qw, s, mn).t()
    torch.testing.assert_close(Q.matmul(x, qw, s, mn, kernels=fp32), want, rtol=1e-5, atol=1e-4)


def test_avx2_only_cpus_keep_the_kernel_up_to_64_rows():
    from tuneserve.kernels.config import CpuFeatures, KernelConfig

    avx2 = KernelConfig(quant="compiled", features=CpuFeatures(avx2=True))
    avx512 = KernelConfig(quant="compiled", features=CpuFeatures(avx2=True, avx512=True))
    assert (Q.large_m(avx2), Q.large_m(avx512), Q.large_m(KernelConfig())) == (64, 16, 16)
    qw, s, mn = _int4(8, 64, 32, torch.float16, torch.Generator().manual_seed(1))
    if Q.compiled_available():
        assert Q.small_batch_call(qw, s, mn, None, kernels=avx2)[2:] == (64, 64)
        assert Q.small_batch_call(qw, s, mn, None, kernels=avx512)[2:] == (16, 16)


def test_portable_env_switch_forces_the_pytorch_path(monkeypatch):
    monkeypatch.setenv("TUNESERVE_KERNELS", "portable")
    cfg = resolve()
    assert cfg.quant == "portable" and cfg.quant_act == "fp32"
    qw, s, mn = _int4(8, 64, 32, torch.float16, torch.Generator().manual_seed(1))
    assert Q.small_batch_call(qw, s, mn, None, kernels=cfg) is None


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_avx2_and_scalar_builds_equal_portable(march, monkeypatch):
    """CI machines may lack AVX-512: the AVX2 and plain-C copies of the kernels must be right too."""
    from tuneserve.kernels import cpu_build

    flags = [f"-march={march}" if f == "-march=native" else f for f in cpu_build.FLAGS]
    monkeypatch.setattr(cpu_build, "FLAGS", flags)
    cpu_build.load.cache_clear()
    Q.libraries.qmatmul.cache_clear()
    Q.libraries.qmatmul_vnni.cache_clear()
    try:
        if Q.libraries.qmatmul() is None:
            pytest.skip(f"cannot build for -march={march}")
        for bits, n, k, group, dtype in CASES:
            for m in (1, 3, 8, 13):
                g = torch.Generator().manual_seed(m)
                qw, s, mn, kw = _weights(bits, n, k, group, dtype, g)
                x = torch.randn(m, k, generator=g)
                ref = Q.matmul(x, qw, s, mn, path="portable", act_int8=Q.uses_act_int8(m, qw, s, mn),
                               act_bf16=Q.uses_act_bf16(m, qw, s, mn), **kw)
                torch.testing.assert_close(Q.matmul(x, qw, s, mn, **kw), ref, rtol=1e-5,
                                           atol=2e-5 * (ref.abs().max().item() + 1))
    finally:
        cpu_build.load.cache_clear()
        Q.libraries.qmatmul.cache_clear()
        Q.libraries.qmatmul_vnni.cache_clear()


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("act", ["int8", "fp32"])
def test_permuted_and_scaled_inputs_applied_in_the_kernel(bits, act, monkeypatch):
    """GPTQ act-order permutations and AWQ input scales: the small-batch kernels apply them in C."""
    from tuneserve.quant.linear import QuantLinear

    cfg = resolve(quant_activations=act)
    g = torch.Generator().manual_seed(bits)
    qw, s, mn, kw = _weights(bits, 24, 128, 64, torch.float16, g)
    perm, iscale = torch.randperm(128, generator=g), torch.rand(128, generator=g) + 0.5
    for p, sc in [(perm, None), (None, iscale), (perm, iscale)]:
        layer = QuantLinear(qw, s, mn, torch.randn(24, generator=g), p, sc, kw.get("qhigh"))
        layer.bind_kernels(cfg)
        assert layer._small_call() is not None
        for m in (1, 5, 20):
            x = torch.randn(m, 128, generator=g)
            xt = x * sc if sc is not None else x
            xt = xt[:, p] if p is not None else xt
            ref = Q.matmul(xt, qw, s, mn, layer.bias, path="portable",
                           act_int8=Q.uses_act_int8(m, qw, s, mn, cfg), act_bf16=Q.uses_act_bf16(m, qw, s, mn, cfg),
                           **kw)
            tol = 4e-3 if Q.uses_act_bf16(m, qw, s, mn, cfg) else 2e-5
            torch.testing.assert_close(layer(x), ref, rtol=tol, atol=tol * (ref.abs().max().item() + 1))
