"""tqmetal.sdpa_int4 under mx.compile (fixed and shapeless) and under mx.grad / mx.vjp."""

import mlx.core as mx
import numpy as np
import pytest

import reference as R
import tqmetal


def _fn(c: R.Case, *, mask=None, sinks=False, tail=False):
    """A function of arrays only (compile traces arrays; python values are constants)."""
    gs, kb, vb, scale = c.group_size, c.k_bits, c.v_bits, c.scale

    def f(q, kp, ks, kb_, vp, vs, vb_, *extra):
        kw = {}
        i = 0
        if mask == "array":
            kw["mask"] = extra[i]
            i += 1
        elif mask is not None:
            kw["mask"] = mask
        if sinks:
            kw["sinks"] = extra[i]
            i += 1
        if tail:
            kw["k_tail"], kw["v_tail"] = extra[i], extra[i + 1]
        return tqmetal.sdpa_int4(
            q, (kp, ks, kb_), (vp, vs, vb_), scale=scale, group_size=gs, k_bits=kb, v_bits=vb, **kw
        )

    return f


def _args(c: R.Case, *, mask=None, sinks=False, tail=False):
    a = [c.q, *c.k, *c.v]
    if mask == "array":
        a.append(c.mask)
    if sinks:
        a.append(c.sinks)
    if tail:
        a += [c.k_tail, c.v_tail]
    return a


CONFIGS = [
    dict(mask=None, sinks=False, tail=False, mask_kind="none"),
    dict(mask="causal", sinks=True, tail=False, mask_kind="causal"),
    dict(mask="array", sinks=False, tail=True, mask_kind="bool_B1LN"),
    dict(mask="array", sinks=True, tail=True, mask_kind="add_inf"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["mask_kind"] for c in CONFIGS])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_compile_matches_eager(cfg, dtype):
    c = R.make_case(
        B=2, Hq=4, Hkv=2, L=5, N=150, T=6 if cfg["tail"] else 0, D=64, dtype=dtype,
        group_size=32, k_bits=8, v_bits=4, mask=cfg["mask_kind"], sinks=cfg["sinks"], seed=1,
    )
    sel = dict(mask=cfg["mask"], sinks=cfg["sinks"], tail=cfg["tail"])
    f = _fn(c, **sel)
    args = _args(c, **sel)
    eager = f(*args)
    cf = mx.compile(f)
    comp = cf(*args)
    comp2 = cf(*args)  # cached trace
    mx.eval(eager, comp, comp2)
    assert comp.dtype == eager.dtype and comp.shape == eager.shape
    assert mx.allclose(comp, eager, rtol=1e-5, atol=1e-6, equal_nan=True).item()
    assert mx.array_equal(comp, comp2, equal_nan=True).item()
    R.check_close(comp, c.reference(), c.tol(), context=f"compiled {c!r}")


def test_compile_slices_cache_inside():
    """As in a compiled mlx-lm step: the compiled function slices the preallocated cache."""
    c = R.make_case(
        B=2, Hq=4, Hkv=2, L=1, N=300, T=0, D=64, dtype="float16", group_size=64, mask="bool_B11N",
        seed=7,
    )
    N = c.k[0].shape[2]
    # preallocated buffers: the N real rows, then rows of garbage / NaN scales
    rng = np.random.default_rng(1)
    parents = [mx.concatenate([a, R.poison_rows(a, 212, rng)], axis=2) for a in (*c.k, *c.v)]
    mx.eval(parents)

    def step(q, kp, ks, kb, vp, vs, vb, mask):
        sl = lambda x: x[..., :N, :]
        return tqmetal.sdpa_int4(
            q, (sl(kp), sl(ks), sl(kb)), (sl(vp), sl(vs), sl(vb)), scale=c.scale, mask=mask,
            group_size=c.group_size, bits=4,
        )

    out = mx.compile(step)(c.q, *parents, c.mask)
    R.check_close(out, c.reference(), c.tol(), context="compiled slicing step")


