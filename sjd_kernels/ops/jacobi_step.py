"""``jacobi_step`` op: validation, ``torch.library`` registration and backend dispatch.

The op is declared once as ``sjd::jacobi_step`` with the PyTorch reference as its
implementation for every device, the Triton and CUDA kernels selected by ``backend``,
and a fake kernel so ``torch.compile`` can trace it. It mutates the state tensors in
place (declared in the schema) and returns fixed-shape outputs, so a step can be
captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference import jacobi_step as ref
from ._common import (BACKEND_CODE, CODE_BACKEND, LANES_MAX, ROWS_MAX, SJDInputError, as_int, check_cfg, check_finite,
                      check_int, check_sampling, check_state_and_sampling, check_state_contents, check_state_counters,
                      check_tensor, check_tensor_size, check_window_rows, guard_pos, guard_win_len, mark_request_errors,
                      new_status, resolve_backend, seed_tensor, triton_device)

I64 = (torch.int64,)


@torch.library.custom_op("sjd::jacobi_step", mutates_args=("q_state", "q_kind", "p_prev", "q_idx", "status"))
def _jacobi_step_op(logits: torch.Tensor, uncond: Optional[torch.Tensor], cfg_scale: Optional[torch.Tensor],
                    drafts: torch.Tensor, win_len: torch.Tensor, pos: torch.Tensor, seed: torch.Tensor,
                    step: torch.Tensor, forced: Optional[torch.Tensor], q_state: torch.Tensor,
                    q_kind: torch.Tensor, p_prev: torch.Tensor, q_idx: torch.Tensor, status: torch.Tensor,
                    temperature: float, top_k: int, top_p: float, draft_mode: int, beta: float, vp_form: int,
                    vp_eps: float, tail_init: int, backend: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced, q_state, q_kind, p_prev,
            status, temperature, top_k, top_p, draft_mode, beta, vp_form, vp_eps, tail_init)
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.jacobi_step import jacobi_step_triton
        with triton_device(logits):
            return jacobi_step_triton(*args, q_idx=q_idx)
    if name == "cuda":
        from ..cuda.jacobi_step import jacobi_step_cuda
        return jacobi_step_cuda(*args, q_idx=q_idx)
    return ref.jacobi_step(*args, q_idx=q_idx)


@_jacobi_step_op.register_fake
def _(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced, q_state, q_kind, p_prev, q_idx, status,
      temperature, top_k, top_p, draft_mode, beta, vp_form, vp_eps, tail_init, backend):
    B, W1, _ = logits.shape
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B, W1), dtype=torch.int64),
            logits.new_empty((B, W1 - 1), dtype=torch.int64))


@dataclass
class JacobiState:
    """Per-request state carried across steps (all device tensors, so a step graph-captures).

    q_state [B, R, V] f32 and q_kind [B, R] i32: the law each draft was drawn from, slot
    ``p % R`` for absolute position p; p_prev [B, R, V] f32 (empty unless VP is wanted):
    the previous target row per position; seed, step [B] i64; status [4] i32.

    Sparse form (``create(..., capacity=C)``, for sampling with top-k): q_idx [B, R, C] i32
    holds each slot's lane ids (the support of its target row, ascending, then IDX_PAD) and
    q_state / p_prev hold ``[B, R, C]`` values at those ids. Exact (no mass is dropped); a row
    whose support exceeds C draws that position's next draft uniformly and counts the event in
    ``status[3]`` (see ``sjd_kernels.reference.jacobi_step``). C = top_k plus room for ties at the
    threshold (e.g. ``top_k + 64``) keeps overflows rare. q_idx is empty for the dense form.
    """
    q_state: torch.Tensor
    q_kind: torch.Tensor
    p_prev: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    status: torch.Tensor
    q_idx: torch.Tensor | None = None
    vocab_size: int = 0      # V the lanes index (dense: q_state's last dim; required in the sparse form)

    def __post_init__(self):
        if self.q_idx is None:
            self.q_idx = torch.empty(0, dtype=torch.int32, device=self.q_state.device)
        if not self.sparse and self.q_state.dim() == 3:
            self.vocab_size = self.q_state.shape[2]

    @property
    def sparse(self) -> bool:
        return self.q_idx.numel() > 0

    @classmethod
    def create(cls, batch: int, window: int, vocab: int, seed, *, device="cpu", vp: bool = False,
               ring: int | None = None, capacity: int | None = None) -> "JacobiState":
        batch, window = check_int("batch", batch, 1, ROWS_MAX), check_int("window", window, 0, 65534)
        vocab = check_int("vocab", vocab, 1, LANES_MAX)
        ring = check_int("ring", window + 1 if ring is None else ring, window + 1, ROWS_MAX)   # >= window + 1
        if capacity is not None:
            c = as_int(capacity)
            if c is None or c < 1:
                raise SJDInputError(f"capacity must be a positive int (sparse state) or None (dense), got {capacity!r}")
            capacity = c
        width = vocab if capacity is None else capacity
        lanes = f"vocab={vocab}" if capacity is None else f"capacity={capacity}"
        check_tensor_size(f"batch={batch}, window={window} (ring {ring}), {lanes}", (batch, ring, width), torch.float32)
        seed = seed_tensor(seed, device)
        if seed.numel() == 1 and batch > 1:
            raise SJDInputError("seed must give one value per request (a [B] tensor or list); "
                                "derive per-request seeds explicitly so results do not depend on the batch")
        if seed.numel() != batch:
            raise SJDInputError(f"seed must have {batch} values (one per request), got {seed.numel()}")
        return cls(q_state=torch.zeros(batch, ring, width, dtype=torch.float32, device=device),
                   q_kind=torch.full((batch, ring), ref.KIND_UNIFORM, dtype=torch.int32, device=device),
                   p_prev=(torch.zeros(batch, ring, width, dtype=torch.float32, device=device) if vp
                           else torch.empty(0, dtype=torch.float32, device=device)),
                   seed=seed.clone(), step=torch.zeros(batch, dtype=torch.int64, device=device),
                   status=new_status(device),
                   q_idx=(torch.full((batch, ring, capacity), ref.IDX_PAD, dtype=torch.int32, device=device)
                          if capacity is not None else None), vocab_size=vocab)

    def clone(self) -> "JacobiState":
        """An independent copy (every tensor cloned), e.g. to run two backends from one state."""
        return JacobiState(self.q_state.clone(), self.q_kind.clone(), self.p_prev.clone(), self.seed.clone(),
                           self.step.clone(), self.status.clone(), q_idx=self.q_idx.clone(),
                           vocab_size=self.vocab_size)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_state, self.q_kind, self.p_prev, self.q_idx))

    def dense_laws(self) -> torch.Tensor:
        """The stored laws as dense ``[B, R, V]`` float32 rows: for a dense state ``q_state`` itself (not a
        copy: writing into it changes the state; ``.clone()`` it to keep one), for a sparse one a new tensor."""
        if not self.sparse:
            return self.q_state
        return ref.densify(self.q_idx, self.q_state, self.vocab_size)


@dataclass
class JacobiOutput:
    num_accepted: torch.Tensor   # [B] i64, drafts accepted (m); -1 for a request in error
    tokens: torch.Tensor         # [B, W+1] i64, committed tokens (m + 1 of them), then -1
    next_drafts: torch.Tensor    # [B, W] i64, drafts for positions n+m+1 .. n+m+W


_MODE_ALIASES = {"vp": "sjd", "sjd_vp": "sjd", "coupling_vp": "coupling"}


def check_state_type(state) -> None:
    if not isinstance(state, JacobiState):
        raise SJDInputError(f"state must be a JacobiState (JacobiState.create), got {type(state).__name__}")


def sparse_vp_problem(sparse: bool, vp_form: str, beta: float) -> str | None:
    """Why a sparse state cannot take this verification prediction (None: it can)."""
    if sparse and vp_form == "add" and beta < 0.0:
        return ("the sparse state stores the support of P; additive VP with beta < 0 puts mass outside it: "
                "use beta >= 0, vp_form='log' or a dense state")
    return None


def check_vp_numbers(beta, vp_eps) -> None:
    """``beta`` finite, ``vp_eps`` finite and > 0 (the op's and the kernel wrappers' rule)."""
    check_finite("beta", beta, " (0 = no verification prediction)")
    if not check_finite("vp_eps", vp_eps, " > 0 (the log form's floor)") > 0.0:
        raise SJDInputError(f"vp_eps must be a finite real number > 0 (the log form's floor), got {vp_eps!r}")


def check_kernel_knobs(V: int, temperature, top_k, top_p, mode, beta, vp_form, vp_eps, tail_init) -> None:
    """The scalar arguments of a kernel wrapper, as codes (``torch.ops.sjd.jacobi_step``'s form): the rules
    the op applies to its named arguments and the CUDA binding to these, for the Triton wrapper."""
    check_sampling(temperature, top_k, top_p, V)
    if as_int(mode) not in ref.MODES.values():
        raise SJDInputError(f"mode code must be one of {sorted(ref.MODES.values())}, got {mode!r}")
    check_vp_numbers(beta, vp_eps)
    for name, v, codes in (("vp_form", vp_form, (ref.VP_ADD, ref.VP_LOG)),
                           ("tail_init", tail_init, (ref.TAIL_UNIFORM, ref.TAIL_LEFT))):
        if as_int(v) not in codes:
            raise SJDInputError(f"{name} code must be one of {list(codes)}, got {v!r}")


def check_kernel_args(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced, q_state, q_kind, p_prev,
                      status, q_idx=None, inputs_contiguous: bool = True) -> tuple[int, int, int]:
    """Shapes, dtypes, devices and contiguity of every tensor the op hands to a kernel; returns
    ``(B, W, V)``. ``jacobi_step`` checks them (and more), and so do the kernel wrappers, which
    ``torch.ops.sjd.jacobi_step`` and direct calls reach without it. No value is read (no sync).
    ``inputs_contiguous=False``: the read-only index tensors (drafts, win_len, pos, seed, step,
    forced) may be strided (a wrapper that copies them); the state it writes must be contiguous."""
    B, W1, V = check_window_rows("logits", logits)
    W = W1 - 1
    dev = logits.device
    ic = inputs_contiguous
    check_cfg(uncond, cfg_scale, logits)
    check_tensor("drafts", drafts, dtypes=I64, shape=(B, W), dim=2, device=dev, contiguous=ic, last_contiguous=ic)
    for name, t in (("win_len", win_len), ("pos", pos), ("state.seed", seed), ("state.step", step)):
        check_tensor(name, t, dtypes=I64, shape=(B,), dim=1, device=dev, contiguous=ic, last_contiguous=ic)
    check_tensor("state.status", status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)
    if forced is not None:
        check_tensor("forced", forced, dtypes=I64, dim=2, shape=(B, None), device=dev, contiguous=ic, last_contiguous=ic)
    sparse = q_idx is not None and q_idx.numel() > 0
    if sparse:
        check_tensor("state.q_idx", q_idx, dtypes=(torch.int32,), shape=(B, None, None), dim=3, device=dev,
                     contiguous=True)
    C = q_idx.shape[2] if sparse else V
    check_tensor("state.q_state", q_state, dtypes=(torch.float32,), shape=(B, None, C), dim=3, device=dev,
                 contiguous=True)
    R = q_state.shape[1]
    check_tensor("state.q_kind", q_kind, dtypes=(torch.int32,), shape=(B, R), dim=2, device=dev, contiguous=True)
    if sparse:
        check_tensor("state.q_idx", q_idx, shape=(B, R, C))
    if R < W + 1:
        raise SJDInputError(f"state ring ({R} slots) must be >= W + 1 = {W + 1}; create the state with window >= {W}")
    if p_prev is not None and p_prev.numel() > 0:
        check_tensor("state.p_prev", p_prev, dtypes=(torch.float32,), shape=(B, R, C), dim=3, device=dev,
                     contiguous=True)
    return B, W, V


def validate(logits, drafts, win_len, pos, state: JacobiState, uncond, cfg_scale, forced,
             temperature, top_k, top_p, mode, beta, vp_form, tail_init, vp_eps=1e-6):
    check_state_type(state)
    B, W1, V = check_window_rows("logits", logits)
    dev = logits.device
    if state.sparse:
        check_tensor("state.q_idx", state.q_idx, dtypes=(torch.int32,), shape=(B, None, None), dim=3, device=dev,
                     contiguous=True)
        if state.vocab_size != V:
            raise SJDInputError(f"the sparse state's vocab_size is {state.vocab_size} (JacobiState.create sets it), "
                                f"the logits have V = {V}")
    check_kernel_args(logits, uncond, cfg_scale, drafts, win_len, pos, state.seed, state.step, forced, state.q_state,
                      state.q_kind, state.p_prev, state.status, state.q_idx)
    sparse = state.sparse
    check_state_and_sampling(state, B, V, dev, forced, temperature, top_k, top_p)
    check_state_contents(state, V)
    m = _MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else None
    if m not in ref.MODES:
        raise SJDInputError(f"mode must be one of sjd, vp, coupling, coupling_vp, gumbel, gumbel_jacobi, got {mode!r}")
    check_vp_numbers(beta, vp_eps)
    if beta != 0.0 and m in ("gumbel", "gumbel_jacobi"):
        raise SJDInputError(f"beta (verification prediction) applies to sjd and coupling, not {mode!r}")
    if beta != 0.0 and state.p_prev.numel() == 0:
        raise SJDInputError("beta != 0 needs the previous target rows: create the state with vp=True")
    if vp_form not in ("add", "log"):
        raise SJDInputError(f"vp_form must be 'add' or 'log', got {vp_form!r}")
    why = sparse_vp_problem(sparse, vp_form, beta)
    if why:
        raise SJDInputError(why)
    if tail_init not in ("uniform", "left"):
        raise SJDInputError(f"tail_init must be 'uniform' or 'left', got {tail_init!r}")
    return ref.MODES[m]


def jacobi_step(logits: torch.Tensor, drafts: torch.Tensor, win_len: torch.Tensor, pos: torch.Tensor,
                state: JacobiState, *, uncond_logits: torch.Tensor | None = None,
                cfg_scale: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, mode: str = "sjd",
                beta: float = 0.0, vp_form: str = "add", vp_eps: float = 1e-6, tail_init: str = "uniform",
                backend: str = "auto", advance: bool = True) -> JacobiOutput:
    """One Jacobi step after the LM head for a ragged batch (see ``sjd_kernels.reference.jacobi_step``).

    ``logits [B, W+1, V]`` (bf16/fp16/fp32; may be an image-slice view of a larger vocabulary),
    ``drafts [B, W]``, ``win_len [B]``, ``pos [B]``. CFG: ``uncond_logits`` (shaped like
    ``logits``) with ``cfg_scale [B]`` float32, both or neither. ``mode``: sjd, vp (sjd with ``beta``;
    the default ``beta=0`` predicts nothing, so it is sjd exactly: pass e.g. ``beta=0.5``),
    coupling (maximal coupling of old drafts; with ``beta`` towards Qvp), gumbel,
    gumbel_jacobi (deterministic; equals AR with the same noise). Mutates ``state``; with
    ``advance`` it also increments ``state.step``. No host synchronisation: device errors land in
    ``state.status``; call ``sjd_kernels.check_status(state.status)`` to raise them.
    """
    mode_code = validate(logits, drafts, win_len, pos, state, uncond_logits, cfg_scale, forced,
                         temperature, top_k, top_p, mode, beta, vp_form, tail_init, vp_eps)
    be = resolve_backend(backend, logits.device)
    # no host sync on a GPU: out-of-range requests run with win_len 0 (and pos 0), return -1 and set
    # status bit 8 (win_len) or 16 (pos)
    win_len, win_bad = guard_win_len(win_len, drafts.shape[1])
    pos, pos_bad = guard_pos(pos)
    if pos_bad is not None:
        win_len = torch.where(pos_bad, torch.zeros_like(win_len), win_len)
    out = torch.ops.sjd.jacobi_step(
        logits, uncond_logits, cfg_scale, drafts, win_len, pos, state.seed, state.step, forced,
        state.q_state, state.q_kind, state.p_prev, state.q_idx, state.status,
        float(temperature), int(top_k), float(top_p), mode_code, float(beta),
        ref.VP_ADD if vp_form == "add" else ref.VP_LOG, float(vp_eps),
        ref.TAIL_UNIFORM if tail_init == "uniform" else ref.TAIL_LEFT, BACKEND_CODE[be])
    out = mark_request_errors(state.status, out, (win_bad, ref.ERR_WIN_LEN), (pos_bad, ref.ERR_POS))
    if advance:
        state.step.add_(1)
    return JacobiOutput(*out)


def init_window(state: JacobiState, pos: torch.Tensor, window: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform drafts ``[B, window]`` for positions ``pos .. pos+window-1`` (one shared implementation).

    ``pos [B]`` int64 on the state's device; ``window`` at most the state's ring size - 1; ``forced``
    ``[B, L]`` int64 as for ``jacobi_step``. A ``pos`` outside [0, 2^62] raises on the CPU; on a GPU
    (no host sync) that request's drafts are -1 and status bit 16 is set. The state's seed, step,
    status and q_kind are checked as ``jacobi_step`` checks them."""
    check_state_type(state)
    check_tensor("state.seed", state.seed, dtypes=I64, dim=1)
    B, dev = state.seed.shape[0], state.seed.device
    check_state_counters(state, B, dev)
    check_tensor("state.q_kind", state.q_kind, dtypes=(torch.int32,), shape=(B, None), dim=2, device=dev,
                 contiguous=True)
    R = state.q_kind.shape[1]
    w = as_int(window)
    if w is None or not 0 <= w <= R - 1:
        raise SJDInputError(f"window must be an int in [0, {R - 1}] (the state's ring holds {R} slots), got {window!r}")
    if state.vocab_size < 1:
        raise SJDInputError(f"the state's vocab_size must be >= 1, got {state.vocab_size}")
    check_tensor("pos", pos, dtypes=I64, shape=(B,), dim=1, device=dev)
    if forced is not None:
        check_tensor("forced", forced, dtypes=I64, shape=(B, None), dim=2, device=dev)
    pos, bad = guard_pos(pos)
    tok = ref.init_window(state.seed, pos, state.step, w, state.vocab_size, state.q_kind, forced)
    return mark_request_errors(state.status, (tok,), (bad, ref.ERR_POS))[0]
