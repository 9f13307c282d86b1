"""The decoding methods ``generate`` offers, as settings of one chain loop and the ``jacobi_step`` op.

| method          | window | op mode         | lossless | note |
|-----------------|--------|-----------------|----------|------|
| ``ar``          | 0      | sjd             | target   | one token per forward |
| ``ar_gumbel``   | 0      | gumbel_jacobi   | target   | AR with position-keyed Gumbel noise |
| ``sjd``         | W      | sjd             | yes | fresh drafts from the current rows |
| ``sjd_vp``      | W      | sjd + beta      | yes | verification prediction; ``Qvp`` stored |
| ``coupling``    | W      | coupling        | yes | maximal coupling (MC-SJD); ``beta``: to ``Qvp`` |
| ``gumbel``      | W      | gumbel          | yes | shared Gumbel noise, probabilistic check |
| ``gumbel_jacobi`` | W    | gumbel_jacobi   | yes | exact match; same tokens as ``ar_gumbel`` |
| ``pac``         | tree   | coupling + tree | yes | K-ary tree (``tree_width``, ``tree_depth``) then a chain; ``decoding.pac`` |
| ``sjd2``        | W      | sjd, noisy in   | no  | ``sjd_kernels.sjd2`` (a fine-tuned model) |

``sjd2`` runs its own loop on the in-package class-conditional GPT carrying ``model.sjd2`` (set by
``sjd_kernels.sjd2.checkpoint.load_finetuned``); ``generate`` refuses the options it does not use
(``forced``, ``uncond``, ``beta``, ``vp_form``, the tree and sparse-state options, ...), and each
method refuses the options of the others (``sjd2``/``sjd2_kv``, ``tree_width``/``tree_depth``,
``beta``/``vp_form``).

``ar`` and ``gumbel_jacobi`` at window 0 run the same op as the Jacobi methods, so all methods
share one target pipeline (SPEC section 2) and one generator (section 7).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    mode: str               # jacobi_step draft mode
    windowed: bool          # False: window forced to 0 (AR)
    lossless: bool
    vp: bool = False        # keeps previous target rows (beta)
    default_beta: float = 0.0
    tree: bool = False      # draft tree verified by tree_verify (method pac)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ar", "sjd", False, True),
    Method("ar_gumbel", "gumbel_jacobi", False, True),
    Method("sjd", "sjd", True, True),
    Method("sjd_vp", "sjd", True, True, vp=True, default_beta=0.5),
    Method("coupling", "coupling", True, True),
    Method("gumbel", "gumbel", True, True),
    Method("gumbel_jacobi", "gumbel_jacobi", True, True),
    Method("pac", "coupling", True, True, tree=True),
)}
PENDING: dict[str, str] = {}
EXTERNAL = ("sjd2",)


def available_methods() -> tuple[str, ...]:
    """Names ``generate`` accepts in this build."""
    out = list(METHODS)
    try:
        from ..sjd2.decode import generate_sjd2  # noqa: F401
        out.append("sjd2")
    except ImportError:
        pass
    return tuple(out)
