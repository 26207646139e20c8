"""Flower-side pieces shared by the apps: strategies and their wrappers, the ordered grid,
the federated-statistics protocol, and what a node knows about itself (partition, privacy state)."""
