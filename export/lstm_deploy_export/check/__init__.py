"""Check: `lstm-deploy validate`: the runtime registry, the sweep, the references, the report."""
