"""Stage two's commands: train-head, sweep, evaluate, report, suggest, export, init."""
