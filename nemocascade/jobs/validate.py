"""Every stage of a cascade checked before anything trains.

`validate_stages` collects every problem it finds (not only the first) and raises one
`StageValidationError` listing them, each naming the stage, the field and the fix, within seconds
of launch, instead of failing hours into a run:

  * `start_from` and MOPD `teachers` name stages that run earlier (or, for a teacher, an existing
    Hugging Face checkpoint directory); an MOPD stage has an earlier stage to teach it;
  * every domain's data exists (SFT records for SFT stages, prompt records for RL stages,
    held-out records for every evaluated domain);
  * every record a verifier scores has a registered verifier (no silent reward 0 for an unknown
    domain); a learned reward model's path exists and its kind is implemented;
  * the mesh splits every batch (RL rows, SFT rows) evenly;
  * the code sandbox can start when a code verifier is used (`rewards.sandbox.sandbox_status`);
  * an agentic stage's environment (`stages.<name>.env`) exists, its limits are >= 1 (the tool
    timeout > 0), every
    record of its domains builds the environment (e.g. a `swe` record has its repository), and
    the sandbox its tools run in can start; a domain evaluated by episodes
    (`jobs.evaluation.episode_envs`) likewise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from nemocascade import rewards as rw
from nemocascade.jobs.evaluation import episode_envs
from nemocascade.jobs.reward_stage import EXPORT_DIR
from nemocascade.jobs.stages import RewardModelStageConfig, SFTStageConfig, StageConfig
from nemocascade.model.reward_head import META_FILE
from nemocascade.rewards import sandbox
from nemocascade.rl import envs
from nemocascade.rl.config import EnvStageConfig
from nemocascade.typed_config import ConfigError

SANDBOXED_VERIFIERS = ("code", "code_io")
MAX_RECORD_PROBLEMS = 3  # per domain: the first few records that cannot build the environment


class StageValidationError(ConfigError):
    """The cascade's stages cannot all run; the message lists every problem and its fix."""


def verifier_problems(records: Sequence[dict], where: str) -> tuple[list[str], set[str]]:
    """(problems, verifier names used) of records scored by rule-based verifiers."""
    problems, names, unknown = [], set(), {}
    for i, r in enumerate(records):
        try:
            name = rw.verifier_name(r)
        except (TypeError, ValueError) as e:
            problems.append(f"{where}: record {i}: {e}")
            continue
        names.add(name)
        if not rw.has_verifier(name):
            unknown.setdefault(name, i)
    for name, i in sorted(unknown.items()):
        problems.append(
            f"{where}: no verifier is registered for {name!r} (first at record {i}); give the "
            "records a `verifier.type` that exists or register one with "
            "`nemocascade.rewards.register`"
        )
    return problems, names


def env_record_problems(env: EnvStageConfig, records: Sequence[dict], where: str) -> list[str]:
    """The first records that cannot build environment `env.name` (each built and closed: the
    check is the environment's own, e.g. a `swe` record's repository and test command)."""
    problems = []
    for i, r in enumerate(records):
        try:
            envs.make_env(env.name, r, env.limits()).close()
        except Exception as e:  # whatever the environment rejects, named with the record
            problems.append(f"{where}: record {i}: {type(e).__name__}: {e}")
            if len(problems) >= MAX_RECORD_PROBLEMS:
                break
    return problems


def env_problems(env: EnvStageConfig, where: str) -> list[str]:
    """An environment's name is registered and its limits are valid (`where` = `...env`)."""
    if env.name not in envs.ENVS:
        return [f"{where}.name={env.name!r}: not an environment; known: {sorted(envs.ENVS)}"]
    return env.problems(where)


def reward_model_problems(cfg, where: str, earlier, stages) -> list[str]:
    """A learned reward's kind is registered and its checkpoint reachable: a directory, or
    `stage:<name>` naming a reward_model stage that runs earlier."""
    from nemocascade.rewards.reward_models import reward_model_names

    problems = []
    if cfg.reward not in reward_model_names():
        known = ["verifier", *reward_model_names()]
        problems.append(f"{where}.reward={cfg.reward!r}: not a reward kind ({known})")
    path = cfg.reward_model_path
    if not path:
        problems.append(
            f"{where}.reward_model_path is not set: reward={cfg.reward!r} needs a reward model "
            "checkpoint (a directory, or stage:<name> of a reward_model stage)"
        )
    elif path.startswith("stage:"):
        src = path[len("stage:") :]
        if src not in earlier or not isinstance(stages[src], RewardModelStageConfig):
            problems.append(
                f"{where}.reward_model_path={path!r}: not a reward_model stage that runs before"
            )
    elif not os.path.exists(path):
        problems.append(f"{where}.reward_model_path={path!r} does not exist")
    return problems


