"""Synthetic, deterministic data checked by the real verifiers: the tiny Cascade's domains
(`core`: instruction, math, code), toy versions of the paper's other RL domains (`paper`: mcqa,
structured_output, workplace tool calls, long_context), repository repair tasks for the `swe`
environment (`repair`: "swe"), a preference domain whose truth is a
rule only the generator knows (`preference`: "chat", for reward models and RLHF) and the
arithmetic chats of the tiny SFT run (`arithmetic_records`).

Each domain is a generator of problems with a disjoint train / held-out split (by a hash of the
problem, so the split does not depend on how many are drawn). A problem renders as
  * an SFT chat record  {"messages": [user, assistant], "domain": ..., ["tools"]}, and
  * an RL prompt record {"messages": [user], "domain": ..., "verifier": {...}, ["tools"]}
in the formats that `nemocascade.data` reads and `nemocascade.rewards` scores. A new domain is a
function `fn(rng) -> Problem` decorated with `register_domain(name)`.
"""

from nemocascade.data.synthetic import core, paper, preference, repair  # noqa: F401  (register domains)
from nemocascade.data.synthetic.arithmetic import arithmetic_records
from nemocascade.data.synthetic.base import (
    DOMAINS,
    Problem,
    all_texts,
    problems,
    prompt_record,
    register_domain,
    sft_record,
)

__all__ = [
    "DOMAINS",
    "Problem",
    "all_texts",
    "arithmetic_records",
    "problems",
    "prompt_record",
    "register_domain",
    "sft_record",
]
