"""SmolLM2's linear layers at M rows: torch F.linear vs the compiled small-batch kernel (ms per step)."""
import time, torch
import torch.nn.functional as F
from tuneserve.kernels import dense_ops
H, I, L, V, KV = 576, 1536, 30, 49152, 192
shapes = [(H + 2 * KV, H), (H, H), (2 * I, H), (H, I)] * L + [(V, H)]  # (N, K) nn.Linear layout
ws = [torch.randn(n, k) for n, k in shapes]
def step(f, M):
    xs = {k: torch.randn(M, k) for _, k in shapes}
    best = 1e9
    for _ in range(7):
        t0 = time.perf_counter()
        for (n, k), w in zip(shapes, ws):
            f(xs[k], w)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3
import sys
for M in [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 else (1, 2, 4, 5, 8, 12, 15):
    a, b = step(F.linear, M), step(dense_ops.linear, M)
    print(f"M={M:2d}: torch {a:6.1f} ms  kernel {b:6.1f} ms  speed-up {a / b:4.2f}x")
