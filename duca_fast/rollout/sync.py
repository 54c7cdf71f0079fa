"""Weight sync: push a live torch model (full or LoRA) into a rollout engine in place, and check it.

Order of one sync: map the trainer's parameter names to HF checkpoint names, validate every name,
shape and dtype against what the engine expects, and only then stream the tensors in buckets of at
most ``bucket_bytes`` (LoRA deltas merged on the fly, cast to the engine dtype). The engine bumps its
weight version and resets its prefix cache. On CUDA the engine sleeps during training and wakes in
two steps around the push: weights first, KV cache after, so the cache never coexists with the
optimizer state and the old weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from duca_fast.rollout.engine import ParamSpec, RolloutEngine, SamplingConfig

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "base_model.model.")
"""Prefixes added by torch.compile, DDP and peft in front of the HF names."""


def checkpoint_name(name: str) -> str | None:
    """The HF checkpoint name of a trainer parameter, or None for LoRA adapter weights (merged instead)."""
    if ".lora_" in name or ".lora_magnitude_vector" in name:
        return None
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name.replace("._fsdp_wrapped_module.", ".").replace(".base_layer.", ".")


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync did."""

    weight_version: int
    """The engine's weight version after the sync."""
    num_tensors: int
    """Tensors pushed."""
    num_bytes: int
    """Bytes pushed (in the engine dtype)."""
    num_buckets: int
    """Buckets the tensors were streamed in."""
    max_bucket_bytes: int
    """Largest bucket materialized at once (the extra memory of the push)."""
    seconds: float
    """Wall time of validation + push + prefix-cache reset."""
    logprob_mismatch: float | None = None
    """Mean absolute difference between engine and trainer log-probs on the check prompts, when run."""


@dataclass(frozen=True)
class LogprobCheck:
    """Training/inference mismatch: engine sampler log-probs vs the trainer's recomputation."""

    mean_abs_diff: float
    """Mean over all generated tokens of |engine log-prob - trainer log-prob|."""
    max_abs_diff: float
    """Largest such difference."""
    num_tokens: int
    """Generated tokens compared."""


class _Source:
    """One tensor to push: where it comes from and how to materialize it (LoRA merged)."""

    def __init__(self, name: str, tensor: torch.Tensor, lora_layer=None) -> None:
        self.name = name
        self.tensor = tensor
        self.lora_layer = lora_layer

    def materialize(self, spec: ParamSpec, device: torch.device) -> torch.Tensor:
        tensor = _full_tensor(self.tensor.detach())
        layer = self.lora_layer
        if layer is not None and not layer.merged and not layer.disable_adapters:
            # Merged without touching the live model: W + sum of the active adapters' deltas.
            tensor = tensor.float()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    tensor = tensor + _lora_delta(layer, adapter)
        return tensor.to(device=device, dtype=spec.dtype).contiguous()


