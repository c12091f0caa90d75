"""A1111 v1.10 prompt language: AND, prompt editing / alternation, attention emphasis.

Reference: docs/generation-semantics.md §1.1–§1.3, §1.7 (worked examples), §6.4 (edit timing).
Pure Python; the three stages do not share a grammar and are parsed independently:

1. ``get_multicond_prompt_list`` — split on ``AND`` with optional ``:weight`` (§1.1).
2. ``get_learned_conditioning_prompt_schedules`` — ``[from:to:when]`` / ``[a|b]`` (§1.2).
3. ``parse_prompt_attention`` — ``(x)``, ``[x]``, ``(x:1.3)``, escapes, ``BREAK`` (§1.3).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from .errors import InvalidRequestError

# ---------------------------------------------------------------------------------------------
# §1.3 attention / emphasis parser
# ---------------------------------------------------------------------------------------------

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1  # multiplied, never divided: [[x]] = (1/1.1)**2 (§1.3)
BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

# Token alternatives in the order §1.3 lists them; the first that matches at a position wins.
_ATTENTION_TOKEN_RE = re.compile(r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\     # escaped literals
  | \\                                   # a lone backslash
  | \( | \[                              # openers
  | :\s*([+-]?[.\d]+)\s*\)               # ":<number>)" closes a round bracket with a weight
  | \) | \]                              # closers
  | [^\\()\[\]:]+                        # plain text
  | :                                    # a lone colon
""", re.VERBOSE)
_BREAK_WORD_RE = re.compile(r"\bBREAK\b")



