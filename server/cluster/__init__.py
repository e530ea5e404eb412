"""Several server processes, one run per session: leases with fencing tokens,
acknowledged cross-node cancels, run events any node can serve
(docs/cluster.md)."""
