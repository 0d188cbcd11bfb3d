"""rdzv: fast, elastic rendezvous for distributed training launchers, on etcd v3."""
