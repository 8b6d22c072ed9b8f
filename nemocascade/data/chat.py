"""The Nemotron-3-Nano chat template (ChatML with think blocks), as token ids plus a loss mask.

Rendered text. This follows the Nemotron-3 Hugging Face chat template as read
(not copied) from a public copy of its jinja source, tinker-cookbook's tested
`nemotron3` renderer and `reference/nemotron_h_architecture.md` §7; the
released tokenizer_config.json itself cannot be fetched here:

    <|im_start|>system\\n{system}<|im_end|>\\n          always emitted; {system} = "" if none
                                                     (+ the tool declarations, given `tools`)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{c}\\n</tool_response>\\n...<|im_end|>\\n
                                                     one block per run of consecutive tool messages
    <|im_start|>assistant\\n{body}<|im_end|>\\n

An assistant message carries reasoning either in `reasoning_content` or as a
`<think>...</think>` prefix of `content`. Its `{body}` is:

- current turn (after the last user message) with reasoning, `thinking=True`:
  `<think>\\n{reasoning}\\n</think>\\n{content}`;
- no reasoning, or `thinking=False` (non-thinking mode drops it):
  `<think></think>{content}`;
- an earlier turn (before the last user message): reasoning is stripped
  (`truncate_history_thinking`). As in the HF template (`"<think></think>" ~
  c.split("</think>")[-1]`), a turn that had reasoning keeps the newline that
  followed `</think>`, i.e. `<think></think>\\n{content}`; a turn without
  reasoning is `<think></think>{content}`. "Current" follows the HF rule
  (index after the last user message), so assistant turns around tool
  responses of the last user request keep their reasoning.

Reasoning is stripped of surrounding newlines and content (after a think
block) of leading newlines; every assistant body is right-trimmed of
whitespace (HF's `| trim`). Both input forms of reasoning render the same,
as the canonical inline text `<think>\\n{reasoning}\\n</think>\\n{content}` that
the model generates. (Documented deviation: given `reasoning_content`, the
HF template concatenates `"<think>\\n" ~ reasoning ~ "</think>" ~ content`
without those two newlines; we do not copy that asymmetry.)

Tool calls (`tools.py` has the format). `tools` (a list of `ToolSpec` or
tool declarations) are declared in the system turn after its text. An
assistant message's `tool_calls` (`[{"name", "arguments"}]` or OpenAI's
`[{"function": {...}}]`) render after its content as `<tool_call>` blocks
(`{content}\\n\\n<tool_call>...`, or just the blocks when the content is
empty) and are trained like the rest of the turn. Calls may also be written
inline in `content` as Nemotron's XML text. `tool` messages render as above,
via `tools.render_tool_responses`, and are never trained. Without `tools` and
`tool_calls` the rendering is unchanged.

Generation prefix (`add_generation_prompt=True`, and `render_prompt`):
`<|im_start|>assistant\\n<think>\\n` in thinking mode, `<|im_start|>assistant\\n<think></think>`
in non-thinking mode (no trailing newline).

Loss mask: 1 on exactly the tokens the model generates after that prefix:
for a turn rendered with reasoning, `{reasoning}\\n</think>\\n{content}<|im_end|>`;
otherwise `{content}<|im_end|>` (plus the history newline above). Never the
`<|im_start|>assistant\\n` header, the opening think tokens, or the `\\n` after
`<|im_end|>`. By default every assistant turn is trained (earlier ones with
their reasoning stripped, as the model sees them in context); with
`train_history=False` only the turns after the last user message are.

Token ids come from encoding the whole rendered text at once (as
`apply_chat_template(tokenize=True)` does); the mask is assigned per token by
the character where the token starts. Special-token strings written inside
message text (e.g. a literal `<|im_end|>`) become special ids, as in HF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nemocascade.data.tokenizer import IM_END, IM_START, THINK, THINK_END, Tokenizer
from nemocascade.data.tools import ToolSpec, render_system, render_tool_calls, render_tool_responses

ROLES = ("system", "user", "assistant", "tool")


def split_reasoning(message: Mapping) -> tuple[str | None, str]:
    """(reasoning or None, content) of an assistant message.

    Reasoning comes from `reasoning_content` or a `<think>...</think>` prefix of
    `content`; it is stripped of edge newlines, and empty reasoning (e.g. a
    non-thinking sample's `<think></think>answer`) counts as none. When there
    was a think block, leading newlines of the content are stripped.
    """
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None and THINK_END in content:
        head, content = content.split(THINK_END, 1)
        reasoning = head.split(THINK, 1)[1] if THINK in head else head
    if reasoning is None:
        return None, content
    reasoning = reasoning.strip("\n")
    return (reasoning or None), content.lstrip("\n")


def _assistant_body(message: Mapping, *, current: bool, thinking: bool) -> tuple[str, str]:
    """(untrained prefix, trained text without <|im_end|>) of one assistant turn's body.

    The body is right-trimmed of whitespace, as the HF template's `| trim` does.
    """
    reasoning, content = split_reasoning(message)
    if message.get("tool_calls"):
        calls = render_tool_calls(message["tool_calls"])
        content = f"{content.rstrip()}\n\n{calls}" if content.strip() else calls
    if current and thinking and reasoning is not None:
        return f"{THINK}\n", f"{reasoning}\n{THINK_END}\n{content}".rstrip()
    if not current and reasoning is not None:
        return f"{THINK}{THINK_END}", f"\n{content}".rstrip()
    return f"{THINK}{THINK_END}", content.rstrip()


def _pieces(
    messages: Sequence[Mapping],
    *,
    thinking: bool,
    add_generation_prompt: bool,
    train_history: bool,
    tools: Sequence[ToolSpec | Mapping] | None,
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, in order."""
    if not messages and not add_generation_prompt:
        raise ValueError("cannot render an empty conversation")
    system, offset = "", 0  # offset: index of messages[0] in the caller's list
    if messages and messages[0].get("role") == "system":
        system, messages, offset = messages[0].get("content") or "", messages[1:], 1
    pieces = [(f"{IM_START}system\n{render_system(system, tools)}{IM_END}\n", False)]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    i = 0
    while i < len(messages):
        role = messages[i].get("role")
        if role == "user":
            pieces.append((f"{IM_START}user\n{messages[i].get('content') or ''}{IM_END}\n", False))
        elif role == "tool":
            results = []
            while i < len(messages) and messages[i].get("role") == "tool":
                results.append(messages[i].get("content") or "")
                i += 1
            pieces.append((f"{IM_START}user\n{render_tool_responses(results)}{IM_END}\n", False))
            continue
        elif role == "assistant":
            current = i > last_user
            prefix, body = _assistant_body(messages[i], current=current, thinking=thinking)
            trained = current or train_history
            pieces.append((f"{IM_START}assistant\n{prefix}", False))
            pieces.append((f"{body}{IM_END}", trained))
            pieces.append(("\n", False))
        elif role == "system":
            raise ValueError(f"messages[{i + offset}]: a system message may only come first")
        else:
            raise ValueError(
                f"messages[{i + offset}].role: expected one of {list(ROLES)}, got {role!r}"
            )
        i += 1
    if add_generation_prompt:
        pieces.append(
            (
                f"{IM_START}assistant\n" + (f"{THINK}\n" if thinking else f"{THINK}{THINK_END}"),
                False,
            )
        )
    return pieces


def render_text(
    messages: Sequence[Mapping],
    *,
    thinking: bool = True,
    add_generation_prompt: bool = False,
    tools: Sequence[ToolSpec | Mapping] | None = None,
) -> str:
    """The conversation rendered as template text (no tokenisation)."""
    pieces = _pieces(
        messages,
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
        train_history=True,
        tools=tools,
    )
    return "".join(text for text, _ in pieces)


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping],
    *,
    thinking: bool = True,
    add_generation_prompt: bool = False,
    train_history: bool = True,
    tools: Sequence[ToolSpec | Mapping] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 loss mask over them.

    The mask covers the tokens an assistant generates (see module docstring);
    `thinking` selects thinking mode (reasoning of the current turn rendered)
    or non-thinking mode (empty `<think></think>`); `tools` are declared in the system turn.
    """
    pieces = _pieces(
        messages,
        thinking=thinking,
        add_generation_prompt=add_generation_prompt,
        train_history=train_history,
        tools=tools,
    )
    text = "".join(t for t, _ in pieces)
    char_mask = bytearray(len(text))
    pos = 0
    for piece, trained in pieces:
        if trained:
            char_mask[pos : pos + len(piece)] = b"\x01" * len(piece)
        pos += len(piece)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(char_mask[start]) if start < len(text) else 0 for start, _ in offsets]
    return ids, mask


def render_prompt(
    tokenizer: Tokenizer,
    messages_or_prompt: str | Sequence[Mapping],
    *,
    thinking: bool = True,
    tools: Sequence[ToolSpec | Mapping] | None = None,
) -> list[int]:
    """Token ids of an RL prompt, ending with the generation prefix of the chosen mode.

    A string is a single user message. The conversation must not end with an
    assistant message (it may end with tool responses: the model continues
    after them). `tools` are declared in the system turn.
    """
    if isinstance(messages_or_prompt, str):
        messages = [{"role": "user", "content": messages_or_prompt}]
    else:
        messages = list(messages_or_prompt)
    if messages and messages[-1].get("role") == "assistant":
        raise ValueError("an RL prompt must not end with an assistant message")
    text = render_text(messages, thinking=thinking, add_generation_prompt=True, tools=tools)
    return tokenizer.encode(text)