def validate_stages(
    order: Sequence[str],
    stages: Mapping[str, StageConfig],
    *,
    eval_domains: Sequence[str],
    records: Callable[[str, str], list[dict]],
    batch_shards: int,
) -> None:
    """Raise `StageValidationError` listing every problem of the pipeline (see the module
    docstring); `records(domain, kind)` loads a domain's 'sft', 'rl' or 'eval' records."""
    problems: list[str] = []
    verifiers: set[str] = set()
    sandboxed: dict[str, None] = {}  # environments whose tools run in the sandbox (ordered)

    def load(domain: str, kind: str, where: str) -> list[dict] | None:
        try:
            out = records(domain, kind)
        except (FileNotFoundError, ValueError, KeyError) as e:
            problems.append(f"{where}: {e}")
            return None
        if not out:
            problems.append(f"{where}: domain {domain!r} has no {kind} records")
        return out

    for name in order:
        cfg = stages[name]
        where = f"stages.{name}"
        earlier = order[: order.index(name)]
        if cfg.start_from and cfg.start_from not in earlier:
            problems.append(
                f"{where}.start_from={cfg.start_from!r}: not a stage that runs before {name!r} "
                f"(earlier stages: {list(earlier)})"
            )
        if isinstance(cfg, RewardModelStageConfig):
            for d in cfg.domains:
                load(d, "pairs", f"{where}.domains")
            continue
        if isinstance(cfg, SFTStageConfig):
            if cfg.batch_size % batch_shards:
                problems.append(
                    f"{where}.batch_size={cfg.batch_size} does not split over the mesh's "
                    f"{batch_shards} batch shards; use a multiple of {batch_shards} or change "
                    "mesh.*"
                )
            for d in cfg.domains:
                load(d, "sft", f"{where}.domains")
            continue
        if cfg.rows % batch_shards:
            problems.append(
                f"{where}: prompts_per_step x samples_per_prompt = {cfg.rows} rows do not split "
                f"over the mesh's {batch_shards} batch shards; use a multiple of {batch_shards} "
                "or change mesh.*"
            )
        if cfg.env.name:
            found = env_problems(cfg.env, f"{where}.env")
            problems += found
            if not found:
                sandboxed[f"{where}.env.name={cfg.env.name!r}"] = None
        for d in cfg.domains:
            pool = load(d, "rl", f"{where}.domains")
            if pool and cfg.env.name:
                if cfg.env.name in envs.ENVS:
                    problems += env_record_problems(
                        cfg.env, pool, f"{where}.env.name={cfg.env.name!r} ({d} prompts)"
                    )
            elif pool and cfg.type == "grpo" and cfg.reward == "verifier":
                found, names = verifier_problems(pool, f"{where} ({d} prompts)")
                problems += found
                verifiers |= names
        if cfg.type == "grpo" and cfg.reward != "verifier":
            problems += reward_model_problems(cfg, where, earlier, stages)
        if cfg.type == "mopd":
            if not earlier:
                problems.append(f"{where}: an MOPD stage needs an earlier stage to teach it")
            for d, src in cfg.teachers.items():
                is_ckpt = os.path.isdir(src) and os.path.exists(os.path.join(src, "config.json"))
                if src not in earlier and not is_ckpt:
                    problems.append(
                        f"{where}.teachers.{d}={src!r}: neither a stage that runs before "
                        f"{name!r} nor a Hugging Face checkpoint directory (with config.json)"
                    )
    held_out_sets = {d: load(d, "eval", f"eval ({d})") for d in eval_domains}
    by_episodes = episode_envs(order, stages, {d: r for d, r in held_out_sets.items() if r})
    for d, held_out in held_out_sets.items():
        if held_out and d in by_episodes:
            env = by_episodes[d]
            if env.name in envs.ENVS:  # an unknown name is named with its stage above
                where = f"eval ({d} held-out records, environment {env.name!r})"
                problems += env_record_problems(env, held_out, where)
                sandboxed[where] = None
        elif held_out:
            found, names = verifier_problems(held_out, f"eval ({d} held-out records)")
            problems += found
            verifiers |= names
    if verifiers & set(SANDBOXED_VERIFIERS):
        status = sandbox.sandbox_status()
        if not status.usable:
            problems.append(
                f"code verifiers ({sorted(verifiers & set(SANDBOXED_VERIFIERS))}): {status.message}"
            )
    if sandboxed:
        status = sandbox.sandbox_status()
        if not status.usable:
            problems += [
                f"{k}: the environment's tools run in the sandbox: {status.message}"
                for k in sandboxed
            ]
    if problems:
        raise StageValidationError(
            f"the pipeline cannot run ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}; nothing was trained):\n  - "
            + "\n  - ".join(problems)
        )


def check_finished_exports(
    order: Sequence[str],
    stages: Mapping[str, StageConfig],
    done: set[str],
    stage_dir: Callable[[str], str],
    summary_path: str,
) -> None:
    """A stage still to run that scores with `stage:<name>` of a reward model that already
    finished needs that export on disk: checked when the job (re)starts, not when the stage
    does, hours later."""
    for name in order:
        cfg = stages[name]
        path = getattr(cfg, "reward_model_path", "")
        if name in done or getattr(cfg, "reward", "verifier") == "verifier":
            continue
        src = path[len("stage:") :] if path.startswith("stage:") else ""
        if src in done:
            export = os.path.join(stage_dir(src), EXPORT_DIR)
            if not os.path.isfile(os.path.join(export, META_FILE)):
                raise FileNotFoundError(
                    f"stages.{name}.reward_model_path={path!r}: stage {src!r} finished "
                    f"({summary_path}) but its export {export} is missing; restore it, or "
                    f"remove {src!r} from {summary_path} to train it again"
                )
