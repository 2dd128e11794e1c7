"""`dldkd validate`: the checks, the per-worker memory model, and what is printed."""