def parse_prompt_attention(text: str) -> list[list]:
    """Parse emphasis syntax into ``[[fragment, weight], ...]`` (§1.3).

    ``BREAK`` becomes ``["BREAK", -1.0]`` (its weight is multiplied like any fragment's when it sits
    inside brackets, which makes it an ordinary word for the chunker). Unbalanced brackets never
    raise; a weight that ``float()`` rejects (``(a:1.2.3)``) raises ``ValueError`` as in A1111.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    for match in _ATTENTION_TOKEN_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])  # "\(" -> "(", a lone "\" -> ""
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            _multiply_from(res, round_open.pop(), float(weight))
        elif token == ")" and round_open:
            _multiply_from(res, round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_open:
            _multiply_from(res, square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            _append_text_with_breaks(res, token)

    # Brackets still open at the end apply to everything after them: round first, then square.
    for start in round_open:
        _multiply_from(res, start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        _multiply_from(res, start, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    return _merge_equal_neighbours(res)


def is_break_marker(fragment: Sequence) -> bool:
    """True for a BREAK the chunker honours: text "BREAK" with weight exactly -1 (§1.3, §1.4)."""
    return fragment[0] == BREAK_TEXT and fragment[1] == BREAK_WEIGHT


def _multiply_from(res: list[list], start: int, multiplier: float) -> None:
    for entry in res[start:]:
        entry[1] *= multiplier


def _append_text_with_breaks(res: list[list], text: str) -> None:
    for i, part in enumerate(split_on_break(text)):
        if i > 0:
            res.append([BREAK_TEXT, BREAK_WEIGHT])
        res.append([part, 1.0])


def split_on_break(text: str) -> list[str]:
    r"""``re.split(r"\s*\bBREAK\b\s*", text)`` (A1111's), in linear time.

    The regex rescans each whitespace run from every position in it: a prompt of 20 000 spaces took
    seconds. Here each ``BREAK`` word takes the whitespace run just before it (back to the previous
    match) and the one after it, exactly the leftmost-longest matches re.split makes.
    """
    parts, done = [], 0
    for word in _BREAK_WORD_RE.finditer(text):
        start, end = word.start(), word.end()
        if start < done:
            continue
        while start > done and text[start - 1].isspace():
            start -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[done:start])
        done = end
    parts.append(text[done:])
    return parts


def _merge_equal_neighbours(res: list[list]) -> list[list]:
    merged = [res[0]]
    for text, weight in res[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


# ---------------------------------------------------------------------------------------------
# §1.1 AND / composable prompts
# ---------------------------------------------------------------------------------------------

_AND_RE = re.compile(r"\bAND\b")
_SUBPROMPT_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def split_and_subprompts(prompt: str) -> list[tuple[str, float]]:
    """``"a cat :1.2 AND a dog:-0.5"`` -> ``[("a cat", 1.2), (" a dog", -0.5)]`` (§1.1).

    Leading whitespace of a part is kept; trailing whitespace and the ``:weight`` are removed.
    """
    parts = []
    for part in _AND_RE.split(prompt):
        text, weight = _split_subprompt_weight(part)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def _split_subprompt_weight(part: str) -> tuple[str, str | None]:
    r"""A1111's ``^((?:\s|.)*?)(?:\s*:\s*(NUMBER))?\s*$`` on one AND part, in linear time.

    The lazy regex retried the trailing ``\s*$`` from every position (quadratic in a run of spaces).
    Its match is the shortest prefix whose rest is ``\s*:\s*NUMBER\s*`` (the colon is then the last
    one) or else only whitespace.
    """
    stripped = part.rstrip()
    colon = stripped.rfind(":")
    if colon >= 0 and _SUBPROMPT_NUMBER_RE.fullmatch(stripped[colon + 1:].lstrip()):
        return stripped[:colon].rstrip(), stripped[colon + 1:].lstrip()
    return stripped, None


def get_multicond_prompt_list(prompts: Iterable[str]):
    """AND-split a batch of prompts and de-duplicate the sub-prompt texts (§1.1).

    Returns ``(indexes, texts, text_to_index)``: ``indexes[i]`` lists ``(index into texts, weight)``
    for prompt ``i``; every distinct sub-prompt text is in ``texts`` once, in first-seen order.
    """
    texts: list[str] = []
    text_to_index: dict[str, int] = {}
    indexes: list[list[tuple[int, float]]] = []
    for prompt in prompts:
        prompt_indexes = []
        for text, weight in split_and_subprompts(prompt):
            if text not in text_to_index:
                text_to_index[text] = len(texts)
                texts.append(text)
            prompt_indexes.append((text_to_index[text], weight))
        indexes.append(prompt_indexes)
    return indexes, texts, text_to_index


# ---------------------------------------------------------------------------------------------
# §1.2 prompt editing and alternation
# ---------------------------------------------------------------------------------------------

@dataclass
class _Scheduled:
    """``[before:after:when]``; ``before`` is None for the ``[after:when]`` form."""
    before: list | None
    after: list
    number: str  # the NUMBER token as written: "." in it decides fraction vs step (§1.2)


@dataclass
class _Alternate:
    """``[a|b|...]``; each option is a node sequence (an empty option renders as "")."""
    options: list


# A node is a verbatim string, a _Scheduled, an _Alternate, or a list of nodes.
_Node = Union[str, _Scheduled, _Alternate, list]


class _ScheduleSyntaxError(Exception):
    pass


# Lark's common.SIGNED_NUMBER, alternatives in the same order: INT EXP | DECIMAL EXP? | INT.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_WHITESPACE_RE = re.compile(r"\s*")
_PROMPT_STOP = "[]():|"       # characters a plain run can never contain
_TOP_LEVEL_LITERALS = "[]():"  # what `start` may take verbatim between prompts ("|" is not one)


class _ScheduleParser:
    """Recursive-descent equivalent of the §1.2 grammar.

    Inside a ``prompt`` the structure is unambiguous: brackets must pair up and the number of
    top-level ``:``/``|`` in a group decides emphasized / scheduled / alternate. Only ``start`` is
    ambiguous (a valid group may also be read as literal brackets). We read every group that is
    valid as a group, outermost first; this agrees with Lark 1.1.2 on the §1.7 examples and on
    random bracket soup, except where Lark's own pick depends on PYTHONHASHSEED (e.g. ``[a:1]]``,
    a valid group followed by a stray closer at the end) — we then give one of Lark's answers.
    """

    def __init__(self, text: str):
        self.text = text
        self._groups: dict[int, tuple[_Node, int] | None] = {}

    def parse(self) -> list:
        text, nodes, pos = self.text, [], 0
        while True:
            prompt, pos = self._prompt(pos)
            nodes.append(prompt)
            if pos == len(text):
                return nodes
            if text[pos] not in _TOP_LEVEL_LITERALS:  # "|" outside an alternate, or a bad "\"
                raise _ScheduleSyntaxError(pos)
            nodes.append(text[pos])  # stray closer, colon, or opener of an invalid group
            pos += 1

    def _prompt(self, pos: int) -> tuple[list, int]:
        """Longest ``prompt`` starting at ``pos``: plain text, escapes and valid groups."""
        text, nodes, plain_start = self.text, [], pos
        while pos < len(text):
            char = text[pos]
            if char == "\\":
                if pos + 1 == len(text) or text[pos + 1] == "\n":  # plain's "\\." needs a char
                    break
                pos += 2
            elif char in "([":
                group = self._group(pos)
                if group is None:
                    break
                nodes.append(text[plain_start:pos])
                node, pos = group
                nodes.append(node)
                plain_start = pos
            elif char in _PROMPT_STOP:
                break
            else:
                pos += 1
        nodes.append(text[plain_start:pos])
        return nodes, pos

    def _group(self, pos: int) -> tuple[_Node, int] | None:
        if pos not in self._groups:
            parse = self._round_group if self.text[pos] == "(" else self._square_group
            self._groups[pos] = parse(pos)
        return self._groups[pos]

    def _round_group(self, pos: int):
        """``(prompt)`` or ``(prompt:prompt)``: emitted verbatim (emphasis is stage 3)."""
        first, pos = self._prompt(pos + 1)
        if self._char(pos) == ")":
            return ["(", first, ")"], pos + 1
        if self._char(pos) == ":":
            second, pos = self._prompt(pos + 1)
            if self._char(pos) == ")":
                return ["(", first, ":", second, ")"], pos + 1
        return None

    def _square_group(self, pos: int):
        first, pos = self._prompt(pos + 1)
        char = self._char(pos)
        if char == "]":
            return ["[", first, "]"], pos + 1
        if char == "|":
            return self._alternate_rest(first, pos)
        if char == ":":
            return self._scheduled_rest(first, pos)
        return None

    def _alternate_rest(self, first: list, pos: int):
        options = [first]
        while self._char(pos) == "|":
            option, pos = self._prompt(pos + 1)
            options.append(option)
        if self._char(pos) == "]":
            return _Alternate(options), pos + 1
        return None

    def _scheduled_rest(self, first: list, colon: int):
        number = self._number_then_close(colon + 1)  # [after:when]
        if number is not None:
            return _Scheduled(None, first, number[0]), number[1]
        second, pos = self._prompt(colon + 1)  # [before:after:when]
        if self._char(pos) == ":":
            number = self._number_then_close(pos + 1)
            if number is not None:
                return _Scheduled(first, second, number[0]), number[1]
        return None

    def _number_then_close(self, pos: int) -> tuple[str, int] | None:
        """``[WS] NUMBER [WS] "]"`` at ``pos`` -> (number text, position after "]")."""
        pos = _WHITESPACE_RE.match(self.text, pos).end()
        number = _NUMBER_RE.match(self.text, pos)
        if number is None:
            return None
        pos = _WHITESPACE_RE.match(self.text, number.end()).end()
        if self._char(pos) != "]":
            return None
        return number.group(0), pos + 1

    def _char(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""


def _parse_schedule_tree(prompt: str) -> list | None:
    """The §1.2 parse tree, or None when the prompt does not parse (it is then used verbatim)."""
    try:
        return _ScheduleParser(prompt).parse()
    except (_ScheduleSyntaxError, RecursionError):
        return None


def _iter_nodes(node: _Node):
    """Every node of the tree, depth first."""
    yield node
    if isinstance(node, list):
        children = node
    elif isinstance(node, _Scheduled):
        children = [node.before or [], node.after]
    elif isinstance(node, _Alternate):
        children = node.options
    else:
        children = []
    for child in children:
        yield from _iter_nodes(child)


@dataclass(frozen=True)
class _StepRule:
    """How a scheduled node's NUMBER becomes a step boundary (§1.2 "Step resolution")."""
    steps: int
    int_offset: int = 0
    fraction_offset: float = 0.0
    old_scheduling: bool = False

    def when(self, number: str) -> int:
        value = float(number)
        if self.old_scheduling:
            value = value * self.steps if value < 1 else value
        elif "." in number:
            value = (value - self.fraction_offset) * self.steps
        else:
            value = value - self.int_offset
        # Clamped before int(): `[a:b:1e999]` means "never switches" (A1111 fails on int(inf)), and any
        # number below 1 means "from the start".
        return int(min(self.steps, max(value, -1.0)))


