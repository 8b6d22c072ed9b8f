"""Hugging Face checkpoint I/O (safetensors only) for NemotronH.

Two on-disk layouts are read:
  released:   `backbone.*` keys, one tensor per expert (`mixer.experts.{j}.up_proj.weight`);
  in-memory:  transformers 5.x names, `model.*` keys, stacked experts (`mixer.experts.up_proj`).
`save_hf_checkpoint` writes the released layout + `config.json`, which
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Loading streams tensor by tensor into a model built abstractly (`nnx.eval_shape`), so host memory
holds the model once plus one tensor (one MoE layer's experts while stacking them; with
`scan_layers` one stacked variable, i.e. that tensor of every repeat of a scanned segment).
A scanned model (`ModelConfig.scan_layers`) reads and writes the same tensor names and values as
the unrolled one: layer i's tensors are row r of the stacked variable `layer_scan.layer_location`
names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from nemocascade.model.config import ModelConfig
from nemocascade.model.layer_scan import layer_location
from nemocascade.model.nemotron_h import NemotronH

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction heads of other family members


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names every offending key."""


# ---------------------------------------------------------------------------------------------
# name mapping: our parameter path -> (HF keys, function from HF tensors to our array)
# ---------------------------------------------------------------------------------------------
def _t(w):  # Linear weight [out, in] -> ours [in, out]
    return w.T


def _param_plan(cfg: ModelConfig, prefix: str, stacked: bool):
    """Yields (our_path tuple, row, [hf keys], to_ours(list of arrays) -> array,
    to_hf(array) -> [arrays]). `row` is None, or (scanned model) the index on the leading stacked
    axis of the variable at `our_path` that holds this layer's tensor."""
    yield ("embed_VD",), None, [f"{prefix}.embeddings.weight"], lambda ws: ws[0], lambda a: [a]
    yield ("norm_f", "weight"), None, [f"{prefix}.norm_f.weight"], lambda ws: ws[0], lambda a: [a]
    if not cfg.tie_word_embeddings:
        yield ("lm_head_DV",), None, ["lm_head.weight"], lambda ws: _t(ws[0]), lambda a: [_t(a)]
    for i, kind in enumerate(cfg.block_types):
        our, row = layer_location(cfg, i)
        for our_path, hf_keys, to_ours, to_hf in _layer_plan(
            cfg, f"{prefix}.layers.{i}", our, kind, stacked
        ):
            yield our_path, row, hf_keys, to_ours, to_hf


def _layer_plan(cfg: ModelConfig, lp: str, our: tuple, kind: str, stacked: bool):
    """The entries of one layer (HF prefix `lp`, our block path `our`), without the row."""
    d = cfg.hidden_size
    n, kv, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e = cfg.n_routed_experts
    mp = f"{lp}.mixer"
    yield our + ("norm", "weight"), [f"{lp}.norm.weight"], lambda ws: ws[0], lambda a: [a]
    m = our + ("mixer",)
    if kind == "mamba":
        yield (
            m + ("in_proj_DP",),
            [f"{mp}.in_proj.weight"],
            lambda ws: _t(ws[0]),
            lambda a: [_t(a)],
        )
        yield (
            m + ("conv_w_KC",),
            [f"{mp}.conv1d.weight"],
            lambda ws: ws[0][:, 0, :].T,
            lambda a: [a.T[:, None, :]],
        )
        if cfg.use_conv_bias:
            yield m + ("conv_b_C",), [f"{mp}.conv1d.bias"], lambda ws: ws[0], lambda a: [a]
        for ours, theirs in (
            ("dt_bias_H", "dt_bias"),
            ("A_log_H", "A_log"),
            ("D_H", "D"),
            ("norm_I", "norm.weight"),
        ):
            yield m + (ours,), [f"{mp}.{theirs}"], lambda ws: ws[0], lambda a: [a]
        yield (
            m + ("out_proj_ID",),
            [f"{mp}.out_proj.weight"],
            lambda ws: _t(ws[0]),
            lambda a: [_t(a)],
        )
    elif kind == "attention":
        for ours, theirs, heads in (
            ("q_DNH", "q_proj", n),
            ("k_DKH", "k_proj", kv),
            ("v_DKH", "v_proj", kv),
        ):
            yield (
                m + (ours,),
                [f"{mp}.{theirs}.weight"],
                lambda ws, hh=heads: ws[0].T.reshape(d, hh, h),
                lambda a: [a.reshape(d, -1).T],
            )
        yield (
            m + ("o_NHD",),
            [f"{mp}.o_proj.weight"],
            lambda ws: ws[0].T.reshape(n, h, d),
            lambda a: [a.reshape(-1, d).T],
        )
    elif kind == "moe":
        yield m + ("router_DE",), [f"{mp}.gate.weight"], lambda ws: _t(ws[0]), lambda a: [_t(a)]
        yield (
            m + ("bias_E",),
            [f"{mp}.gate.e_score_correction_bias"],
            lambda ws: ws[0],
            lambda a: [a],
        )
        for ours, theirs in (("up_EDF", "up_proj"), ("down_EFD", "down_proj")):
            if stacked:
                yield (
                    m + (ours,),
                    [f"{mp}.experts.{theirs}"],
                    lambda ws: np.swapaxes(ws[0], 1, 2),
                    lambda a: [np.swapaxes(a, 1, 2)],
                )
            else:
                yield (
                    m + (ours,),
                    [f"{mp}.experts.{j}.{theirs}.weight" for j in range(e)],
                    lambda ws: np.stack([w.T for w in ws]),
                    lambda a: [w.T for w in a],
                )
        for ours, theirs in (("up_DF", "up_proj"), ("down_FD", "down_proj")):
            yield (
                m + ("shared", ours),
                [f"{mp}.shared_experts.{theirs}.weight"],
                lambda ws: _t(ws[0]),
                lambda a: [_t(a)],
            )
    elif kind == "mlp":
        for ours, theirs in (("up_DF", "up_proj"), ("down_FD", "down_proj")):
            yield (
                m + (ours,),
                [f"{mp}.{theirs}.weight"],
                lambda ws: _t(ws[0]),
                lambda a: [_t(a)],
            )


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _safetensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path}: pickle checkpoints are refused; convert it to safetensors"
            )
        return {k: path for k in _keys_of(path)}
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            out = {k: path / f for k, f in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index}: not a safetensors index with a 'weight_map' ({e})"
            ) from None
        missing_files = sorted({str(f) for f in out.values() if not f.exists()})
        if missing_files:
            raise CheckpointError(f"{index}: shard files missing: {missing_files}")
        held = {f: set(_keys_of(f)) for f in set(out.values())}
        absent = sorted(f"{k} (in {f.name})" for k, f in out.items() if k not in held[f])
        if absent:
            raise CheckpointError(
                f"{index} lists tensors that their shard does not hold:\n"
                + "\n".join(f"  missing: {a}" for a in absent)
            )
        return out
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle checkpoints found ({pickles}); they are refused "
                "(arbitrary code execution). Convert them to safetensors."
            )
        raise CheckpointError(f"{path}: no *.safetensors files")
    return {k: f for f in files for k in _keys_of(f)}


