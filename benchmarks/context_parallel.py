"""Context parallelism on simulated CPU devices: correctness and per-device memory, not speed
(8 simulated devices share the host's cores; timing needs an accelerator).

    python benchmarks/context_parallel.py            # T = 4096, context 1, 2, 4, 8
    python benchmarks/context_parallel.py --quick    # T = 512

For each context size (mesh data=1 x context=c), the forward and backward of a NemotronH with
every mixer kind (pattern "M*EM*E", blockwise attention, fp32, one packed row of documents that
cross the slice borders) against the same model on one device: the largest absolute logit
difference, the largest gradient difference relative to that parameter's largest gradient, and
the compiled program's per-device temp bytes (`memory_analysis`: activations and exchange
buffers; the parameters are replicated here). Writes
benchmarks/results/context_parallel[_quick].json; `run(quick)` returns the dict with
`context_parallel_max_logit_err` (over every context size).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from results_io import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "context_parallel.json"
CONTEXTS = (1, 2, 4, 8)


def _setup() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(seq: int) -> list[dict]:
    _setup()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from nemocascade import sharding
    from nemocascade.model import ModelConfig, NemotronH

    if jax.device_count() < max(CONTEXTS):
        raise RuntimeError(f"context_parallel: needs {max(CONTEXTS)} devices; run it alone")
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = ModelConfig.tiny(
        pattern="M*EM*E",
        attention_impl="blockwise",
        attention_block_q=128,
        attention_block_k=128,
        chunk_size=64,
        moe_backend="sorted",
        n_group=1,
        remat="block",
    )
    ids = jax.random.randint(jax.random.key(0), (1, seq), 0, cfg.vocab_size)
    cuts = np.cumsum(np.random.default_rng(0).integers(seq // 16, seq // 3, size=16))
    seg = jnp.asarray((np.searchsorted(cuts, np.arange(seq), side="right") + 1)[None], jnp.int32)
    r = jax.random.normal(jax.random.key(1), (1, seq, cfg.vocab_size))

    def program(context):
        mesh = None
        if context > 1:
            mesh = sharding.make_mesh(dict(data=1, context=context))
        model = NemotronH(cfg, rngs=nnx.Rngs(0), mesh=mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, ids, seg):
            logits = nnx.merge(graphdef, p, rest)(ids, seg)
            return jnp.mean(logits * r), logits

        args = (params, ids, seg)
        if mesh is not None:
            spec = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh=mesh))
            args = (jax.device_put(params, NamedSharding(mesh, jax.P())),) + tuple(
                jax.device_put(a, spec) for a in (ids, seg)
            )
        step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()
        (_, logits), g = step(*args)
        return np.asarray(logits), g, step.memory_analysis().temp_size_in_bytes

    ref_logits, ref_g, _ = program(1)
    rows = []
    for context in CONTEXTS:
        logits, g, temp = program(context)
        grad_err = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g), strict=True)
        )
        rows.append(
            {
                "context": context,
                "seq": seq,
                "positions_per_device": seq // context,
                "max_abs_logit_err": float(np.max(np.abs(logits - ref_logits))),
                "max_rel_grad_err": grad_err,
                "per_device_temp_bytes": int(temp),
            }
        )
        print(
            f"context {context}: {seq // context} positions/device, logits max |err| "
            f"{rows[-1]['max_abs_logit_err']:.2e}, grads max rel err {grad_err:.2e}, "
            f"temp {temp / 2**20:.1f} MiB/device"
        )
    return rows


def run(quick: bool = True, write: bool = True) -> dict:
    rows = measure(512 if quick else 4096)
    res = {
        "rows": rows,
        "context_parallel_max_logit_err": max(r["max_abs_logit_err"] for r in rows),
        "context_parallel_max_rel_grad_err": max(r["max_rel_grad_err"] for r in rows),
        "context_parallel_temp_reduction_8": rows[0]["per_device_temp_bytes"]
        / max(rows[-1]["per_device_temp_bytes"], 1),
    }
    if write:
        write_result(
            res, RESULTS.with_name("context_parallel" + ("_quick" if quick else "") + ".json")
        )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    run(quick=p.parse_args().quick)


if __name__ == "__main__":
    main()
