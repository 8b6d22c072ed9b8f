"""What a `generate` call asks for (validated once, shared by the static and the continuous
engine), what it returns, and the per-step rules both engines apply on device.

Rows are prompt-major: prompt i, sample j is row r = i*n + j. Finish codes: RUNNING while a row
decodes, then EOS / STOP / LENGTH (`REASONS` names them in the result).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nemocascade import sharding as shd
from nemocascade.generate.sampling import SamplingMode

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}
MIN_BUCKET = 16
ID_SLOTS = 8  # eos / stop ids are padded to a multiple of this (-1 = unused) to share programs


@dataclasses.dataclass
class GenerateResult:
    """Host (numpy) outputs of `generate`; rows are prompt-major (prompt i, sample j -> i*n+j)."""

    tokens: np.ndarray  # [R, max(max_new_tokens)] int32, pad_id after each row's end
    logprobs: np.ndarray  # [R, max(max_new_tokens)] fp32, 0 after the end
    logprobs_untempered: np.ndarray  # [R, max(max_new_tokens)] fp32, 0 after the end
    lengths: np.ndarray  # [R] int32, generated tokens including eos / stop
    finish_reason: list[str]  # "eos" | "stop" | "length"
    prompt_index: np.ndarray  # [R] index of the prompt each row continues
    timings: dict[str, float]  # prefill_s, decode_s (wall, including any compile), steps
    # with record_routes: per row, the experts each position of prompt + tokens[:length - 1]
    # used ([positions, n_moe_layers, K] int16): the inputs of a training forward on the row
    routes: list[np.ndarray] | None = None


def bucket(length: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(length, minimum)."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


# ----------------------------------------------------------------------------- on device
def constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Shards the leading (batch) axis of every array leaf over the mesh's batch axes."""
    if mesh is None:
        return tree

    def f(x):
        if x.ndim == 0:
            return x
        return jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim))

    return jax.tree.map(f, tree)


def classify(tok_R, step, max_new, eos_E, stop_S):
    """Finish code of each row if it stopped at `step` ([] or [R]) with token budget `max_new`
    ([] or [R]); RUNNING if it goes on."""
    is_eos = jnp.any(tok_R[:, None] == eos_E[None, :], axis=-1)
    is_stop = jnp.any(tok_R[:, None] == stop_S[None, :], axis=-1)
    at_len = step + 1 >= max_new
    return jnp.where(is_eos, EOS, jnp.where(is_stop, STOP, jnp.where(at_len, LENGTH, RUNNING)))


def empty_routes(cfg, *lead: int) -> jax.Array:
    """A routing-replay buffer [*lead, n_moe_layers, K] of -1: no position recorded yet."""
    return jnp.full(lead + (cfg.block_types.count("moe"), cfg.num_experts_per_tok), -1, jnp.int32)


