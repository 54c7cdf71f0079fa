"""ctypes binding of the native library ``duca_kernels`` (``kernels/``): advantages on CPU and CUDA tensors.

The functions here take tensors the ops layer has already validated for shape (contiguous int64 ids, float32
or float64 rewards with any strides) plus plain options, pass their data pointers to the C ABI and return a
new tensor. Value checks (id ranges, NaN/inf) run in the library and come back as ``ValueError`` naming the
argument. Nothing here imports ``duca_fast.ops``.

The library is looked up at ``$DUCA_KERNELS_LIB`` or ``<repo>/build/kernels/libduca_kernels.so`` (built by
``make install`` / ``make native``, or ``build_library()``). When it is missing, ``available()`` is False
and one line is logged; importing this module never fails.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = REPO_ROOT / "build"
LIBRARY_ENV = "DUCA_KERNELS_LIB"
ABI_VERSION = 1

_STATUS_NAMES = {
    1: "invalid argument",
    2: "non-finite value",
    3: "out of memory",
    4: "CUDA error",
    5: "internal",
}
_FLOAT32, _FLOAT64 = 0, 1
_TURN_SCOPES = {"group": 0, "group_turn": 1}
_SCALES = {"group": 0, "batch": 1, "none": 2}
_NAN_POLICIES = {"raise": 0, "omit": 1}
_MESSAGE_SIZE = 512


class _Rewards(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("stride_row", ctypes.c_int64),
        ("stride_col", ctypes.c_int64),
        ("weights", ctypes.c_void_p),
    ]


class _Options(ctypes.Structure):
    _fields_ = [
        ("turn_weight", ctypes.c_double),
        ("session_weight", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("turn_scope", ctypes.c_int32),
        ("scale", ctypes.c_int32),
        ("nan_policy", ctypes.c_int32),
    ]


class _PolicyOptions(ctypes.Structure):
    _fields_ = [
        ("clip_low", ctypes.c_double),
        ("clip_high", ctypes.c_double),
        ("dual_clip", ctypes.c_double),
        ("kl_coef", ctypes.c_double),
        ("kl_type", ctypes.c_int32),
        ("entropy_coef", ctypes.c_double),
        ("tis_cap", ctypes.c_double),
        ("log_ratio_limit", ctypes.c_double),
    ]


class _PolicyInputs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "logprobs",
            "entropy",
            "advantages",
            "old_logprobs",
            "ref_logprobs",
            "behavior_logprobs",
            "token_weights",
            "active",
        )
    ]


# The fields of duca_policy_sums (float64 each), in order.
POLICY_SUMS = (
    "loss",
    "pg_loss",
    "active",
    "clipped_low",
    "clipped_high",
    "dual_clipped",
    "tis_capped",
    "approx_kl",
    "ratio",
    "entropy",
    "kl_ref",
    "behavior_gap",
)


_KL_TYPES = {"k1": 0, "k2": 1, "k3": 2}


def library_path() -> Path:
    """Where the shared library is expected (``$DUCA_KERNELS_LIB`` wins)."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    name = {"darwin": "libduca_kernels.dylib", "win32": "duca_kernels.dll"}.get(
        sys.platform, "libduca_kernels.so"
    )
    return DEFAULT_BUILD_DIR / "kernels" / name


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = library_path()
    if not path.exists():
        logger.warning("native kernels not built (%s missing; run `make native`): using the torch path", path)
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        logger.warning("native kernels at %s cannot be loaded (%s): using the torch path", path, error)
        return None
    if lib.duca_abi_version() != ABI_VERSION:
        logger.warning(
            "native kernels at %s have ABI %d, expected %d: rebuild them with `make native`",
            path,
            lib.duca_abi_version(),
            ABI_VERSION,
        )
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    rewards_p, options_p = ctypes.POINTER(_Rewards), ctypes.POINTER(_Options)
    lib.duca_hian_advantages.argtypes = [
        rewards_p,
        pointer,
        rewards_p,
        pointer,
        i64,
        pointer,
        pointer,
        i64,
        options_p,
        pointer,
        i32,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.duca_grpo_advantages.argtypes = [
        rewards_p,
        pointer,
        i64,
        options_p,
        pointer,
        i32,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.duca_hian_advantages.restype = lib.duca_grpo_advantages.restype = ctypes.c_int
    size, f64, message = ctypes.c_size_t, ctypes.c_double, ctypes.c_char_p
    lib.duca_logits_stats.argtypes = [
        pointer,
        i32,
        i64,
        i64,
        i64,
        i64,
        pointer,
        f64,
        pointer,
        pointer,
        pointer,
        message,
        size,
    ]
    lib.duca_policy_head.argtypes = [
        i64,
        i32,
        ctypes.POINTER(_PolicyInputs),
        ctypes.POINTER(_PolicyOptions),
        pointer,
        pointer,
        pointer,
        message,
        size,
    ]
    lib.duca_logits_grad_inplace.argtypes = [
        pointer,
        i32,
        i64,
        i64,
        i64,
        i64,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        f64,
        message,
        size,
    ]
    for name in ("duca_logits_stats", "duca_policy_head", "duca_logits_grad_inplace"):
        getattr(lib, name).restype = ctypes.c_int
    if lib.duca_has_cuda():
        lib.duca_hian_advantages_cuda.argtypes = [
            rewards_p,
            pointer,
            rewards_p,
            pointer,
            i64,
            pointer,
            i64,
            pointer,
            i64,
            options_p,
            pointer,
            i32,
            pointer,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.duca_grpo_advantages_cuda.argtypes = [
            rewards_p,
            pointer,
            i64,
            options_p,
            pointer,
            i32,
            pointer,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.duca_hian_advantages_cuda.restype = lib.duca_grpo_advantages_cuda.restype = ctypes.c_int
        lib.duca_logits_stats_cuda.argtypes = [*lib.duca_logits_stats.argtypes[:-2], pointer, message, size]
        lib.duca_policy_head_cuda.argtypes = [
            *lib.duca_policy_head.argtypes[:6],
            pointer,
            pointer,
            message,
            size,
        ]
        lib.duca_logits_grad_inplace_cuda.argtypes = [
            *lib.duca_logits_grad_inplace.argtypes[:-2],
            pointer,
            message,
            size,
        ]
        for name in ("duca_logits_stats_cuda", "duca_policy_head_cuda", "duca_logits_grad_inplace_cuda"):
            getattr(lib, name).restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the native library is built and loadable (the first miss logs one line)."""
    return _library() is not None


def cpu_threads() -> int:
    """OpenMP threads the CPU kernels use (``OMP_NUM_THREADS`` at load time)."""
    return int(_require().duca_cpu_threads())


def has_cuda() -> bool:
    """Whether the loaded build contains the CUDA kernels."""
    return bool(_require().duca_has_cuda())


def build_library(build_dir: Path = DEFAULT_BUILD_DIR, *, cuda: bool | None = None) -> Path:
    """Configure and build ``kernels/`` with CMake (Ninja when present) and return the library path.

    ``cuda``: True/False sets ``DUCA_KERNELS_CUDA`` (False is a faster, CPU-only build); None keeps the
    build directory's setting (CUDA when nvcc is found, on a fresh one).
    """
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        raise RuntimeError("cmake is not installed: `pip install cmake ninja` (or run `make native`)")
    configure = [cmake, "-S", str(REPO_ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    if cuda is not None:
        configure.append(f"-DDUCA_KERNELS_CUDA={'ON' if cuda else 'OFF'}")
    for command in (configure, [cmake, "--build", str(build_dir), "--target", "duca_kernels"]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
    _library.cache_clear()
    return build_dir / "kernels" / library_path().name


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native kernels are not built ({library_path()} missing): run `make native`")
    return lib


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the rewards are on {device}")


def _cuda_stream(device: torch.device, lib: ctypes.CDLL) -> int | None:
    """The current torch stream of a CUDA device (what the CUDA entry points queue on); None on the CPU."""
    if device.type == "cpu":
        return None
    if device.type != "cuda" or not lib.duca_has_cuda():
        raise ValueError(f"the native kernels run on the CPU or CUDA (a CUDA build), got tensors on {device}")
    return torch.cuda.current_stream(device).cuda_stream


def _ids(name: str, tensor: torch.Tensor | None, length: int | None, device: torch.device) -> int | None:
    """Data pointer of a contiguous 1-D int64 id tensor on ``device`` (None passes through)."""
    if tensor is None:
        return None
    _check_device(name, tensor, device)
    if tensor.dtype != torch.int64 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous 1-D int64 tensor, got dtype {tensor.dtype} shape "
            f"{tuple(tensor.shape)} strides {tensor.stride()}"
        )
    if length is not None and tensor.shape[0] != length:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {length}")
    return tensor.data_ptr()


def _rewards(name: str, rewards: torch.Tensor, weights: torch.Tensor | None) -> tuple[_Rewards, object]:
    """The C view of a [M] or [M, K] float32/float64 tensor (any strides) and the weights it must outlive."""
    if rewards.dtype not in (torch.float32, torch.float64) or rewards.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be a 1-D or 2-D float32/float64 tensor, got {rewards.dtype} "
            f"shape {tuple(rewards.shape)}"
        )
    matrix = rewards if rewards.dim() == 2 else rewards[:, None]
    weight_pointer, keep = None, None
    if weights is not None:
        keep = torch.as_tensor(weights, dtype=torch.float64).to(rewards.device).contiguous()
        if keep.dim() != 1 or keep.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"{name} weights must have one entry per component ({matrix.shape[1]}), "
                f"got shape {tuple(keep.shape)}"
            )
        weight_pointer = keep.data_ptr()
    view = _Rewards(
        matrix.data_ptr() if matrix.numel() else None,
        _FLOAT32 if matrix.dtype == torch.float32 else _FLOAT64,
        matrix.shape[0],
        matrix.shape[1],
        matrix.stride(0),
        matrix.stride(1),
        weight_pointer,
    )
    return view, keep


def _choice(name: str, value: str, table: dict[str, int]) -> int:
    if value not in table:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, table))}, got {value!r}")
    return table[value]


def _options(
    turn_weight: float, session_weight: float, turn_scope: str, scale: str, eps: float, nan_policy: str
) -> _Options:
    return _Options(
        float(turn_weight),
        float(session_weight),
        float(eps),
        _choice("turn_scope", turn_scope, _TURN_SCOPES),
        _choice("scale", scale, _SCALES),
        _choice("nan_policy", nan_policy, _NAN_POLICIES),
    )


def _out_dtype_code(out_dtype: torch.dtype) -> int:
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    return _FLOAT32 if out_dtype == torch.float32 else _FLOAT64


def _raise_on_error(status: int, message: ctypes.Array) -> None:
    if status == 0:
        return
    text = message.value.decode(errors="replace")
    if status in (1, 2):
        raise ValueError(text)
    if status == 3:
        raise MemoryError(text)
    raise RuntimeError(f"duca_kernels {_STATUS_NAMES.get(status, status)} error: {text}")


def hian_advantages(
    turn_rewards: torch.Tensor,
    turn_session: torch.Tensor,
    session_rewards: torch.Tensor,
    session_group: torch.Tensor,
    turn_index: torch.Tensor | None,
    token_turn: torch.Tensor | None,
    turn_weights: torch.Tensor | None,
    session_weights: torch.Tensor | None,
    turn_weight: float,
    session_weight: float,
    turn_scope: str,
    scale: str,
    eps: float,
    nan_policy: str,
    num_groups: int | None,
    out_dtype: torch.dtype = torch.float32,
    num_turn_positions: int | None = None,
) -> torch.Tensor:
    """Fused HIAN advantages (same contract as ``ops.hian_advantages``) on the CPU or, with a CUDA build, on
    CUDA tensors (queued on the current torch stream, no host synchronisation).

    Rewards ``[T]``/``[T, Kt]`` and ``[S]``/``[S, Ks]`` float32 or float64 (any strides); ids contiguous
    int64; ``turn_weights``/``session_weights`` component weights or None (all 1). On the CPU ``num_groups``
    None accepts any id >= 0 (sparse ids are remapped, never used as a table size) and every id and reward
    is checked. On CUDA ``num_groups`` (and ``num_turn_positions`` for "group_turn") are required and the
    values are not checked (validate first). Returns ``[T]``, or ``[N]`` with ``token_turn`` (-1 tokens get
    0), in ``out_dtype``.
    """
    lib = _require()
    device = turn_rewards.device
    stream = _cuda_stream(device, lib)
    _check_device("session_rewards", session_rewards, device)
    turns, keep_turn_weights = _rewards("turn_rewards", turn_rewards, turn_weights)
    sessions, keep_session_weights = _rewards("session_rewards", session_rewards, session_weights)
    num_turns = turns.rows
    session_pointer = _ids("turn_session", turn_session, num_turns, device)
    group_pointer = _ids("session_group", session_group, sessions.rows, device)
    index_pointer = _ids("turn_index", turn_index, num_turns, device)
    token_pointer = _ids("token_turn", token_turn, None, device)
    options = _options(turn_weight, session_weight, turn_scope, scale, eps, nan_policy)
    rows = num_turns if token_turn is None else token_turn.shape[0]
    out_code = _out_dtype_code(out_dtype)
    out = torch.empty(rows, dtype=out_dtype, device=device)
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    groups = -1 if num_groups is None else int(num_groups)
    head = (
        ctypes.byref(turns),
        session_pointer,
        ctypes.byref(sessions),
        group_pointer,
        groups,
        index_pointer,
    )
    tail = (
        token_pointer,
        rows if token_turn is not None else 0,
        ctypes.byref(options),
        out.data_ptr() if rows else None,
        out_code,
    )
    if stream is None:
        status = lib.duca_hian_advantages(*head, *tail, message, _MESSAGE_SIZE)
    else:
        positions = 0 if num_turn_positions is None else int(num_turn_positions)
        status = lib.duca_hian_advantages_cuda(*head, positions, *tail, stream, message, _MESSAGE_SIZE)
    del keep_turn_weights, keep_session_weights
    _raise_on_error(status, message)
    return out


def grpo_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    weights: torch.Tensor | None,
    scale: str,
    eps: float,
    nan_policy: str,
    num_groups: int | None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One-horizon GRPO advantages ``[S]`` (same contract as ``ops.grpo_advantages``); CPU or CUDA tensors,
    with the same rules as ``hian_advantages``."""
    lib = _require()
    device = rewards.device
    stream = _cuda_stream(device, lib)
    view, keep_weights = _rewards("rewards", rewards, weights)
    group_pointer = _ids("group", group, view.rows, device)
    options = _options(1.0, 1.0, "group", scale, eps, nan_policy)
    out_code = _out_dtype_code(out_dtype)
    out = torch.empty(view.rows, dtype=out_dtype, device=device)
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    args = (
        ctypes.byref(view),
        group_pointer,
        -1 if num_groups is None else int(num_groups),
        ctypes.byref(options),
        out.data_ptr() if view.rows else None,
        out_code,
    )
    if stream is None:
        status = lib.duca_grpo_advantages(*args, message, _MESSAGE_SIZE)
    else:
        status = lib.duca_grpo_advantages_cuda(*args, stream, message, _MESSAGE_SIZE)
    del keep_weights
    _raise_on_error(status, message)
    return out


# ---------------------------------------------------------------------------------------------------
# row kernels of the fused policy loss (CPU, or CUDA tensors on the current torch stream with a CUDA build)


def _float_code(name: str, tensor: torch.Tensor) -> int:
    if tensor.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {tensor.dtype}")
    return _FLOAT32 if tensor.dtype == torch.float32 else _FLOAT64


def _vector(name: str, tensor: torch.Tensor | None, like: torch.Tensor, num_tokens: int) -> int | None:
    """Data pointer of a contiguous [N] tensor of ``like``'s dtype and device (None passes through)."""
    if tensor is None:
        return None
    if tensor.device != like.device or tensor.dtype != like.dtype or tuple(tensor.shape) != (num_tokens,):
        raise ValueError(
            f"{name} must be a [{num_tokens}] {like.dtype} tensor on {like.device}, got {tensor.dtype} "
            f"{tuple(tensor.shape)} on {tensor.device}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    return tensor.data_ptr()


def _logits_view(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    code = _float_code("logits", logits)
    _ids("target", target, logits.shape[0], logits.device)
    return code, logits.stride(0), logits.stride(1)


def _call(lib: ctypes.CDLL, name: str, device: torch.device, *args: object) -> None:
    """Call ``name`` (CPU) or ``name_cuda`` with the current stream, and raise on a bad status."""
    stream = _cuda_stream(device, lib)
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    if stream is None:
        status = getattr(lib, name)(*args, message, _MESSAGE_SIZE)
    else:
        status = getattr(lib, f"{name}_cuda")(*args, stream, message, _MESSAGE_SIZE)
    _raise_on_error(status, message)


def logits_stats(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits [N, V]`` (any strides) with ``z = logits / temperature``: log-sum-exp, the target's
    log-prob and the entropy, in the logits' dtype (float64 accumulation)."""
    lib = _require()
    code, stride_n, stride_v = _logits_view(logits, target)
    num_tokens, vocab_size = logits.shape
    lse, logprobs, entropy = (
        torch.empty(num_tokens, dtype=logits.dtype, device=logits.device) for _ in range(3)
    )
    _call(
        lib,
        "duca_logits_stats",
        logits.device,
        logits.data_ptr(),
        code,
        num_tokens,
        vocab_size,
        stride_n,
        stride_v,
        target.data_ptr(),
        float(temperature),
        lse.data_ptr(),
        logprobs.data_ptr(),
        entropy.data_ptr(),
    )
    return lse, logprobs, entropy


def policy_head(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    behavior_logprobs: torch.Tensor | None,
    token_weights: torch.Tensor,
    active: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_type: str,
    entropy_coef: float,
    tis_cap: float | None,
    log_ratio_limit: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The per-token PPO objective (same options as ``ops.fused_policy_loss``) on [N] tensors.

    Returns ``d loss / d logp``, ``d loss / d H`` (None when ``entropy_coef`` is 0) and the float64 sums
    over active tokens as 0-d tensors on the inputs' device (``POLICY_SUMS``: loss and pg_loss weighted by
    ``token_weights``, the rest plain sums; no host synchronisation on CUDA).
    """
    lib = _require()
    num_tokens = logprobs.shape[0] if logprobs.dim() == 1 else -1
    code = _float_code("logprobs", logprobs)
    if active.dtype != torch.bool or tuple(active.shape) != (num_tokens,) or not active.is_contiguous():
        raise ValueError(
            f"active must be a contiguous [{num_tokens}] bool tensor, got {active.dtype} "
            f"{tuple(active.shape)}"
        )
    inputs = _PolicyInputs(
        _vector("logprobs", logprobs, logprobs, num_tokens),
        _vector("entropy", entropy, logprobs, num_tokens),
        _vector("advantages", advantages, logprobs, num_tokens),
        _vector("old_logprobs", old_logprobs, logprobs, num_tokens),
        _vector("ref_logprobs", ref_logprobs, logprobs, num_tokens),
        _vector("behavior_logprobs", behavior_logprobs, logprobs, num_tokens),
        _vector("token_weights", token_weights, logprobs, num_tokens),
        active.data_ptr(),
    )
    options = _PolicyOptions(
        float(clip_low),
        float(clip_high),
        0.0 if dual_clip is None else float(dual_clip),
        float(kl_coef),
        _choice("kl_type", kl_type, _KL_TYPES),
        float(entropy_coef),
        0.0 if tis_cap is None else float(tis_cap),
        float(log_ratio_limit),
    )
    if active.device != logprobs.device:
        raise ValueError(f"active is on {active.device} but logprobs are on {logprobs.device}")
    grad_logprobs = torch.empty_like(logprobs)
    grad_entropy = torch.empty_like(logprobs) if entropy_coef != 0 else None
    sums = torch.empty(len(POLICY_SUMS), dtype=torch.float64, device=logprobs.device)
    _call(
        lib,
        "duca_policy_head",
        logprobs.device,
        num_tokens,
        code,
        ctypes.byref(inputs),
        ctypes.byref(options),
        grad_logprobs.data_ptr(),
        None if grad_entropy is None else grad_entropy.data_ptr(),
        sums.data_ptr(),
    )
    return grad_logprobs, grad_entropy, dict(zip(POLICY_SUMS, sums.unbind()))


def logits_grad_(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Overwrite ``logits [N, V]`` with ``d loss / d logits`` from the row statistics and the head's
    derivatives; returns ``logits``."""
    lib = _require()
    code, stride_n, stride_v = _logits_view(logits, target)
    num_tokens, vocab_size = logits.shape
    pointers = [
        _vector(name, value, logits, num_tokens)
        for name, value in (
            ("lse", lse),
            ("entropy", entropy),
            ("grad_logprobs", grad_logprobs),
            ("grad_entropy", grad_entropy),
        )
    ]
    _call(
        lib,
        "duca_logits_grad_inplace",
        logits.device,
        logits.data_ptr(),
        code,
        num_tokens,
        vocab_size,
        stride_n,
        stride_v,
        target.data_ptr(),
        *pointers,
        float(temperature),
    )
    return logits