def _step_rule(base_steps: int, hires_steps: int | None, use_old_scheduling: bool) -> _StepRule:
    if hires_steps is None or use_old_scheduling:
        return _StepRule(base_steps, old_scheduling=use_old_scheduling)
    # hires second pass: fractions 1..2 and step numbers above the first pass address it
    return _StepRule(hires_steps, int_offset=base_steps, fraction_offset=1.0)


def _render(node: _Node, step: int, whens: dict[int, int]) -> str:
    """The text of ``node`` at the 1-based boundary ``step``."""
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "".join(_render(child, step, whens) for child in node)
    if isinstance(node, _Scheduled):
        if step <= whens[id(node)]:
            return _render(node.before, step, whens) if node.before is not None else ""
        return _render(node.after, step, whens)
    return _render(node.options[(step - 1) % len(node.options)], step, whens)


def _schedule_for_prompt(prompt: str, rule: _StepRule) -> list[list]:
    tree = _parse_schedule_tree(prompt)
    if tree is None:
        return [[rule.steps, prompt]]
    try:
        return _schedule_from_tree(tree, rule)
    except RecursionError:  # absurdly deep nesting: treated like a prompt that does not parse
        return [[rule.steps, prompt]]


def _schedule_from_tree(tree: list, rule: _StepRule) -> list[list]:
    boundaries = {rule.steps}
    whens: dict[int, int] = {}
    for node in _iter_nodes(tree):
        if isinstance(node, _Scheduled):
            whens[id(node)] = rule.when(node.number)
            if whens[id(node)] >= 1:
                boundaries.add(whens[id(node)])
        elif isinstance(node, _Alternate):
            boundaries.update(range(1, rule.steps + 1))
    return [[step, _render(tree, step, whens)] for step in sorted(boundaries)]


