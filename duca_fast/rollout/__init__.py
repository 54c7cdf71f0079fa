"""Colocated rollouts: a generation engine (vLLM or transformers), weight sync, and the multi-turn driver.

Nothing here imports vLLM until a ``VLLMEngine`` is created.
"""

from duca_fast.rollout.driver import (
    DRIVERS,
    CarriedSessions,
    IncrementalChat,
    RolloutBatch,
    RolloutConfig,
    SessionSpec,
    concat_batches,
    make_session_specs,
    rollout,
)
from duca_fast.rollout.engine import (
    Completion,
    HFEngine,
    ParamSpec,
    RolloutEngine,
    SamplingConfig,
    VLLMEngine,
)
from duca_fast.rollout.models import (
    build_tiny_model_dir,
    default_gguf_path,
    load_default_model_dir,
    load_default_tokenizer,
)
from duca_fast.rollout.sync import (
    LogprobCheck,
    SyncReport,
    WeightSync,
    checkpoint_name,
    logprob_mismatch,
    trainer_logprobs,
    validate_against_engine,
)

__all__ = [
    "DRIVERS",
    "CarriedSessions",
    "Completion",
    "HFEngine",
    "IncrementalChat",
    "LogprobCheck",
    "ParamSpec",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "SamplingConfig",
    "SessionSpec",
    "SyncReport",
    "VLLMEngine",
    "WeightSync",
    "build_tiny_model_dir",
    "checkpoint_name",
    "concat_batches",
    "default_gguf_path",
    "load_default_model_dir",
    "load_default_tokenizer",
    "logprob_mismatch",
    "make_session_specs",
    "rollout",
    "trainer_logprobs",
    "validate_against_engine",
]