# ----------------------------------------------------------------------------- host side
def split_model(model) -> tuple[Any, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return model
    raise TypeError(
        f"generate: model must be an nnx.Module or a (graphdef, state) pair from nnx.split, "
        f"got {type(model).__name__}"
    )


def id_array(ids: Sequence[int]) -> np.ndarray:
    slots = max(ID_SLOTS, -(-len(ids) // ID_SLOTS) * ID_SLOTS)
    out = np.full((slots,), -1, np.int32)
    out[: len(ids)] = ids
    return out


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_arg(value, name: str, minimum: int) -> int:
    """`value` as an int >= `minimum`; floats and bools are refused (TypeError)."""
    if not _is_int(value):
        raise TypeError(f"generate: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"generate: {name} must be >= {minimum}, got {value}")
    return int(value)


def _token_id(value, name: str, vocab_size: int) -> int:
    if not _is_int(value):
        raise TypeError(f"generate: {name} must be an integer token id, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(
            f"generate: {name}={value} is outside the model's vocabulary [0, {vocab_size})"
        )
    return int(value)


def _as_ids(value, name: str, vocab_size: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if _is_int(value):
        return (_token_id(value, name, vocab_size),)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"generate: {name} must be an int or a sequence of ints, got {value!r}")
    return tuple(_token_id(v, f"{name}[{i}]", vocab_size) for i, v in enumerate(value))


def _check_prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim != (1 if prompt_ids.dtype == object else 2):
            raise TypeError(
                f"generate: prompt_ids as an array must be [prompts, tokens], got shape "
                f"{prompt_ids.shape}"
            )
        prompt_ids = list(prompt_ids)  # rows are checked (and named) one by one below
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError("generate: prompt_ids must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompt_ids):
        if not isinstance(p, (list, tuple)):  # an array (numpy, jax) of token ids
            arr = np.asarray(p)
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise TypeError(
                    f"generate: prompt_ids[{i}] must be a 1-D sequence of integer token ids, got "
                    f"{arr.ndim}-D {arr.dtype}"
                )
            p = arr.tolist()
        not_int = [t for t in p if not _is_int(t)]
        if not_int:
            raise TypeError(
                f"generate: prompt_ids[{i}] has non-integer token ids {not_int[:5]} "
                "(token ids must be ints)"
            )
        p = [int(t) for t in p]
        if not p:
            raise ValueError(
                f"generate: prompt_ids[{i}] is empty (a prompt needs at least one token)"
            )
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"generate: prompt_ids[{i}] has ids {bad[:5]} outside [0, {vocab_size})"
            )
        out.append(p)
    return out


def left_pad(prompts: list[list[int]], rows: int, length: int, pad_id: int):
    """[rows, length] ids and segment ids (1 = prompt, 0 = padding); extra rows repeat prompt 0."""
    ids = np.full((rows, length), pad_id, np.int32)
    seg = np.zeros((rows, length), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]
        ids[i, length - len(p) :] = p
        seg[i, length - len(p) :] = 1
    return ids, seg


def _first_stop(tokens: list[int], stop_strings: Sequence[str], tokenizer) -> int | None:
    """The fewest leading tokens whose decoded text contains a stop string (None if none does)."""

    def hit(k):
        return any(s in tokenizer.decode(tokens[:k]) for s in stop_strings)

    if not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) holds; find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclasses.dataclass(frozen=True)
class Request:
    """The validated arguments of one `generate` call (see `generate` for their meaning)."""

    graphdef: Any
    state: Any
    prompts: list[list[int]]
    n: int
    budgets: tuple[int, ...]  # max_new_tokens of each prompt
    mode: SamplingMode
    seed: int
    temperature: float
    top_p: float
    eos: tuple[int, ...]
    stops: tuple[int, ...]
    stop_strings: tuple[str, ...]
    tokenizer: Any
    pad_id: int
    mesh: Mesh | None
    prefill_chunk: int = 0  # > 0: chunked prefill (`slots.prefill_rows`)
    record_routes: bool = False  # record each token's experts (routing replay)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def max_new(self) -> int:
        return max(self.budgets)

    @property
    def gen_bucket(self) -> int:
        return bucket(self.max_new)

    def row_budgets(self, rows) -> np.ndarray:
        """The token budget of rows `rows` (prompt-major ids; 1 for padding rows past the end)."""
        b = np.repeat(np.asarray(self.budgets, np.int32), self.n)
        rows = np.asarray(rows)
        return np.where(rows < len(b), b[np.minimum(rows, len(b) - 1)], 1).astype(np.int32)

    def sampling_args(self) -> tuple:
        """The runtime (traced) sampling arguments: seed, temperature, top_p, eos ids, stop ids,
        pad id."""
        return (
            jnp.int32(self.seed),
            jnp.float32(max(self.temperature, 1e-6)),
            jnp.float32(self.top_p),
            jnp.asarray(id_array(self.eos)),
            jnp.asarray(id_array(self.stops)),
            jnp.int32(self.pad_id),
        )

    def put(self, x: np.ndarray) -> jax.Array:
        """A host batch (the same on every process) laid out over the mesh's batch axes."""
        return shd.device_batch({"x": x}, self.mesh, process_local=False)["x"]


def _budgets(max_new_tokens, num_prompts: int) -> tuple[int, ...]:
    if _is_int(max_new_tokens):
        return (_int_arg(max_new_tokens, "max_new_tokens", 1),) * num_prompts
    if isinstance(max_new_tokens, (str, bytes)) or not hasattr(max_new_tokens, "__iter__"):
        raise TypeError(
            f"generate: max_new_tokens must be an int or one int per prompt, got {max_new_tokens!r}"
        )
    budgets = tuple(_int_arg(m, f"max_new_tokens[{i}]", 1) for i, m in enumerate(max_new_tokens))
    if len(budgets) != num_prompts:
        raise ValueError(
            f"generate: max_new_tokens has {len(budgets)} entries for {num_prompts} prompts"
        )
    return budgets


def _number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"generate: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"generate: {name} must be finite, got {value}")
    return float(value)


def make_request(
    model,
    prompt_ids,
    *,
    max_new_tokens,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    eos_id,
    stop_ids,
    stop_strings,
    tokenizer,
    n: int,
    pad_id: int,
    mesh: Mesh | None,
    prefill_chunk: int = 0,
    record_routes: bool = False,
) -> Request:
    """Checks `generate`'s arguments (clear errors) and resolves the sampling mode."""
    graphdef, state = split_model(model)
    try:
        vocab_size = int(state["embed_VD"][...].shape[0])
    except (KeyError, TypeError) as e:
        raise TypeError("generate: the model state has no `embed_VD` (expected a NemotronH)") from e
    prompts = _check_prompts(prompt_ids, vocab_size)
    budgets = _budgets(max_new_tokens, len(prompts))
    temperature = _number(temperature, "temperature")
    if temperature < 0.0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    top_p = _number(top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    top_k, n = _int_arg(top_k, "top_k", 0), _int_arg(n, "n", 1)
    prefill_chunk = _int_arg(prefill_chunk, "prefill_chunk", 0)
    if not _is_int(seed):
        raise TypeError(f"generate: seed must be an integer, got {seed!r}")
    pad_id = _token_id(pad_id, "pad_id", vocab_size)
    eos, stops = _as_ids(eos_id, "eos_id", vocab_size), _as_ids(stop_ids, "stop_ids", vocab_size)
    if isinstance(stop_strings, (str, bytes)):
        raise TypeError(f"generate: stop_strings must be a list of strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer (with .decode) to be recognised")
    greedy = temperature == 0.0
    mode = SamplingMode(
        greedy=greedy, top_k=0 if greedy else top_k, top_p=(not greedy) and top_p < 1.0
    )
    return Request(
        graphdef=graphdef,
        state=state,
        prompts=prompts,
        n=n,
        budgets=budgets,
        mode=mode,
        seed=int(seed),
        temperature=temperature,
        top_p=top_p,
        eos=eos,
        stops=stops,
        stop_strings=tuple(stop_strings),
        tokenizer=tokenizer,
        pad_id=pad_id,
        mesh=mesh,
        prefill_chunk=prefill_chunk,
        record_routes=bool(record_routes),
    )


def finish(
    req: Request, toks, lps, lprs, lengths, reasons, timings: dict, routes=None
) -> GenerateResult:
    """The result of `req` from its rows' outputs ([R, >= max_new] host arrays, prompt-major):
    cut to the largest budget, stop strings applied (a row is cut after the first token that
    completes one: reason "stop"). `routes` (record_routes): `(prompt_routes, token_routes)`,
    per row the experts of its prompt's positions ([prompt length, n_moe, K], from the prefill
    the row started from) and [R, >= max_new, n_moe, K] of the generated tokens as they were
    fed back; each row's are its prompt's and those of its tokens but the last."""
    keep, max_new, pad_id = req.rows, req.max_new, req.pad_id
    toks, lps, lprs = (np.array(a[:keep, :max_new]) for a in (toks, lps, lprs))
    lengths, reasons = np.array(lengths[:keep]), np.array(reasons[:keep])
    if req.stop_strings:
        for r in range(keep):
            k = _first_stop(toks[r, : lengths[r]].tolist(), req.stop_strings, req.tokenizer)
            if k is not None and (k < lengths[r] or reasons[r] == LENGTH):
                toks[r, k:], lps[r, k:], lprs[r, k:] = pad_id, 0.0, 0.0
                lengths[r], reasons[r] = k, STOP
    prompt_index = np.repeat(np.arange(len(req.prompts)), req.n).astype(np.int32)
    row_routes = None
    if routes is not None:
        prompt_routes, token_routes = routes
        row_routes = []
        for r in range(keep):
            fed = token_routes[r, : max(int(lengths[r]) - 1, 0)]
            row_routes.append(np.concatenate([prompt_routes[r], fed]).astype(np.int16))
    return GenerateResult(
        tokens=toks,
        logprobs=lps,
        logprobs_untempered=lprs,
        lengths=lengths.astype(np.int32),
        finish_reason=[REASONS[int(c)] for c in reasons],
        prompt_index=prompt_index,
        timings=timings,
        routes=row_routes,
    )
