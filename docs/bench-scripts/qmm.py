"""SmolLM2's linears as packed int8 (per-channel) and int4 (g64) weights at M rows: ms per step."""
import time, torch
from tuneserve.kernels import quant_ops as Q
H, I, L, V, KV = 576, 1536, 30, 49152, 192
shapes = [(H + 2 * KV, H), (H, H), (2 * I, H), (H, I)] * L + [(V, H)]
def w8(n, k): return torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n, 1, dtype=torch.float32), None
def w4(n, k): return torch.randint(0, 255, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // 64, dtype=torch.float16), torch.rand(n, k // 64, dtype=torch.float16)
for name, make in (("int8", w8), ("int4", w4)):
    ws = [make(n, k) for n, k in shapes]
    for M in (1, 4, 8):
        xs = {k: torch.randn(M, k) for _, k in shapes}
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            for (n, k), (q, s, m) in zip(shapes, ws):
                Q.matmul(xs[k], q, s, m)
            best = min(best, time.perf_counter() - t0)
        print(f"{name} M={M}: {best*1e3:6.1f} ms per step", flush=True)
