"""The daemon's operations listener: Prometheus metrics, health, the status page and the git webhook
(docs/architecture.md "Monitoring"). Imports nothing, so importing one pure module loads only it."""
