"""The class-incremental methods of the kit, in one explicit table.

| name | class | module | penalty |
|---|---|---|---|
| ``ita`` | :class:`~compolab.methods.ita_iel.ITA` | ``ita_iel`` | Eq. 11–12 |
| ``iel`` | :class:`~compolab.methods.ita_iel.IEL` | ``ita_iel`` | Eq. 18–19 |
| ``seq`` | :class:`~compolab.methods.baselines.Sequential` | ``baselines`` | none |
| ``naive`` | :class:`~compolab.methods.baselines.Naive` | ``baselines`` | none |
| ``ewc`` | :class:`~compolab.methods.ewc.EWC` | ``ewc`` | EWC at the previous weights |
| ``joint`` | :class:`~compolab.methods.baselines.Joint` | ``baselines`` | none |
| ``tmc`` | :class:`~compolab.methods.tangent.TMC` | ``tangent`` (over :mod:`compolab.tmc`) | L2 norm |

Every entry satisfies the :class:`~compolab.methods.base.Method` protocol; nothing registers
itself at import time.
"""

from __future__ import annotations

from compolab.errors import ConfigError
from compolab.methods.base import ABLATIONS, MergedMethod, Method, MethodConfig, TaskContext
from compolab.methods.baselines import Joint, Naive, Sequential
from compolab.methods.ewc import EWC
from compolab.methods.ita_iel import IEL, ITA
from compolab.methods.penalties import head_penalty, iel_penalty, ita_penalty, linear_head_fisher
from compolab.methods.state import EWCState, SecondOrderState, saved_fisher
from compolab.methods.tangent import TMC

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "get_method",
    "Method",
    "MergedMethod",
    "MethodConfig",
    "ABLATIONS",
    "TaskContext",
    "SecondOrderState",
    "EWCState",
    "saved_fisher",
    "ita_penalty",
    "iel_penalty",
    "head_penalty",
    "linear_head_fisher",
]

#: ``name -> method``: every method of ``compolab train --method``.
METHODS: dict[str, Method] = {
    m.name: m for m in (ITA(), IEL(), Sequential(), Naive(), EWC(), Joint(), TMC())
}
#: The method of a :class:`~compolab.run.RunConfig` that names none.
DEFAULT_METHOD = "ita"


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ConfigError: For an unknown name; the message lists the choices.

    Examples:
        >>> get_method("tmc").linearised, get_method("ita").linearised
        (True, False)
    """
    if name not in METHODS:
        raise ConfigError(f"`method` {name!r} is unknown; choose one of {list(METHODS)}")
    return METHODS[name]
