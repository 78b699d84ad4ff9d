"""Counters the engine keeps, rendered as Prometheus text for ``GET /metrics``.

Hand-written rather than ``prometheus_client``: a dozen series do not justify a dependency,
and the engine thread only ever adds to plain ints (atomic enough under the GIL for metrics).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        lines += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return lines


@dataclass
class EngineStats:
    requests: int = 0  # finished requests
    rejected: int = 0  # refused because the queue was full
    aborted: int = 0  # cancelled (client disconnected)
    prompt_tokens: int = 0  # prompt positions prefilled (counted chunk by chunk)
    prefill_chunks: int = 0  # prefill forwards (one per chunk of a prompt)
    generation_tokens: int = 0
    steps: int = 0
    restarts: int = 0  # engine loop restarts after a failed step
    finished: dict[str, int] = field(default_factory=dict)  # choices by finish reason
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    step_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def observe_step(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self.batch_size.observe(rows)
        self.step_time.observe(seconds)


def _metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]


def render(stats: EngineStats, running: int, waiting: int, http_errors: dict[int, int],
           kv_tokens: int | None = None, kv_budget: int | None = None, prefilling: int = 0) -> str:
    lines: list[str] = []
    lines += _metric("llmslim_requests_running", "gauge", "Sequences in the running batch.", running)
    lines += _metric("llmslim_requests_prefilling", "gauge", "Requests admitted whose prompt is being prefilled.",
                     prefilling)
    lines += _metric("llmslim_requests_waiting", "gauge", "Requests in the queue.", waiting)
    if kv_tokens is not None:
        lines += _metric("llmslim_kv_tokens", "gauge", "KV cache positions the running batch may reach.", kv_tokens)
    if kv_budget is not None:
        lines += _metric("llmslim_kv_tokens_budget", "gauge", "KV cache positions allowed (--max-kv-*).", kv_budget)
    lines += _metric("llmslim_engine_restarts_total", "counter", "Engine loop restarts after a failed step.",
                     stats.restarts)
    lines += _metric("llmslim_requests_total", "counter", "Requests finished.", stats.requests)
    lines += _metric("llmslim_requests_rejected_total", "counter", "Requests refused, queue full.", stats.rejected)
    lines += _metric("llmslim_requests_aborted_total", "counter", "Requests cancelled by the client.", stats.aborted)
    lines += _metric("llmslim_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens)
    lines += _metric("llmslim_prefill_chunks_total", "counter", "Prefill forwards (chunks of prompts).",
                     stats.prefill_chunks)
    lines += _metric("llmslim_generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens)
    lines += _metric("llmslim_decode_steps_total", "counter", "Batched decode steps.", stats.steps)
    lines += ["# HELP llmslim_choices_finished_total Choices finished, by reason.",
              "# TYPE llmslim_choices_finished_total counter"]
    lines += [f'llmslim_choices_finished_total{{reason="{k}"}} {v}' for k, v in sorted(stats.finished.items())]
    lines += ["# HELP llmslim_http_errors_total Error responses, by status.",
              "# TYPE llmslim_http_errors_total counter"]
    lines += [f'llmslim_http_errors_total{{status="{k}"}} {v}' for k, v in sorted(http_errors.items())]
    lines += stats.ttft.render("llmslim_time_to_first_token_seconds", "Arrival to first generated token.")
    lines += stats.latency.render("llmslim_request_latency_seconds", "Arrival to last token.")
    lines += stats.step_time.render("llmslim_decode_step_seconds", "Time of one batched decode step.")
    lines += stats.batch_size.render("llmslim_batch_size", "Rows per decode step.")
    return "\n".join(lines) + "\n"
