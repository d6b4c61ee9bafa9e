"""Errors raised by lloptim.

Every error a user can provoke with bad input is a subclass of :class:`LloptimError`, carries the
offending field (where there is one) and says how to fix it. Code that catches ``LloptimError`` sees
every failure the library anticipates; anything else is a bug.
"""

from __future__ import annotations


class LloptimError(Exception):
    """Base class of every error lloptim raises on purpose."""


class SpecError(LloptimError, ValueError):
    """A problem specification is invalid.

    Parameters
    ----------
    field
        Dotted path of the offending field, e.g. ``"requests[3].prompt_tokens"``; empty when the
        whole document is at fault (a TOML syntax error, say).
    problem
        What is wrong.
    fix
        What the user should do instead.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        where = f"{field}: " if field else ""
        hint = f" (fix: {fix})" if fix else ""
        super().__init__(f"{where}{problem}{hint}")

    def __reduce__(self):
        # rebuild from the fields, so the error survives pickling (process pools, Ray tasks)
        return (type(self), (self.field, self.problem, self.fix))

    def replace(self, field: str | None = None, fix: str | None = None) -> "SpecError":
        """A copy of this error (same class, same extra data) naming another field or fix.

        Parameters
        ----------
        field
            The new field (a flag, a prefixed spec key); None keeps it.
        fix
            The new fix; None keeps it.
        """
        cls, args = self.__reduce__()
        args = list(args)
        if field is not None:
            args[0] = field
        if fix is not None:
            args[2] = fix
        return cls(*args)


class TooLargeError(SpecError):
    """A run is estimated to need more memory or time than this machine allows (see :mod:`lloptim.guards`).

    :attr:`field` names the size to lower (a flag, a spec key or a parameter); :attr:`fix` says
    how far, and how to run anyway.
    """


class ProfileError(SpecError):
    """A hardware profile is unknown or malformed."""


class PrecedenceError(SpecError):
    """A request's predecessors (``after``) are invalid: an unknown id, itself, or one named twice.

    Parameters
    ----------
    field, problem, fix
        As for :class:`SpecError`.
    ids
        The request ids at fault.
    """

    def __init__(self, field: str, problem: str, fix: str = "", ids: tuple[str, ...] = ()) -> None:
        super().__init__(field, problem, fix)
        self.ids = tuple(ids)

    def __reduce__(self):
        return (type(self), (self.field, self.problem, self.fix, self.ids))


class CycleError(PrecedenceError):
    """The precedence graph has a cycle, so no request on it could ever start.

    Attributes
    ----------
    cycle
        The ids on the cycle, in order (the last one is a predecessor of the first).
    """

    @property
    def cycle(self) -> tuple[str, ...]:
        """The ids on the cycle, in order."""
        return self.ids


class PolicyError(LloptimError, RuntimeError):
    """A scheduling policy asked the engine for something impossible (a bug in the policy)."""


class SolverError(LloptimError, RuntimeError):
    """A solver backend is unavailable or failed in a way that leaves no usable answer."""


class ModelTooLargeError(SolverError):
    """A model would not fit in memory for the chosen backend."""
