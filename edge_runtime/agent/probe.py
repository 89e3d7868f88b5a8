"""What this device can run and how fast, measured once: by the agent's warm-up thread while the
device waits for its first manifest, or by the first round that needs it.

The warm-up also imports what building a model needs (peft pulls in bitsandbytes: seconds on a
small CPU), so the first round does not. A round waits for a running warm-up
(:meth:`DeviceProbe.wait`): what it is doing the round would do anyway, and the matmul probe then
never shares the CPU with the round's decoding.
"""

from __future__ import annotations

import logging
import threading
import time

from edge_runtime.agent.config import AgentConfig
from edge_runtime.device.planner import Capabilities
from edge_runtime.device.profiler import profile_device
from edge_runtime.service import lifecycle
from edge_runtime.training.models import bitsandbytes_problem

log = logging.getLogger("edge_runtime.agent")
WARM_UP_WAIT_S = 300.0   # the longest a round waits for the warm-up (imports on a slow SD card)


def import_model_libraries() -> None:
    """What building a model imports (peft, transformers' auto classes): seconds on a small CPU."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401


class DeviceProbe:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.device = None                      # (capabilities, training memory), measured once
        self.peak: float | None = None          # measured fp32 matmul GFLOP/s
        self.warm_up_s: float | None = None     # seconds the warm-up took (None: not done, or failed)
        self._lock = threading.Lock()           # the warm-up thread and a round may both ask
        self._idle = threading.Event()          # set: no warm-up is running
        self._idle.set()

    def capabilities(self):
        """(what this device can run, its training memory), profiled on the first call."""
        with self._lock:
            if self.device is None:
                prof = profile_device(memory_budget=self.cfg.memory_budget, disk_path=self.cfg.state_dir)
                caps = Capabilities("cuda" if prof.cuda else "cpu", False, bitsandbytes_problem() is None,
                                    prof.gflops_fp32 or 50.0)   # fp16 training is not a plan option yet
                self.device, self.peak = (caps, prof.training_memory), prof.gflops_fp32
            return self.device

    def start_warm_up(self) -> None:
        """:meth:`warm_up` in a daemon thread (``--no-warm-up``: nothing)."""
        if self.cfg.warm_up:
            self._idle.clear()
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()

    def warm_up(self) -> None:
        """The device profile (``--plan auto``), then the model libraries' imports. A failure only
        costs the head start: logged, and the round does it (and reports it) again."""
        t0 = time.perf_counter()
        try:
            if self.cfg.plan == "auto":
                self.capabilities()
            import_model_libraries()
            self.warm_up_s = time.perf_counter() - t0
            log.info("warmed up in %.1f s (device profile, model libraries)", self.warm_up_s)
        except Exception as exc:   # never stops the agent
            log.warning("warm-up failed (the first round will do it): %s: %s", type(exc).__name__, exc)
        finally:
            self._idle.set()

    def wait(self) -> None:
        """Until a running warm-up ends (at most ``WARM_UP_WAIT_S``), telling the service watchdog
        the agent is alive meanwhile; a stop request ends the wait (``lifecycle.Interrupted``)."""
        deadline = time.monotonic() + WARM_UP_WAIT_S
        while not self._idle.wait(0.5):
            lifecycle.progress()
            if time.monotonic() > deadline:
                log.warning("the warm-up has not finished after %.0f s; the round goes ahead", WARM_UP_WAIT_S)
                return
