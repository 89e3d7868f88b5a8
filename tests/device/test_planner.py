"""The planner never exceeds the budget it was given (property test), and steps down sensibly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.device.memory_model import Arch, Plan, predict_peak
from edge_runtime.device.planner import Capabilities, PlanError, Request, choose_plan, step_seconds
from edge_runtime.methods import METHODS

MINILM = Arch("bert", 6, 384, 1536, 12, 12, 30522, 512, False)
SMOLLM2 = Arch("llama", 30, 576, 1536, 9, 3, 49152, 8192, True)


@settings(max_examples=150, deadline=None)
@given(budget=st.integers(min_value=50 * 2**20, max_value=80 * 2**30),
       arch=st.sampled_from([MINILM, SMOLLM2]),
       method=st.sampled_from(["lora", "fdlora", "fedpeptao"]),
       task=st.sampled_from(["classification", "causal-lm"]),
       caps=st.builds(Capabilities, accelerator=st.sampled_from(["cpu", "cuda"]), fp16=st.booleans(),
                      bitsandbytes=st.booleans()),
       batch=st.sampled_from([1, 4, 16, 32]), seq=st.sampled_from([32, 64, 256]),
       margin=st.floats(min_value=0.0, max_value=0.5))
def test_never_over_budget(budget, arch, method, task, caps, batch, seq, margin):
    req = Request(prompt_like=METHODS[method].prompt_like, adapter_copies=METHODS[method].adapter_copies, task=task,
                  batch_size=batch, seq_len=seq)
    try:
        choice = choose_plan(arch, budget, req, caps, margin=margin)
    except PlanError as exc:
        assert "no plan fits" in str(exc)
        return
    assert choice.predicted.total <= budget * (1 - margin)
    assert choice.predicted == predict_peak(arch, choice.plan, task, req.num_labels)
    p = choice.plan
    assert p.batch_size == batch and p.step_batch <= batch and p.seq_len <= seq and p.rank <= req.rank
    if not caps.bitsandbytes:
        assert p.quantization in ("fp32", "fp16")


def test_a_roomy_device_gets_the_request_as_asked():
    choice = choose_plan(MINILM, 16 * 2**30, Request(batch_size=16, seq_len=64))
    assert choice.plan == Plan(quantization="fp32", rank=8, batch_size=16, seq_len=64)
    assert len(choice.reasons) == 2   # nothing given up


def test_a_tight_device_steps_down_and_says_why():
    roomy = choose_plan(SMOLLM2, 64 * 2**30, Request(task="causal-lm", batch_size=32, seq_len=256))
    tight_budget = int(roomy.predicted.total * 0.6)
    tight = choose_plan(SMOLLM2, tight_budget, Request(task="causal-lm", batch_size=32, seq_len=256), margin=0.0)
    assert tight.predicted.total <= tight_budget < roomy.predicted.total
    assert tight.plan != roomy.plan and any("to fit" in r or "checkpointing" in r for r in tight.reasons)
    # quantization is only used where bitsandbytes runs, and then it lets the sequence length stay
    q = choose_plan(SMOLLM2, tight_budget, Request(task="causal-lm", batch_size=32, seq_len=256),
                    Capabilities(bitsandbytes=True), margin=0.0)
    assert q.plan.seq_len >= tight.plan.seq_len


def test_an_impossible_budget_is_a_clear_error():
    with pytest.raises(PlanError, match="no plan fits .* the smallest, fp32"):
        choose_plan(SMOLLM2, 100 * 2**20, Request(task="causal-lm"))


def test_more_memory_never_gives_a_worse_plan():
    req = Request(task="causal-lm", batch_size=16, seq_len=128)
    last = None
    for gib in (1, 1.5, 2, 3, 4, 8, 16):
        try:
            p = choose_plan(SMOLLM2, int(gib * 2**30), req).plan
        except PlanError:
            continue
        key = (p.seq_len, p.rank, -step_seconds(SMOLLM2, p, Capabilities()))   # longer, richer, then faster
        assert last is None or key >= last
        last = key


def test_a_device_short_of_memory_keeps_the_batch_and_runs_it_in_micro_batches():
    req = Request(task="causal-lm", batch_size=32, seq_len=128)
    roomy = choose_plan(SMOLLM2, 64 * 2**30, req)
    assert (roomy.plan.batch_size, roomy.plan.micro_batch, roomy.plan.step_batch) == (32, 0, 32)
    # room for the weights and about a quarter of the batch's activations
    whole, quarter = (predict_peak(SMOLLM2, Plan(batch_size=32, micro_batch=m, seq_len=128), "causal-lm").total
                      for m in (0, 8))
    assert quarter < whole
    tight = choose_plan(SMOLLM2, int(quarter * 1.01), req, margin=0.0)
    assert tight.plan.batch_size == 32 and tight.plan.micro_batch == 8 and tight.plan.seq_len == 128
    assert any("micro-batches of 8 to fit (the batch of 32 kept" in r for r in tight.reasons)
    # a micro-batch is priced as the batch of its size: the activations and logits of 8 examples
    eight = predict_peak(SMOLLM2, Plan(batch_size=8, seq_len=128), "causal-lm")
    assert (eight.activations, eight.logits) == (predict_peak(SMOLLM2, Plan(batch_size=32, micro_batch=8, seq_len=128),
                                                              "causal-lm").activations, eight.logits)


def test_step_down_halves_the_micro_batch_then_recomputes_then_shortens():
    from edge_runtime.device.planner import plan_overrides, step_down

    p = Plan(batch_size=16, seq_len=64)
    seen = []
    while p is not None:
        seen.append((p.step_batch, p.checkpointing, p.seq_len))
        assert p.batch_size == 16                       # the optimizer's batch never changes
        p = step_down(p)
    # micro-batches under 4 come after checkpointing: tiny matmuls run far below the FLOP rate
    assert seen == [(16, False, 64), (8, False, 64), (4, False, 64), (4, True, 64), (2, True, 64),
                    (1, True, 64), (1, True, 32), (1, True, 16)]
    assert plan_overrides(Plan(batch_size=16, micro_batch=4))["train"] == {
        "batch_size": 16, "micro_batch_size": 4, "max_seq_len": 64, "gradient_checkpointing": False}


def test_checkpointing_comes_before_micro_batches_under_4():
    req = Request(task="causal-lm", batch_size=32, seq_len=128)
    at = {(m, c): predict_peak(SMOLLM2, Plan(batch_size=32, micro_batch=m, seq_len=128, checkpointing=c),
                               "causal-lm").total for m in (0, 4, 2) for c in (False, True)}
    budget = int(max(at[(2, False)], at[(4, True)]) * 1.001)   # room for either, not for 4 without recompute
    assert at[(4, False)] > budget
    choice = choose_plan(SMOLLM2, budget, req, margin=0.0)
    assert choice.plan.checkpointing and choice.plan.step_batch >= 4   # not micro-batches of 2
    roomier = choose_plan(SMOLLM2, int(at[(4, False)] * 1.001), req, margin=0.0)
    assert roomier.plan.step_batch >= 4 and not roomier.plan.checkpointing   # no recompute where 4 fit
