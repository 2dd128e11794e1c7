"""The jobs dldkd starts: a training run (Ray Train), a sweep (Ray Tune), the demo, `ray job
submit`, and the lease that allows one launch per run."""