def _unreadable(file: Path, key: str | None, e: Exception) -> CheckpointError:
    what = f" (reading tensor {key})" if key else ""
    return CheckpointError(
        f"{file}: not a readable safetensors file{what}: {e}; is it truncated or corrupt?"
    )


def _keys_of(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="flax") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise _unreadable(file, None, e) from None


def _shape_of(file: Path, key: str) -> tuple[int, ...]:
    try:
        with safe_open(str(file), framework="flax") as f:
            return tuple(f.get_slice(key).get_shape())
    except (SafetensorError, OSError) as e:
        raise _unreadable(file, key, e) from None


def _read(file: Path, key: str) -> np.ndarray:
    try:
        with safe_open(str(file), framework="flax") as f:
            arr = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise _unreadable(file, key, e) from None
    return np.asarray(arr.astype(jnp.float32)) if arr.dtype == jnp.bfloat16 else np.asarray(arr)


def _expected_in(path: Path, files: dict[str, Path]) -> str:
    """Where a tensor that no file holds should have been (missing tensors of an index's shards
    are reported by `_safetensor_files`)."""
    shards = sorted({f.name for f in files.values()})
    if len(shards) == 1:
        return f"not in {path if path.is_file() else path / shards[0]}"
    if (path / "model.safetensors.index.json").exists():
        return f"not listed in {path / 'model.safetensors.index.json'}"
    return f"in none of the {len(shards)} *.safetensors files of {path}"


