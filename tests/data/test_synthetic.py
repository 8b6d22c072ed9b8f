"""Synthetic domains: deterministic, disjoint splits, reference answers pass their own verifier."""

import pytest

from nemocascade.data import synthetic as tasks
from nemocascade.rewards import score_one


@pytest.mark.parametrize("domain", sorted(tasks.DOMAINS))
def test_splits_disjoint_and_deterministic(domain):
    train = tasks.problems(domain, "train", 300)
    test = tasks.problems(domain, "test", 60)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.prompt for p in train}) == 300
    assert [p.prompt for p in tasks.problems(domain, "test", 60)] == [p.prompt for p in test]
    # a larger draw of the same split keeps the held-out set held out
    assert not {p.prompt for p in tasks.problems(domain, "train", 500)} & {p.prompt for p in test}


@pytest.mark.parametrize("domain", ["instruction", "math"])
def test_reference_responses_verify_and_corruptions_fail(domain):
    for p in tasks.problems(domain, "test", 20):
        rec = tasks.prompt_record(p)
        assert score_one(rec, p.response, True)[0] == 1.0, p
        assert score_one(rec, p.response, False)[0] == 0.0  # cut at the length limit
        wrong = (
            p.response + " " + p.response.split()[-1]
            if domain == "instruction"
            else p.response.replace("}", "1}")
        )
        assert score_one(rec, wrong, True)[0] == 0.0, wrong


def test_code_reference_passes_in_sandbox_and_wrong_fails():
    p = tasks.problems("code", "test", 1)[0]
    rec = tasks.prompt_record(p)
    assert score_one(rec, p.response, True)[0] == 1.0
    assert score_one(rec, p.response.replace("return '", "return 'z"), True)[0] == 0.0


def test_records_validate_with_the_data_readers(tmp_path):
    import json

    from nemocascade.data import read_chat_jsonl, read_prompt_jsonl

    ps = tasks.problems("math", "train", 5)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(tasks.sft_record(p)) for p in ps))
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(tasks.prompt_record(p)) for p in ps))
    assert len(read_chat_jsonl(tmp_path / "sft.jsonl")[0]) == 5
    assert len(read_prompt_jsonl(tmp_path / "rl.jsonl")[0]) == 5


def test_unknown_domain_and_exhausted_split():
    with pytest.raises(ValueError, match="unknown domain"):
        tasks.problems("poetry", "train", 1)
    with pytest.raises(ValueError, match="distinct problems"):
        tasks.problems("instruction", "test", 1_000)