def get_learned_conditioning_prompt_schedules(prompts: Sequence[str], base_steps: int,
                                              hires_steps: int | None = None,
                                              use_old_scheduling: bool = False) -> list[list[list]]:
    """Per prompt, the edit/alternation schedule ``[[end_at_step, text], ...]`` (§1.2).

    ``base_steps`` / ``hires_steps`` are already multiplied for second-order samplers
    (`Sampler.prompt_schedule_steps` in samplers.py). With ``hires_steps`` the schedule is the one of the hires second pass.
    """
    rule = _step_rule(base_steps, hires_steps, use_old_scheduling)
    schedules = {prompt: _schedule_for_prompt(prompt, rule) for prompt in dict.fromkeys(prompts)}
    return [schedules[prompt] for prompt in prompts]


# Samplers A1111 flags second-order: their prompt schedules are built for 2 x steps (§1.2).
def schedule_index_at_call(schedule: Sequence[Sequence], call_index: int) -> int:
    """Index of the schedule entry the CFG denoiser uses at its ``call_index``-th call (0-based).

    The first entry with ``call_index <= end_at_step``: since the boundaries are 1-based steps, an
    edit takes effect one call later than its number suggests (§1.2, §6.4). A call past the last
    boundary falls back to entry 0, as A1111's lookup does (its default index).
    """
    for index, (end_at_step, _text) in enumerate(schedule):
        if call_index <= end_at_step:
            return index
    return 0


def scheduled_text_at_call(schedule: Sequence[Sequence], call_index: int) -> str:
    return schedule[schedule_index_at_call(schedule, call_index)][1]


# ---------------------------------------------------------------------------------------------
# Validation before a job runs
# ---------------------------------------------------------------------------------------------

# Attention and AND weights beyond this overflow float32 conditioning to inf/NaN in the UNet (A1111
# then fails with NansException); 1000 is ~72 nested "(" or an explicit (word:1000).
MAX_ATTENTION_WEIGHT = 1000.0
# Brackets open at once: parse_prompt_attention (as A1111's) re-multiplies every fragment after an opener
# when it closes, so thousands of openers cost millions of steps (1.1**73 is past MAX_ATTENTION_WEIGHT).
MAX_BRACKET_DEPTH = 100


def bracket_depth(text: str) -> int:
    """The most emphasis brackets open at once, as parse_prompt_attention pairs them (linear time)."""
    round_open = square_open = deepest = 0
    for match in _ATTENTION_TOKEN_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token == "(":
            round_open += 1
        elif token == "[":
            square_open += 1
        elif (weight is not None or token == ")") and round_open:
            round_open -= 1
        elif token == "]" and square_open:
            square_open -= 1
        deepest = max(deepest, round_open + square_open)
    return deepest


def check_prompt(prompt: str, steps: int) -> None:
    """Raise InvalidRequestError for a prompt the engine could not turn into finite conditioning.

    Runs the three stages as the engine does: malformed weights (``(a:1.2.3)``), weights that are
    not finite or beyond ±MAX_ATTENTION_WEIGHT, and brackets nested past MAX_BRACKET_DEPTH.
    """
    for text, weight in split_and_subprompts(prompt):
        if not math.isfinite(weight) or abs(weight) > MAX_ATTENTION_WEIGHT:
            raise InvalidRequestError(f"AND weight {weight:g} is outside ±{MAX_ATTENTION_WEIGHT:g}")
        schedule = get_learned_conditioning_prompt_schedules([text], max(1, steps))[0]
        for scheduled_text in dict.fromkeys(t for _, t in schedule):
            depth = bracket_depth(scheduled_text)
            if depth > MAX_BRACKET_DEPTH:
                raise InvalidRequestError(f"{depth} brackets are open at once, more than {MAX_BRACKET_DEPTH}")
            try:
                fragments = parse_prompt_attention(scheduled_text)
            except ValueError as exc:  # float() of a weight such as "1.2.3"
                raise InvalidRequestError(f"invalid attention weight: {exc}") from None
            for fragment in fragments:
                w = fragment[1]
                if not is_break_marker(fragment) and (not math.isfinite(w) or abs(w) > MAX_ATTENTION_WEIGHT):
                    raise InvalidRequestError(f"attention weight {w:g} of {fragment[0][:40]!r} is outside "
                                              f"±{MAX_ATTENTION_WEIGHT:g} (too many nested brackets or a "
                                              "huge (text:weight))")
