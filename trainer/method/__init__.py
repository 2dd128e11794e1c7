"""The maths of docs/method.md: student, dropout, losses and teacher targets, schedules, optimizer,
metrics. Pure torch: no I/O, no collectives, no Ray."""
