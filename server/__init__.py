"""shallowmark.server: the gRPC service (``shallowmark serve``).

Modules: :mod:`.config` (ServerConfig, TOML), :mod:`.auth` (bearer tokens -> tenants),
:mod:`.validation` (safe image decoding, request checks), :mod:`.ledger` (embed records),
:mod:`.attestation` (Ed25519 signing of Verify results), :mod:`.servicer` (the RPCs and the model
pool), :mod:`.batching` (micro-batching of concurrent model jobs), :mod:`.errors` (job failures
mapped to status codes), :mod:`.app` (server lifecycle: health, reflection, TLS, graceful
shutdown), :mod:`.metrics` (Prometheus metrics, the call observer), :mod:`.logs` (request ids,
structured logs), :mod:`.loadtest` (``shallowmark loadtest``).

Importing this package does not import torch; the models load when the server starts.
"""
