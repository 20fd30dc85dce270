"""Matmul ceiling for SmolLM2 at batch M: time every linear layer's GEMM (fp32) at M rows, as one decode
step of M sequences would run them, with torch's own GEMM; ceiling tok/s = M / (sum of GEMM times)."""
import time, torch
H, I, L, V, KV = 576, 1536, 30, 49152, 192  # SmolLM2-135M: hidden, mlp, layers, vocab, kv width (3 heads x 64)
shapes = [(H, H + 2 * KV), (H, H), (H, 2 * I), (I, H)] * L + [(H, V)]
for M in (1, 8, 32, 64):
    ws = [torch.randn(k, n) for k, n in shapes]
    x = {k: torch.randn(M, k) for k, _ in shapes}
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for (k, n), w in zip(shapes, ws):
            torch.mm(x[k], w)
        best = min(best, time.perf_counter() - t0)
    flops = sum(2 * M * k * n for k, n in shapes)
    print(f"M={M:3d}: {best*1e3:7.2f} ms per step, {flops/best/1e9:6.1f} GFLOP/s, ceiling {M/best:7.1f} tok/s")
