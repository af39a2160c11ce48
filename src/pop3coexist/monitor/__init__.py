"""Monitoring: the metrics (Prometheus, multi-process), the /metrics and /healthz HTTP
listener, and the mail log; all fed by the mail events of ``pop3coexist.events``."""