def _detect_layout(keys) -> tuple[str, bool]:
    if any(k.startswith("backbone.") for k in keys):
        prefix = "backbone"
    elif any(k.startswith("model.") for k in keys):
        prefix = "model"
    else:
        raise CheckpointError("checkpoint has neither 'backbone.*' nor 'model.*' tensors")
    stacked = any(
        ".mixer.experts.up_proj" in k
        and ".experts.up_proj.weight" not in k
        and k.endswith("experts.up_proj")
        for k in keys
    )
    return prefix, stacked


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_hf_checkpoint(
    path,
    *,
    dtype=jnp.float32,
    config: ModelConfig | None = None,
    mesh: Mesh | None = None,
    **config_overrides,
) -> NemotronH:
    """Loads a NemotronH safetensors checkpoint directory (config.json + weights) into our model.

    `dtype` sets the parameter and compute dtype (router, A_log, D, dt_bias stay fp32); `mesh`
    is passed to `NemotronH` (expert parallelism over its `expert` axis).
    Raises `CheckpointError` naming every missing, unexpected or wrongly-shaped tensor.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (neither a directory nor a file)")
    if config is None:
        cfg_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
        if not cfg_file.exists():
            raise CheckpointError(f"{cfg_file}: missing (needed to build the model)")
        name = jnp.dtype(dtype).name
        config = ModelConfig.from_json_file(
            cfg_file, param_dtype=name, compute_dtype=name, **config_overrides
        )
    files = _safetensor_files(path)
    keys = {k: f for k, f in files.items()}
    # the older Mamba spelling `backbone.embedding.weight`
    if "backbone.embedding.weight" in keys and "backbone.embeddings.weight" not in keys:
        keys["backbone.embeddings.weight"] = keys.pop("backbone.embedding.weight")
        renamed = {"backbone.embeddings.weight": "backbone.embedding.weight"}
    else:
        renamed = {}
    prefix, stacked = _detect_layout(keys)
    if config.tie_word_embeddings:
        keys.pop("lm_head.weight", None)

    abstract = nnx.eval_shape(lambda: NemotronH(config, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    plan = list(_param_plan(config, prefix, stacked))

    # validate everything before reading any tensor
    expected = {k for _, _, hf_keys, _, _ in plan for k in hf_keys}
    missing = sorted(expected - set(keys))
    unexpected = sorted(k for k in set(keys) - expected if not k.startswith(IGNORED_PREFIXES))
    bad_shapes = []
    for our_path, row, hf_keys, to_ours, _ in plan:
        want = _get_path(state, our_path).get_value().shape[0 if row is None else 1 :]
        shapes = [_shape_of(keys[k], renamed.get(k, k)) for k in hf_keys if k in keys]
        if len(shapes) != len(hf_keys):
            continue
        try:
            got = to_ours([np.empty(s, np.float32) for s in shapes]).shape
        except ValueError:  # e.g. a reshape that cannot fit: certainly the wrong shape
            got = None
        if got is None or tuple(got) != tuple(want):
            bad_shapes.append(
                f"{hf_keys[0] if len(hf_keys) == 1 else hf_keys[0] + ' (+experts)'}: "
                f"shape {shapes[0]} does not fit {'/'.join(map(str, our_path))} {tuple(want)}"
            )
    if missing or unexpected or bad_shapes:
        header = (
            f"checkpoint {path} does not match config ({config.num_layers} layers, "
            f"pattern {config.pattern}):"
        )
        lines = [header]
        lines += [f"  missing: {k} ({_expected_in(path, files)})" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {s}" for s in bad_shapes]
        raise CheckpointError("\n".join(lines))

    # one variable at a time; a stacked one (scanned model) is filled row by row on the host
    by_var: dict[tuple, list] = {}
    for our_path, row, hf_keys, to_ours, _ in plan:
        by_var.setdefault(our_path, []).append((row, hf_keys, to_ours))
    for our_path, entries in by_var.items():
        var = _get_path(state, our_path)
        target = var.get_value()
        rows = None if entries[0][0] is None else np.empty(target.shape, target.dtype)
        for row, hf_keys, to_ours in entries:
            arr = jnp.asarray(
                to_ours([_read(keys[k], renamed.get(k, k)) for k in hf_keys]), dtype=target.dtype
            )
            if rows is None:
                var.set_value(arr)
            else:
                rows[row] = np.asarray(arr)
        if rows is not None:
            if sorted(r for r, _, _ in entries) != list(range(target.shape[0])):
                raise AssertionError(f"{'/'.join(map(str, our_path))}: rows not all loaded")
            var.set_value(jnp.asarray(rows))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def iter_hf_tensors(model: NemotronH, prefix: str = "backbone") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, array) in the released layout, one tensor at a time."""
    state = nnx.state(model)
    for our_path, row, hf_keys, _, to_hf in _param_plan(model.cfg, prefix, stacked=False):
        value = _get_path(state, our_path).get_value()
        if row is not None:
            value = value[row]
        for k, arr in zip(hf_keys, to_hf(np.asarray(jax.device_get(value))), strict=True):
            yield k, np.ascontiguousarray(arr)


def save_hf_checkpoint(
    model: NemotronH, path, *, max_shard_bytes: int = 4 << 30, dtype: str | None = None
) -> Path:
    """Writes `config.json` + safetensors shards (+ index) in the released `backbone.*` layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = jnp.dtype(dtype or model.cfg.param_dtype)
    hf_cfg = model.cfg.to_hf_config()
    hf_cfg["torch_dtype"] = out_dtype.name
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")

    fp32_keys = ("A_log", ".D", "dt_bias", "e_score_correction_bias", "gate.weight")
    # Shards are written as soon as they fill (no second copy of the model), then renamed.
    shard: dict[str, jax.Array] = {}
    written: list[tuple[Path, list[str], int]] = []

    def flush():
        tmp = path / f".shard-{len(written):05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    size = 0
    for k, arr in iter_hf_tensors(model):
        keep32 = any(k.endswith(s) for s in fp32_keys)
        a = jnp.asarray(arr, jnp.float32 if keep32 else out_dtype)
        if size and size + a.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[k] = a
        size += a.nbytes
    flush()
    n = len(written)
    weight_map = {}
    for i, (tmp, names, _) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(path / final)
        weight_map.update({k: final for k in names})
    if n > 1:
        total = sum(b for _, _, b in written)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            + "\n"
        )
    return path
