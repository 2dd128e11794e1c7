"""Everything that starts work: the `dldkd` command, Ray Train and Tune jobs, validate, report."""