@pytest.mark.parametrize("arg", ["", "long"])
def test_reference_responses_fit_the_tiny_cascade_token_budgets(arg):
    """Every reference answer (+ eos) fits the job's eval and RL `max_new_tokens` with the
    tokenizer the job trains (a shorter cap makes correct answers impossible and caps the score),
    and every SFT record its longest row (`seq_len` or a bucket's): the main job and its
    long-context variant."""
    import importlib.util
    import pathlib

    from nemocascade.data import render_chat, train_bpe

    path = pathlib.Path(__file__).parents[2] / "configs" / "tiny_cascade.py"
    spec = importlib.util.spec_from_file_location("tiny_cascade_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg)
    stages = {n: cfg.stages[n] for n in cfg.stage_order.split(",")}  # the job's stages
    domains = sorted({d.strip() for st in stages.values() for d in str(st.domains).split(",")})
    tok = train_bpe(  # the tokenizer the job trains: on its own domains' texts
        tasks.all_texts(seed=cfg.seed, domains=domains),
        int(cfg.tokenizer.vocab_size),
        split_digits=bool(cfg.tokenizer.split_digits),
    )
    caps = {d: [("eval", int(cfg.eval.max_new_tokens))] for d in domains}
    for name, st in stages.items():
        if "max_new_tokens" in st:  # the sampling stages (not sft, not reward_model)
            for d in str(st.domains).split(","):
                caps[d.strip()].append((name, int(st.max_new_tokens)))
    for d, limits in caps.items():
        n_train = int(cfg.data.get("train_counts", {}).get(d, cfg.data.train_per_domain))
        ps = tasks.problems(d, "train", n_train, seed=cfg.seed) + tasks.problems(
            d, "test", int(cfg.data.eval_per_domain), seed=cfg.seed
        )
        longest = max(len(tok.encode(p.response)) + 1 for p in ps)
        for where, cap in limits:
            assert longest <= cap, (
                f"{d}: a reference answer needs {longest} tokens, {where} allows {cap}"
            )
        sft = cfg.stages.sft
        if d in str(sft.domains).split(","):
            rendered = max(
                len(render_chat(tok, tasks.sft_record(p)["messages"], thinking=sft.thinking)[0])
                for p in ps
            )
            longest_row = max([sft.seq_len] + [b[0] for b in sft.get("buckets", ())])
            assert rendered <= longest_row, f"{d}: an SFT record of {rendered} tokens"


@pytest.mark.parametrize(
    "domain",
    ["mcqa", "structured_output", "workplace", "long_context", "long_document", "long_needle"],
)
def test_paper_domains_reference_verifies_and_wrong_fails(domain):
    from nemocascade.data import render_tool_calls

    for p in tasks.problems(domain, "test", 10):
        rec = tasks.prompt_record(p)
        reply = render_tool_calls(list(p.tool_calls)) if p.tool_calls else p.response
        assert score_one(rec, reply, True)[0] == 1.0, (p, reply)
        assert score_one(rec, "I do not know.", True)[0] == 0.0
    if domain == "workplace":  # a call with another argument value is wrong, a malformed one too
        call = dict(p.tool_calls[0])
        args = {k: (v + 1 if isinstance(v, int) else v + "x") for k, v in call["arguments"].items()}
        assert score_one(rec, render_tool_calls([dict(call, arguments=args)]), True)[0] == 0.0
        assert score_one(rec, reply.replace("</tool_call>", ""), True)[0] == 0.0
        sft = tasks.sft_record(p)
        assert sft["tools"] and sft["messages"][1]["tool_calls"] == [dict(call)]
    if domain == "long_context":  # the answer is one fact among many in the document
        assert p.prompt.count("has the number") == 12 and p.response[7:-1] in p.prompt
    if domain == "long_document":  # 1-16 facts, the question before and after the document
        facts = [q.prompt.count("has the number") for q in tasks.problems(domain, "train", 400)]
        assert min(facts) == 1 and max(facts) == 16 and facts.count(1) > facts.count(8)
        question, *_, last = p.prompt.split("\n")
        assert question == last and question.startswith("What number does the")
        assert p.domain == "long_document" and p.response[7:-1] in p.prompt
    if domain == "long_needle":  # one fact among 0-60 filler sentences, anywhere
        ps = tasks.problems(domain, "train", 400)
        filler = [q.prompt.count("Nothing happened") for q in ps]
        assert min(filler) <= 2 and max(filler) >= 58 and max(filler) <= 60
        assert all(q.prompt.count("has the number") == 1 for q in ps)
        depth = []  # where the fact is, as a fraction of the document's sentences
        for q in ps:
            sentences = q.prompt.split("\n")[1].split(". ")
            at = next(i for i, t in enumerate(sentences) if t.startswith("The "))
            depth.append(at / max(1, len(sentences) - 1))
        assert sum(d < 0.25 for d in depth) > 50 and sum(d > 0.75 for d in depth) > 50
        question, *_, last = p.prompt.split("\n")
        assert question == last and p.response[7:-1] in p.prompt


def test_all_texts_can_be_limited_to_a_run_domains():
    some = list(tasks.all_texts(5, domains=["math"]))
    assert some and all("+" in t or "boxed" in t for t in some)
    assert len(list(tasks.all_texts(5))) > len(some)