def test_compile_inside_larger_graph():
    c = R.make_case(B=1, Hq=4, Hkv=1, L=3, N=99, D=128, dtype="float32", group_size=64, mask="causal", seed=2)
    f = _fn(c, mask="causal")

    def g(*a):
        o = f(*a)
        return mx.tanh(o) * 2.0 + o.sum(axis=-1, keepdims=True)

    ref = c.reference()
    R.check_close(f(*_args(c)), ref, c.tol(), context="uncompiled op")
    out = mx.compile(g)(*_args(c))
    # the compiled graph computes what the uncompiled one does, up to float32 rounding ...
    np.testing.assert_allclose(R.to_f64(out), R.to_f64(g(*_args(c))), rtol=1e-6, atol=1e-6)
    # ... which is the reference's (loosely: the sum over D adds up the op's row error)
    exp = np.tanh(ref) * 2.0 + ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(R.to_f64(out), exp, rtol=1e-3, atol=1e-3)


SHAPELESS = [
    dict(mask=None, sinks=False, tail=False, mask_kind="none"),
    dict(mask="causal", sinks=True, tail=False, mask_kind="causal"),
    dict(mask="causal", sinks=False, tail=True, mask_kind="causal"),
    dict(mask="array", sinks=False, tail=True, mask_kind="bool_BHLN"),
    # masks that need broadcasting to [B, H_q, L, N_total]
    dict(mask="array", sinks=False, tail=True, mask_kind="bool_B1LN"),
    dict(mask="array", sinks=True, tail=False, mask_kind="bool_LN"),
    dict(mask="array", sinks=False, tail=False, mask_kind="add_LN"),
]


@pytest.mark.parametrize(
    "cfg", SHAPELESS, ids=[f"{c['mask_kind']}-sinks{int(c['sinks'])}-tail{int(c['tail'])}" for c in SHAPELESS]
)
def test_compile_shapeless_changing_lengths(cfg):
    """shapeless=True: one trace, then calls with different L and N (and tail length)."""
    shapes = [(1, 100, 3), (1, 257, 1), (4, 300, 5), (1, 1000, 2), (7, 33, 4)]
    cf = None
    for i, (L, N, T) in enumerate(shapes):
        c = R.make_case(
            B=2, Hq=4, Hkv=2, L=L, N=N, T=T if cfg["tail"] else 0, D=64, dtype="float32",
            group_size=64, mask=cfg["mask_kind"], sinks=cfg["sinks"], seed=10 + i,
        )
        sel = dict(mask=cfg["mask"], sinks=cfg["sinks"], tail=cfg["tail"])
        if cf is None:
            cf = mx.compile(_fn(c, **sel), shapeless=True)
        out = cf(*_args(c, **sel))
        mx.eval(out)
        assert tuple(out.shape) == (2, 4, L, 64), f"shapeless call {i}: shape {out.shape}"
        R.check_close(out, c.reference(), c.tol(), context=f"shapeless call {i} {c!r}")


# ==================================================================================
# gradients
# ==================================================================================
#
# tqmetal defines the VJP with respect to q only (the backward pass is mx.fast SDPA on
# the dequantized cache); asking for the gradient of anything else raises ValueError.


def _grad_case(mask_kind, sinks, dtype="float32", T=0, L=6, N=120, seed=0):
    return R.make_case(
        B=2, Hq=4, Hkv=2, L=L, N=N, T=T, D=64, dtype=dtype, group_size=32, k_bits=4,
        v_bits=8, mask=mask_kind, sinks=sinks, seed=seed,
    )


GRAD_CONFIGS = [
    ("none", False, 0), ("causal", True, 0), ("causal", False, 5), ("bool_BHLN", False, 3),
    ("bool_dead", True, 0), ("add_inf", False, 0), ("add_B1LN", True, 4),
]


