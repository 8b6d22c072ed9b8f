"""transformers' side of `train_step.py`: its worker process (`python benchmarks/train_step.py
--side=transformers`, started by `side_by_side.py`) loads the checkpoint our side wrote with
`AutoModelForCausalLM.from_pretrained`, and times its train step (forward, token
cross-entropy, backward, `clip_grad_norm_`, `torch.optim.AdamW` with the same settings as ours:
`train_step.OPTIM`) and its forward, with the fastest attention x experts implementation chosen
per job (`side_by_side.select_impl`), and `torch.mm`'s fp32 peak for reference."""

from __future__ import annotations

import argparse

import numpy as np
import side_by_side as sbs
from train_step import GUARD_POSITIONS, OPTIM, PEAK_SIZES, make_batch

from nemocascade.model import ModelConfig


def torch_matmul_peak_flops(n: int = 2048, repeats: int = 3) -> float:
    """Best fp32 FLOP/s of `torch.mm` on [n, n] squares (transformers' side, for reference)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(sbs.timed(lambda: torch.mm(a, b))[0] for _ in range(repeats))
    return 2 * n**3 / best


def transformers_programs(hf, batch: dict):
    """(train_step() -> loss, prefill() -> logits) closures over the transformers model."""
    import torch

    decay, no_decay = [], []
    for name, p in hf.named_parameters():
        low = name.lower()
        (no_decay if p.ndim < 2 or "norm" in low or "bias" in low else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPTIM.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=OPTIM.lr,
        betas=(OPTIM.b1, OPTIM.b2),
        eps=OPTIM.eps,
    )
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    tgt = torch.as_tensor(batch["targets"], dtype=torch.long)

    def train():
        hf.train()
        logits = hf(ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), OPTIM.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def prefill():
        hf.eval()
        with torch.no_grad():
            return hf(ids, use_cache=False).logits

    return train, prefill


def transformers_worker(a: argparse.Namespace) -> dict:
    """transformers' request handlers (init, select, warmup, time)."""
    sbs.start_transformers_worker(a.threads)
    st: dict = {"impl": {}}

    def init(ckpt: str, seed: int) -> dict:
        t_load, hf = sbs.load_transformers(ckpt)
        data = make_batch(ModelConfig.small(), a.batch, a.seq, seed)
        train, fwd = transformers_programs(hf, data)

        def train_logged():  # the first two losses: initial weights, then after one update
            loss = train()
            if len(st["losses"]) < 2:
                st["losses"].append(loss)
            return loss

        st.update(hf=hf, train=train_logged, forward=fwd, losses=[])
        st["matmul_peak"] = lambda: {n: torch_matmul_peak_flops(n) for n in PEAK_SIZES}
        return {"load_s": t_load}

    def select(job: str, guard_path: str, max_gather_gib: float) -> dict:
        check = None
        if job == "forward":
            ref = np.load(guard_path)

            def check(out):
                got = out[0, :GUARD_POSITIONS].float().numpy()
                return {"max_abs_logit_diff": float(np.max(np.abs(got - ref)))}

        res = sbs.select_impl(
            st["hf"],
            st[job],
            gather_bytes=sbs.batched_mm_gather_bytes(
                st["hf"].config, a.batch * a.seq, train=job == "train"
            ),
            max_gather_bytes=int(max_gather_gib * 2**30),
            check=check,
        )
        st["impl"][job] = res["chosen"]
        if job == "train":
            res["first_loss"], res["loss_after_one_step"] = st["losses"]
        return {**res, "threads": sbs.worker_threads()}

    def time_job(job: str) -> dict:
        if job in st["impl"]:
            sbs.set_impl(st["hf"], **st["impl"][job])
        s, out = sbs.timed(st[job])
        reply = {"s": s}
        if job == "train":
            reply["loss"] = out
        elif job == "matmul_peak":
            reply["flops_by_n"] = out
        return reply

    return {"init": init, "select": select, "warmup": time_job, "time": time_job}
