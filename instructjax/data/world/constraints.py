"""Explicit constraints: one checkable instruction on the form of an answer, added to a
prompt ("Put your answer in square brackets."), as InstructGPT's labelers judged whether an
output "follows explicit constraints in the instruction".

Each constraint is a wrapper around the answer, not a change of its content, so a small
model can produce it whether or not it knows the answer, a judge can check it without
solving the task, and stripping it gives back the content that correctness is judged on.

  wrap(name, response)     the response with the wrapper (leading whitespace kept)
  unwrap(name, response)   its exact inverse
  follows(name, response)  whether the first line carries the wrapper around some content
  content_line(response)   the first line with any known wrapper removed
"""

from __future__ import annotations

import re

# name -> (instruction added to the prompt, left part, right part) of the wrapper.
CONSTRAINTS: dict[str, tuple[str, str, str]] = {
    "prefix": ("Start your answer with 'Answer:'.", "Answer: ", ""),
    "brackets": ("Put your answer in square brackets.", "[", "]"),
    "quotes": ("Put your answer in double quotes.", '"', '"'),
    "done": ("End your answer with the word 'Done'.", "", " Done."),
}
NAMES = tuple(CONSTRAINTS)


def _check(name: str) -> tuple[str, str, str]:
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; constraints are {NAMES}")
    return CONSTRAINTS[name]


def instruction(name: str) -> str:
    return _check(name)[0]


def add_to_prompt(name: str, prompt: str, style: str) -> str:
    """The prompt carrying the constraint, close to its end: after a direct instruction
    (which ends in a newline), before the query of a few-shot prompt (its last two lines:
    "Input: ...\nOutput:"), as a leading line of a continuation. Near the end, because RL
    keeps a long prompt's last tokens (ppo.PPOConfig.max_prompt_len): a constraint at
    the top of a few-shot prompt would be cut off there."""
    text = instruction(name)
    if style == "instruction":
        return f"{prompt}{text}\n"
    if style == "few_shot":
        lines = prompt.split("\n")
        return "\n".join([*lines[:-2], text, *lines[-2:]])
    return f"{text}\n{prompt}"


def _split_lead(response: str) -> tuple[str, str]:
    body = response.lstrip()
    return response[:len(response) - len(body)], body


def wrap(name: str, response: str) -> str:
    _, left, right = _check(name)
    lead, body = _split_lead(response)
    return f"{lead}{left}{body.rstrip()}{right}"


def unwrap(name: str, response: str) -> str:
    """wrap's inverse; a response without the wrapper comes back unchanged."""
    if not follows(name, response):
        return response
    _, left, right = _check(name)
    lead, body = _split_lead(response)
    body = body.rstrip()
    return f"{lead}{body[len(left):len(body) - len(right)]}"


def first_line(response: str) -> str:
    return response.strip().split("\n", 1)[0].strip()


def follows(name: str, response: str) -> bool:
    """The first line starts and ends with the wrapper and holds something between them."""
    _, left, right = _check(name)
    line = first_line(response)
    return (line.startswith(left.strip()) and line.endswith(right.strip())
            and len(line) > len(left.strip()) + len(right.strip())
            and bool(line[len(left):len(line) - len(right)].strip()))


_WRAPPERS = [(re.escape(left.strip()), re.escape(right.strip()))
             for _, left, right in CONSTRAINTS.values()]


def content_line(response: str) -> str:
    """The first line without the wrapper of any constraint (whether or not the prompt
    asked for it), so content is judged the same way in either form."""
    line = first_line(response)
    for left, right in _WRAPPERS:
        m = re.fullmatch(rf"{left}\s*(.+?)\s*{right}", line, flags=re.DOTALL)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return line