@pytest.mark.parametrize("mask_kind,sinks,T", GRAD_CONFIGS, ids=[f"{m}-{s}-{t}" for m, s, t in GRAD_CONFIGS])
def test_vjp_wrt_q(mask_kind, sinks, T):
    c = _grad_case(mask_kind, sinks, T=T, seed=len(mask_kind) + T)
    kw = c.kwargs()
    ct = mx.array(np.random.default_rng(5).normal(size=c.q.shape).astype(np.float32))

    (out,), (dq,) = mx.vjp(lambda q: [tqmetal.sdpa_int4(q, c.k, c.v, **kw)], [c.q], [ct])
    R.check_close(out, c.reference(), c.tol(), context="vjp primal")
    K, V = c.kv_ref()
    dq_ref = R.attention_grad_q_ref(c.q, K, V, ct, scale=c.scale, mask=c.mask, sinks=c.sinks)
    assert dq.shape == c.q.shape and dq.dtype == c.q.dtype
    R.check_close(dq, dq_ref, 1e-6, context=f"dq {c!r}")

    # same as mx.fast's own VJP on the dequantized cache
    Kf, Vf = c.dequantized_mx()
    _, (dq_fast,) = mx.vjp(
        lambda q: [mx.fast.scaled_dot_product_attention(q, Kf, Vf, scale=c.scale, mask=c.mask, sinks=c.sinks)],
        [c.q], [ct],
    )
    R.check_close(dq, dq_fast, 1e-6, context="dq vs mx.fast vjp")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_grad_wrt_q_half(dtype):
    c = _grad_case("causal", False, dtype=dtype, T=2, seed=3)
    kw = c.kwargs()
    g = mx.grad(lambda q: tqmetal.sdpa_int4(q, c.k, c.v, **kw).astype(mx.float32).sum())(c.q)
    assert g.dtype == c.q.dtype
    K, V = c.kv_ref()
    ref = R.attention_grad_q_ref(c.q, K, V, np.ones(c.q.shape), scale=c.scale, mask="causal")
    R.check_close(g, ref, 5e-3, context=f"grad {dtype}")


def test_grad_finite_differences():
    """Independent of both references: central differences of a scalar loss in float64 numpy."""
    c = _grad_case("bool_B1LN", True, T=3, L=2, N=40, seed=9)
    kw = c.kwargs()
    w = np.random.default_rng(1).normal(size=c.q.shape)

    def loss_np(qn):
        return float((R.sdpa_int4_ref(qn, c.k, c.v, **kw) * w).sum())

    g = mx.grad(lambda q: (tqmetal.sdpa_int4(q, c.k, c.v, **kw) * mx.array(w.astype(np.float32))).sum())(c.q)
    g = R.to_f64(g)
    q0 = R.to_f64(c.q)
    rng = np.random.default_rng(2)
    for _ in range(12):
        idx = tuple(int(rng.integers(0, n)) for n in q0.shape)
        h = 1e-5
        qp, qm = q0.copy(), q0.copy()
        qp[idx] += h
        qm[idx] -= h
        fd = (loss_np(qp) - loss_np(qm)) / (2 * h)
        assert abs(g[idx] - fd) <= 1e-4 * max(1.0, abs(fd)), (idx, g[idx], fd)


def test_grad_under_compile():
    c = _grad_case("causal", True, seed=4)
    kw = c.kwargs()
    gf = mx.grad(lambda q: tqmetal.sdpa_int4(q, c.k, c.v, **kw).sum())
    g1 = gf(c.q)
    g2 = mx.compile(gf)(c.q)
    assert mx.allclose(g1, g2, rtol=1e-5, atol=1e-6).item()
    K, V = c.kv_ref()
    ref = R.attention_grad_q_ref(c.q, K, V, np.ones(c.q.shape), scale=c.scale, mask="causal", sinks=c.sinks)
    R.check_close(g2, ref, 1e-6, context="compiled grad")


@pytest.mark.parametrize("what", ["k_scales", "v_biases", "sinks", "k_tail", "v_tail", "mask"])
def test_grad_wrt_other_inputs_raises(what):
    c = _grad_case("add_B1LN", True, T=3, seed=6)
    kw = c.kwargs()
    k, v = list(c.k), list(c.v)

    def f(x):
        kk, vv, kw2 = list(k), list(v), dict(kw)
        if what == "k_scales":
            kk[1] = x
        elif what == "v_biases":
            vv[2] = x
        else:
            kw2[what] = x
        return tqmetal.sdpa_int4(c.q, tuple(kk), tuple(vv), **kw2).sum()

    x0 = {"k_scales": k[1], "v_biases": v[2], "sinks": c.sinks, "k_tail": c.k_tail,
          "v_tail": c.v_tail, "mask": c.mask}[what]
    with pytest.raises(ValueError, match=r"gradient.*\bq\b"):
        mx.eval(mx.grad(f)(x0))
