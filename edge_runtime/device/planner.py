"""Choose a training plan that fits a device: quantization, LoRA rank, micro-batch, sequence length,
gradient checkpointing, at the training profile's layer-drop ratio (DropPEFT; the server's
configurator picks the ratio per device, among those that fit). The batch itself is the training
profile's: a device short of memory runs it in micro-batches (``train.micro_batch_size``), which
takes the same optimizer step with fewer activations alive, so its update stays the fleet's kind.

Every candidate is priced by :mod:`edge_runtime.device.memory_model` and by the time model
(:func:`predict_train_seconds`: the plan's FLOPs at the device's measured matmul speed); those whose predicted peak
stays under ``budget x (1 - margin)`` are ranked by what they keep of the training profile's
request (sequence length first, as truncation loses data; then weight precision; then rank), then
by estimated throughput (micro-batches cost no FLOPs, checkpointing a third more), then by the
largest micro-batch; micro-batches of fewer than :data:`SMALL_MICRO` examples come only after
checkpointing. The choice comes with its reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from edge_runtime.device.memory_model import Arch, Breakdown, Coefficients, Plan, predict_peak
from edge_runtime.device.profiler import format_size
from edge_runtime.errors import ConfigError

QUALITY = {"fp32": 3, "fp16": 3, "int8": 2, "nf4": 1}   # fp16 on a GPU loses ~nothing for training adapters
SLOWDOWN = {"fp32": 1.0, "fp16": 0.5, "int8": 1.6, "nf4": 1.4}  # vs fp32 per FLOP (fp16: GPUs with fast half)
SMALL_MICRO = 4   # micro-batches below this many examples rank after checkpointing: tiny matmuls run far below
#                   the FLOP rate the time model assumes, and a step's fixed costs repeat per micro-batch
TRAIN_EFFICIENCY = 0.5   # the share of the matmul probe's speed training achieves, before a device measured its own


class PlanError(ConfigError):
    """No plan fits the budget."""


@dataclass(frozen=True)
class Capabilities:
    """What the device can run: from a live profile or a device class."""

    accelerator: str = "cpu"        # "cpu" or "cuda"
    fp16: bool = False
    bitsandbytes: bool = False
    gflops_fp32: float = 50.0


@dataclass(frozen=True)
class Request:
    """What the training profile asks for (the planner never goes above it)."""

    prompt_like: bool = False       # the method's traits (edge_runtime.methods.base.Method)
    adapter_copies: int = 1
    task: str = "classification"
    num_labels: int = 26
    rank: int = 8
    prompt_length: int = 20
    batch_size: int = 16
    micro_batch: int = 0            # train.micro_batch_size as asked (0: the whole batch)
    seq_len: int = 64
    layer_drop: float = 0.0
    fixed_rank: bool = False        # a federated device must keep the fleet's adapter shapes
    top_blocks: int = 0             # lora.top_blocks (the adapter's layout: the planner keeps it)
    cached: bool = False            # train.cache_frozen


@dataclass(frozen=True)
class PlanChoice:
    plan: Plan
    predicted: Breakdown
    budget: int
    limit: int                      # budget x (1 - margin)
    seconds_per_step: float         # estimate, for ranking
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"plan": asdict(self.plan), "predicted": self.predicted.as_dict(), "budget": self.budget,
                "limit": self.limit, "seconds_per_step": self.seconds_per_step, "reasons": list(self.reasons)}


def _halvings(top: int, floor: int) -> list[int]:
    out, v = [], top
    while v >= floor:
        out.append(v)
        v //= 2
    return out or [top]


def train_flops(arch: Arch, plan: Plan, tokens: float) -> float:
    """The blocks' linear-layer FLOPs of training on ``tokens`` (padding included) under ``plan``:
    a forward pass through the blocks that run (with the frozen cache, only those from the lowest
    adapted block up), the input gradients back through the adapted blocks (a frozen weight gets no
    weight gradient, LoRA's are ~1% of it), and a recomputed forward with checkpointing."""
    trained = plan.trained_layers(arch)
    forward = trained if plan.cached else plan.kept_layers(arch)
    passes = forward + trained + (forward if plan.checkpointing else 0)
    return 2.0 * arch.block_linear_params() * passes * tokens


def predict_train_seconds(arch: Arch, plan: Plan, caps: Capabilities, tokens: float,
                          efficiency: float = TRAIN_EFFICIENCY) -> float:
    """A round's training seconds on ``tokens``: :func:`train_flops` at ``efficiency`` times the
    device's measured matmul speed (slower for a quantized base). ``efficiency`` is what training
    achieves of that peak: :data:`TRAIN_EFFICIENCY` until the device has measured its own
    (:func:`calibrate_efficiency` over its last round)."""
    speed = caps.gflops_fp32 * 1e9 / SLOWDOWN[plan.quantization]
    return train_flops(arch, plan, tokens) / (speed * efficiency)


def calibrate_efficiency(arch: Arch, plan: Plan, caps: Capabilities, tokens: float, seconds: float) -> float:
    """The efficiency a measured round implies (what :func:`predict_train_seconds` would have
    needed to predict ``seconds``)."""
    return predict_train_seconds(arch, plan, caps, tokens, 1.0) / max(seconds, 1e-9)


def step_seconds(arch: Arch, plan: Plan, caps: Capabilities) -> float:
    """One step of ``plan`` on full-length examples (the planner's ranking among equals)."""
    return predict_train_seconds(arch, plan, caps, plan.batch_size * plan.seq_len)


def candidates(req: Request, caps: Capabilities) -> list[Plan]:
    quants = ["fp32"]
    if caps.accelerator == "cuda" and caps.fp16:
        quants.append("fp16")
    if caps.bitsandbytes:
        quants += ["int8", "nf4"]
    ranks = [req.rank] if req.prompt_like or req.fixed_rank else _halvings(req.rank, 2)
    out = []
    for q in quants:
        for rank in ranks:
            for seq in _halvings(req.seq_len, 16):
                for mb in _halvings(min(req.micro_batch or req.batch_size, req.batch_size), 1):
                    for ckpt in (False, True):
                        out.append(Plan(quantization=q, prompt_like=req.prompt_like, adapter_copies=req.adapter_copies, rank=rank, prompt_length=req.prompt_length,
                                        batch_size=req.batch_size, micro_batch=0 if mb == req.batch_size else mb,
                                        seq_len=seq, layer_drop=req.layer_drop, checkpointing=ckpt,
                                        top_blocks=req.top_blocks, cached=req.cached))
    return out


def choose_plan(arch: Arch, budget: int, req: Request, caps: Capabilities = Capabilities(), margin: float = 0.15,
                coef: Coefficients = Coefficients()) -> PlanChoice:
    """The best plan whose predicted peak is under ``budget * (1 - margin)``; PlanError if none is."""
    if budget <= 0 or not 0 <= margin < 1:
        raise ConfigError(f"budget must be > 0 and margin in [0, 1), got {budget}, {margin}")
    limit = int(budget * (1 - margin))
    priced = [(p, predict_peak(arch, p, req.task, req.num_labels, coef)) for p in candidates(req, caps)]
    fitting = [(p, b) for p, b in priced if b.total <= limit]
    if not fitting:
        smallest = min(priced, key=lambda pb: pb[1].total)
        raise PlanError(f"no plan fits {format_size(limit)} ({format_size(budget)} less a {margin:.0%} margin): the "
                        f"smallest, {_describe(smallest[0])}, needs {format_size(smallest[1].total)}")

    def key(pb):
        p, _ = pb
        return (p.seq_len, QUALITY[p.quantization], p.rank, p.step_batch >= min(SMALL_MICRO, p.batch_size),
                -step_seconds(arch, p, caps), p.step_batch)

    plan, pred = max(fitting, key=key)
    reasons = [f"budget {format_size(budget)}, planning under {format_size(limit)} ({margin:.0%} margin)",
               f"chosen: {_describe(plan)}, predicted peak {format_size(pred.total)}"]
    asked = Plan(quantization="fp32", prompt_like=req.prompt_like, adapter_copies=req.adapter_copies, rank=req.rank, prompt_length=req.prompt_length,
                 batch_size=req.batch_size, micro_batch=req.micro_batch if req.micro_batch < req.batch_size else 0,
                 seq_len=req.seq_len, layer_drop=req.layer_drop,
                 top_blocks=req.top_blocks, cached=req.cached)
    if plan != asked:
        full = predict_peak(arch, asked, req.task, req.num_labels, coef)
        reasons.append(f"the request as asked ({_describe(asked)}) needs {format_size(full.total)}")
        for what, got, want in (("sequence length", plan.seq_len, req.seq_len), ("rank", plan.rank, req.rank)):
            if got != want:
                reasons.append(f"{what} {want} -> {got} to fit")
        if plan.step_batch != asked.step_batch:
            reasons.append(f"micro-batches of {plan.step_batch} to fit (the batch of {plan.batch_size} kept: "
                           f"the same step, fewer activations alive)")
        if plan.quantization != "fp32":
            reasons.append(f"base weights in {plan.quantization}: "
                           + ("faster on this GPU" if plan.quantization == "fp16" else "smaller, to fit"))
        if plan.checkpointing:
            reasons.append("gradient checkpointing: activations recomputed instead of stored (~33% more compute)")
    return PlanChoice(plan, pred, budget, limit, step_seconds(arch, plan, caps), tuple(reasons))


def step_down(plan: Plan, caps: Capabilities = Capabilities()) -> Plan | None:
    """The next smaller plan after an out-of-memory failure (None when nothing is left to give up):
    halve the micro-batch (the batch stays) down to :data:`SMALL_MICRO` examples, then recompute
    activations, then halve the micro-batch to 1, then halve the sequence, then quantize the base."""
    if plan.step_batch > min(SMALL_MICRO, plan.batch_size) or (plan.checkpointing and plan.step_batch > 1):
        return replace(plan, micro_batch=plan.step_batch // 2)
    if not plan.checkpointing:
        return replace(plan, checkpointing=True)
    if plan.seq_len > 16:
        return replace(plan, seq_len=max(16, plan.seq_len // 2))
    if caps.bitsandbytes and plan.quantization in ("fp32", "fp16"):
        return replace(plan, quantization="int8")
    if caps.bitsandbytes and plan.quantization == "int8":
        return replace(plan, quantization="nf4")
    return None


def plan_overrides(plan: Plan) -> dict:
    """A plan as device-profile overrides of a training spec (the adapter's layout untouched)."""
    return {"train": {"batch_size": plan.batch_size, "micro_batch_size": plan.micro_batch,
                      "max_seq_len": plan.seq_len, "gradient_checkpointing": plan.checkpointing},
            "quantization": plan.quantization if plan.quantization in ("nf4", "int8") else "fp32"}


def plan_of(spec, method) -> Plan:
    """The plan a training spec runs (what a step-down starts from); ``method`` is the spec's
    :class:`~edge_runtime.methods.base.Method`, whose traits shape the adapter and the layer drop."""
    return Plan(quantization=spec.quantization, prompt_like=method.prompt_like, adapter_copies=method.adapter_copies,
                rank=spec.lora.rank, prompt_length=spec.prompt.length or 20, batch_size=spec.train.batch_size,
                micro_batch=spec.train.micro_batch_size, seq_len=spec.train.max_seq_len, layer_drop=method.layer_dropout(spec),
                checkpointing=spec.train.gradient_checkpointing, top_blocks=spec.lora.top_blocks,
                cached=_cached(spec, method))


def _describe(p: Plan) -> str:
    adapter = f"prompts {p.prompt_length}" if p.prompt_like else f"rank {p.rank}"
    micro = f" in micro-batches of {p.step_batch}" if p.step_batch < p.batch_size else ""
    return (f"{p.quantization}, {adapter}, batch {p.batch_size}{micro}, seq {p.seq_len}"
            + (", checkpointing" if p.checkpointing else "") + (f", layer-drop {p.layer_drop}" if p.layer_drop else ""))


def request_from_spec(spec, method) -> Request:
    """The request a :class:`~edge_runtime.training.spec.TrainingSpec` makes (``method``: its
    :class:`~edge_runtime.methods.base.Method`)."""
    return Request(prompt_like=method.prompt_like, adapter_copies=method.adapter_copies, task=spec.task, num_labels=max(len(spec.labels), 2), rank=spec.lora.rank,
                   prompt_length=spec.prompt.length or 20, batch_size=spec.train.batch_size,
                   micro_batch=spec.train.micro_batch_size, seq_len=spec.train.max_seq_len,
                   layer_drop=method.layer_dropout(spec), fixed_rank=True,
                   top_blocks=spec.lora.top_blocks, cached=_cached(spec, method))


def _cached(spec, method) -> bool:
    """Whether the spec's training replays the frozen blocks: the cache on, the adapter above the bottom
    block, and a method whose blocks all run every step (DropPEFT's do not; prompts sit below them)."""
    return bool(spec.train.cache_frozen and spec.lora.top_blocks and not method.prompt_like
                and method.name != "droppeft")
