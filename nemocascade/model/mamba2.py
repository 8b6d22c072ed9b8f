"""Mamba-2 mixer (NemotronH `M` blocks): in_proj -> causal depthwise conv + SiLU -> SSD scan ->
gate-before-norm grouped RMSNorm -> out_proj.

Shapes: B batch, T time, D hidden, H ssm heads, P head dim, G groups, N state size, K conv taps,
C chunks, L chunk length.

The scan is the exact chunked SSD algorithm (Mamba-2 paper, section 6): within a chunk a masked
"attention" form, across chunks a recurrence over chunk states, all in fp32. Packed sequences:
`segment_ids` cut every path between positions of different segments (conv taps, intra-chunk
terms, chunk-state carries), which equals running each segment alone from a zero state.

The time step is `dt = softplus(dt_raw + dt_bias)` clamped to `cfg.dt_limit`: Hugging Face's
PyTorch path floors it at `time_step_min`; the released kernels do not (see config.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from nemocascade.model import context_parallel as cp
from nemocascade.model.config import ModelConfig
from nemocascade.model.layers import dtype_of, param

_NEG = -1e30  # exponent of a cut path (exp -> 0); avoids inf - inf


@struct.dataclass
class MambaCache:
    conv_BKC: jax.Array  # [B, K-1, conv_dim] last conv inputs of the current segment (else 0)
    ssm_BHPN: jax.Array  # [B, H, P, N] fp32 SSM state
    seg_B: jax.Array  # [B] int32 segment id the states belong to (that of the last position)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, dtype) -> MambaCache:
        return cls(
            jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
            jnp.zeros(
                (batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), jnp.float32
            ),
            jnp.zeros((batch,), jnp.int32),
        )

    def continuing(self, seg_BT: jax.Array) -> MambaCache:
        """The states with rows zeroed whose cached segment differs from that of `seg_BT[:, 0]`
        (a new segment starts from a zero state, so states of padding or of an earlier document
        never leak into it)."""
        same_B = self.seg_B == seg_BT[:, 0].astype(jnp.int32)
        return MambaCache(
            jnp.where(same_B[:, None, None], self.conv_BKC, 0),
            jnp.where(same_B[:, None, None, None], self.ssm_BHPN, 0),
            self.seg_B,
        )


def causal_conv(x_BTC, w_KC, b_C, seg_BT, prev_BKC=None, prev_seg_BK=None):
    """Depthwise causal conv over time; taps from another segment contribute zero.

    `prev_BKC` (K-1 earlier inputs) continues a sequence: a cache's (already masked to the first
    position's segment) or, with their segment ids `prev_seg_BK`, the previous slice's of a
    context-parallel sequence. Output `y[t] = b + sum_j w[j] * x[t - (K-1) + j]` in fp32: the
    decode step's conv stays fp32 up to the SiLU as well, so the two paths round to the compute
    dtype once, at the same place (a bf16 rounding here, on the training path only, put the
    sampler's and the trainer's log-probs apart: issue 20, `benchmarks/logprob_mismatch.py`).
    """
    k = w_KC.shape[0]
    t = x_BTC.shape[1]
    if prev_BKC is None:
        prev_BKC = jnp.zeros((x_BTC.shape[0], k - 1, x_BTC.shape[2]), x_BTC.dtype)
        prev_seg = jnp.full((x_BTC.shape[0], k - 1), -1, seg_BT.dtype)
    elif prev_seg_BK is not None:
        prev_seg = prev_seg_BK.astype(seg_BT.dtype)
    else:
        prev_seg = jnp.broadcast_to(seg_BT[:, :1], (x_BTC.shape[0], k - 1))
    xx = jnp.concatenate([prev_BKC.astype(x_BTC.dtype), x_BTC], axis=1)  # [B, K-1+T, C]
    ss = jnp.concatenate([prev_seg, seg_BT], axis=1)
    y = jnp.zeros(x_BTC.shape, jnp.float32) + b_C.astype(jnp.float32)
    for j in range(k):
        tap = jax.lax.dynamic_slice_in_dim(xx, j, t, axis=1)
        same = (jax.lax.dynamic_slice_in_dim(ss, j, t, axis=1) == seg_BT)[..., None]
        y = y + jnp.where(same, tap, 0).astype(jnp.float32) * w_KC[j].astype(jnp.float32)
    return y


def _pad_time(x, pad, mode="zeros"):
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, mode="edge" if mode == "edge" else "constant")


def ssd_scan(x_BTHP, dt_BTH, a_H, b_BTGN, c_BTGN, seg_BT, chunk: int, init_BHPN=None):
    """Exact chunked SSD: S_t = exp(dt_t a) S_{t-1} + dt_t x_t (x) B_t ;  y_t = S_t . C_t.

    All inputs are promoted to fp32. Returns (y_BTHP fp32, final state [B, H, P, N]). The initial
    state, if given, belongs to the segment of position 0.
    """
    f32 = jnp.float32
    bsz, t, h, p = x_BTHP.shape
    g, n = b_BTGN.shape[2], b_BTGN.shape[3]
    L = chunk
    pad = (-t) % L
    nc = (t + pad) // L
    x = _pad_time(x_BTHP.astype(f32), pad)
    dt = _pad_time(dt_BTH.astype(f32), pad)  # dt = 0 on padding: state passes unchanged
    seg = _pad_time(seg_BT, pad, mode="edge")
    rep = h // g
    b = jnp.repeat(_pad_time(b_BTGN.astype(f32), pad), rep, axis=2)  # [B, T', H, N]
    c = jnp.repeat(_pad_time(c_BTGN.astype(f32), pad), rep, axis=2)

    def chunks(z):
        return z.reshape((bsz, nc, L) + z.shape[2:])

    xdt = chunks(x * dt[..., None])  # [B, C, L, H, P]
    a = chunks(dt * a_H.astype(f32))  # [B, C, L, H]
    b, c, seg = chunks(b), chunks(c), chunks(seg)  # [B, C, L, H, N], [B, C, L]
    cum = jnp.cumsum(a, axis=2)  # [B, C, L, H]

    # 1. intra-chunk (diagonal blocks): y_l += sum_{s<=l, same seg} C_l.B_s exp(cum_l - cum_s) xdt_s
    causal = np.tril(np.ones((L, L), bool))
    ok_BCls = causal & (seg[:, :, :, None] == seg[:, :, None, :])
    expo = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, C, l, s, H]
    decay = jnp.exp(jnp.where(ok_BCls[..., None], expo, _NEG))
    scores = jnp.einsum("bclhn,bcshn->bclsh", c, b) * decay
    y_diag = jnp.einsum("bclsh,bcshp->bclhp", scores, xdt)

    # 2. state of each chunk at its last position (only positions of the last position's segment)
    seg_end = seg[:, :, -1]  # [B, C]
    to_end = jnp.where((seg == seg_end[:, :, None])[..., None], cum[:, :, -1:, :] - cum, _NEG)
    states = jnp.einsum("bclhn,bclh,bclhp->bchpn", b, jnp.exp(to_end), xdt)

    # 3. carry states across chunks; ext chunk 0 is the initial state.
    if init_BHPN is None:
        init_BHPN = jnp.zeros((bsz, h, p, n), f32)
    states_ext = jnp.concatenate([init_BHPN.astype(f32)[:, None], states], axis=1)  # [B, C+1, ...]
    seg_ext = jnp.concatenate([seg[:, :1, 0], seg_end], axis=1)  # [B, C+1]
    a_ext = jnp.concatenate([jnp.zeros((bsz, 1, h), f32), cum[:, :, -1, :]], axis=1)
    acum = jnp.cumsum(a_ext, axis=1)  # [B, C+1, H]
    ok_zz = np.tril(np.ones((nc + 1, nc + 1), bool)) & (seg_ext[:, :, None] == seg_ext[:, None, :])
    cexp = jnp.where(ok_zz[..., None], acum[:, :, None, :] - acum[:, None, :, :], _NEG)
    carried = jnp.einsum("bzwh,bwhpn->bzhpn", jnp.exp(cexp), states_ext)  # state after ext chunk z
    enter, final = carried[:, :-1], carried[:, -1]

    # 4. contribution of the entering state to each position of its segment
    enter_seg = seg_ext[:, :-1]  # [B, C]
    out_ok = (seg == enter_seg[:, :, None])[..., None]
    out_decay = jnp.exp(jnp.where(out_ok, cum, _NEG))  # [B, C, L, H]
    y_off = jnp.einsum("bclhn,bchpn->bclhp", c, enter) * out_decay[..., None]

    y = (y_diag + y_off).reshape(bsz, nc * L, h, p)[:, :t]
    return y, final


def ssd_step(state_BHPN, x_BHP, dt_BH, a_H, b_BGN, c_BGN):
    """One recurrent step of the same SSM (decode); returns (y_BHP fp32, new state)."""
    f32 = jnp.float32
    h, g = x_BHP.shape[1], b_BGN.shape[1]
    b = jnp.repeat(b_BGN.astype(f32), h // g, axis=1)
    c = jnp.repeat(c_BGN.astype(f32), h // g, axis=1)
    dt = dt_BH.astype(f32)
    decay = jnp.exp(dt * a_H.astype(f32))[..., None, None]
    state = state_BHPN * decay + jnp.einsum("bh,bhp,bhn->bhpn", dt, x_BHP.astype(f32), b)
    y = jnp.einsum("bhpn,bhn->bhp", state, c)
    return y, state


def context_parallel_mixer(
    xbc_BTC, dt_BTH, a_H, d_H, conv_w_KC, conv_b_C, seg_BT, mesh: Mesh, *, chunk: int, split
):
    """conv -> SiLU -> SSD (+ the D skip) of `Mamba2` on sequences sharded over the mesh's
    `context` axis (`context_parallel`: the conv's halo from the previous slice, the SSD from a
    zero state plus the entering state's contribution, which is linear in it).

    `xbc_BTC` the conv input, `dt_BTH` the clamped time steps, `a_H` = -exp(A_log), `split(xbc)`
    -> (x [.., H, P], B [.., G, N], C [.., G, N]). Returns y [B, T, H, P] fp32, equal to the
    single-device path up to summation order."""
    k1 = conv_w_KC.shape[0] - 1
    cp.local_length(xbc_BTC.shape[1], mesh, "context_parallel_mixer", max(k1, 1))

    def local(xbc, dt, seg, a_H, d_H, w, b):
        prev_x, prev_seg = cp.halo(xbc, seg, k1)
        conv = causal_conv(xbc, w, b, seg, prev_x, prev_seg)
        xs, bb, cc = split(jax.nn.silu(conv.astype(jnp.float32)).astype(xbc.dtype))
        y, final = ssd_scan(xs, dt, a_H, bb, cc, seg, chunk)
        la_BTH = dt.astype(jnp.float32) * a_H.astype(jnp.float32)
        s_in = cp.entering_state(final, la_BTH.sum(1), seg[:, 0], seg[:, -1])
        # y_t += exp(cum_t) C_t . S_in on the positions of the slice's first segment
        first_BT1 = (seg == seg[:, :1])[..., None]
        cum_BTH = jnp.where(first_BT1, jnp.cumsum(la_BTH, axis=1), _NEG)
        c_BTHN = jnp.repeat(cc.astype(jnp.float32), xs.shape[2] // cc.shape[2], axis=2)
        y = y + jnp.einsum("bthn,bhpn->bthp", c_BTHN, s_in) * jnp.exp(cum_BTH)[..., None]
        return y + d_H.astype(jnp.float32)[:, None] * xs.astype(jnp.float32)

    seq2, seq3 = cp.seq_spec(mesh, 2), cp.seq_spec(mesh, 3)
    rep = jax.sharding.PartitionSpec()
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq3, seq3, seq2, rep, rep, rep, rep),
        out_specs=cp.seq_spec(mesh, 4),
    )
    return fn(xbc_BTC, dt_BTH, seg_BT, a_H, d_H, conv_w_KC, conv_b_C)


def gated_group_rms_norm(y, z, weight, n_groups: int, eps: float):
    """HF NemotronHRMSNormGated with norm_before_gate=False: RMS over groups of (y * silu(z))."""
    y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shp = y.shape
    yg = y.reshape(shp[:-1] + (n_groups, shp[-1] // n_groups))
    yg = yg * jax.lax.rsqrt(jnp.mean(jnp.square(yg), axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * yg.reshape(shp)


class Mamba2(nnx.Module):
    """`mesh`: with a context axis of more than one device, the forward without a cache runs
    context parallel (`context_parallel_mixer`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.cfg = cfg
        self.cp_mesh = cp.context_mesh(mesh)  # None: one device holds each sequence
        d, h, pd, std = cfg.hidden_size, cfg.mamba_num_heads, cfg.param_dtype, cfg.initializer_range
        proj = cfg.mamba_inner + cfg.conv_dim + h
        self.in_proj_DP = param(rngs, (d, proj), ("embed", "ssm_proj"), std=std, dtype=pd)
        bound = 1.0 / math.sqrt(cfg.conv_kernel)  # PyTorch Conv1d default init, depthwise
        self.conv_w_KC = nnx.Param(
            jax.random.uniform(
                rngs.params(), (cfg.conv_kernel, cfg.conv_dim), jnp.float32, -bound, bound
            ).astype(dtype_of(pd)),
            axes=("conv_kernel", "ssm_conv"),
        )
        self.conv_b_C = nnx.Param(
            jax.random.uniform(rngs.params(), (cfg.conv_dim,), jnp.float32, -bound, bound).astype(
                dtype_of(pd)
            )
            if cfg.use_conv_bias
            else jnp.zeros((cfg.conv_dim,), dtype_of(pd)),
            axes=("ssm_conv",),
        )
        # dt initialised log-uniform in [time_step_min, time_step_max], stored as softplus^-1.
        u = jax.random.uniform(rngs.params(), (h,), jnp.float32)
        dt0 = jnp.exp(
            u * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
            + math.log(cfg.time_step_min)
        )
        dt0 = jnp.maximum(dt0, cfg.time_step_floor)
        self.dt_bias_H = nnx.Param(dt0 + jnp.log(-jnp.expm1(-dt0)), axes=("ssm_heads",))
        self.A_log_H = nnx.Param(
            jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)), axes=("ssm_heads",)
        )
        self.D_H = nnx.Param(jnp.ones((h,), jnp.float32), axes=("ssm_heads",))
        self.norm_I = nnx.Param(jnp.ones((cfg.mamba_inner,), dtype_of(pd)), axes=("ssm_inner",))
        out_std = std / math.sqrt(cfg.num_layers) if cfg.rescale_prenorm_residual else std
        self.out_proj_ID = param(
            rngs, (cfg.mamba_inner, d), ("ssm_inner", "embed"), std=out_std, dtype=pd
        )

    def _split(self, zxbcdt):
        cfg = self.cfg
        i, c = cfg.mamba_inner, cfg.conv_dim
        return zxbcdt[..., :i], zxbcdt[..., i : i + c], zxbcdt[..., i + c :]

    def _dt(self, dt_raw):
        lo, hi = self.cfg.dt_limit
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias_H[...].astype(jnp.float32))
        return jnp.clip(dt, lo, hi)

    def _xbc_split(self, xbc):
        cfg = self.cfg
        i, gn = cfg.mamba_inner, cfg.n_groups * cfg.ssm_state_size
        shp = xbc.shape[:-1]
        x = xbc[..., :i].reshape(shp + (cfg.mamba_num_heads, cfg.mamba_head_dim))
        b = xbc[..., i : i + gn].reshape(shp + (cfg.n_groups, cfg.ssm_state_size))
        c = xbc[..., i + gn :].reshape(shp + (cfg.n_groups, cfg.ssm_state_size))
        return x, b, c

    def __call__(self, x_BTD, segment_ids_BT, cache: MambaCache | None = None):
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        zxbcdt = jnp.einsum("btd,dp->btp", x_BTD.astype(cd), self.in_proj_DP[...].astype(cd))
        z, xbc, dt_raw = self._split(zxbcdt)
        a_H = -jnp.exp(self.A_log_H[...].astype(jnp.float32))
        dt = self._dt(dt_raw)
        t = x_BTD.shape[1]
        if cache is not None:
            cache = cache.continuing(segment_ids_BT)
            new_seg_B = segment_ids_BT[:, -1].astype(jnp.int32)
        if cache is not None and t == 1:
            window = jnp.concatenate([cache.conv_BKC.astype(cd), xbc], axis=1)  # [B, K, C]
            conv = (
                jnp.einsum(
                    "bkc,kc->bc",
                    window.astype(jnp.float32),
                    self.conv_w_KC[...].astype(jnp.float32),
                )
                + self.conv_b_C[...]
            )
            xbc_act = jax.nn.silu(conv).astype(cd)[:, None]
            xs, b, c = self._xbc_split(xbc_act[:, 0])
            y, ssm = ssd_step(cache.ssm_BHPN, xs, dt[:, 0], a_H, b, c)
            y = y[:, None]
            xs = xs[:, None]
            new_conv = window[:, 1:]
            cache = MambaCache(new_conv.astype(cache.conv_BKC.dtype), ssm, new_seg_B)
        elif cache is None and self.cp_mesh is not None:
            y = context_parallel_mixer(
                xbc,
                dt,
                a_H,
                self.D_H[...],
                self.conv_w_KC[...],
                self.conv_b_C[...],
                segment_ids_BT,
                self.cp_mesh,
                chunk=cfg.chunk_size,
                split=self._xbc_split,
            )
            return self._out(y, z), None
        else:
            prev = None if cache is None else cache.conv_BKC
            conv = causal_conv(xbc, self.conv_w_KC[...], self.conv_b_C[...], segment_ids_BT, prev)
            xbc_act = jax.nn.silu(conv.astype(jnp.float32)).astype(cd)
            xs, b, c = self._xbc_split(xbc_act)
            init = None if cache is None else cache.ssm_BHPN
            y, ssm = ssd_scan(xs, dt, a_H, b, c, segment_ids_BT, cfg.chunk_size, init)
            if cache is not None:
                cache = MambaCache(
                    self._conv_tail(cache.conv_BKC, xbc, segment_ids_BT), ssm, new_seg_B
                )
        y = y + self.D_H[...].astype(jnp.float32)[:, None] * xs.astype(jnp.float32)
        return self._out(y, z), cache

    def _out(self, y_BTHP, z):
        """Gated group norm and out_proj of the SSD output (with its D skip)."""
        cfg = self.cfg
        cd = dtype_of(cfg.compute_dtype)
        y = y_BTHP.reshape(y_BTHP.shape[:2] + (cfg.mamba_inner,))
        y = gated_group_rms_norm(y, z, self.norm_I[...], cfg.n_groups, cfg.layer_norm_epsilon)
        return jnp.einsum("bti,id->btd", y.astype(cd), self.out_proj_ID[...].astype(cd))

    def _conv_tail(self, prev_BKC, xbc_BTC, seg_BT):
        """Last K-1 conv inputs for decoding, zeroed where they belong to an earlier segment."""
        k1 = self.cfg.conv_kernel - 1
        xx = jnp.concatenate([prev_BKC.astype(xbc_BTC.dtype), xbc_BTC], axis=1)[:, -k1:]
        prev_seg = jnp.broadcast_to(seg_BT[:, :1], (seg_BT.shape[0], k1))
        ss = jnp.concatenate([prev_seg, seg_BT], axis=1)[:, -k1:]
        keep = (ss == seg_BT[:, -1:])[..., None]
        return jnp.where(keep, xx, 0).astype(prev_BKC.dtype)
