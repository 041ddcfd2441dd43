# One decode call shape (B=1, 32/8 heads, D=128, g64) for ncu: tq (int4), k5v3 or fp16 SDPA.
import sys
import mlx.core as mx
import tqmetal
mode, N = sys.argv[1], int(sys.argv[2])
k = mx.random.normal((1, 8, N, 128)).astype(mx.float16)
v = mx.random.normal((1, 8, N, 128)).astype(mx.float16)
q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
kb, vb = (5, 3) if mode == "k5v3" else (4, 4)
kq, vq = mx.quantize(k, group_size=64, bits=kb), mx.quantize(v, group_size=64, bits=vb)
mx.eval(k, v, kq, vq, q)
if mode == "fp16":
    f = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=128 ** -0.5)
else:
    f = lambda: tqmetal.sdpa_int4(q, kq, vq, scale=128 ** -0.5, group_size=64, k_bits=kb, v_bits=vb)
for i in range(3):
    mx.eval(f())
mx.synchronize()
print("ok", mode, N)
