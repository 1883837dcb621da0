"""target_modules as a regular expression, matched in bounded time: the check adapter files run on
an untrusted config before compiling its pattern (docs/adapter_files.md)."""
import re

try:
    # Python 3.11+; before, the same parser was the module sre_parse
    from re import _parser as sre_parse
except ImportError:
    import sre_parse


# A target_modules regular expression is matched against every layer name of a model, and a
# downloaded adapter's config is untrusted: Python's backtracking matcher takes time exponential in
# the name's length on patterns such as (.|.)*x or (a+)+x. check_target_pattern refuses the shapes
# that backtrack exponentially: a repeat (*, +, {m,n} with n > 1) around an alternation, around
# another repeat, and back-references. What remains backtracks at most polynomially, with degree
# the number of repeats, so that number is bounded too; docs/adapter_files.md has the measured cost.
MAX_TARGET_PATTERN_CHARS = 1000
MAX_TARGET_PATTERN_REPEATS = 3


def check_target_pattern(pattern: str, name: str) -> str:
    """`pattern` if it is a regular expression safe to match against untrusted names (above)."""
    if len(pattern) > MAX_TARGET_PATTERN_CHARS:
        raise ValueError(f"{name} is a regular expression of {len(pattern)} characters; at most "
                         f"{MAX_TARGET_PATTERN_CHARS}")
    try:
        tree = sre_parse.parse(pattern)
    except re.error as error:
        raise ValueError(f"{name} is no regular expression ({error})") from None
    repeats = _repeats(tree, sre_parse.MAXREPEAT, name, pattern)
    if repeats > MAX_TARGET_PATTERN_REPEATS:
        raise ValueError(f"{name} {pattern!r} has {repeats} repeats (*, +, {{m,n}}); at most "
                         f"{MAX_TARGET_PATTERN_REPEATS}, which bound its matching time")
    return pattern


def _repeats(tree, maxrepeat, name: str, pattern: str, inside_repeat: bool = False) -> int:
    """The repeats with an upper bound above 1 in a parsed pattern; a ValueError for a shape that
    backtracks exponentially (a repeat inside a repeat, an alternation inside a repeat,
    back-references)."""
    def refuse(what: str):
        raise ValueError(f"{name} {pattern!r} has {what}, which can make matching take time "
                         f"exponential in the name's length; write it without (e.g. a list of "
                         f"names, or .*\\.(q_proj|v_proj) with the alternation outside any repeat)")
    count = 0
    for op, value in tree:
        op = str(op)
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = value
            repeats = high == maxrepeat or high > 1
            if repeats and inside_repeat:
                refuse("a repeat inside a repeat, such as (a+)*")
            count += repeats + _repeats(body, maxrepeat, name, pattern, inside_repeat or repeats)
        elif op == "BRANCH":
            if inside_repeat:
                refuse("an alternation inside a repeat, such as (a|b.)*")
            count += sum(_repeats(branch, maxrepeat, name, pattern) for branch in value[1])
        elif op in ("GROUPREF", "GROUPREF_EXISTS"):
            refuse("a back-reference")
        elif op == "SUBPATTERN":
            count += _repeats(value[-1], maxrepeat, name, pattern, inside_repeat)
        elif op in ("ASSERT", "ASSERT_NOT"):
            count += _repeats(value[1], maxrepeat, name, pattern, inside_repeat)
        elif op == "ATOMIC_GROUP":
            count += _repeats(value, maxrepeat, name, pattern, inside_repeat)
    return count