def _is_sharded(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank pushes in one order)."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """``scaling * B @ A`` of one adapter in float32, gathering FSDP2 shards one tensor at a time."""
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not (_is_sharded(lora_a) or _is_sharded(lora_b)):
        return layer.get_delta_weight(adapter).float()
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(
            "sharded LoRA with fan_in_fan_out (Conv1D layers) is not supported by the weight sync"
        )
    a = _full_tensor(lora_a.detach()).float()
    b = _full_tensor(lora_b.detach()).float()
    return (b @ a) * layer.scaling[adapter]


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules of a peft model that carry LoRA adapters, by module name."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _sources(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> list[_Source]:
    if isinstance(model_or_state, Mapping):
        items = list(model_or_state.items())
        lora = {}
    else:
        # named_parameters drops duplicates, so a tied lm_head appears once (as the embedding).
        items = list(model_or_state.named_parameters())
        lora = _lora_layers(model_or_state)
    sources, seen = [], {}
    for raw_name, tensor in items:
        name = checkpoint_name(raw_name)
        if name is None:
            continue
        if name in seen:
            raise ValueError(f"parameters {seen[name]!r} and {raw_name!r} both map to {name!r}")
        seen[name] = raw_name
        module_name = raw_name.rsplit(".base_layer.", 1)[0] if ".base_layer." in raw_name else None
        layer = lora.get(module_name) if module_name is not None and raw_name.endswith(".weight") else None
        if layer is not None and any(layer.use_dora.get(a, False) for a in layer.active_adapters):
            raise ValueError(
                f"{raw_name}: DoRA adapters are not supported by the weight sync; use plain LoRA"
            )
        sources.append(_Source(name, tensor, layer))
    return sources


def validate_against_engine(
    sources_specs: Mapping[str, ParamSpec], expected: Mapping[str, ParamSpec]
) -> None:
    """Raise ValueError naming every missing, extra, mis-shaped or non-floating parameter."""
    missing = sorted(set(expected) - set(sources_specs))
    extra = sorted(set(sources_specs) - set(expected))
    problems = []
    if missing:
        problems.append(
            f"missing parameters the engine expects: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if extra:
        problems.append(f"parameters the engine does not know: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name in sorted(set(expected) & set(sources_specs)):
        given, want = sources_specs[name], expected[name]
        if given.shape != want.shape:
            problems.append(f"{name}: shape {list(given.shape)} but the engine expects {list(want.shape)}")
        if not given.dtype.is_floating_point:
            problems.append(
                f"{name}: dtype {given.dtype} but the engine expects a floating dtype ({want.dtype})"
            )
    if problems:
        raise ValueError("weight sync refused before pushing anything:\n  " + "\n  ".join(problems))


class WeightSync:
    """Pushes a trainer model into a ``RolloutEngine`` after every optimizer step."""

    def __init__(
        self,
        engine: RolloutEngine,
        *,
        bucket_bytes: int = 256 * 2**20,
        name_map: Callable[[str], str | None] | None = None,
    ) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.engine = engine
        """The engine that receives the weights."""
        self.bucket_bytes = bucket_bytes
        """Most bytes materialized at once during a push (a single larger tensor forms its own bucket)."""
        self.name_map = name_map
        """Optional extra renaming applied after ``checkpoint_name`` (None drops the parameter)."""

    def push(
        self,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        check_prompts: Sequence[Sequence[int]] | None = None,
    ) -> SyncReport:
        """Validate, then stream ``model``'s weights (merged LoRA) into the engine.

        ``model`` is a module (HF, peft, compiled) or a state dict with HF names. With ``check_prompts``
        the engine then samples from them and the trainer model recomputes the log-probs of the sampled
        tokens; the mean absolute difference lands in ``SyncReport.logprob_mismatch``.
        """
        start = time.perf_counter()
        if isinstance(model, torch.nn.Module):
            self._check_architecture(model)
        sources = self._mapped_sources(model)
        expected = self.engine.parameter_specs()
        validate_against_engine(
            {s.name: ParamSpec(tuple(s.tensor.shape), s.tensor.dtype) for s in sources}, expected
        )
        stats = {"buckets": 0, "max_bucket": 0, "bytes": 0}
        num_tensors = self.engine.update_weights(self._buckets(sources, expected, stats))
        report = SyncReport(
            weight_version=self.engine.weight_version,
            num_tensors=num_tensors,
            num_bytes=stats["bytes"],
            num_buckets=stats["buckets"],
            max_bucket_bytes=stats["max_bucket"],
            seconds=time.perf_counter() - start,
        )
        if check_prompts is not None:
            if not isinstance(model, torch.nn.Module):
                raise ValueError("check_prompts needs the trainer model, not a state dict")
            check = logprob_mismatch(self.engine, model, check_prompts)
            report = SyncReport(**{**report.__dict__, "logprob_mismatch": check.mean_abs_diff})
        return report

    def sleep_for_training(self) -> None:
        """Free the engine's GPU memory before the optimizer step (CUDA only; nothing to do on CPU)."""
        if self.engine.device.type == "cuda":
            self.engine.sleep()

    def wake_and_push(self, model: torch.nn.Module, **push_kwargs) -> SyncReport:
        """After the optimizer step: wake the weights, push the new ones, then wake the KV cache.

        On CUDA the sequence is ``wake_up(["weights"])`` -> ``push`` -> ``wake_up(["kv_cache"])``, so the
        KV cache is re-allocated only once the trainer's temporaries of the push are gone. On CPU it is
        just ``push``.
        """
        if self.engine.device.type != "cuda":
            return self.push(model, **push_kwargs)
        self.engine.wake_up(["weights"])
        report = self.push(model, **push_kwargs)
        torch.cuda.empty_cache()
        self.engine.wake_up(["kv_cache"])
        self.engine.reset_prefix_cache()
        return report

    def _check_architecture(self, model: torch.nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is not None and model_type != self.engine.model_type:
            raise ValueError(
                f"architecture mismatch: the trainer model is {model_type!r} but the engine serves "
                f"{self.engine.model_type!r}"
            )

    def _mapped_sources(self, model) -> list[_Source]:
        sources = _sources(model)
        if self.name_map is None:
            return sources
        mapped = []
        for source in sources:
            name = self.name_map(source.name)
            if name is not None:
                source.name = name
                mapped.append(source)
        return mapped

    def _buckets(
        self, sources: list[_Source], expected: Mapping[str, ParamSpec], stats: dict[str, int]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Materialize tensors bucket by bucket; a bucket is dropped before the next one is built."""
        device = self.engine.device
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_size = 0
        for index, source in enumerate(sources):
            tensor = source.materialize(expected[source.name], device)
            bucket.append((source.name, tensor))
            bucket_size += tensor.numel() * tensor.element_size()
            if bucket_size >= self.bucket_bytes or index == len(sources) - 1:
                stats["buckets"] += 1
                stats["max_bucket"] = max(stats["max_bucket"], bucket_size)
                stats["bytes"] += bucket_size
                yield from bucket
                bucket, bucket_size = [], 0


@torch.no_grad()
def trainer_logprobs(
    model: torch.nn.Module, prompt: Sequence[int], completion: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs the trainer model gives the completion tokens after the prompt (fp32 softmax)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(completion)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    if temperature > 0:
        logits = logits / temperature
    targets = torch.tensor(list(completion), device=device)[:, None]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0].cpu()


def logprob_mismatch(
    engine: RolloutEngine,
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
) -> LogprobCheck:
    """Sample from the engine, recompute the sampled tokens' log-probs with the trainer model, compare."""
    sampling = sampling or SamplingConfig(max_new_tokens=16, temperature=1.0)
    if sampling.top_p < 1:
        raise ValueError("logprob_mismatch compares full-vocabulary log-probs; use top_p=1")
    completions = engine.generate(prompts, sampling, seeds=[seed + i for i in range(len(prompts))])
    diffs = []
    for prompt, completion in zip(prompts, completions, strict=True):
        if not completion.token_ids:
            continue
        ours = trainer_logprobs(model, prompt, completion.token_ids, sampling.temperature)
        diffs.append((ours - torch.tensor(completion.logprobs)).abs())
    if not diffs:
        raise ValueError("logprob_mismatch: the engine generated no tokens to compare")
    diff = torch.cat(diffs)
    return LogprobCheck(diff.mean().item(), diff.max().item(), diff.numel())
