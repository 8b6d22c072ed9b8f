"""Expert computation backends for the MoE layer, behind one interface.

Every backend computes, for tokens `x_TD` routed to experts `idx_TK` with weights `w_TK`,

    y_t = sum_k w_tk * down_{e_tk}( relu(up_{e_tk}(x_t))^2 )

with `up_EDF` [experts, hidden, width] and `down_EFD` [experts, width, hidden] (non-gated
squared-ReLU experts, as in Nemotron-3-Nano). The weighted sum is accumulated in fp32 and cast
back to `x_TD.dtype`. Backends are chosen by name from the model config, never by platform.

`dense` is the oracle: every token through every expert, masked by the one-hot routing weights.
It costs `n_experts / top_k` times the useful FLOPs; other backends must agree with it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp


class ExpertBackend(Protocol):

    def __call__(self, x_TD: jax.Array, idx_TK: jax.Array, w_TK: jax.Array, up_EDF: jax.Array,
                 down_EFD: jax.Array) -> jax.Array:
        ...


_BACKENDS: dict[str, ExpertBackend] = {}


def register_backend(name: str) -> Callable[[ExpertBackend], ExpertBackend]:
    def deco(fn: ExpertBackend) -> ExpertBackend:
        _BACKENDS[name] = fn
        return fn
    return deco


def get_backend(name: str) -> ExpertBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


@register_backend("dense")
def dense_experts(x_TD, idx_TK, w_TK, up_EDF, down_EFD):
    """One-hot reference: all experts on all tokens, combined with a dense [T, E] weight matrix."""
    num_experts = up_EDF.shape[0]
    combine_TE = jnp.sum(jax.nn.one_hot(idx_TK, num_experts, dtype=jnp.float32)
                         * w_TK[..., None].astype(jnp.float32), axis=1)
    h_TEF = relu2(jnp.einsum("td,edf->tef", x_TD, up_EDF))
    y_TED = jnp.einsum("tef,efd->ted", h_TEF, down_EFD)
    y_TD = jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), combine_TE)
    return y_TD.astype(x_TD.dtype)


def expert_mlp(x_TD, idx_TK, w_TK, up_EDF, down_EFD, *, backend: str = "dense"):
    """Routed expert MLP with the named backend (see module docstring)."""
    return get_backend(backend)(x_TD, idx_TK, w_TK, up_EDF, down_EFD)
