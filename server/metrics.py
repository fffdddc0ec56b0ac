"""Prometheus metrics of one server: `jalora serve --metrics-port P` serves them over HTTP on the server's host.

Names are vLLM's where vLLM has the metric, under a `jalora:` prefix (a counter `jalora:x` is exposed as
`jalora:x_total`, as vLLM's are), plus jalora's own: prefix-cache hits split by the key of the block they
hit (base-keyed blocks hold the base model's KV and serve every adapter), evictions, the activation
index of aLoRA requests, compilations of step variants, and the host-memory KV tier (hits, bytes moved
each way, blocks held).

The numbers come from two places, both on the engine thread (server/engine_worker.py calls `observe`
after every step, request added and abort, before the step's deltas go out, so whatever a client has
received is already counted):
- the engine's `EngineStats` snapshot (load, token and prefix-cache counters, compilations): a scrape
  reads the latest one and never waits for the engine, which may be busy compiling;
- each request's final `FinishedRequest` (finish reason, the engine's timings from its receipt of the
  request) and the time each of its tokens came out of a step (inter-token latency).

Each server has a `CollectorRegistry` of its own, not prometheus_client's global one, so several
servers in one process keep their numbers apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jalora.engine.interface import EngineStats
from jalora.outputs import FinishedRequest, RequestDelta

PREFIX = "jalora:"
FINISH_REASONS = ("stop", "length", "abort")

# Seconds: from a decode step on a fast accelerator to a long prompt on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
POSITION_BUCKETS = tuple(2**k for k in range(4, 18))  # tokens, 16 .. 131072


class ServerMetrics:
    """The registry of one server, the `StepObserver` that fills it, and its HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The latest snapshot and its time.time(), replaced whole by the engine thread, read by scrapes.
        self.latest: tuple[EngineStats, float] | None = None
        self._last_token: dict[str, float] = {}  # engine thread: when each running request's last token came
        r = self.registry
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests, by finish reason (stop, length, abort).",
            ["finished_reason"], registry=r,
        )  # fmt: skip
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from the engine's receipt of a request to its first token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between two consecutive tokens of a request.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from the engine's receipt of a request to its end.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time a request waited before its first step.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.alora_activation_position = Histogram(
            PREFIX + "alora_activation_position", "Activation index of aLoRA requests: the prompt tokens before "
            "it are computed with base weights, so their full blocks are keyed (and shared) like the base "
            "model's.", buckets=POSITION_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineStatsCollector(self))
        self._http = None
        self._http_thread: threading.Thread | None = None

    # ---- engine thread (EngineWorker's StepObserver) ----------------------------------------------

    def observe(self, stats: EngineStats, deltas: Sequence[RequestDelta], now: float) -> None:
        self.latest = (stats, time.time())
        for delta in deltas:
            if delta.token_ids:
                last = self._last_token.get(delta.request_id)
                if last is not None:
                    self.inter_token_latency.observe(now - last)
                self._last_token[delta.request_id] = now
            if delta.finished is not None:
                self._last_token.pop(delta.request_id, None)
                self._finished(delta.finished)

    def _finished(self, f: FinishedRequest) -> None:
        m = f.metrics
        self.request_success.labels(f.finish_reason).inc()
        if m.finished_time is not None:
            self.e2e_request_latency.observe(m.finished_time - m.arrival_time)
        if m.first_token_time is not None:
            self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.request_queue_time.observe(m.first_scheduled_time - m.arrival_time)
        # activation_start is 0 for a plain LoRA (every token adapted) and None for the base model.
        if f.adapter is not None and f.activation_start:
            self.alora_activation_position.observe(f.activation_start)

    # ---- the HTTP endpoint ------------------------------------------------------------------------

    def start_http(self, host: str, port: int) -> int:
        """Serves the registry on host:port (any path; Prometheus scrapes /metrics); returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join()
            self._http = self._http_thread = None


class _EngineStatsCollector(Collector):
    """The metrics read from the latest EngineStats snapshot, built at each scrape."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def describe(self) -> list:
        return []  # the names depend on nothing registered elsewhere; collect() builds them per scrape

    def collect(self) -> Iterator:
        latest = self._metrics.latest
        if latest is None:  # the engine thread has not started
            return
        s, taken = latest

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        def counter_by(name: str, doc: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
            """One counter per value of `label`."""
            family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            return family

        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.num_requests_running)
        yield gauge("num_requests_waiting", "Requests waiting for their first (or, preempted, next) step.",
                    s.num_requests_waiting)  # fmt: skip
        yield gauge("kv_cache_usage_perc", "KV-cache usage: the share of blocks held by requests (1 = 100 percent).",
                    s.kv_cache_usage)  # fmt: skip
        yield counter("prompt_tokens", "Prompt tokens of the requests that got their first token.", s.prompt_tokens)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens)
        yield counter("num_preemptions", "Running requests sent back to wait (their KV is recomputed).",
                      s.num_preemptions)  # fmt: skip
        yield counter("prefix_cache_queries", "Prefix-cache queries, in tokens: each request's tokens at its "
                      "first admission.", s.prefix_cache_queries)  # fmt: skip
        yield counter("prefix_cache_hits", "Prefix-cache hits, in tokens: the prompt tokens whose KV was found.",
                      s.prefix_cache_hits)  # fmt: skip
        by_key = CounterMetricFamily(
            PREFIX + "prefix_cache_hits_by_block_key",
            "Prefix-cache hits in tokens, by the key of the block hit (base: the base model's KV, which every "
            "adapter shares; adapter: one adapter's KV) and by the kind of request that hit it.",
            labels=["block_key", "request"],
        )
        by_key.add_metric(["base", "base"], s.prefix_cache_hits_base_keyed - s.prefix_cache_hits_base_keyed_by_adapters)
        by_key.add_metric(["base", "adapter"], s.prefix_cache_hits_base_keyed_by_adapters)
        by_key.add_metric(["adapter", "adapter"], s.prefix_cache_hits_adapter_keyed)
        yield by_key
        yield counter("prefix_cache_evictions", "Cached KV blocks overwritten to make room.", s.prefix_cache_evictions)
        yield gauge("prefix_cache_blocks", "KV blocks findable in the prefix cache.", s.num_cached_blocks)
        yield counter("host_kv_cache_hits", "Prefix-cache hits, in tokens, served by copying KV blocks back from "
                      "the host-memory tier (included in prefix_cache_hits).", s.host_kv_cache_hits)  # fmt: skip
        yield counter_by(
            "host_kv_cache_bytes", "Bytes of KV blocks copied between the device and the host-memory tier, by "
            "direction (to_host: evicted from the device; to_device: copied back on a hit).", "direction",
            {"to_host": s.host_kv_cache_bytes_to_host, "to_device": s.host_kv_cache_bytes_to_device},
        )  # fmt: skip
        yield gauge("host_kv_cache_blocks", "KV blocks held in the host-memory tier.", s.host_kv_cache_blocks)
        yield gauge("host_kv_cache_capacity_blocks", "KV blocks the host-memory tier can hold (0: it is off).",
                    s.host_kv_cache_capacity_blocks)  # fmt: skip
        yield gauge("session_retained_blocks", "KV blocks pipeline sessions keep from eviction.", s.num_retained_blocks)
        yield gauge("sessions", "Live pipeline sessions.", s.num_sessions)
        yield counter_by(
            "sessions_ended", "Pipeline sessions ended by their TTL (expired) or to make room for another "
            "session's blocks (evicted); sessions ended by a call or a request are not counted.", "reason",
            {"expired": s.sessions_expired, "evicted": s.sessions_evicted},
        )  # fmt: skip
        yield counter_by(
            "step_compilations", "First uses of a compiled step variant (a compilation, or a load from JAX's "
            "persistent cache), in the warm-up or while serving (where requests waited for it).", "phase",
            {"warmup": s.warmup_compilations, "serving": s.compilations},
        )  # fmt: skip
        yield counter_by("step_compile_seconds", "Seconds spent in first uses of step variants.", "phase",
                         {"warmup": s.warmup_compile_seconds, "serving": s.compile_seconds})  # fmt: skip
        yield gauge("lora_adapters_loaded", "Adapters loaded (held in host memory; up to max_cpu_loras).",
                    s.num_adapters_loaded)  # fmt: skip
        yield gauge("lora_adapters_resident", "Loaded adapters that hold a device slot (up to max_loras).",
                    s.num_adapters_resident)  # fmt: skip
        yield counter("lora_swaps", "Adapters written into a device slot on demand because more adapters are loaded "
                      "than slots.", s.adapter_swaps)  # fmt: skip
        yield counter("lora_swap_seconds", "Host seconds spent issuing adapter swaps (the copies to the device "
                      "are enqueued, not waited for).", s.adapter_swap_seconds)  # fmt: skip
        info = GaugeMetricFamily(
            PREFIX + "lora_requests_info", "Adapters of running and waiting requests (names, comma-separated); "
            "the value is the time of the snapshot.", labels=["max_lora", "waiting_lora_adapters",
                                                              "running_lora_adapters"],
        )  # fmt: skip
        labels = [str(s.max_loras), ",".join(s.waiting_adapters), ",".join(s.running_adapters)]
        info.add_metric(labels, taken)
        yield info
