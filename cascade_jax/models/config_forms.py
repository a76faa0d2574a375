"""The forms a model constructor argument may take, written once per model next to its constructor.

A model config is the official constructor call written as YAML, so what it may hold is what the
official constructor accepts: ``StageC(self_attn=True)`` or ``self_attn=[True, False]`` (one per
level), ``dropout=0.1`` or ``[0, 0.1]`` (the official code repeats a scalar over the levels),
``block_repeat=None``. Each model class lists its arguments' forms in ``CONFIG_FORMS`` (built from
the pieces here); :func:`cascade_jax.models.config_check.check_config` tests a config against them
and names the key, the value and the accepted forms when one does not fit. Inferring forms from
the defaults is too strict: a default shows one form, not every form the code handles.

Per-level lists are sized by the levels of the model (``len(c_hidden)``): the official constructors
index them ``[i]`` for each level, so a shorter list crashes there and a longer one is read up to
the last level (its tail is ignored, as officially).
"""

from __future__ import annotations

from typing import Callable


class Form:
    """One accepted form: ``problem`` says why a value does not fit (None: it fits), ``text`` what fits."""

    plural = "values"

    def problem(self, value, levels: int | None) -> str | None:
        raise NotImplementedError

    def text(self, levels: int | None) -> str:
        raise NotImplementedError


class Kind(Form):
    """A scalar kind: an integer, a number, a flag, a string."""

    def __init__(self, singular: str, plural: str, test: Callable[[object], bool]):
        self.singular, self.plural, self.test = singular, plural, test

    def problem(self, value, levels):
        return None if self.test(value) else f"{value!r} is not {self.singular}"

    def text(self, levels):
        return self.singular


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# bool is an int in Python; a flag where a width belongs (c_hidden: true) is a mistake, not a width of 1.
INT = Kind("an integer", "integers", _is_int)
NUMBER = Kind("a number", "numbers", lambda v: _is_int(v) or isinstance(v, float))
# The official code only tests a flag's truth (``if self_attn:``), so 0 and 1 work as well as false/true.
FLAG = Kind("true or false", "true/false values", lambda v: isinstance(v, bool) or (_is_int(v) and v in (0, 1)))
TEXT = Kind("a string", "strings", lambda v: isinstance(v, str))
NULL = Kind("null", "nulls", lambda v: v is None)


class Choice(Form):
    def __init__(self, *values: str):
        self.values = values
        self.plural = "values among " + ", ".join(repr(v) for v in values)

    def problem(self, value, levels):
        return None if isinstance(value, str) and value in self.values else f"{value!r} is not one of them"

    def text(self, levels):
        return "one of " + ", ".join(repr(v) for v in self.values)


class Letters(Form):
    """A level's block letters: ``"CTA"`` or ``[C, T, A]`` (the official loop iterates over either)."""

    def __init__(self, letters: str):
        self.letters = letters
        self.plural = f"strings of block letters ({', '.join(letters)})"

    def problem(self, value, levels):
        if not isinstance(value, (str, list, tuple)) or not all(isinstance(c, str) and len(c) == 1 for c in value):
            return f"{value!r} is not a string of block letters"
        unknown = sorted(set(value) - set(self.letters))
        return f"{value!r} has block types {unknown}, not among {', '.join(self.letters)}" if unknown else None

    def text(self, levels):
        return f"a string of block letters ({', '.join(self.letters)}), such as {self.letters[:3]!r}"


class Seq(Form):
    """A list whose entries all fit ``element``: at least ``min_length`` long, or exactly ``length``.

    ``per_level``: at least one entry per level, plus ``level_offset`` (the official ``switch_level``
    is read at level - 1, so it needs one entry fewer).
    """

    def __init__(self, element: Form, *, min_length: int = 0, length: int | None = None, per_level: bool = False,
                 level_offset: int = 0):
        self.element, self.min_length, self.length = element, min_length, length
        self.per_level, self.level_offset = per_level, level_offset
        self.plural = f"lists of {element.plural}"

    def problem(self, value, levels):
        if not isinstance(value, (list, tuple)):
            return f"{value!r} is not a list"
        if self.per_level and levels is not None and len(value) < levels + self.level_offset:
            needed = levels + self.level_offset
            return f"it has {_entries(len(value))}; c_hidden has {levels} levels, so {needed} " \
                   f"{'is' if needed == 1 else 'are'} needed"
        if len(value) < self.min_length or (self.length is not None and len(value) != self.length):
            return f"it has {_entries(len(value))}"
        for i, item in enumerate(value):
            problem = self.element.problem(item, levels)
            if problem is not None:  # nested lists: "entry [1][0]: ..."
                return f"entry [{i}]{problem[6:]}" if problem.startswith("entry [") else f"entry [{i}]: {problem}"
        return None

    def text(self, levels):
        head = f"a list of {self.element.plural}"
        if self.per_level:
            first = " but the first" if self.level_offset else ""
            return f"{head}, one per level{first} of c_hidden" + (f" ({levels} levels)" if levels is not None else "")
        if self.length is not None:
            return f"{head} of {self.length} entries"
        return f"{head} (at least {self.min_length})" if self.min_length else head


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


class DownUp(Seq):
    """The official ``blocks`` / ``block_repeat``: ``[down, up]``, two per-level lists."""

    def __init__(self, element: Form):
        super().__init__(Seq(element, per_level=True), min_length=2)
        self.plural = f"[down, up] pairs of lists of {element.plural}"

    def text(self, levels):
        count = f" ({levels} levels)" if levels is not None else ""
        return f"[down, up]: two lists of {self.element.element.plural}, each one per level of c_hidden{count}"


class Either(Form):
    """Any of several forms (``true``, or a list of flags per level)."""

    def __init__(self, *forms: Form):
        self.forms = forms
        self.plural = " or ".join(f.plural for f in forms)

    def problem(self, value, levels):
        problems = [f.problem(value, levels) for f in self.forms]
        if any(p is None for p in problems):
            return None
        # Report the form the value looks like: a list against the list form, a scalar against the others.
        is_list = isinstance(value, (list, tuple))
        for form, problem in zip(self.forms, problems):
            if isinstance(form, Seq) == is_list:
                return problem
        return problems[0]

    def text(self, levels):
        return ", or ".join(f.text(levels) for f in self.forms)


def optional(form: Form) -> Form:
    return Either(NULL, form)


def per_level(element: Form, **kwargs) -> Seq:
    return Seq(element, per_level=True, **kwargs)


def scalar_or_per_level(element: Form) -> Form:
    """The official ``dropout`` / ``self_attn``: one value for every level, or one per level."""
    return Either(element, per_level(element))
